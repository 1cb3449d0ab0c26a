"""A real HTTP server on 127.0.0.1 for outbound-request tests (the only address tests may reach)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    # Send no Content-Length and stream the body in chunks until the connection closes.
    stream_chunks: int = 0


@dataclass
class LocalServer:
    base_url: str
    received: list[Received]
    # Answers by path; a callable may choose per request.
    routes: dict[str, Reply | Callable[[Received], Reply]]

    def url(self, path: str) -> str:
        return self.base_url + path


@contextmanager
def local_server() -> Iterator[LocalServer]:
    received: list[Received] = []
    routes: dict[str, Reply | Callable[[Received], Reply]] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            headers = {name.lower(): value for name, value in self.headers.items()}
            request = Received(self.command, self.path, headers, self.rfile.read(length))
            received.append(request)
            route = routes.get(self.path.split("?")[0], Reply())
            reply = route(request) if callable(route) else route
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if not reply.stream_chunks:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            try:
                for _ in range(max(reply.stream_chunks, 1)):
                    self.wfile.write(reply.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading, as it should past its limit

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LocalServer(f"http://127.0.0.1:{server.server_address[1]}", received, routes)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
