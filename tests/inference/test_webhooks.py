"""Customer webhooks: fal's body, Standard Webhooks and fal signatures, retries over a day, SSRF refusals.

Deliveries go to a real HTTP receiver on 127.0.0.1 (OUTBOUND_ALLOW_PRIVATE on for that reason).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import current_app
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import connection
from django.db.models import F
from django.utils import timezone
from standardwebhooks import Webhook

from inference import webhook_signing, webhooks
from inference.hooks import hooks
from inference.models import Endpoint, Job, JobStatus, TenantSettings, WebhookDelivery, WebhookStatus
from inference.netguard import HOST_REFUSED
from inference.webhook_tasks import deliver_due_webhooks as deliver_due_task
from inference.webhook_tasks import deliver_webhook as deliver_task
from inference.webhooks import (
    WebhookUrlError,
    check_webhook_url,
    deliver,
    deliver_due_webhooks,
    delivery_log,
    next_attempt_time,
    schedule_webhook,
    webhook_body,
    webhook_secret_for,
)
from tests.inference.local_http import LocalServer, Reply, local_server

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver(settings: Any) -> Iterator[LocalServer]:
    settings.OUTBOUND_ALLOW_PRIVATE = True
    with local_server() as server:
        yield server


@pytest.fixture
def make_job(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> Callable[..., Job]:
    endpoint = builtin_endpoint

    def make(webhook_url: str = "", status: str = JobStatus.COMPLETED, **fields: Any) -> Job:
        final = status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)
        fields.setdefault(
            "result", {"images": [], "seed": 1, "prompt": "a cat"} if status == JobStatus.COMPLETED else None
        )
        return Job.objects.create(
            organization=tenant["organization"],
            api_key=tenant["api_key"],
            endpoint=endpoint,
            gpu_class=endpoint.gpu_class,
            input={"prompt": "a cat"},
            webhook_url=webhook_url,
            status=status,
            finished_at=timezone.now() if final else None,
            **fields,
        )

    return make


def scheduled(job: Job) -> WebhookDelivery:
    delivery = schedule_webhook(job.id)
    assert delivery is not None
    return delivery


def verified_body(job: Job, request: Any) -> Any:
    return Webhook(webhook_secret_for(job.organization_id)).verify(request.body, request.headers)


# Scheduling


def test_schedule_creates_one_delivery_and_queues_it_on_commit(
    make_job: Callable[..., Job], receiver: LocalServer, sent_tasks: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    job = make_job(receiver.url("/hook"))
    with django_capture_on_commit_callbacks(execute=True):
        delivery = scheduled(job)
        again = scheduled(job)
    assert again.pk == delivery.pk
    assert sent_tasks == [("inference.deliver_webhook", [delivery.pk])]
    assert delivery.message_id == f"msg_{job.id.hex}"
    assert delivery.status == WebhookStatus.PENDING
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at <= timezone.now()
    assert receiver.received == []  # sending is the task's job


def test_schedule_survives_a_broker_outage(
    make_job: Callable[..., Job], receiver: LocalServer, monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:  # fmt: skip
    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(current_app, "send_task", broker_down)
    job = make_job(receiver.url("/hook"))
    with django_capture_on_commit_callbacks(execute=True):
        delivery = scheduled(job)
    # Still due, so the periodic sweep sends it.
    assert deliver_due_webhooks() == 1
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.DELIVERED


@pytest.mark.usefixtures("sent_tasks")
def test_no_delivery_without_a_webhook_or_before_the_end(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    assert schedule_webhook(make_job("").id) is None
    assert schedule_webhook(make_job(receiver.url("/hook"), status=JobStatus.RUNNING).id) is None
    assert not WebhookDelivery.objects.exists()


def test_webhook_secret_is_created_once(tenant: dict[str, Any]) -> None:
    organization_id = tenant["organization"].pk
    secret = webhook_secret_for(organization_id)
    assert secret.startswith("whsec_")
    assert len(Webhook(secret)._whsecret) == 24
    assert webhook_secret_for(organization_id) == secret
    TenantSettings.objects.filter(organization_id=organization_id).update(webhook_secret="")
    refilled = webhook_secret_for(organization_id)
    assert refilled.startswith("whsec_")
    assert refilled != secret


# Delivery


@pytest.mark.usefixtures("sent_tasks")
def test_delivers_a_signed_fal_body(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    job = make_job(receiver.url("/hook?token=abc"))
    delivery = scheduled(job)

    assert deliver(delivery.pk) is True

    [request] = receiver.received
    assert request.method == "POST"
    assert request.path == "/hook?token=abc"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["webhook-id"] == f"msg_{job.id.hex}"
    body = verified_body(job, request)
    # Signed fal's way too (tests/inference/test_fal_webhook_signatures.py verifies it with fal's own code).
    assert request.headers["x-fal-webhook-request-id"] == str(job.id)
    assert request.headers["x-fal-webhook-user-id"] == str(job.organization_id)
    assert request.headers["x-fal-webhook-timestamp"] == request.headers["webhook-timestamp"]
    [key] = webhook_signing.jwks()["keys"]
    Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(key["x"])).verify(
        bytes.fromhex(request.headers["x-fal-webhook-signature"]),
        b"\n".join(
            [
                str(job.id).encode(),
                str(job.organization_id).encode(),
                request.headers["x-fal-webhook-timestamp"].encode(),
                hashlib.sha256(request.body).hexdigest().encode(),
            ]
        ),
    )
    assert body == {
        "request_id": str(job.id),
        "gateway_request_id": str(job.id),
        "status": "OK",
        "payload": {"images": [], "seed": 1, "prompt": "a cat"},
        "error": None,
        # Made without an attempt, so nothing used: billing's usage object says so.
        "usage": {
            "gpu_class": "cpu", "gpu_ms": 0, "billable_units": 0.0, "unit": "gpu_second", "unit_price_micros": 100,
            "cost_micros": 0,
        },
    }  # fmt: skip
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.DELIVERED
    assert delivery.attempts == 1
    assert delivery.delivered_at is not None
    assert delivery.next_attempt_at is None


@pytest.mark.usefixtures("sent_tasks")
def test_a_tampered_body_fails_verification(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    from standardwebhooks.webhooks import WebhookVerificationError

    job = make_job(receiver.url("/hook"))
    deliver(scheduled(job).pk)
    [request] = receiver.received
    with pytest.raises(WebhookVerificationError):
        Webhook(webhook_secret_for(job.organization_id)).verify(
            request.body.replace(b'"OK"', b'"ERROR"'), request.headers
        )


@pytest.mark.usefixtures("sent_tasks")
def test_error_body_carries_the_details_in_payload(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    job = make_job(
        receiver.url("/hook"), status=JobStatus.FAILED, error="Out of memory on the GPU.", error_type="internal_error"
    )
    assert deliver(scheduled(job).pk) is True
    body = verified_body(job, receiver.received[0])
    assert body["status"] == "ERROR"
    assert body["error"] == "Out of memory on the GPU."
    assert body["payload"] == {"detail": "Out of memory on the GPU.", "error_type": "internal_error"}


def test_body_includes_usage_when_billing_answers(
    make_job: Callable[..., Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    usage = {"gpu_class": "cpu", "gpu_ms": 1234, "cost_micros": 56}
    monkeypatch.setattr(hooks, "usage", lambda job: usage)
    assert webhook_body(make_job("https://hooks.example.com/"))["usage"] == usage
    monkeypatch.setattr(hooks, "usage", None)
    assert "usage" not in webhook_body(make_job("https://hooks.example.com/"))


@pytest.mark.usefixtures("sent_tasks")
def test_a_failed_try_is_logged_and_retried_later(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    answers = iter([Reply(status=500, body=b"receiver exploded " + b"!" * 1000), Reply(status=204, body=b"")])
    receiver.routes["/hook"] = lambda request: next(answers)
    job = make_job(receiver.url("/hook"))
    delivery = scheduled(job)

    before = timezone.now()
    assert deliver(delivery.pk) is False
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.PENDING
    assert delivery.attempts == 1
    assert delivery.next_attempt_at is not None
    # 5 s after the first failure, give or take the jitter.
    assert before + timedelta(seconds=3.9) <= delivery.next_attempt_at <= timezone.now() + timedelta(seconds=6.1)
    [attempt] = delivery.log.all()
    assert (attempt.number, attempt.status_code, attempt.error) == (1, 500, "HTTP 500")
    assert attempt.response_excerpt.startswith("receiver exploded")
    assert len(attempt.response_excerpt) == 500

    assert deliver(delivery.pk) is False  # not due yet: nothing sent
    assert len(receiver.received) == 1
    assert deliver_due_webhooks() == 0

    assert deliver(delivery.pk, force=True) is True
    assert len(receiver.received) == 2
    # The same message id on every try, so receivers can deduplicate.
    assert receiver.received[0].headers["webhook-id"] == receiver.received[1].headers["webhook-id"]
    verified_body(job, receiver.received[1])
    log = delivery_log(job, in_full=True)
    assert log is not None
    assert log["status"] == "delivered"
    assert log["attempts"] == 2
    assert log["next_attempt_at"] is None
    assert [(entry["attempt"], entry["status_code"], entry["error"]) for entry in log["log"]] == [
        (1, 500, "HTTP 500"),
        (2, 204, None),
    ]
    assert all(isinstance(entry["duration_ms"], int) for entry in log["log"])
    datetime.fromisoformat(log["log"][0]["created_at"])


@pytest.mark.usefixtures("sent_tasks")
def test_a_delivered_webhook_is_never_sent_again(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    delivery = scheduled(make_job(receiver.url("/hook")))
    assert deliver(delivery.pk) is True
    assert deliver(delivery.pk) is False
    assert deliver(delivery.pk, force=True) is False
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now() - timedelta(minutes=1))
    assert deliver_due_webhooks() == 0
    assert len(receiver.received) == 1


@pytest.mark.usefixtures("sent_tasks")
def test_gone_stops_retries(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    receiver.routes["/hook"] = Reply(status=410)
    delivery = scheduled(make_job(receiver.url("/hook")))
    assert deliver(delivery.pk) is False
    delivery.refresh_from_db()
    assert (delivery.status, delivery.next_attempt_at) == (WebhookStatus.FAILED, None)


@pytest.mark.usefixtures("sent_tasks")
def test_gives_up_after_the_retry_window(make_job: Callable[..., Job], receiver: LocalServer, settings: Any) -> None:
    receiver.routes["/hook"] = Reply(status=503)
    delivery = scheduled(make_job(receiver.url("/hook")))
    WebhookDelivery.objects.filter(pk=delivery.pk).update(
        created_at=timezone.now() - timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_SECONDS + 1)
    )
    assert deliver(delivery.pk) is False
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.FAILED
    assert delivery.next_attempt_at is None
    assert delivery.log.count() == 1


@pytest.mark.usefixtures("sent_tasks")
def test_an_unreachable_receiver_is_logged(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    delivery = scheduled(make_job(f"http://127.0.0.1:{port}/hook"))
    assert deliver(delivery.pk) is False
    [attempt] = delivery.log.all()
    assert attempt.status_code is None
    assert "ConnectError" in attempt.error


def test_retry_schedule_covers_at_least_a_day(settings: Any) -> None:
    settings.WEBHOOK_RETRY_WINDOW_SECONDS = 26 * 3600
    created = timezone.now()
    tries = [created]  # the first try, at once
    while (retry_at := next_attempt_time(created_at=created, failed_tries=len(tries), now=tries[-1])) is not None:
        tries.append(retry_at)
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(tries)]
    assert tries[-1] - created >= timedelta(hours=24)
    assert tries[-1] - created <= timedelta(hours=26)
    assert 4 <= gaps[0] <= 6
    assert 24 <= gaps[1] <= 36
    assert max(gaps) <= 8 * 3600 * 1.2  # capped near 8 h
    assert 10 <= len(tries) <= 20
    assert next_attempt_time(created_at=created, failed_tries=99, now=created + timedelta(hours=26)) is None


def test_retry_delays_grow_with_jitter() -> None:
    for failed_tries, base in enumerate(webhooks.RETRY_DELAYS_SECONDS, start=1):
        delays = {webhooks.retry_delay_seconds(failed_tries) for _ in range(20)}
        assert all(0.8 * base <= delay <= 1.2 * base for delay in delays)
        assert len(delays) > 1
    assert webhooks.retry_delay_seconds(50) <= 8 * 3600 * 1.2


# SSRF


def test_webhook_urls_are_checked_at_submission(settings: Any) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = False
    for url in ("http://127.0.0.1:8000/hook", "http://localhost/hook", "http://169.254.169.254/", "http://[::1]/"):
        with pytest.raises(WebhookUrlError, match="Invalid webhook URL"):
            check_webhook_url(url)
    with pytest.raises(WebhookUrlError, match="Only http and https"):
        check_webhook_url("ftp://example.com/hook")
    with pytest.raises(WebhookUrlError, match="longer than 2000"):
        check_webhook_url("https://example.com/" + "a" * 2000)
    settings.OUTBOUND_ALLOW_PRIVATE = True
    check_webhook_url("http://127.0.0.1:8000/hook")


@pytest.mark.usefixtures("sent_tasks")
def test_private_receivers_are_refused_at_delivery(
    make_job: Callable[..., Job], receiver: LocalServer, settings: Any
) -> None:
    delivery = scheduled(make_job(receiver.url("/hook")))  # accepted while private addresses were allowed
    settings.OUTBOUND_ALLOW_PRIVATE = False
    assert deliver(delivery.pk) is False
    assert receiver.received == []
    [attempt] = delivery.log.all()
    assert attempt.status_code is None
    assert attempt.error == HOST_REFUSED  # the delivery log is the customer's: why (loopback) is our log's only
    delivery.refresh_from_db()
    assert delivery.status == WebhookStatus.PENDING


# The sweep and the tasks


@pytest.mark.usefixtures("sent_tasks")
def test_sweep_delivers_only_what_is_due(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    now = timezone.now()
    due = scheduled(make_job(receiver.url("/due")))
    later = scheduled(make_job(receiver.url("/later")))
    WebhookDelivery.objects.filter(pk=later.pk).update(next_attempt_at=now + timedelta(minutes=5))
    done = scheduled(make_job(receiver.url("/done")))
    WebhookDelivery.objects.filter(pk=done.pk).update(status=WebhookStatus.DELIVERED, next_attempt_at=now)
    gave_up = scheduled(make_job(receiver.url("/gave-up")))
    WebhookDelivery.objects.filter(pk=gave_up.pk).update(status=WebhookStatus.FAILED, next_attempt_at=now)

    assert deliver_due_webhooks() == 1
    assert [request.path for request in receiver.received] == ["/due"]
    due.refresh_from_db()
    assert due.status == WebhookStatus.DELIVERED
    assert deliver_due_webhooks() == 0


@pytest.mark.usefixtures("sent_tasks")
def test_tasks_call_the_services(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    first = scheduled(make_job(receiver.url("/first")))
    second = scheduled(make_job(receiver.url("/second")))
    assert deliver_task(first.pk) is True
    assert deliver_due_task() == 1
    assert sorted(request.path for request in receiver.received) == ["/first", "/second"]
    second.refresh_from_db()
    assert second.status == WebhookStatus.DELIVERED


def test_delivery_log_before_and_without_a_webhook(make_job: Callable[..., Job]) -> None:
    assert delivery_log(make_job(""), in_full=True) is None
    waiting = delivery_log(make_job("https://hooks.example.com/", status=JobStatus.RUNNING), in_full=True)
    assert waiting == {
        "url": "https://hooks.example.com/",
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": None,
        "delivered_at": None,
        "log": [],
    }


@pytest.mark.usefixtures("sent_tasks")
def test_the_body_is_compact_json(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    job = make_job(receiver.url("/hook"))
    deliver(scheduled(job).pk)
    raw = receiver.received[0].body
    assert json.loads(raw)["request_id"] == str(job.id)
    assert b": " not in raw


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("sent_tasks")
def test_no_lock_is_held_during_the_http_call(make_job: Callable[..., Job], receiver: LocalServer) -> None:
    delivery = scheduled(make_job(receiver.url("/hook")))
    seen: dict[str, Any] = {}

    def while_in_flight(request: Any) -> Reply:
        # Runs in the receiver's thread, on its own database connection, during the POST.
        try:
            seen["second_try_sent"] = deliver(delivery.pk)
            seen["row_written"] = WebhookDelivery.objects.filter(pk=delivery.pk).update(url=F("url"))
        finally:
            connection.close()
        return Reply(status=200)

    receiver.routes["/hook"] = while_in_flight
    assert deliver(delivery.pk) is True
    assert seen == {"second_try_sent": False, "row_written": 1}
    assert len(receiver.received) == 1
