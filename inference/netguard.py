"""Outbound HTTP that cannot be pointed at our own network (SSRF).

Customer-supplied URLs (webhooks, ``image_url`` inputs) must never reach loopback, private,
link-local (cloud metadata at 169.254.169.254) or otherwise non-public addresses, unless
``OUTBOUND_ALLOW_PRIVATE`` is on (the embedded run on one machine).

Checking a URL once and then letting the HTTP client resolve the name again is not enough: DNS
can answer a public address to the check and a private one to the connection (DNS rebinding).
So the client from ``open_client`` resolves the name itself at connect time, refuses if any
address is forbidden, and connects to the address it checked. The Host header, TLS SNI and
certificate verification still use the original name, because httpcore hands that name, not
the address, to the TLS layer.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Iterable

import httpcore
import httpx
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = logging.getLogger(__name__)

ALLOWED_SCHEMES = ("http", "https")
# Names that mean "this machine" without asking DNS (RFC 6761 reserves all of *.localhost).
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# NAT64 (RFC 6052) carries an IPv4 address in its last 32 bits.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
# A host resolving to many addresses is unusual; bound the connection attempts it can cost.
MAX_ADDRESSES_TRIED = 4


class OutboundError(ValueError):
    """An outbound request that could not be made or did not give a usable answer."""


class UnsafeUrl(OutboundError):
    """The URL is not http(s), has no host, or its host resolves to a forbidden address."""


class TooLarge(OutboundError):
    """The response body is larger than the caller allows."""


def _allow_private(allow_private: bool | None) -> bool:
    return bool(settings.OUTBOUND_ALLOW_PRIVATE) if allow_private is None else allow_private


def forbidden_reason(address: IPAddress) -> str | None:
    """Why this address may not be reached from outbound requests, or None if it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address: judge the IPv4 address inside.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = forbidden_reason(embedded)
            return f"{reason} (inside {address})" if reason else None
        if address.teredo is not None:
            return "a Teredo tunnel address"
    checks = (
        (address.is_loopback, "a loopback address"),
        (address.is_unspecified, "an unspecified address"),
        (address.is_link_local, "a link-local address"),
        (address.is_multicast, "a multicast address"),
        (address.is_reserved, "a reserved address"),
        (address.is_private, "a private address"),
        # Catches the rest of the special-purpose registry (e.g. 100.64.0.0/10 shared address space).
        (not address.is_global, "a non-public address"),
    )
    return next((reason for failed, reason in checks if failed), None)


# Every refusal of a host reads the same to the caller: "could not be resolved" against "resolves to 10.96.14.7, a
# private address" would make us an oracle for how our internal names resolve (a webhook URL naming
# postgres.default.svc.cluster.local answered with its address). Why, and the address, go to our log only.
HOST_REFUSED = "The host is not reachable at a public address."


def _refuse_host(host: str, why: str) -> UnsafeUrl:
    logger.info("outbound request to host %r refused: %s", host, why)
    return UnsafeUrl(HOST_REFUSED)


def _check_name(host: str) -> None:
    name = host.lower().rstrip(".")
    if name in LOCAL_NAMES or name.endswith(".localhost"):
        raise _refuse_host(host, "it refers to this machine")


def resolve(host: str, port: int, *, allow_private: bool) -> list[str]:
    """The addresses of ``host``, each checked; raises ``UnsafeUrl`` if any is forbidden.

    All of them are checked, not only the first: a client may fall back to any of them.
    """
    if not allow_private:
        _check_name(host)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _refuse_host(host, f"it could not be resolved ({exc})") from None
    addresses: list[str] = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        text = str(sockaddr[0])
        if text in addresses:
            continue
        if not allow_private:
            # Scoped IPv6 literals (fe80::1%eth0) are link-local; ipaddress keeps the scope.
            reason = forbidden_reason(ipaddress.ip_address(text))
            if reason:
                raise _refuse_host(host, f"it resolves to {text}, {reason}")
        addresses.append(text)
    if not addresses:
        raise _refuse_host(host, "it has no address")
    return addresses


MAX_PORT = 65535


def literal_address(host: str) -> IPAddress | None:
    """The address ``host`` writes out, or None for a name: parsed here, never looked up.

    Beside the usual forms, the ones a resolver reads as IPv4 without asking DNS (``inet_aton``'s: ``127.1``,
    ``0x7f.1``, ``2130706433``), so that no spelling of a forbidden address passes for a name.
    """
    try:
        return ipaddress.ip_address(host)  # IPv6 comes without its brackets from httpx, a zone index kept
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, UnicodeError, ValueError):
        return None


def check_url_offline(url: str, *, allow_private: bool | None = None) -> tuple[str, int]:
    """Raises ``UnsafeUrl`` unless ``url`` is http(s) with a host that may be public, judged without the network:
    its shape, its port, a host that names this machine, an address written out in a forbidden range. A name is not
    resolved: the client of ``open_client`` checks every address it resolves to when it connects. Returns the host
    and the port to connect to.

    For a request's thread (a submission's webhook URL): a name that resolves slowly cannot hold it.
    """
    try:
        parsed = httpx.URL(url)
        host = parsed.host
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        # ValueError: httpx decodes the host lazily, and idna's errors (UnicodeError) for a bad A-label such as
        # xn--a.com are not httpx's own.
        raise UnsafeUrl(f"Not a valid URL: {exc}.") from None
    if parsed.scheme not in ALLOWED_SCHEMES:
        raise UnsafeUrl("Only http and https URLs are allowed.")
    if not host:
        raise UnsafeUrl("The URL has no host.")
    if parsed.userinfo:
        raise UnsafeUrl("Credentials in the URL are not allowed.")
    if parsed.port is not None and not 0 < parsed.port <= MAX_PORT:
        # httpx keeps 99999 as it is, and a socket would take it modulo 65536: another port than the one written.
        raise UnsafeUrl(f"The port must be from 1 to {MAX_PORT}.")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not _allow_private(allow_private):
        _check_name(host)
        address = literal_address(host)
        reason = forbidden_reason(address) if address is not None else None
        if reason:
            raise _refuse_host(host, f"it is {address}, {reason}")
    return host, port


def check_url(url: str, *, allow_private: bool | None = None) -> None:
    """Raises ``UnsafeUrl`` unless ``url`` is http(s) with a host whose every address is public: ``check_url_offline``,
    then the name resolved (a DNS lookup, for as long as the resolver takes: not on a request's thread).

    With private addresses allowed only the shape is checked (no DNS lookup).
    """
    host, port = check_url_offline(url, allow_private=allow_private)
    if not _allow_private(allow_private):
        resolve(host, port, allow_private=False)


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's socket backend, but every TCP connection goes to an address checked just now.

    httpcore calls ``connect_tcp`` with the URL's host name and later starts TLS with that same
    name as ``server_hostname``, so connecting to the resolved address keeps SNI and certificate
    checks on the name while the address we connect to is the one we checked (no second lookup).
    """

    def __init__(self, *, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._sockets = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        *earlier, last = resolve(host, port, allow_private=self._allow_private)[:MAX_ADDRESSES_TRIED]
        for address in earlier:
            try:
                return self._sockets.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                continue  # the next address may answer, as a resolving client would try it
        return self._sockets.connect_tcp(last, port, timeout, local_address, socket_options)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise UnsafeUrl("Unix sockets are not allowed for outbound requests.")

    def sleep(self, seconds: float) -> None:
        self._sockets.sleep(seconds)


@functools.lru_cache(maxsize=4)
def _ssl_context(cert_file: str | None, cert_dir: str | None) -> ssl.SSLContext:
    return httpx.create_ssl_context()  # certifi, or SSL_CERT_FILE/SSL_CERT_DIR when set


def shared_ssl_context() -> ssl.SSLContext:
    """This process's TLS client context: loading the CA bundle costs about 20 ms of CPU, which a context made per
    client (two per client, before) spent on every webhook delivery and image fetch. Made again only when
    SSL_CERT_FILE or SSL_CERT_DIR changes. An ``SSLContext`` may be shared by threads and connections."""
    return _ssl_context(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


class GuardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose connection pool connects through ``_GuardedBackend``.

    httpx 0.28 has no public argument for a network backend, so the pool it builds is replaced by
    an identical one that has ours; ``handle_request`` and error mapping stay httpx's own. No proxy:
    a proxy would do the resolving and defeat the check.
    """

    def __init__(self, *, allow_private: bool, max_connections: int = 10) -> None:
        context = shared_ssl_context()
        super().__init__(verify=context)  # the pool it builds is replaced below: no context of its own
        self._pool = httpcore.ConnectionPool(
            ssl_context=context,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=_GuardedBackend(allow_private=allow_private),
        )


def open_client(*, allow_private: bool | None = None, timeout: float, max_redirects: int = 0) -> httpx.Client:
    """An httpx client that only reaches public addresses (unless private ones are allowed).

    Redirects are off by default; with ``max_redirects`` they are followed, and each hop's
    connection is checked by the transport like the first. Environment proxies and .netrc are
    ignored (``trust_env=False``). Use it as a context manager.
    """
    return httpx.Client(
        transport=GuardedTransport(allow_private=_allow_private(allow_private)),
        timeout=timeout,
        follow_redirects=max_redirects > 0,
        max_redirects=max(max_redirects, 0),
        trust_env=False,
    )


def fetch_bytes(
    url: str, *, max_bytes: int, allow_private: bool | None = None, timeout: float = 20
) -> tuple[bytes, str]:
    """GETs ``url`` and returns (body, content type), reading at most ``max_bytes``.

    ``timeout`` bounds each network operation and the whole download (a server dripping bytes
    cannot hold a worker). Raises ``UnsafeUrl``, ``TooLarge``, or ``OutboundError`` for any other
    failure (non-2xx answer, network error, timeout); all are ``ValueError``.
    """
    check_url(url, allow_private=allow_private)
    deadline = time.monotonic() + timeout
    try:
        with (
            open_client(allow_private=allow_private, timeout=timeout, max_redirects=5) as client,
            # Identity encoding: a compressed body could expand far past max_bytes in one chunk.
            client.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response,
        ):
            if not response.is_success:
                raise OutboundError(f"Fetching {url} answered HTTP {response.status_code}.")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise TooLarge(f"The file at {url} is {declared} bytes; the limit is {max_bytes}.")
            chunks: list[bytes] = []
            received = 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > max_bytes:
                    raise TooLarge(f"The file at {url} is larger than the limit of {max_bytes} bytes.")
                if time.monotonic() > deadline:
                    raise OutboundError(f"Fetching {url} took longer than {timeout:g} s.")
                chunks.append(chunk)
            content_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
            return b"".join(chunks), content_type
    except httpx.TooManyRedirects:
        raise OutboundError(f"Fetching {url} was redirected too many times.") from None
    except httpx.TimeoutException:
        raise OutboundError(f"Fetching {url} timed out after {timeout:g} s.") from None
    except httpx.HTTPError as exc:
        raise OutboundError(f"Fetching {url} failed: {exc}.") from None
