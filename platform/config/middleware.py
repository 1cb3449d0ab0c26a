from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as _auth
from django.contrib.messages import middleware as _messages
from django.contrib.sessions import middleware as _session
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.middleware import common as _common
from django.middleware import csrf as _csrf
from django.middleware import security as _security


def too_large_response(limit: int) -> JsonResponse:
    return JsonResponse(
        {"detail": f"Request body is larger than the limit of {limit} bytes.", "error_type": "payload_too_large"},
        status=413,
    )


class BodySizeLimitMiddleware:
    """Refuses a declared body over the limit before anything reads it (413, JSON).

    Bodies without a Content-Length (chunked) are bounded by ``config.asgi.BodyLimit`` in front of Django.
    """

    # Both, so that under ASGI the request never hops to a thread just to pass through here.
    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        self.limit = settings.MAX_REQUEST_BODY_BYTES
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        refusal = self.refusal(request)
        if self.is_async:
            return self._acall(request, refusal)
        return refusal or self.get_response(request)

    async def _acall(self, request: HttpRequest, refusal: HttpResponse | None) -> HttpResponse:
        return refusal or await self.get_response(request)  # type: ignore[misc]

    def refusal(self, request: HttpRequest) -> HttpResponse | None:
        declared = request.META.get("CONTENT_LENGTH") or "0"
        try:
            length = int(declared)
        except ValueError:
            return JsonResponse({"detail": "Invalid Content-Length header.", "error_type": "bad_request"}, status=400)
        if length > self.limit:
            return too_large_response(self.limit)
        return None


class BrowserOnly:
    """Skips a browser-only middleware (sessions, CSRF cookies, auth, messages, framing) on API paths.

    Under ASGI each of Django's sync middleware costs a hop to a thread per request; the API
    authenticates with keys and never reads a session, so its requests go straight past them.
    """

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if request.path.startswith(API_PATH_PREFIXES):
            return self.get_response(request)  # type: ignore[attr-defined]
        return super().__call__(request)  # type: ignore[misc]


# The paths of the API (and the files it links to): key-authenticated, no cookies.
API_PATH_PREFIXES = (
    "/v1/",
    "/queue/",
    "/run/",
    "/fal/",
    "/files/",
    "/storage/",
    "/healthz",
    "/readyz",
    "/billing/stripe/",
)


class SessionMiddleware(BrowserOnly, _session.SessionMiddleware):
    pass


class InlineUnderAsgi:
    """Runs a Django middleware's ``process_request`` and ``process_response`` on the event loop under ASGI.

    Django's ``MiddlewareMixin`` hops to the request's thread and back for each of them (two hops a request per
    middleware, about 60 µs each here, more under load, and the GIL handed back and forth). Only for middleware whose
    two hooks do no I/O, so they cannot stall the loop: the security headers and redirects, ``CommonMiddleware``'s
    host check, slash redirect (a URL resolution) and Content-Length, and the CSRF cookie read and set (kept in a
    cookie, not the session: ``CSRF_USE_SESSIONS`` is off). The CSRF check itself (``process_view``, which may read a
    form's body) runs in the thread unless it cannot read one (``CsrfViewMiddleware`` below). Under WSGI nothing
    changes.
    """

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        response = self.process_request(request)  # type: ignore[attr-defined]
        response = response or await self.get_response(request)  # type: ignore[attr-defined]
        return self.process_response(request, response)  # type: ignore[attr-defined]


# The methods Django's CSRF check lets through without looking at the request (RFC 9110's safe methods).
SAFE_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE")


class SecurityMiddleware(InlineUnderAsgi, _security.SecurityMiddleware):
    pass


class CommonMiddleware(InlineUnderAsgi, _common.CommonMiddleware):
    pass


class CsrfViewMiddleware(InlineUnderAsgi, _csrf.CsrfViewMiddleware):
    """Django's CSRF middleware; under ASGI its check (``process_view``) hops to the request's thread only when it
    may read a form's body: an unsafe method to a view not exempt from it. The API's views are all exempt (they
    authenticate with keys) and every GET is safe, so their requests are checked on the event loop, as Django's
    check would decide in the thread (it returns before any I/O in both cases)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        if settings.CSRF_USE_SESSIONS:  # the token would be read from the session: database I/O on the loop
            raise ImproperlyConfigured("config.middleware.CsrfViewMiddleware keeps the CSRF token in a cookie only")
        super().__init__(get_response)
        if iscoroutinefunction(get_response):
            # Django adapts a coroutine ``process_view`` as it is; a sync one it would run in the thread each time.
            self.process_view = self._process_view_async  # type: ignore[method-assign,assignment]

    async def _process_view_async(
        self, request: HttpRequest, callback: Any, callback_args: Any, callback_kwargs: Any
    ) -> HttpResponse | None:
        check = super().process_view
        if getattr(callback, "csrf_exempt", False) or request.method in SAFE_METHODS:
            return check(request, callback, callback_args, callback_kwargs)
        return await sync_to_async(check, thread_sensitive=True)(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(BrowserOnly, _auth.AuthenticationMiddleware):
    pass


class MessageMiddleware(BrowserOnly, _messages.MessageMiddleware):
    pass


class ContentSecurityPolicyMiddleware:
    """Sends ``CONTENT_SECURITY_POLICY`` and ``X-Frame-Options`` with every HTML response, on any path.

    A page that sets its own policy keeps it. ``X-Frame-Options`` backs up ``frame-ancestors`` for
    browsers that do not read CSP; a view marked ``xframe_options_exempt`` goes without it. Other
    answers (JSON, files, event streams) are not documents a browser renders in a frame: they pass
    as they are (stored files set their own sandboxing policy, inference/files.py).
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse | Awaitable[HttpResponse]]) -> None:
        self.get_response = get_response
        self.policy = "; ".join(
            " ".join([directive, *sources]) for directive, sources in settings.CONTENT_SECURITY_POLICY.items()
        )
        self.frame_options = settings.X_FRAME_OPTIONS
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self._acall(request)
        return self.protect(self.get_response(request))  # type: ignore[arg-type]

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        return self.protect(await self.get_response(request))  # type: ignore[misc]

    def protect(self, response: HttpResponse) -> HttpResponse:
        if not response.get("Content-Type", "").startswith("text/html"):
            return response
        response.headers.setdefault("Content-Security-Policy", self.policy)
        if not getattr(response, "xframe_options_exempt", False):
            response.headers.setdefault("X-Frame-Options", self.frame_options)
        return response
