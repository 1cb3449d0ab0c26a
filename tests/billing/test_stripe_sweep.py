"""The sweep's share of the Stripe inbox (``stripe_events.process_due_events``): lost events and due retries only.

A failed event is retried 2^attempts minutes after it arrived. Events still backing off must not count against a
sweep's batch, or enough of them would hide every event behind them; each test stores its events directly and
watches which ones the sweep hands to ``process_event``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing import stripe_events
from billing.models import StripeEvent, StripeEventStatus

pytestmark = pytest.mark.django_db


def event(event_id: str, **fields: Any) -> StripeEvent:
    return StripeEvent.objects.create(id=event_id, type="payment_intent.succeeded", payload={}, **fields)


@pytest.fixture
def processed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The events the sweep processes, in order (their processing is not under test here: nothing changes)."""
    seen: list[str] = []
    monkeypatch.setattr(stripe_events, "process_event", lambda event_id, **_: seen.append(event_id))
    return seen


def test_failed_events_waiting_for_their_backoff_do_not_starve_a_lost_pending_event(processed: list[str]) -> None:
    now = timezone.now()
    StripeEvent.objects.bulk_create(
        StripeEvent(
            id=f"evt_failed_{n:04d}",
            type="payment_intent.succeeded",
            payload={},
            status=StripeEventStatus.FAILED,
            attempts=5,  # due 32 minutes after it arrived
            received_at=now - timedelta(minutes=20, seconds=n),
        )
        for n in range(200)
    )
    event("evt_lost", received_at=now - timedelta(minutes=5))

    for _ in range(3):
        stripe_events.process_due_events()

    assert processed == ["evt_lost"] * 3  # the stand-in leaves it pending: each sweep finds it again


def test_a_failed_event_is_due_two_to_the_attempts_minutes_after_it_arrived(processed: list[str]) -> None:
    now = timezone.now()
    for attempts in range(1, 4):
        backoff = timedelta(minutes=2**attempts)
        for label, age in (("waiting", backoff - timedelta(seconds=30)), ("due", backoff + timedelta(seconds=30))):
            event(f"evt_{label}_{attempts}", status=StripeEventStatus.FAILED, attempts=attempts, received_at=now - age)
    event("evt_within_grace", received_at=now - timedelta(seconds=30))  # its message is still on its way

    assert stripe_events.process_due_events() == 3
    assert processed == ["evt_due_3", "evt_due_2", "evt_due_1"]  # oldest first


def test_the_sweep_takes_due_events_oldest_first_up_to_its_limit_and_gives_up_at_the_last_attempt(
    processed: list[str], settings: Any
) -> None:
    settings.BILLING_STRIPE_EVENT_MAX_ATTEMPTS = 3
    now = timezone.now()
    failed = {"status": StripeEventStatus.FAILED, "attempts": 2}
    event("evt_given_up", **{**failed, "attempts": 3}, received_at=now - timedelta(hours=3))
    event("evt_due_second", **failed, received_at=now - timedelta(hours=1))
    event("evt_lost_first", received_at=now - timedelta(hours=2))
    event("evt_due_third", **failed, received_at=now - timedelta(minutes=30))
    event("evt_done", status=StripeEventStatus.PROCESSED, received_at=now - timedelta(hours=4))

    with CaptureQueriesContext(connection) as queries:
        assert stripe_events.process_due_events(limit=2) == 2
    assert processed == ["evt_lost_first", "evt_due_second"]
    assert len(queries) == 1  # the due events, read once: none fetched only to be skipped

    assert stripe_events.process_due_events() == 3
    assert processed[2:] == ["evt_lost_first", "evt_due_second", "evt_due_third"]


def test_an_event_failed_past_the_backoff_horizon_is_left_to_an_operator(processed: list[str], settings: Any) -> None:
    settings.BILLING_STRIPE_EVENT_MAX_ATTEMPTS = 60  # more attempts than any backoff a datetime can hold
    long_ago = timezone.now() - timedelta(days=3 * 365)
    horizon = stripe_events.BACKOFF_HORIZON
    event("evt_at_horizon", status=StripeEventStatus.FAILED, attempts=horizon, received_at=long_ago)
    event("evt_past_horizon", status=StripeEventStatus.FAILED, attempts=horizon + 1, received_at=long_ago)
    event("evt_replayed_often", status=StripeEventStatus.FAILED, attempts=59, received_at=long_ago)

    assert stripe_events.process_due_events() == 1
    assert processed == ["evt_at_horizon"]


def test_the_tasks_time_running_out_is_not_the_events_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    """Celery's soft time limit, raised inside an event's processing, stops the sweep: it is not recorded as the
    event's failure (one attempt fewer before an operator is needed) and the events after it are not processed."""

    def out_of_time(target: str) -> Any:
        raise SoftTimeLimitExceeded()

    monkeypatch.setitem(stripe_events.FETCHERS, "payment_intent.succeeded", out_of_time)
    now = timezone.now()
    for n in range(2):
        StripeEvent.objects.create(
            id=f"evt_{n}",
            type="payment_intent.succeeded",
            payload={"data": {"object": {"id": f"pi_{n}"}}},
            received_at=now - timedelta(minutes=5, seconds=n),
        )

    with pytest.raises(SoftTimeLimitExceeded):
        stripe_events.process_due_events()

    assert [(e.status, e.attempts, e.error) for e in StripeEvent.objects.order_by("id")] == [
        (StripeEventStatus.PENDING, 0, ""),
        (StripeEventStatus.PENDING, 0, ""),
    ]
