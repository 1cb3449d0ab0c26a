"""Payment actions own their transactions (``atomic(durable=True)``): each commits on its own, and one called
inside another transaction fails loudly before Stripe is asked anything. Stripe's state is applied inside the
Stripe inbox's transaction, which the apply functions join."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import transaction

from billing import cards, charges, controls, stripe_events, topups
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentStatus, StripeEventStatus
from billing.stripe_client import stripe_client
from tests.billing.conftest import deliver
from tests.stripe_support import FakeStripe

# No test-case transaction around these: each action's durable transaction is the outermost, as in production.
pytestmark = pytest.mark.django_db(transaction=True)

NESTED = "A durable atomic block cannot be nested within another atomic block."


def intents_of(customer_id: str) -> list[Any]:
    return list(stripe_client().v1.payment_intents.list(params={"customer": customer_id, "limit": 100}).data)


def test_card_purchase_and_its_events_commit_in_their_own_transactions(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any]
) -> None:
    organization = tenant["organization"]
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
    before = Account.objects.get(pk=organization.pk).balance_micros

    payment = charges.buy_credits(organization=organization, amount_cents=2_000).payment

    assert payment.status == PaymentStatus.SUCCEEDED
    assert Account.objects.get(pk=organization.pk).balance_micros == before + 20_000_000
    [event] = fake_stripe.events(payment.stripe_payment_intent_id, types=("payment_intent.succeeded",))
    assert deliver(tenant["client"], event).status_code == 200
    assert stripe_events.process_event(event["id"]).status == StripeEventStatus.PROCESSED
    assert list(CreditEntry.objects.filter(payment=payment).values_list("kind", flat=True)) == [EntryKind.PURCHASE]


def test_a_purchase_inside_another_transaction_fails_before_stripe_is_asked(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any]
) -> None:
    organization = tenant["organization"]
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
    customer_id = Account.objects.get(pk=organization.pk).stripe_customer_id

    with pytest.raises(RuntimeError, match=NESTED), transaction.atomic():
        charges.buy_credits(organization=organization, amount_cents=2_000)

    assert not Payment.objects.filter(organization=organization).exists()
    assert intents_of(customer_id) == []


def test_an_auto_top_up_inside_another_transaction_fails_before_stripe_is_asked(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any]
) -> None:
    organization = tenant["organization"]
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
    customer_id = Account.objects.get(pk=organization.pk).stripe_customer_id
    threshold = Account.objects.get(pk=organization.pk).available_micros + 1
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=threshold, amount_cents=2_000)

    with pytest.raises(RuntimeError, match=NESTED), transaction.atomic():
        topups.auto_top_up(organization_id=organization.pk)

    assert not Payment.objects.filter(organization=organization).exists()
    assert intents_of(customer_id) == []
    assert topups.auto_top_up(organization_id=organization.pk) is not None  # on its own, it charges
    assert len(intents_of(customer_id)) == 1


def test_a_suspended_organizations_card_is_not_charged_unattended(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any]
) -> None:
    """Its members cannot turn auto top-up off while it is suspended (the dashboard is read-only for it), and it
    runs nothing that needs the credit: no unattended charge until an operator lifts the suspension."""
    from accounts.services import set_organization_suspended

    organization = tenant["organization"]
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
    customer_id = Account.objects.get(pk=organization.pk).stripe_customer_id
    threshold = Account.objects.get(pk=organization.pk).available_micros + 1
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=threshold, amount_cents=2_000)
    set_organization_suspended(organization=organization, suspended=True)
    assert topups.auto_top_up(organization_id=organization.pk) is None
    assert intents_of(customer_id) == []
    set_organization_suspended(organization=organization, suspended=False)
    assert topups.auto_top_up(organization_id=organization.pk) is not None
    assert len(intents_of(customer_id)) == 1
