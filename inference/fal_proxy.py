"""fal's proxy protocol: ``@fal-ai/client`` reaches the platform with its own ``proxyUrl`` option alone.

A client configured with ``proxyUrl`` sends every request to that URL instead of fal's, with the fal URL it would
have called in the ``x-fal-target-url`` header; method, headers (``Authorization: Key ...`` among them) and body are
the request's own. fal's server proxy adds a key and forwards the request over HTTP. The platform is the server
behind fal's hosts, so ``/fal/proxy`` forwards nothing: it maps the target onto the platform's own route and runs
that route's view in this process, on a copy of the request that has the target's path and query and no cookies.
The view authenticates the key the request carries, exactly as when it is called directly, and its answer passes
through as it is: status, headers and body, event streams unbuffered.

Every request ``@fal-ai/client`` 1.10.1 sends through a proxy, and what serves it:

| target (https, default port) | the client's call | served by |
|---|---|---|
| ``queue.fal.run/{app}[/{path}]`` | ``queue.submit``, ``subscribe`` | ``/queue/...`` |
| ``queue.fal.run/{owner}/{model}/requests/{id}[...]`` | status, its stream, result, cancel | ``/queue/...`` |
| ``fal.run/{app}[/{path}]`` | ``run`` | ``/run/...`` |
| ``fal.run/{app}/stream`` | ``stream`` (its default ``connectionMode: "server"``) | ``/run/.../stream`` |
| ``rest.fal.ai/storage/upload/initiate[-multipart]`` | ``storage.upload``, Blobs in ``input`` | ``/storage/...`` |
| ``rest.fal.ai/tokens/`` | ``realtime.connect``, ``stream`` with ``connectionMode: "client"`` | 501 |
| ``api.fal.ai/v1/...`` | (fal's platform API, e.g. pricing; not the client) | ``/v1/...`` |

``rest.alpha.fal.ai`` is served as ``rest.fal.ai`` (fal's Python client names it). The upload URLs that initiating
hands out are the platform's own, and the client PUTs the bytes there directly.

The temporary tokens of ``rest.fal.ai/tokens/`` are refused with 501 ``proxy_target_unsupported``, a detail saying why
and what to use instead (``REALTIME_REFUSAL``): with a token the client connects to ``wss://fal.run`` (realtime) or
``https://fal.run/{app}/stream?fal_jwt_token=...`` itself, past the proxy, so nothing the platform could hand out
would reach it. The client throws that answer as its ``ApiError``.

Any other target is refused with 403 ``proxy_target_refused``: the platform is no open proxy. A fal target with no
route here answers 404 ``not_found`` with a detail naming the target and what its host serves.

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
    result must lie under ``routes`` (so a host reaches only its own part of the platform). ``serves`` says what, for
    the answer to a target with no route here."""

    prefix: str
    routes: str
    serves: str


REST = HostRoutes(
    prefix="",
    routes="storage/",
    serves="fal's storage uploads: POST /storage/upload/initiate and /storage/upload/initiate-multipart",
)
FAL_HOSTS = {
    "queue.fal.run": HostRoutes(
        prefix="/queue",
        routes="queue/",
        serves="fal's queue API: /{owner}/{model}[/{path}], /{owner}/{model}/requests/{id}[/status[/stream]|/cancel]",
    ),
    "fal.run": HostRoutes(
        prefix="/run", routes="run/", serves="fal's sync and streaming runs: /{owner}/{model}[/{path}][/stream]"
    ),
    "rest.fal.ai": REST,
    "rest.alpha.fal.ai": REST,
    "api.fal.ai": HostRoutes(prefix="", routes="v1/", serves="the platform API: /v1/..."),
}

REALTIME_AUTH_PATHS = ("/tokens", "/tokens/")
REALTIME_REFUSAL = (
    "fal's temporary tokens (rest.fal.ai/tokens/) are for fal.realtime.connect and for fal.stream with "
    'connectionMode "client": with one, the client connects to fal.run itself, not through this proxy, so this '
    'platform serves neither. Stream with fal.stream\'s default connectionMode ("server"), which goes through the '
    "proxy; realtime (websocket) apps are not served."
)
# A preflight's Access-Control-Request-Headers, echoed back only when it is a plain list of header names.
HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+([ \t]*,[ \t]*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
# What a request may carry along that a copy for the target's view must not: ambient authority and the target.
NOT_FORWARDED = ("HTTP_COOKIE", "HTTP_X_FAL_TARGET_URL")


class ProxyTargetRefused(AppError):
    status_code = 403
    error_type = "proxy_target_refused"


class ProxyTargetUnsupported(AppError):
    """A fal target the client can name that the platform does not serve, said so (``REALTIME_REFUSAL``)."""

    status_code = 501
    error_type = "proxy_target_unsupported"


@dataclass(frozen=True)
class LocalTarget:
    host: str
    target_path: str
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
    hostname = (parts.hostname or "").lower()
    return LocalTarget(host=hostname, target_path=path, path=host.prefix + path, query=parts.query, routes=host.routes)


def unsupported(target: LocalTarget) -> ProxyTargetUnsupported | None:
    """The refusal of a fal target the platform knowingly does not serve, or None."""
    if FAL_HOSTS[target.host] is REST and target.target_path in REALTIME_AUTH_PATHS:
        return ProxyTargetUnsupported(REALTIME_REFUSAL)
    return None


def not_found(target: LocalTarget) -> dict[str, str]:
    return {
        "detail": f"Nothing here serves https://{target.host}{target.target_path[:200]} through the proxy; "
        f"{target.host} serves {FAL_HOSTS[target.host].serves}.",
        "error_type": "not_found",
    }


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
    refusal = unsupported(target)
    if refusal is not None:
        return JsonResponse(refusal.body(), status=refusal.status_code)
    match = find_view(target)
    if match is None:
        return JsonResponse(not_found(target), status=404)
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
