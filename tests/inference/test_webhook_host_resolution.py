"""A webhook URL's host is not resolved on the submission's thread: a caller pointing it at a name that resolves
slowly would hold a web thread for the resolver's timeout on every submission. What can be judged without the network
is judged at submission (scheme, host, port, a name of this machine, an address written out in a forbidden range);
the name is resolved, and every address it gives checked, by the delivery when it connects (inference/netguard.py)."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from inference import netguard
from inference.catalog import ensure_builtin_endpoints
from inference.models import Endpoint, WebhookAttempt, WebhookDelivery, WebhookStatus
from inference.netguard import HOST_REFUSED, UnsafeUrl
from inference.webhooks import deliver
from tests.inference.local_http import LocalServer, local_server

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]

SLOW_NAME = "slow.resolver.example"
_real_getaddrinfo = socket.getaddrinfo


class Resolver:
    """``socket.getaddrinfo`` in its place: the names asked for; ``answers`` for some, any other name as a resolver
    that never answers in time would end (after its timeout), IP addresses parsed as the real one does."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.answers: dict[str, str] = {}

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name == "127.0.0.1" and name not in self.answers:
            return _real_getaddrinfo(host, port, *args, **kwargs)  # the test's own services (Redis)
        self.asked.append(name)
        if name in self.answers:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (self.answers[name], int(port or 0)))]
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Resolver:
    fake = Resolver()
    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return fake


@pytest.fixture(autouse=True)
def _endpoints(db: None, settings: Any) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = False  # production's rule
    ensure_builtin_endpoints(Endpoint)


@pytest.fixture
def receiver() -> Iterator[LocalServer]:
    with local_server() as server:
        yield server


def submit(tenant: dict[str, Any], webhook: str) -> Any:
    return tenant["client"].post(
        f"/queue/platform/tiny-sd?fal_webhook={webhook}",
        data=json.dumps({"prompt": "x"}),
        content_type="application/json",
    )


def delivered_to(tenant: dict[str, Any], request_id: str) -> WebhookDelivery:
    """Ends the request (cancelled in its queue), and tries its webhook once."""
    cancelled = tenant["client"].put(f"/queue/platform/tiny-sd/requests/{request_id}/cancel")
    assert cancelled.status_code == 202, cancelled.content
    delivery = WebhookDelivery.objects.get(job_id=request_id)
    assert deliver(delivery.pk) is False
    delivery.refresh_from_db()
    return delivery


def test_a_submission_does_not_resolve_its_webhook_host(tenant: dict[str, Any], resolver: Resolver) -> None:
    accepted = submit(tenant, f"https://{SLOW_NAME}/hook")
    assert accepted.status_code == 200, accepted.content
    assert SLOW_NAME not in resolver.asked
    # The body's webhook_url is checked the same way.
    body = {"prompt": "x", "webhook_url": f"https://{SLOW_NAME}/other"}
    assert tenant["client"].post("/queue/platform/tiny-sd", body, format="json").status_code == 200
    assert resolver.asked == []


def test_billing_alert_settings_do_not_resolve_their_webhook_host(tenant: dict[str, Any], resolver: Resolver) -> None:
    saved = tenant["client"].put(
        "/v1/billing/alerts/settings", {"webhook_url": f"https://{SLOW_NAME}/billing"}, format="json"
    )
    assert saved.status_code == 200, saved.content
    assert resolver.asked == []


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3",
        "127.0.0.1:8000",
        "127.1",  # 127.0.0.1 as inet_aton reads it
        "0x7f.1",
        "2130706433",  # one integer
        "169.254.169.254",
        "[::1]",
        "[::ffff:10.0.0.1]",
        "[fd00::1]",
        "0.0.0.0",  # noqa: S104 - a host refused, not an address bound
        "localhost",
        "api.localhost",
    ],
)
def test_a_forbidden_address_written_out_is_still_refused_at_submission(
    tenant: dict[str, Any], resolver: Resolver, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="inference.netguard")
    refused = submit(tenant, f"http://{host}/hook")
    assert refused.status_code == 422, refused.content
    body = refused.json()
    assert body["error_type"] == "invalid_webhook_url"
    assert body["detail"][0]["msg"] == f"Invalid webhook URL: {HOST_REFUSED}"  # the one message for every host
    assert body["detail"][0]["loc"] == ["query", "fal_webhook"]
    assert resolver.asked == []
    assert "refused" in caplog.text  # why, with the address, in our log only


def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(
    tenant: dict[str, Any], resolver: Resolver, receiver: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = receiver.base_url.rsplit(":", 1)[1]
    resolver.answers["innocent.example"] = "127.0.0.1"  # the receiver listens there, and must hear nothing
    resolver.answers["cluster.internal-test"] = "10.96.14.7"
    caplog.set_level(logging.INFO, logger="inference.netguard")
    errors = []
    for name in ("innocent.example", "cluster.internal-test", SLOW_NAME):
        accepted = submit(tenant, f"http://{name}:{port}/hook")
        assert accepted.status_code == 200, accepted.content
        delivery = delivered_to(tenant, accepted.json()["request_id"])
        assert delivery.status == WebhookStatus.PENDING  # retried later, as any failed try
        [attempt] = WebhookAttempt.objects.filter(delivery=delivery)
        assert attempt.status_code is None
        errors.append(attempt.error)
    assert receiver.received == []
    # The delivery log is the customer's: one message whatever the reason, the address in our log only.
    assert errors == [HOST_REFUSED] * 3
    assert "127.0.0.1" in caplog.text
    assert "10.96.14.7" in caplog.text
    assert {"innocent.example", "cluster.internal-test", SLOW_NAME} <= set(resolver.asked)


def test_check_url_offline_asks_no_resolver(resolver: Resolver) -> None:
    public = netguard.check_url_offline("https://hooks.example.com:8443/x", allow_private=False)
    assert public == ("hooks.example.com", 8443)
    assert netguard.check_url_offline("http://93.184.215.14/x", allow_private=False) == ("93.184.215.14", 80)
    with pytest.raises(UnsafeUrl, match="port must be from 1 to 65535"):
        netguard.check_url_offline("https://hooks.example.com:70000/", allow_private=False)
    with pytest.raises(UnsafeUrl, match="Only http and https"):
        netguard.check_url_offline("ftp://hooks.example.com/", allow_private=False)
    assert netguard.check_url_offline("http://127.0.0.1:9/", allow_private=True) == ("127.0.0.1", 9)
    assert resolver.asked == []
