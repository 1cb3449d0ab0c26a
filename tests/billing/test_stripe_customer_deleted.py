"""A Stripe customer deleted at Stripe (by an operator in Stripe's dashboard), with the cards it held: the
organization forgets it, whether the ``customer.deleted`` webhook, its next payment or its next auto top-up tells us
first, and can save a card and pay again under a new customer; the refunds of what it paid through the deleted one
still apply, and reconciliation still finds those payments at Stripe."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from accounts.models import AuditAction, AuditEvent
from billing import controls, reconciliation, stripe_events, topups
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentStatus, StripeEventStatus
from billing.stripe_client import object_id, stripe_client
from tests.billing.conftest import deliver
from tests.billing.test_stripe import balance, buy, save_card
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

DOLLARS_20 = 20_000_000  # micros


def account_of(tenant: dict[str, Any]) -> Account:
    return Account.objects.get(pk=tenant["organization"].pk)


def with_auto_top_up(tenant: dict[str, Any], threshold_micros: int = 0) -> str:
    """A saved card and auto top-up on; the customer's id."""
    save_card(tenant)
    controls.set_auto_top_up(organization=tenant["organization"], enabled=True, threshold_micros=threshold_micros)
    return account_of(tenant).stripe_customer_id


def forgotten(tenant: dict[str, Any], customer_id: str) -> None:
    """The account has no card, no auto top-up and not that customer (none, or a new one); the removal is audited
    once."""
    account = account_of(tenant)
    assert account.stripe_customer_id != customer_id
    assert account.default_payment_method_id == ""
    assert not account.auto_top_up_enabled
    assert account.stripe_customers_deleted == 1
    removals = AuditEvent.objects.filter(action=AuditAction.PAYMENT_METHOD_REMOVED, organization=tenant["organization"])
    assert [event.metadata["stripe_customer_id"] for event in removals] == [customer_id]


def test_the_next_payment_finds_the_customer_deleted_and_the_organization_pays_again_under_a_new_one(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    deleted = with_auto_top_up(tenant)
    paid_before = Payment.objects.get(pk=buy(tenant).json()["id"])
    stripe_client().v1.customers.delete(deleted)

    refused = buy(tenant)  # the saved card went with the customer
    assert (refused.status_code, refused.json()["error_type"]) == (409, "billing_conflict"), refused.json()
    assert "Save a card" in refused.json()["detail"]
    forgotten(tenant, deleted)

    save_card(tenant)  # a new customer, made under a key of its own (the first one's would answer the deleted one)
    renewed = account_of(tenant).stripe_customer_id
    assert renewed not in ("", deleted)
    start = balance(tenant)
    paid = buy(tenant)
    assert (paid.status_code, paid.json()["status"]) == (201, "succeeded"), paid.json()
    assert balance(tenant) == start + DOLLARS_20

    # A refund of what was paid through the deleted customer still applies to its payment.
    intent = stripe_client().v1.payment_intents.retrieve(paid_before.stripe_payment_intent_id)
    refund = stripe_client().v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    for event in fake_stripe.events(object_id(intent.latest_charge), types=("charge.refunded",)):
        assert deliver(tenant["client"], event).status_code == 200
        assert stripe_events.process_event(event["id"]).status == StripeEventStatus.PROCESSED
    assert CreditEntry.objects.get(idempotency_key=f"refund-{refund.id}").amount_micros == -5_000_000
    assert balance(tenant) == start + DOLLARS_20 - 5_000_000
    checked, drift = reconciliation.compare_with_stripe()
    assert drift == []
    assert checked["payments"] == checked["stripe_payment_intents"] == 2


def test_the_customer_deleted_webhook_forgets_the_customer_once(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    deleted = with_auto_top_up(tenant)
    stripe_client().v1.customers.delete(deleted)
    [event] = fake_stripe.events(deleted, types=("customer.deleted",))
    for _ in range(2):  # delivered twice, then replayed: forgotten once
        assert deliver(tenant["client"], event).status_code == 200
        assert stripe_events.process_event(event["id"]).status == StripeEventStatus.PROCESSED
    assert stripe_events.replay_event(event_id=event["id"]).status == StripeEventStatus.IGNORED
    forgotten(tenant, deleted)


def test_a_customer_deleted_event_for_a_customer_stripe_still_has_forgets_nothing(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    customer_id = with_auto_top_up(tenant)
    event = {
        "id": "evt_stale_customer_deleted",
        "object": "event",
        "type": "customer.deleted",
        "livemode": False,
        "data": {"object": {"id": customer_id, "object": "customer", "deleted": True}},
    }
    assert deliver(tenant["client"], event).status_code == 200
    assert stripe_events.process_event(event["id"]).status == StripeEventStatus.IGNORED
    account = account_of(tenant)
    assert (account.stripe_customer_id, account.auto_top_up_enabled) == (customer_id, True)


def test_an_auto_top_up_refused_for_a_deleted_customer_turns_auto_top_up_off(
    fake_stripe: FakeStripe, tenant: dict[str, Any], settings: Any
) -> None:
    organization = tenant["organization"]
    deleted = with_auto_top_up(tenant, threshold_micros=50_000_000)
    stripe_client().v1.customers.delete(deleted)

    refused = topups.auto_top_up(organization_id=organization.pk)
    assert refused is not None
    assert refused.status == PaymentStatus.FAILED
    forgotten(tenant, deleted)
    Payment.objects.update(created_at=timezone.now() - timedelta(seconds=settings.BILLING_AUTO_TOP_UP_RETRY_SECONDS))
    assert topups.auto_top_up(organization_id=organization.pk) is None  # not charged again and again
    assert Payment.objects.filter(organization=organization).count() == 1
    assert not CreditEntry.objects.filter(organization=organization, kind=EntryKind.AUTO_TOP_UP).exists()
