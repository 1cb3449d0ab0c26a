"""Property: Stripe's events about a payment, delivered and replayed any number of times in any order,
leave the books exactly as one delivery of each does; once all have been applied, nothing changes them.

One history is made at the fake Stripe (paid through Checkout, refunded twice, one dispute won and
one still open); each example replays its events against a rolled-back savepoint of the database.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import stripe_events
from billing.models import Account, CreditEntry, Payment
from billing.stripe_client import stripe_client
from tests.billing.conftest import deliver
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

Books = tuple[int, tuple[tuple[str, int], ...], tuple[str, int, int]]


def books(organization_id: Any, payment_id: int) -> Books:
    payment = Payment.objects.get(pk=payment_id)
    entries = CreditEntry.objects.filter(organization_id=organization_id).values_list(
        "idempotency_key", "amount_micros"
    )
    return (
        Account.objects.get(pk=organization_id).balance_micros,
        tuple(sorted(entries)),
        (payment.status, payment.amount_refunded_cents, payment.amount_disputed_cents),
    )


@pytest.fixture
def history(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> dict[str, Any]:
    started = tenant["client"].post(
        "/v1/billing/purchases",
        {
            "amount_cents": 5_000,
            "mode": "checkout",
            "success_url": "https://a.example/",
            "cancel_url": "https://a.example/",
        },
        format="json",
    )
    session = fake_stripe.pay_checkout(started.json()["checkout_url"].rsplit("/", 1)[1])
    client = stripe_client()
    intent = client.v1.payment_intents.retrieve(session["payment_intent"])
    charge_id = intent.latest_charge.id
    for cents in (300, 200):
        client.v1.refunds.create(params={"payment_intent": intent.id, "amount": cents})
    won = fake_stripe.open_dispute(charge_id, amount=1_000)
    fake_stripe.close_dispute(won["id"], "won")
    still_open = fake_stripe.open_dispute(charge_id, amount=400)
    events = fake_stripe.events(session["id"], intent.id, charge_id, won["id"], still_open["id"])
    assert len(events) == 7
    payment_id = started.json()["id"]
    before = books(tenant["organization"].pk, payment_id)
    with transaction.atomic():  # the books after one delivery of each event, in Stripe's order
        for event in events:
            apply(tenant["client"], event, replay=False)
        expected = books(tenant["organization"].pk, payment_id)
        transaction.set_rollback(True)
    assert expected[2] == ("succeeded", 500, 400)
    assert expected[0] - before[0] == 50_000_000 - 5_000_000 - 4_000_000
    return {"tenant": tenant, "payment_id": payment_id, "events": events, "expected": expected}


def apply(client: Any, event: dict[str, Any], replay: bool) -> None:
    """A delivery (stored once, processed once) or an operator's replay of a stored event."""
    deliver(client, event)
    if replay:
        stripe_events.replay_event(event_id=event["id"])
    else:
        stripe_events.process_event(event["id"])


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_order_and_any_repetition_of_events_leaves_the_same_books(history: dict[str, Any], data: Any) -> None:
    tenant, events = history["tenant"], history["events"]
    organization_id, client = tenant["organization"].pk, tenant["client"]
    deliveries = st.lists(st.tuples(st.sampled_from(events), st.booleans()), max_size=6)

    expected = history["expected"]
    with transaction.atomic():
        for event, replay in data.draw(deliveries, label="before"):
            apply(client, event, replay)
        for event in data.draw(st.permutations(events), label="every event, in some order"):
            apply(client, event, replay=False)
        assert books(organization_id, history["payment_id"]) == expected
        for event, replay in data.draw(deliveries, label="after"):
            apply(client, event, replay)
        assert books(organization_id, history["payment_id"]) == expected
        transaction.set_rollback(True)
