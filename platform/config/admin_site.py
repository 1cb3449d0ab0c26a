"""The operators' console: Django admin with the pages an operator runs the business from."""

from __future__ import annotations

from django.contrib import admin
from django.urls import URLPattern, URLResolver, path


class PlatformAdminSite(admin.AdminSite):
    site_header = "Platform operations"
    site_title = "Platform operations"
    index_title = "Run the business"
    index_template = "admin/platform_index.html"

    def get_urls(self) -> list[URLResolver | URLPattern]:
        from dashboard.operator import run_rate

        extra: list[URLResolver | URLPattern] = [
            path("run-rate/", self.admin_view(run_rate), {"site": self}, name="run-rate"),
        ]
        return extra + super().get_urls()
