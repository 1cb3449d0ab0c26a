"""Every HTML page carries a strict Content-Security-Policy and refuses to be framed, the API's docs page
included; no page needs inline script or style to work under it; production cookies are secure, with HSTS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from accounts.models import User
from inference.models import Endpoint
from tests.lifecycle import run_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

REPO = Path(__file__).resolve().parents[1]
ANONYMOUS_PAGES = ["/auth/login", "/auth/signup", "/auth/password-reset", "/admin/login/", "/v1/docs"]
DASHBOARD_PAGES = [
    "/dashboard/",
    "/dashboard/playground",
    "/dashboard/requests",
    "/dashboard/usage",
    "/dashboard/keys",
    "/dashboard/members",
    "/dashboard/billing",
]
OPERATOR_PAGES = [
    "/admin/",
    "/admin/run-rate/",
    "/admin/accounts/organization/",
    "/admin/billing/stripeevent/",
    "/admin/inference/job/",
    "/admin/billing/reconciliationrun/",
]


def policy(response: Any) -> dict[str, list[str]]:
    directives = [part.split() for part in response["Content-Security-Policy"].split(";") if part.strip()]
    return {name: sources for name, *sources in directives}


class InlineCode(HTMLParser):
    """What a strict policy would refuse in a page: inline scripts, style elements and attributes, handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._in_inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script" and "src" not in named and named.get("type") != "application/json":
            self._in_inline_script = True
        if tag == "style":
            self.found.append("<style>")
        for name, value in attrs:
            if name == "style" or name.startswith("on"):
                self.found.append(f"<{tag} {name}={value!r}>")
            if name in ("href", "src", "action") and (value or "").strip().lower().startswith("javascript:"):
                self.found.append(f"<{tag} {name}={value!r}>")

    def handle_data(self, data: str) -> None:
        if self._in_inline_script and data.strip():
            self.found.append(f"<script>{data.strip()[:60]}")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_inline_script = False


def assert_protected_page(response: Any, path: str) -> None:
    assert response.status_code == 200, path
    assert response["Content-Type"].startswith("text/html"), path
    rules = policy(response)
    assert rules["default-src"] == ["'self'"], path
    assert rules["script-src"] == ["'self'"], path
    assert rules["style-src"] == ["'self'"], path
    assert rules["object-src"] == ["'none'"], path
    assert rules["base-uri"] == ["'none'"], path
    assert rules["frame-ancestors"] == ["'none'"], path
    assert response["X-Frame-Options"] == "DENY", path
    parser = InlineCode()
    parser.feed(response.content.decode())
    assert parser.found == [], (path, parser.found)


def test_pages_anyone_can_open_are_protected() -> None:
    client = Client()
    for path in ANONYMOUS_PAGES:
        assert_protected_page(client.get(path), path)


def test_the_developers_pages_are_protected(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    job = run_as(tenant, builtin_endpoint, gpu_ms=1_500)
    client = Client()
    client.force_login(tenant["user"])
    for path in [*DASHBOARD_PAGES, f"/dashboard/requests/{job.pk}", f"/dashboard/requests/{job.pk}/outcome"]:
        response = client.get(path)
        if path.endswith("/outcome"):  # a fragment the playground puts into its page: no policy of its own needed
            parser = InlineCode()
            parser.feed(response.content.decode())
            assert parser.found == [], parser.found
            continue
        assert_protected_page(response, path)


def test_the_operators_pages_are_protected(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    run_as(tenant, builtin_endpoint, gpu_ms=1_500)
    operator = User.objects.create_superuser(email="ops-headers@example.com")
    client = Client()
    client.force_login(operator)
    for path in OPERATOR_PAGES:
        assert_protected_page(client.get(path), path)


def test_the_api_docs_page_loads_its_script_from_the_site() -> None:
    page = Client().get("/v1/docs")
    assert page["X-Frame-Options"] == "DENY"
    scripts = [line for line in page.content.decode().splitlines() if "<script" in line]
    init = next(line for line in scripts if "script=" in line)
    url = init.split('src="', 1)[1].split('"', 1)[0].replace("&amp;", "&")
    assert url.startswith("/v1/docs?")
    script = Client().get(url)
    assert script.status_code == 200
    assert script["Content-Type"].startswith("application/javascript")
    assert "SwaggerUIBundle(" in script.content.decode()
    assert '"validatorUrl": null' in script.content.decode()  # no image from validator.swagger.io


def test_api_answers_keep_their_own_headers(tenant: dict[str, Any]) -> None:
    """JSON is no page: no policy is added to it."""
    response = tenant["client"].get("/v1/me")
    assert response.status_code == 200
    assert "Content-Security-Policy" not in response


def settings_in(environment: dict[str, str]) -> dict[str, Any]:
    """Security settings as a process started with ``environment`` reads them."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DEBUG", "PLATFORM_EMBEDDED", "SECURE_COOKIES", "SECURE_HSTS_SECONDS")
    }
    env.update(environment)
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; print(json.dumps({"
        "'session': s.SESSION_COOKIE_SECURE, 'csrf': s.CSRF_COOKIE_SECURE, 'hsts': s.SECURE_HSTS_SECONDS,"
        "'frame': s.X_FRAME_OPTIONS}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_production_defaults_are_secure_cookies_and_hsts() -> None:
    production = settings_in({"SECRET_KEY": "x" * 50})
    assert production == {"session": True, "csrf": True, "hsts": 365 * 24 * 3600, "frame": "DENY"}
    embedded = settings_in({"PLATFORM_EMBEDDED": "1"})
    assert (embedded["session"], embedded["hsts"]) == (False, 0)  # plain HTTP on localhost: neither would work


def test_https_pages_carry_hsts_when_it_is_on(settings: Any) -> None:
    settings.SECURE_HSTS_SECONDS = 365 * 24 * 3600
    response = Client().get("/auth/login", secure=True)
    assert response["Strict-Transport-Security"] == "max-age=31536000"
    assert "Strict-Transport-Security" not in Client().get("/auth/login")  # only ever sent over HTTPS


def test_the_deployment_checks_see_djangos_middleware_under_our_names(settings: Any) -> None:
    """``check --deploy`` checks HSTS and secure cookies through config.middleware's names (config/checks.py), and
    still says so when the security middleware is really missing."""
    from django.core.checks import run_checks

    def ids() -> set[str]:
        found = run_checks(include_deployment_checks=True, tags=["security"])
        return {message.id for message in found if not message.is_silenced()}  # as `manage.py check` reports

    settings.SECURE_HSTS_SECONDS, settings.CSRF_COOKIE_SECURE = 0, False
    found = ids()
    assert {"config.security.W004", "config.security.W016"} <= found  # checked, not skipped
    assert not {"security.W001", "security.W003", "config.security.W001", "config.security.W003"} & found
    settings.SECURE_HSTS_SECONDS, settings.CSRF_COOKIE_SECURE = 3600, True
    assert not {"config.security.W004", "config.security.W016"} & ids()
    settings.MIDDLEWARE = [name for name in settings.MIDDLEWARE if not name.endswith(".SecurityMiddleware")]
    assert "config.security.W001" in ids()
