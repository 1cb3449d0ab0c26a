"""Ops endpoints and JSON error pages for the API paths."""

from __future__ import annotations

import logging
import sys
from typing import Any

from django.core.cache import caches
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET

from accounts.outages import GENERIC_DETAIL, RETRY_AFTER_SECONDS, is_outage
from config.cache import FailSoftRedisCache

logger = logging.getLogger(__name__)

API_PREFIXES = ("/v1/", "/queue/", "/run/", "/fal/", "/billing/")


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """The process is up and serving. Checks nothing else, so a slow database never kills it."""
    return JsonResponse({"status": "ok"})


def _check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def _check_broker() -> None:
    from config.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_cache() -> None:
    cache = caches["default"]
    if isinstance(cache, FailSoftRedisCache):
        # Requests are served from process memory while Redis is down: readiness asks Redis itself,
        # so the outage shows here even though no request fails because of it.
        cache.check_reachable()
        return
    cache.set("readyz", 1, timeout=5)
    if cache.get("readyz") != 1:
        raise RuntimeError("cache did not return what was written")


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Ready for traffic: the database, the broker and the cache answer."""
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker), ("cache", _check_cache)):
        try:
            check()
            checks[name] = "ok"
        except Exception as exc:
            logger.warning("readiness check %s failed: %s", name, exc)
            checks[name] = f"error: {type(exc).__name__}"
    ready = all(value == "ok" for value in checks.values())
    return JsonResponse({"status": "ready" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def _wants_json(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIXES) or "application/json" in request.headers.get("Accept", "")


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({"detail": "Bad request.", "error_type": "bad_request"}, status=400)
    from django.views.defaults import bad_request as html

    return html(request, exception or Exception())


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _wants_json(request):
        return JsonResponse({"detail": "Not found.", "error_type": "not_found"}, status=404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception or Exception())


# Written out, not a template: the page must render while the database (which a template's context may read) is down.
UNAVAILABLE_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Service unavailable</title></head>
<body><h1>Service temporarily unavailable</h1>
<p>The platform could not reach one of its services (the database or the message broker). Reload this page in a few
seconds. If you had just submitted something, look for it before you send it again.</p>
</body></html>
"""


def server_error(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    """Django's answer to an exception no view caught, called while it is being handled: an outage of a service
    (``accounts.outages.is_outage``) is 503 with ``Retry-After``, JSON on the API and a page elsewhere; anything else
    is 500. Django logs either with its traceback (``django.request``); the client sees neither."""
    error = sys.exc_info()[1]
    if error is not None and is_outage(error):
        unavailable: HttpResponse
        if _wants_json(request):
            body = {"detail": GENERIC_DETAIL, "error_type": "service_unavailable"}
            unavailable = JsonResponse(body, status=503)
        else:
            unavailable = HttpResponse(UNAVAILABLE_PAGE, status=503, content_type="text/html; charset=utf-8")
        unavailable["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return unavailable
    if _wants_json(request):
        return JsonResponse({"detail": "Internal server error.", "error_type": "internal_error"}, status=500)
    from django.views.defaults import server_error as html

    return html(request)
