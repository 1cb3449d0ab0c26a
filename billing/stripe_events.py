"""The Stripe webhook inbox: every event stored once, processed off the request path, replayable.

Receiving verifies the signature with the SDK, stores the event (its id is the primary key, so a
redelivery is answered 200 and not processed again) and queues its processing on commit.
Processing re-fetches the object from Stripe and applies its *current* state (``stripe_state.apply_*``)
in one transaction with the event's own status, so events may arrive in any order and any number
of times: every effect is a ledger entry with its own idempotency key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import stripe
from celery import current_app
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from accounts.models import AuditAction
from accounts.services import SYSTEM, Actor, record_audit
from billing import cards, stripe_state
from billing.locks import locked_stripe_event
from billing.models import Account, Payment, StripeEvent, StripeEventStatus
from billing.stripe_client import construct_event, field, object_id, stripe_client

logger = logging.getLogger(__name__)

PROCESS_TASK = "billing.process_stripe_event"
DONE = (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED)
# An event not processed this long after it arrived lost its message: the sweep processes it.
PENDING_GRACE = timedelta(seconds=60)
# No retry past this many attempts, whatever ``BILLING_STRIPE_EVENT_MAX_ATTEMPTS`` says: the next would come years
# after the event arrived (2^20 minutes are two years), and a few more doublings overflow a datetime.
BACKOFF_HORIZON = 20

# Applies what was read from Stripe; answers what it changed (``None``: nothing of ours, the event is ignored).
Apply = Callable[[], Payment | Account | None]


def _payment_intent(intent_id: str) -> Apply:
    intent = stripe_client().v1.payment_intents.retrieve(intent_id)
    return lambda: stripe_state.apply_payment_intent(intent)


def _checkout_session(session_id: str) -> Apply:
    client = stripe_client()
    session = client.v1.checkout.sessions.retrieve(session_id)
    intent_id = object_id(field(session, "payment_intent"))
    intent = client.v1.payment_intents.retrieve(intent_id) if intent_id else None
    return lambda: stripe_state.apply_checkout_session(session, intent)


def _charge(charge_id: str) -> Apply:
    client = stripe_client()
    charge = client.v1.charges.retrieve(charge_id)
    intent_id = object_id(field(charge, "payment_intent"))
    if not intent_id:
        return lambda: None  # not a payment of ours: we charge only through PaymentIntents
    intent = client.v1.payment_intents.retrieve(intent_id)
    refunds = list(client.v1.refunds.list(params={"charge": charge.id, "limit": 100}).auto_paging_iter())
    return lambda: stripe_state.apply_refunds(charge=charge, intent=intent, refunds=refunds)


def _refund(refund_id: str) -> Apply:
    refund = stripe_client().v1.refunds.retrieve(refund_id)
    charge_id = object_id(field(refund, "charge"))
    return _charge(charge_id) if charge_id else (lambda: None)


def _dispute(dispute_id: str) -> Apply:
    client = stripe_client()
    dispute = client.v1.disputes.retrieve(dispute_id)
    intent_id = object_id(field(dispute, "payment_intent"))
    if not intent_id:
        charge = client.v1.charges.retrieve(str(object_id(dispute.charge)))
        intent_id = object_id(field(charge, "payment_intent"))
    if not intent_id:
        return lambda: None
    intent = client.v1.payment_intents.retrieve(intent_id)
    return lambda: stripe_state.apply_dispute(dispute=dispute, intent=intent)


def _customer(customer_id: str) -> Apply:
    if not cards.deleted_at_stripe(customer_id):
        return lambda: None  # a stale delivery: the customer is there
    return lambda: cards.forget_deleted_customer(customer_id=customer_id)


# Each handled event type, and how to read the current state of its object from Stripe.
FETCHERS: dict[str, Callable[[str], Apply]] = {
    **dict.fromkeys(
        (
            "payment_intent.succeeded",
            "payment_intent.payment_failed",
            "payment_intent.canceled",
            "payment_intent.processing",
            "payment_intent.requires_action",
        ),
        _payment_intent,
    ),
    **dict.fromkeys(
        (
            "checkout.session.completed",
            "checkout.session.async_payment_succeeded",
            "checkout.session.async_payment_failed",
            "checkout.session.expired",
        ),
        _checkout_session,
    ),
    "charge.refunded": _charge,
    **dict.fromkeys(("charge.refund.updated", "refund.created", "refund.updated", "refund.failed"), _refund),
    **dict.fromkeys(
        (
            "charge.dispute.created",
            "charge.dispute.updated",
            "charge.dispute.closed",
            "charge.dispute.funds_withdrawn",
            "charge.dispute.funds_reinstated",
        ),
        _dispute,
    ),
    "customer.deleted": _customer,
}


def receive_event(payload: bytes, signature: str) -> tuple[StripeEvent, bool]:
    """Stores a signed event once (raises ``stripe.SignatureVerificationError`` or ``ValueError`` if forged).

    Answers the stored event and whether it is new; a new one is queued for processing on commit. A signed body
    that is no event Stripe sends is stored too, as ignored with why (``receive_malformed``), and never processed.
    """
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("The body is not UTF-8.") from None  # before the signature could be checked: forged
    try:
        event = construct_event(payload, signature)
    except stripe.SignatureVerificationError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
        # The SDK checks the signature of the text before it reads it: what fails after that is signed.
        return receive_malformed(payload, f"not an event ({type(exc).__name__})")
    data = json.loads(payload)
    malformation = _malformation(data)
    if malformation is not None:
        return receive_malformed(payload, malformation)
    try:
        with transaction.atomic():
            stored = StripeEvent.objects.create(
                id=event.id, type=event.type, payload=json.loads(payload), livemode=bool(field(event, "livemode"))
            )
    except IntegrityError:
        return StripeEvent.objects.get(pk=event.id), False
    event_id = stored.id
    transaction.on_commit(lambda: enqueue_event(event_id), robust=True)
    return stored, True


MAX_EVENT_ID = 255
MAX_EVENT_TYPE = 100


def _storable(value: Any) -> Any:
    """``value`` as a JSON column holds it: PostgreSQL refuses NUL characters, unpaired surrogates, NaN and
    infinities, which Python's JSON parser lets through; those become text that shows what was sent."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {_storable(key): _storable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


def _malformation(data: Any) -> str | None:
    """Why a signed body is no event Stripe sends (``None`` when it is one)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    event_id, event_type, body = data.get("id"), data.get("type"), data.get("data")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_EVENT_ID:
        return "no event id"
    if not isinstance(event_type, str) or not 0 < len(event_type) <= MAX_EVENT_TYPE:
        return "no event type"
    if not isinstance(body, dict) or not isinstance(body.get("object"), dict):
        return "no data.object"
    if _storable(data) != data:  # NaN is unequal even to itself: caught here too
        return "values a JSON column cannot hold"
    return None


def receive_malformed(payload: bytes, reason: str) -> tuple[StripeEvent, bool]:
    """Stores a signed body that is no event, ignored (``error`` says why), under its id when it has a usable
    one, otherwise under one made from the body, so a redelivery is a duplicate. Its sender holds our signing
    secret; a retry would not mend it, so it is answered as received."""
    try:
        data: Any = json.loads(payload)
    except (ValueError, RecursionError):
        data = {"body": payload.decode("utf-8")[:10_000]}
    event_id = data.get("id") if isinstance(data, dict) else None
    if not (isinstance(event_id, str) and 0 < len(event_id) <= MAX_EVENT_ID and _storable(event_id) == event_id):
        event_id = f"malformed_{hashlib.sha256(payload).hexdigest()}"
    event_type = data.get("type") if isinstance(data, dict) else None
    try:
        with transaction.atomic():
            stored = StripeEvent.objects.create(
                id=event_id,
                type=_storable(event_type)[:MAX_EVENT_TYPE] if isinstance(event_type, str) else "",
                payload=_storable(data) if isinstance(data, dict) else {"body": _storable(data)},
                status=StripeEventStatus.IGNORED,
                error=f"Malformed event: {reason}.",
                processed_at=timezone.now(),
            )
    except IntegrityError:
        return StripeEvent.objects.get(pk=event_id), False
    logger.warning("stored malformed Stripe event %s: %s", event_id, reason)
    return stored, True


def enqueue_event(event_id: str) -> bool:
    try:
        current_app.send_task(PROCESS_TASK, args=[event_id], retry=False)
    except Exception as exc:
        logger.warning("broker refused Stripe event %s: %s; the sweep will process it", event_id, exc)
        return False
    return True


def process_event(event_id: str, *, force: bool = False) -> StripeEvent:
    """Applies one event's object as Stripe has it now; once, unless ``force`` (a replay).

    A failure is recorded on the event (status failed, the error, one more attempt) and not raised:
    the sweep retries it with backoff, and an operator can replay it.
    """
    event = StripeEvent.objects.get(pk=event_id)
    if event.status in DONE and not force:
        return event
    fetch = FETCHERS.get(event.type)
    target = ((event.payload.get("data") or {}).get("object") or {}).get("id")
    try:
        apply = fetch(str(target)) if fetch is not None and target else None  # read Stripe before taking locks
        with transaction.atomic():
            locked_event = locked_stripe_event(event_id)
            if locked_event.status in DONE and not force:
                return locked_event
            changed = apply() if apply is not None else None
            locked_event.status = StripeEventStatus.PROCESSED if changed is not None else StripeEventStatus.IGNORED
            locked_event.attempts += 1
            locked_event.error = ""
            locked_event.processed_at = timezone.now()
            locked_event.save(update_fields=["status", "attempts", "error", "processed_at"])
            return locked_event
    except SoftTimeLimitExceeded:
        raise  # the task's time is up: not the event's failure (it stays as it was, for the next sweep)
    except Exception as exc:
        logger.exception("Stripe event %s (%s) failed", event_id, event.type)
        error = f"{type(exc).__name__}: {exc}"[:4000]
        StripeEvent.objects.filter(pk=event_id).update(attempts=F("attempts") + 1, error=error)
        StripeEvent.objects.filter(pk=event_id).exclude(status__in=DONE).update(status=StripeEventStatus.FAILED)
        return StripeEvent.objects.get(pk=event_id)


def replay_event(*, event_id: str, actor: Actor = SYSTEM) -> StripeEvent:
    """Processes a stored event again from Stripe's current state (changes nothing if already applied); audited."""
    before = StripeEvent.objects.get(pk=event_id).status
    event = process_event(event_id, force=True)
    record_audit(
        action=AuditAction.STRIPE_EVENT_REPLAYED,
        actor=actor,
        target=event,
        metadata={"type": event.type, "status_before": before, "status": event.status, "error": event.error[:500]},
    )
    return event


def replay_events(
    *, event_ids: list[str] | None = None, since: datetime | None = None, actor: Actor = SYSTEM
) -> list[StripeEvent]:
    """Replays the events named, or all received since a moment, or (by default) the failed ones."""
    events = StripeEvent.objects.all()
    if event_ids:
        events = events.filter(pk__in=event_ids)
    elif since is not None:
        events = events.filter(received_at__gte=since)
    else:
        events = events.filter(status=StripeEventStatus.FAILED)
    ids = list(events.order_by("received_at", "id").values_list("id", flat=True))
    return [replay_event(event_id=event_id, actor=actor) for event_id in ids]


def process_due_events(*, limit: int = 200) -> int:
    """Processes the events whose message was lost (pending past ``PENDING_GRACE``) and the failed ones due a retry
    (``due_retries``), oldest first; how many were processed.

    The query reads only the due events, so a batch is never filled with failed events still backing off while a
    newer lost one waits behind them.
    """
    now = timezone.now()
    lost = Q(status=StripeEventStatus.PENDING, received_at__lt=now - PENDING_GRACE)
    due = StripeEvent.objects.filter(lost | due_retries(now)).order_by("received_at")
    event_ids = list(due.values_list("id", flat=True)[:limit])
    for event_id in event_ids:
        process_event(event_id)
    return len(event_ids)


def due_retries(now: datetime) -> Q:
    """The failed events due a retry: received 2^attempts minutes ago or more, up to
    ``BILLING_STRIPE_EVENT_MAX_ATTEMPTS``.

    One arm per number of attempts, each comparing ``received_at`` with a moment computed here, so the same SQL runs
    on PostgreSQL and SQLite and the inbox's index of unprocessed events (by ``received_at``) serves it.
    """
    arms = Q()
    for attempts in range(min(settings.BILLING_STRIPE_EVENT_MAX_ATTEMPTS, BACKOFF_HORIZON + 1)):
        arms |= Q(attempts=attempts, received_at__lte=now - timedelta(minutes=2**attempts))
    return Q(status=StripeEventStatus.FAILED) & arms
