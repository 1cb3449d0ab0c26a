"""fal's proxy protocol: ``@fal-ai/client`` reaches the platform with its own ``proxyUrl`` option alone.

A client configured with ``proxyUrl`` sends every request to that URL instead of fal's, with the fal URL it would
have called in the ``x-fal-target-url`` header; method, headers (``Authorization: Key ...`` among them) and body are
the request's own. fal's server proxy adds a key and forwards the request over HTTP. The platform is the server
behind fal's hosts, so ``/fal/proxy`` forwards nothing: it maps the target onto the platform's own route and runs
that route's view in this process, on a copy of the request that has the target's path and query and no cookies.
The view authenticates the key the request carries, exactly as when it is called directly, and its answer passes
through as it is: status, headers and body, event streams unbuffered.

| target (https, default port) | served by |
|---|---|
| ``queue.fal.run/{path}`` | ``/queue/{path}`` |
| ``fal.run/{path}`` | ``/run/{path}`` |
| ``rest.fal.ai/storage/...``, ``rest.alpha.fal.ai/storage/...`` | ``/storage/...`` |
| ``api.fal.ai/v1/...`` | ``/v1/...`` |

Any other target is refused with 403 ``proxy_target_refused``: the platform is no open proxy. A fal target with no
route here answers 404 ``not_found``, as an unknown path does.

Browsers: every answer allows any origin (CORS, preflight included). Nothing here is authorized by cookies, only by
the key a request carries, so a web app on any origin passes its key in the client's ``credentials`` option.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from asgiref.sync import iscoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse, QueryDict
from django.urls import Resolver404, ResolverMatch, resolve
from django.views.decorators.csrf import csrf_exempt

from accounts.errors import AppError, InvalidInput, problem

TARGET_URL_HEADER = "x-fal-target-url"


@dataclass(frozen=True)
class HostRoutes:
    """Where a fal host's paths land: ``prefix`` is put before the target's path, and the route that serves the
    result must lie under ``routes`` (so a host reaches only its own part of the platform)."""

    prefix: str
    routes: str


FAL_HOSTS = {
    "queue.fal.run": HostRoutes(prefix="/queue", routes="queue/"),
    "fal.run": HostRoutes(prefix="/run", routes="run/"),
    "rest.fal.ai": HostRoutes(prefix="", routes="storage/"),
    "rest.alpha.fal.ai": HostRoutes(prefix="", routes="storage/"),
    "api.fal.ai": HostRoutes(prefix="", routes="v1/"),
}

NOT_FOUND = {"detail": "Not found.", "error_type": "not_found"}
# A preflight's Access-Control-Request-Headers, echoed back only when it is a plain list of header names.
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+([ \t]*,[ \t]*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
# What a request may carry along that a copy for the target's view must not: ambient authority and the target.
NOT_FORWARDED = ("HTTP_COOKIE", "HTTP_X_FAL_TARGET_URL")


class ProxyTargetRefused(AppError):
    status_code = 403
    error_type = "proxy_target_refused"


@dataclass(frozen=True)
class LocalTarget:
    path: str
    query: str
    routes: str


def local_target(target_url: str) -> LocalTarget:
    """The platform's path and query for a fal URL, or ``ProxyTargetRefused`` if it is not one of fal's."""
    refused = ProxyTargetRefused(
        f"Only fal's hosts are proxied ({', '.join(sorted(FAL_HOSTS))}), over https: not {target_url[:200]!r}."
    )
    try:
        parts = urlsplit(target_url.strip())
        port = parts.port
    except ValueError:
        raise refused from None
    host = FAL_HOSTS.get((parts.hostname or "").lower())
    if parts.scheme.lower() != "https" or host is None or port not in (None, 443) or parts.username is not None:
        raise refused
    path = unquote(parts.path) or "/"
    if any(segment in (".", "..") for segment in path.split("/")):
        raise refused
    return LocalTarget(path=host.prefix + path, query=parts.query, routes=host.routes)


def find_view(target: LocalTarget) -> ResolverMatch | None:
    try:
        match = resolve(target.path)
    except Resolver404:
        return None
    return match if match.route.startswith(target.routes) else None


def request_for(request: HttpRequest, target: LocalTarget, match: ResolverMatch) -> HttpRequest:
    """A copy of ``request`` addressed to the target: its path and query, no cookies, the same key and body."""
    inner = copy.copy(request)
    # Attributes cached on the request from its own path, headers and cookies; the copy computes its own.
    for cached in ("headers", "GET", "COOKIES", "session", "user", "auser", "_messages"):
        inner.__dict__.pop(cached, None)
    script_name = request.META.get("SCRIPT_NAME", "").rstrip("/")
    inner.path_info = target.path
    inner.path = script_name + target.path
    inner.META = {name: value for name, value in request.META.items() if name not in NOT_FORWARDED}
    inner.META["PATH_INFO"] = target.path
    inner.META["QUERY_STRING"] = target.query
    inner.GET = QueryDict(target.query)
    inner.COOKIES = {}
    inner.resolver_match = match
    scope = getattr(request, "scope", None)
    if scope is not None:  # an ASGI request: its scope says the same
        inner.scope = {  # type: ignore[attr-defined]
            **scope,
            "path": inner.path,
            "query_string": target.query.encode("latin-1", "replace"),
            "headers": [(name, value) for name, value in scope.get("headers", []) if name != b"cookie"],
        }
    return inner


async def forward(request: HttpRequest) -> HttpResponseBase:
    target_url = request.headers.get(TARGET_URL_HEADER)
    if not target_url:
        missing = InvalidInput([problem(["header", TARGET_URL_HEADER], "Field required.", "missing")])
        return JsonResponse(missing.body(), status=missing.status_code)
    try:
        target = local_target(target_url)
    except ProxyTargetRefused as refused:
        return JsonResponse(refused.body(), status=refused.status_code)
    match = find_view(target)
    if match is None:
        return JsonResponse(NOT_FOUND, status=404)
    inner = request_for(request, target, match)
    if iscoroutinefunction(match.func):
        response: HttpResponseBase = await match.func(inner, *match.args, **match.kwargs)
    else:
        response = await sync_to_async(match.func)(inner, *match.args, **match.kwargs)
    return response


def preflight(request: HttpRequest) -> HttpResponse:
    response = HttpResponse(status=204)
    response["Access-Control-Allow-Methods"] = "GET, POST, PUT, DELETE, OPTIONS"
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    # Authorization is never covered by a wildcard: a browser sends it only when the preflight names it.
    response["Access-Control-Allow-Headers"] = (
        asked if HEADER_LIST.fullmatch(asked) else f"authorization, content-type, accept, {TARGET_URL_HEADER}"
    )
    response["Access-Control-Max-Age"] = "600"
    return response


@csrf_exempt
async def proxy(request: HttpRequest) -> HttpResponseBase:
    """``/fal/proxy``: a request of fal's client, ``x-fal-target-url`` naming the fal URL it is meant for."""
    response = preflight(request) if request.method == "OPTIONS" else await forward(request)
    # Any origin: no answer here depends on cookies, only on the key the request itself carries.
    response["Access-Control-Allow-Origin"] = "*"
    response["Access-Control-Expose-Headers"] = "*"
    return response
