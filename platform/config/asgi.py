"""The ASGI application: the web process (API, dashboard, admin, Stripe webhooks)."""

from __future__ import annotations

import os
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does, before the handler loads middleware

from django.conf import settings  # noqa: E402  (after Django is set up)

from config.request_threads import RenderingHandler, RequestThreads, Scope  # noqa: E402

django_application = RenderingHandler()

Message = dict[str, Any]


class BodyLimit:
    """Bounds request bodies before Django buffers them.

    A declared Content-Length over the limit is refused at once; a body of undeclared length is read
    up to the limit and refused as soon as it passes it, so no client can make the server spool gigabytes.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > self.limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked, or HTTP/2 without one): count what arrives.
        buffered: list[Message] = []
        size = 0
        while True:
            message = await receive()
            buffered.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(send)
                return
            if not message.get("more_body"):
                break

        async def replay() -> Message:
            return buffered.pop(0) if buffered else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        body = (
            b'{"detail": "Request body is larger than the limit of %d bytes.", "error_type": "payload_too_large"}'
            % self.limit
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# Outermost: the pooled request threads (config/request_threads.py) serve everything inside, Django's handler included.
application = RequestThreads(BodyLimit(django_application, settings.MAX_REQUEST_BODY_BYTES))
