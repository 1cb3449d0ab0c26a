from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


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
