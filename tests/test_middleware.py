from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from config.middleware import API_PATH_PREFIXES

pytestmark = pytest.mark.django_db


def test_api_paths_skip_the_browser_middleware(tenant: dict[str, Any]) -> None:
    response = tenant["client"].get("/v1/me")
    assert response.status_code == 200
    assert not response.cookies  # no session or CSRF cookie is ever set for a key-authenticated call
    assert "X-Frame-Options" not in response
    assert not hasattr(response.wsgi_request, "session")


def test_pages_keep_sessions_csrf_and_framing_rules(db: None, settings: Any) -> None:
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
    response = Client().get("/admin/login/")
    assert response.status_code == 200
    assert response["X-Frame-Options"] == "DENY"
    assert "csrftoken" in response.cookies
    assert hasattr(response.wsgi_request, "session")


def test_the_api_prefixes_cover_every_api_route() -> None:
    assert {"/v1/", "/queue/", "/run/", "/files/"} <= set(API_PATH_PREFIXES)
