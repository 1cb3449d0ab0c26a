"""Customer webhooks: fal's body, signed twice (Standard Webhooks, and fal's ED25519 headers), retried with backoff.

A finished request with a ``webhook_url`` gets one ``WebhookDelivery`` row, written by the transaction that ends the
request (``record_delivery``: an outbox, so no crash or error after that COMMIT can end a request without its
webhook); every try is a ``WebhookAttempt`` row (the delivery log developers read in the API). The row drives
retries: a try is claimed with a conditional UPDATE (no lock is held during the HTTP call), and the periodic
``deliver_due_webhooks`` sweep picks up whatever is due, including first tries whose message never went.

An organization's events (``schedule_event``: billing's spend alerts) travel the same way: a row with the event's
body, signed with the same two schemes (fal's request id header carries the event's message id), retried alike.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
import uuid
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from celery import current_app
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone
from standardwebhooks import Webhook

from inference import netguard, webhook_signing
from inference.hooks import hooks
from inference.models import Job, JobStatus, TenantSettings, WebhookAttempt, WebhookDelivery, WebhookStatus

logger = logging.getLogger(__name__)

DELIVER_TASK = "inference.deliver_webhook"
MAX_URL_LENGTH = 2000
# Delay after the n-th failed try (n = 1, 2, ...); the last one repeats until the retry window ends.
RETRY_DELAYS_SECONDS = (5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800)
# Each delay is multiplied by a random factor in this range, so receivers that fail together
# (an outage) are not retried in lockstep.
RETRY_JITTER = (0.8, 1.2)
EXCERPT_CHARS = 500
# A response is read only this far: the log keeps an excerpt, and a receiver must not stream forever.
MAX_RESPONSE_BYTES = 4096
# Receivers that answer this have removed the endpoint on purpose: stop retrying at once.
GONE = 410

_random = secrets.SystemRandom()


class WebhookUrlError(ValueError):
    """The webhook URL cannot be used; the message is fit for a 422 ``detail``."""


def check_webhook_url(url: str) -> None:
    """Whether ``url`` may be a webhook's, as far as can be told without the network (it runs on request threads:
    a name that resolves slowly must not hold them). Its name is resolved, and every address checked, by each
    delivery when it connects (``deliver``)."""
    if len(url) > MAX_URL_LENGTH:
        raise WebhookUrlError(f"The webhook URL is longer than {MAX_URL_LENGTH} characters.")
    try:
        netguard.check_url_offline(url)
    except netguard.UnsafeUrl as exc:
        raise WebhookUrlError(f"Invalid webhook URL: {exc}") from None


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def webhook_secret_for(organization_id: uuid.UUID) -> str:
    """The organization's signing secret, created on first use."""
    tenant_settings, _ = TenantSettings.objects.get_or_create(
        organization_id=organization_id, defaults={"webhook_secret": new_webhook_secret()}
    )
    if not tenant_settings.webhook_secret:
        # Created elsewhere (e.g. only to set retention): give it a secret, once, even under a race.
        TenantSettings.objects.filter(pk=tenant_settings.pk, webhook_secret="").update(
            webhook_secret=new_webhook_secret()
        )
        tenant_settings.refresh_from_db(fields=["webhook_secret"])
    return tenant_settings.webhook_secret


def message_id_for(job_id: uuid.UUID, attempt: int = 0) -> str:
    # A job an operator requeued finishes again under a later attempt: a new message, not a retry.
    return f"msg_{job_id.hex}" if attempt <= 1 else f"msg_{job_id.hex}_{attempt}"


def record_delivery(job: Job) -> None:
    """The delivery of the webhook of ``job``, which the caller's transaction ends (``inference.closing``), written in
    that transaction and due at once: one statement, and nothing if the job has one already.

    Written anywhere after that COMMIT (it was written on commit, until 2026-12-07), it was lost for good to a worker
    killed between the COMMIT and its on-commit callbacks (a time limit, the OOM killer, an eviction) or to a database
    error in them, which the callbacks log and swallow: nothing looks for a final request without its delivery. In
    the same transaction the request ends with its delivery or not at all; its first try is queued once it commits
    (``send_first_try``), and if that message never goes, the ``deliver_due_webhooks`` sweep finds the delivery due.
    The organization's signing secret is made at the first signature if it is not there yet (``deliver``)."""
    delivery = WebhookDelivery(
        job_id=job.pk,
        url=job.webhook_url,
        message_id=message_id_for(job.pk, job.attempt),
        next_attempt_at=timezone.now(),
    )
    WebhookDelivery.objects.bulk_create([delivery], ignore_conflicts=True)


def send_first_try(job_id: uuid.UUID | str) -> None:
    """Queues the first try of the webhook of a request whose end has committed (its delivery not tried yet)."""
    pending = WebhookDelivery.objects.filter(job_id=job_id, status=WebhookStatus.PENDING, attempts=0)
    delivery_id = pending.values_list("pk", flat=True).first()
    if delivery_id is not None:
        enqueue_delivery(delivery_id)


def schedule_webhook(job_id: uuid.UUID | str) -> WebhookDelivery | None:
    """The delivery of a finished request's webhook, written if it is missing (``record_delivery``), its first try
    queued once the caller's transaction commits (at once outside one); None for a request not finished or with no
    webhook. The request's own end writes it (``inference.closing``): this is for a delivery written by hand."""
    job = Job.objects.filter(pk=job_id).only("id", "organization_id", "status", "webhook_url", "attempt").first()
    if job is None or not job.webhook_url or not job.is_final:
        return None
    existing = WebhookDelivery.objects.filter(job_id=job.pk).first()
    if existing is not None:
        return existing
    record_delivery(job)
    transaction.on_commit(lambda: send_first_try(job.pk))
    return WebhookDelivery.objects.get(job_id=job.pk)


def schedule_event(
    *, organization_id: uuid.UUID, url: str, event_type: str, message_id: str, payload: dict[str, Any]
) -> WebhookDelivery:
    """Creates the delivery of one event of an organization to ``url`` and queues its first try on commit.

    Called inside the transaction that records the event, so the event and its delivery commit together;
    ``message_id`` is unique among events (the ``webhook-id`` a receiver deduplicates with), so an event is
    delivered once whoever records it. If the broker is down, the delivery is due now and the sweep sends it.
    """
    webhook_secret_for(organization_id)  # so the secret exists before the first signature
    delivery = WebhookDelivery.objects.create(
        organization_id=organization_id,
        event_type=event_type,
        payload=payload,
        url=url,
        message_id=message_id,
        next_attempt_at=timezone.now(),
    )
    delivery_id = delivery.pk
    transaction.on_commit(lambda: enqueue_delivery(delivery_id), robust=True)
    return delivery


def enqueue_delivery(delivery_id: int) -> bool:
    try:
        current_app.send_task(DELIVER_TASK, args=[delivery_id], retry=False)
    except Exception as exc:
        logger.warning("broker refused webhook delivery %s: %s; the sweep will send it", delivery_id, exc)
        return False
    return True


def webhook_body(job: Job) -> dict[str, Any]:
    """fal's webhook body. On error fal puts the error details in ``payload``.

    Output URLs start with the address the request was submitted to, as the API's own answers do;
    ``PUBLIC_BASE_URL`` only for a request made without one (outside the HTTP API).
    """
    from inference.files import render_result

    succeeded = job.status == JobStatus.COMPLETED
    body: dict[str, Any] = {
        "request_id": str(job.id),
        "gateway_request_id": str(job.id),
        "status": "OK" if succeeded else "ERROR",
        "payload": (
            render_result(job, base_url=job.base_url or settings.PUBLIC_BASE_URL)
            if succeeded
            else {"detail": job.error, "error_type": job.error_type}
        ),
        "error": None if succeeded else (job.error or "The request failed."),
    }
    if hooks.usage is not None:
        body["usage"] = hooks.usage(job)
    return body


def retry_delay_seconds(failed_tries: int) -> float:
    """The wait after ``failed_tries`` failures: 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, 8 h, 8 h..."""
    base = RETRY_DELAYS_SECONDS[min(max(failed_tries, 1), len(RETRY_DELAYS_SECONDS)) - 1]
    return base * _random.uniform(*RETRY_JITTER)


def next_attempt_time(*, created_at: datetime, failed_tries: int, now: datetime) -> datetime | None:
    """When to try again, or None to give up: the window (``WEBHOOK_RETRY_WINDOW_SECONDS`` from
    ``created_at``) is over. A wait that would overshoot the window ends at it, so the last try
    happens at the very end and retries cover the whole window."""
    deadline = created_at + timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_SECONDS)
    if now >= deadline:
        return None
    return min(now + timedelta(seconds=retry_delay_seconds(failed_tries)), deadline)


def deliver(delivery_id: int, *, force: bool = False) -> bool:
    """One try at a pending delivery that is due. True if delivered.

    ``force`` tries it even if not yet due (an operator's "retry now"); a failed delivery must be
    set back to pending first. Unlike the normal path it does not wait for a try still in flight.

    The try is claimed first with a conditional UPDATE (attempts + 1, and ``next_attempt_at`` moved
    past the HTTP call so the sweep leaves it alone meanwhile; if this process dies, the sweep
    retries it then). No transaction is open during the HTTP call.
    """
    now = timezone.now()
    delivery = WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookStatus.PENDING).first()
    if delivery is None or (not force and (delivery.next_attempt_at is None or delivery.next_attempt_at > now)):
        return False
    number = delivery.attempts + 1
    in_flight_until = now + timedelta(seconds=2 * settings.WEBHOOK_TIMEOUT_SECONDS + 60)
    claimed = WebhookDelivery.objects.filter(
        pk=delivery_id, status=WebhookStatus.PENDING, attempts=delivery.attempts
    ).update(attempts=number, next_attempt_at=in_flight_until)
    if not claimed:
        return False  # another worker took this try

    status_code, error, excerpt, duration_ms = _post(delivery)

    finished = timezone.now()
    delivered = status_code is not None and 200 <= status_code < 300
    update: dict[str, Any]
    if delivered:
        update = {"status": WebhookStatus.DELIVERED, "delivered_at": finished, "next_attempt_at": None}
    elif status_code == GONE:
        update = {"status": WebhookStatus.FAILED, "next_attempt_at": None}
    else:
        retry_at = next_attempt_time(created_at=delivery.created_at, failed_tries=number, now=finished)
        update = (
            {"next_attempt_at": retry_at}
            if retry_at is not None
            else {"status": WebhookStatus.FAILED, "next_attempt_at": None}
        )
    with transaction.atomic():
        WebhookAttempt.objects.create(
            delivery_id=delivery_id,
            number=number,
            status_code=status_code,
            error=error[:500],
            response_excerpt=excerpt,
            duration_ms=duration_ms,
            created_at=finished,
        )
        WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookStatus.PENDING, attempts=number).update(**update)
    if not delivered:
        logger.info("webhook %s try %s failed: %s", delivery_id, number, error or f"HTTP {status_code}")
    return delivered


def _post(delivery: WebhookDelivery) -> tuple[int | None, str, str, int]:
    """Sends the signed body once: (status code or None, error, response excerpt, duration in ms)."""
    if delivery.job_id is None:
        # An organization's event: its body as recorded; fal's request id header carries the event's message id.
        assert delivery.organization_id is not None  # noqa: S101 - the row's check constraint
        organization_id, request_id = delivery.organization_id, delivery.message_id
        body: Any = delivery.payload
    else:
        job = Job.objects.select_related("endpoint").get(pk=delivery.job_id)
        organization_id, request_id = job.organization_id, str(job.id)
        body = None
    try:
        payload = json.dumps(webhook_body(job) if body is None else body, cls=DjangoJSONEncoder, separators=(",", ":"))
    except Exception as exc:
        # Logged as a failed try (and retried) rather than lost with the claim.
        logger.exception("could not build the body of webhook %s", delivery.pk)
        return None, f"Could not build the webhook body: {type(exc).__name__}.", "", 0
    content = payload.encode()
    sent_at = timezone.now()
    headers = {
        "content-type": "application/json",
        "user-agent": "genmedia-webhooks/1",
        "webhook-id": delivery.message_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(webhook_secret_for(organization_id)).sign(delivery.message_id, sent_at, payload),
        **webhook_signing.signature_headers(
            request_id=request_id,
            user_id=str(organization_id),
            timestamp=int(sent_at.timestamp()),
            body=content,
        ),
    }
    timeout = float(settings.WEBHOOK_TIMEOUT_SECONDS)
    started = time.monotonic()
    status_code: int | None = None
    error = ""
    excerpt = ""
    try:
        netguard.check_url(delivery.url)  # the clearest message; the client checks again at connect
        with (
            netguard.open_client(timeout=timeout) as client,
            client.stream("POST", delivery.url, content=content, headers=headers) as response,
        ):
            status_code = response.status_code
            excerpt = _read_excerpt(response, deadline=started + timeout)
            if not response.is_success:
                error = f"HTTP {status_code}"
    except netguard.UnsafeUrl as exc:
        error = str(exc)
    except httpx.TimeoutException:
        error = f"Timed out after {timeout:g} s."
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = round((time.monotonic() - started) * 1000)
    return status_code, error[:500], excerpt, duration_ms


def _read_excerpt(response: httpx.Response, *, deadline: float) -> str:
    received = b""
    for chunk in response.iter_bytes():
        received += chunk
        if len(received) >= MAX_RESPONSE_BYTES or time.monotonic() > deadline:
            break
    return received.decode("utf-8", errors="replace")[:EXCERPT_CHARS]


def deliver_due_webhooks(limit: int = 100, *, budget_seconds: float = 120) -> int:
    """Tries the pending deliveries that are due, oldest first; returns how many were tried.

    Stops starting new tries after ``budget_seconds`` (a run of slow receivers must not hold the
    periodic task past its time limit); the rest stay due for the next run.
    """
    stop_at = time.monotonic() + budget_seconds
    due = list(
        WebhookDelivery.objects.filter(status=WebhookStatus.PENDING, next_attempt_at__lte=timezone.now())
        .order_by("next_attempt_at", "pk")
        .values_list("pk", flat=True)[:limit]
    )
    tried = 0
    for delivery_id in due:
        if time.monotonic() > stop_at:
            break
        deliver(delivery_id)
        tried += 1
    return tried


def where_it_goes(url: str) -> str:
    """A webhook URL shown to a reader who did not set it and may not change it (the billing alerts' to a key without
    the ``admin`` scope; a request's to a key or member other than the one that sent it and the organization's
    admins): where it goes, not what it says. Its path and query are often the secret itself (an incoming-webhook URL
    of a chat service posts to its channel for anyone who has it), and a user and password in it always are."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address, as it is written in a URL
    port = f":{parts.port}" if parts.port is not None else ""
    return f"{parts.scheme}://{host}{port}/…"


def delivery_log(job: Job, *, in_full: bool) -> dict[str, Any] | None:
    """The request's webhook state and its tries, for the API; None if it has no webhook. ``in_full``: its URL as
    it is (for the key that sent the request, or one with the ``admin`` scope), or only where it goes."""
    if not job.webhook_url:
        return None
    shown = (lambda url: url) if in_full else where_it_goes
    delivery = WebhookDelivery.objects.filter(job=job).prefetch_related("log").first()
    if delivery is None:  # not finished yet: nothing sent
        return {
            "url": shown(job.webhook_url),
            "status": WebhookStatus.PENDING.value,
            "attempts": 0,
            "next_attempt_at": None,
            "delivered_at": None,
            "log": [],
        }
    return {
        "url": shown(delivery.url),
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "delivered_at": _iso(delivery.delivered_at),
        "log": [
            {
                "attempt": attempt.number,
                "status_code": attempt.status_code,
                "error": attempt.error or None,
                "response": attempt.response_excerpt,
                "duration_ms": attempt.duration_ms,
                "created_at": attempt.created_at.isoformat(),
            }
            for attempt in delivery.log.all()
        ],
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
