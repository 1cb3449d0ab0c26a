"""Health, readiness and the API's own description."""

from __future__ import annotations

import re

import pytest
from django.test import Client

from config.celery import app as celery_app

pytestmark = pytest.mark.django_db

CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


def test_healthz_is_ok_without_credentials() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_broker_and_cache() -> None:
    response = Client().get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "cache": "ok"}}


def test_readyz_is_503_when_the_broker_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    # A real failed connection to a closed port, not a mocked check.
    monkeypatch.setattr(celery_app.conf, "broker_url", CLOSED_PORT_BROKER)
    response = Client().get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["cache"] == "ok"
    assert body["checks"]["broker"].startswith("error: ")
    assert "127.0.0.1" not in body["checks"]["broker"]  # the kind of failure only, no addresses


def test_readyz_recovers_when_the_broker_is_back(monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(celery_app.conf, "broker_url", CLOSED_PORT_BROKER)
        assert Client().get("/readyz").status_code == 503
    assert celery_app.conf.broker_url != CLOSED_PORT_BROKER
    assert Client().get("/readyz").status_code == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_answer_only_get(path: str) -> None:
    assert Client().post(path).status_code == 405


def test_openapi_schema_describes_the_platform_api() -> None:
    response = Client().get("/v1/openapi.json")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/")
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert {"/v1/me", "/v1/keys", "/v1/keys/{id}"} <= set(schema["paths"])
    assert set(schema["paths"]["/v1/keys"]) >= {"get", "post"}
    assert set(schema["paths"]["/v1/keys/{id}"]) >= {"get", "delete"}
    scheme = schema["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": scheme["description"],
    }
    assert {"ApiKey": []} in schema["paths"]["/v1/me"]["get"]["security"]


@pytest.mark.usefixtures("unhashed_static_files")
@pytest.mark.parametrize(
    "path",
    [
        "/v1/docs",
    ],
)
def test_api_docs_are_served_from_local_static_files(path: str) -> None:
    response = Client().get(path)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    page = response.content.decode()
    for cdn in ("cdn.", "unpkg", "jsdelivr", "cdnjs", "googleapis"):
        assert cdn not in page
    scripts = re.findall(r'<script[^>]+src="([^"]+)"', page)
    assert scripts
    # The vendored Swagger UI from /static/, and its start-up script from the app itself (no inline script).
    assert all(src.startswith(("/static/", "/v1/docs?script")) for src in scripts), scripts
    assert "/v1/openapi.json" in page or "/v1/docs?script" in page


def test_the_root_leads_to_the_dashboard() -> None:
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"] == "/dashboard/"
