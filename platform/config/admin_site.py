"""The operators' console: Django admin with the pages an operator runs the business from."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, URLResolver, path

from accounts.login_protection import ThrottledAdminAuthenticationForm, throttled_login_response


class PlatformAdminSite(admin.AdminSite):
    site_header = "Platform operations"
    site_title = "Platform operations"
    index_title = "Run the business"
    index_template = "admin/platform_index.html"
    # The same failure counts as /auth/login (accounts/login_protection.py): one account, one limit.
    login_form = ThrottledAdminAuthenticationForm

    def login(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        return throttled_login_response(super().login(request, extra_context))

    def get_urls(self) -> list[URLResolver | URLPattern]:
        from dashboard.operator import run_rate

        extra: list[URLResolver | URLPattern] = [
            path("run-rate/", self.admin_view(run_rate), {"site": self}, name="run-rate"),
        ]
        return extra + super().get_urls()
