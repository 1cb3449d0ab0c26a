"""Outbound requests never reach private addresses: checked names, pinned connections, bounded bodies.

No test sends traffic anywhere but 127.0.0.1: names are resolved by a fake resolver, and connections
to public addresses are intercepted before a socket is opened.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any

import httpcore
import httpx
import pytest

from inference import netguard
from inference.netguard import HOST_REFUSED, OutboundError, TooLarge, UnsafeUrl, check_url, fetch_bytes, open_client
from tests.inference.local_http import LocalServer, Reply, local_server

PUBLIC_V4 = "93.184.216.34"
PUBLIC_V6 = "2606:2800:220:1:248:1893:25c8:1946"

_real_getaddrinfo = socket.getaddrinfo


def _info(address: str, port: int) -> tuple[Any, ...]:
    if ipaddress.ip_address(address).version == 6:
        return (socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, port, 0, 0))
    return (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))


@contextlib.contextmanager
def host_refused(caplog: pytest.LogCaptureFixture, reason: str) -> Iterator[None]:
    """A refused host is told one message whatever the reason (no oracle for our DNS); the reason, and the address,
    are in the server's log only."""
    caplog.set_level(logging.INFO, logger="inference.netguard")
    with pytest.raises(UnsafeUrl) as refusal:
        yield
    assert str(refusal.value) == HOST_REFUSED
    assert re.search(reason, caplog.text), caplog.text


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    """A fake DNS: name → successive answers (the last repeats). IP literals resolve for real
    (numerically, no lookup); any other name fails, so no test depends on real DNS."""
    answers: dict[str, list[list[str]]] = {}

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:  # noqa: A002
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in answers:
            queue = answers[name]
            addresses = queue.pop(0) if len(queue) > 1 else queue[0]
            return [_info(address, int(port or 0)) for address in addresses]
        return _real_getaddrinfo(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return answers


@pytest.fixture
def connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Records every TCP connection attempt; refuses (without a socket) any not to loopback."""
    attempts: list[tuple[str, int]] = []
    real_connect = httpcore.SyncBackend.connect_tcp

    def connect_tcp(self: httpcore.SyncBackend, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        attempts.append((host, port))
        if not ipaddress.ip_address(host).is_loopback:
            raise httpcore.ConnectError(f"test: no traffic to {host}")
        return real_connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore.SyncBackend, "connect_tcp", connect_tcp)
    return attempts


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with local_server() as running:
        yield running


@pytest.mark.usefixtures("dns")
@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "loopback"),
        ("http://127.1:8080/", "loopback"),
        ("http://2130706433/", "loopback"),  # 127.0.0.1 as one integer
        ("http://0x7f.1/", "loopback"),
        ("http://[::1]/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[::ffff:7f00:1]/", "loopback"),
        ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 around 127.0.0.1
        ("http://[64:ff9b::a00:1]/", "private"),  # NAT64 around 10.0.0.1
        ("http://10.1.2.3/hook", "private"),
        ("http://172.16.0.9/", "private"),
        ("http://192.168.1.10/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fd00::1]/", "private"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://[::]/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://240.0.0.1/", "reserved"),
        ("http://100.64.0.1/", "non-public"),  # carrier-grade NAT
        ("http://localhost:8000/", "this machine"),
        ("http://LOCALHOST./", "this machine"),
        ("http://api.localhost/", "this machine"),
        ("ftp://example.com/file", "Only http and https"),
        ("file:///etc/passwd", "Only http and https"),
        ("gopher://example.com/", "Only http and https"),
        ("javascript:alert(1)", "Only http and https"),
        ("http:///path", "no host"),
        ("http://user:secret@example.com/", "Credentials"),
        ("not a url", "Only http and https"),
    ],
)
def test_refuses_non_public_and_odd_urls(url: str, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inference.netguard")
    with pytest.raises(UnsafeUrl) as refusal:
        check_url(url, allow_private=False)
    told = str(refusal.value)
    # A refused host reads the same whatever the reason, which only the log holds; a malformed URL says what it is.
    assert reason in (caplog.text if told == HOST_REFUSED else told)


def test_refuses_a_name_that_resolves_to_loopback(
    dns: dict[str, list[list[str]]], caplog: pytest.LogCaptureFixture
) -> None:
    dns["innocent.example"] = [["127.0.0.1"]]
    with host_refused(caplog, r"resolves to 127\.0\.0\.1, a loopback address"):
        check_url("https://innocent.example/hook", allow_private=False)


def test_refuses_if_any_address_is_private(dns: dict[str, list[list[str]]], caplog: pytest.LogCaptureFixture) -> None:
    dns["mixed.example"] = [[PUBLIC_V4, "10.0.0.5"]]
    with host_refused(caplog, r"10\.0\.0\.5"):
        check_url("https://mixed.example/", allow_private=False)


def test_refuses_an_unresolvable_name(dns: dict[str, list[list[str]]], caplog: pytest.LogCaptureFixture) -> None:
    with host_refused(caplog, "could not be resolved"):
        check_url("https://no-such-name.invalid/", allow_private=False)


def test_allows_public_addresses(dns: dict[str, list[list[str]]]) -> None:
    dns["hooks.example.com"] = [[PUBLIC_V4, PUBLIC_V6]]
    check_url("https://hooks.example.com/receive?x=1", allow_private=False)
    check_url(f"http://{PUBLIC_V4}:8080/", allow_private=False)
    check_url(f"http://[{PUBLIC_V6}]/", allow_private=False)
    check_url("http://[::ffff:8.8.8.8]/", allow_private=False)


@pytest.mark.usefixtures("dns")
def test_allow_private_follows_the_setting(settings: Any) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = False
    with pytest.raises(UnsafeUrl):
        check_url("http://127.0.0.1:9/")
    settings.OUTBOUND_ALLOW_PRIVATE = True
    check_url("http://127.0.0.1:9/")
    check_url("http://localhost:9/")
    with pytest.raises(UnsafeUrl, match="Only http and https"):
        check_url("file:///etc/passwd")  # the shape is checked even then


def test_dns_rebinding_is_refused_at_connect_time(
    dns: dict[str, list[list[str]]],
    connections: list[tuple[str, int]],
    server: LocalServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    # Public when checked, loopback when the client connects.
    dns["rebind.example"] = [[PUBLIC_V4], ["127.0.0.1"]]
    url = f"http://rebind.example:{port}/secret"
    check_url(url, allow_private=False)
    with open_client(allow_private=False, timeout=5) as client, host_refused(caplog, "loopback"):
        client.get(url)
    assert connections == []
    assert server.received == []


def test_connects_to_the_address_it_checked(
    dns: dict[str, list[list[str]]], connections: list[tuple[str, int]]
) -> None:
    dns["hooks.example.com"] = [[PUBLIC_V4]]
    with open_client(allow_private=False, timeout=5) as client, pytest.raises(httpx.ConnectError, match="no traffic"):
        client.post("https://hooks.example.com/hook", content=b"{}")
    assert connections == [(PUBLIC_V4, 443)]


def test_keeps_the_host_header_of_the_name(
    dns: dict[str, list[list[str]]], connections: list[tuple[str, int]], server: LocalServer
) -> None:
    port = int(server.base_url.rsplit(":", 1)[1])
    dns["receiver.test"] = [["127.0.0.1"]]
    with open_client(allow_private=True, timeout=5) as client:
        response = client.get(f"http://receiver.test:{port}/hello")
    assert response.status_code == 200
    assert connections == [("127.0.0.1", port)]
    assert server.received[0].headers["host"] == f"receiver.test:{port}"


def test_redirects_are_not_followed_by_default(server: LocalServer) -> None:
    server.routes["/moved"] = Reply(status=302, headers={"Location": "http://169.254.169.254/"})
    with open_client(allow_private=True, timeout=5) as client:
        response = client.get(server.url("/moved"))
    assert response.status_code == 302
    assert len(server.received) == 1


def test_each_redirect_hop_is_checked(
    dns: dict[str, list[list[str]]],
    server: LocalServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Only for this test, one name may reach the local server; the redirect it answers may not.
    real_resolve = netguard.resolve

    def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
        return ["127.0.0.1"] if host == "trusted.test" else real_resolve(host, port, allow_private=allow_private)

    monkeypatch.setattr(netguard, "resolve", resolve)
    port = int(server.base_url.rsplit(":", 1)[1])
    server.routes["/moved"] = Reply(status=302, headers={"Location": f"http://127.0.0.1:{port}/image"})
    with host_refused(caplog, "loopback"):
        fetch_bytes(f"http://trusted.test:{port}/moved", max_bytes=1000, allow_private=False)
    assert [request.path for request in server.received] == ["/moved"]


def test_fetch_bytes_returns_the_body_and_type(server: LocalServer) -> None:
    server.routes["/image.png"] = Reply(body=b"\x89PNG-bytes", headers={"Content-Type": "image/PNG; charset=binary"})
    body, content_type = fetch_bytes(server.url("/image.png"), max_bytes=100, allow_private=True)
    assert body == b"\x89PNG-bytes"
    assert content_type == "image/png"


def test_fetch_bytes_follows_redirects(server: LocalServer) -> None:
    server.routes["/moved"] = Reply(status=301, headers={"Location": "/image.png"})
    server.routes["/image.png"] = Reply(body=b"pixels", headers={"Content-Type": "image/png"})
    assert fetch_bytes(server.url("/moved"), max_bytes=100, allow_private=True) == (b"pixels", "image/png")


def test_fetch_bytes_stops_at_max_bytes_of_a_declared_length(server: LocalServer) -> None:
    server.routes["/big"] = Reply(body=b"x" * 100_000)
    with pytest.raises(TooLarge, match="100000 bytes"):
        fetch_bytes(server.url("/big"), max_bytes=1000, allow_private=True)


def test_fetch_bytes_stops_at_max_bytes_while_streaming(server: LocalServer) -> None:
    # No Content-Length: 64 MiB would arrive if the client kept reading.
    server.routes["/endless"] = Reply(body=b"y" * 65536, stream_chunks=1024)
    with pytest.raises(TooLarge, match="larger than the limit of 100000 bytes"):
        fetch_bytes(server.url("/endless"), max_bytes=100_000, allow_private=True)


def test_fetch_bytes_reads_exactly_max_bytes(server: LocalServer) -> None:
    server.routes["/exact"] = Reply(body=b"z" * 1000, stream_chunks=1)
    body, _ = fetch_bytes(server.url("/exact"), max_bytes=1000, allow_private=True)
    assert len(body) == 1000


def test_fetch_bytes_refuses_private_addresses_when_not_allowed(
    server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    with host_refused(caplog, "loopback"):
        fetch_bytes(server.url("/image.png"), max_bytes=100, allow_private=False)
    assert server.received == []


@pytest.mark.parametrize("status", [404, 500])
def test_fetch_bytes_reports_error_answers(server: LocalServer, status: int) -> None:
    server.routes["/broken"] = Reply(status=status)
    with pytest.raises(OutboundError, match=f"HTTP {status}"):
        fetch_bytes(server.url("/broken"), max_bytes=100, allow_private=True)


def test_fetch_bytes_reports_a_refused_connection() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(OutboundError, match="failed"):
        fetch_bytes(f"http://127.0.0.1:{port}/", max_bytes=100, allow_private=True)


def test_errors_are_value_errors() -> None:
    errors: list[Callable[..., Exception]] = [UnsafeUrl, TooLarge, OutboundError]
    assert all(issubclass(error, ValueError) for error in errors)  # type: ignore[arg-type]


@pytest.mark.parametrize("url", ["http://93.184.215.14:99999/hook", "https://example.com:65536/", "http://a.com:0/"])
def test_refuses_a_port_out_of_range(url: str) -> None:
    """httpx keeps a port as written and a socket would take it modulo 65536: another port than the one asked."""
    with pytest.raises(UnsafeUrl, match="port must be from 1 to 65535"):
        check_url(url, allow_private=True)
