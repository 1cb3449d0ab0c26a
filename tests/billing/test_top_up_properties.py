"""Property: whatever happens to an auto top-up on its way to Stripe (its send lost before Stripe saw it, or its
answer lost after Stripe charged), and whatever the organization does meanwhile (auto top-up off and on again,
suspended, credit added or taken), the sweep that settles it charges the card only while the organization would be
charged unattended then (``topups.charges_now``), and every charge Stripe made is credited exactly once.

Each example is a new organization's sequence against the fake Stripe, committed as the services commit it (a top-up
and a failed charge commit durably); the test's database is emptied after it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from accounts.models import Organization
from billing import controls, stale_payments, topups
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentKind, PaymentStatus
from billing.stripe_client import field, stripe_client
from tests.billing.conftest import STATE_MACHINES, total
from tests.billing.test_stripe_idempotency import save_card
from tests.conftest import personal_organization
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db(transaction=True)

PAYMENT_INTENTS = "/v1/payment_intents"
THRESHOLD = 5_000_000
TOP_UP_CENTS = 2_000


class TopUps(RuleBasedStateMachine):
    new_organization: Callable[[], Organization]
    fake: FakeStripe

    @initialize()
    def open_books(self) -> None:
        self.organization = self.new_organization()
        self.customer_id = save_card(self.organization)
        # Just below the threshold: a top-up is due until one is credited.
        available = Account.objects.get(pk=self.organization.pk).available_micros
        grant_credits(
            organization=self.organization,
            amount_micros=THRESHOLD - 1 - available,
            reason="x",
            kind=EntryKind.ADJUSTMENT,
        )
        controls.set_auto_top_up(
            organization=self.organization, enabled=True, threshold_micros=THRESHOLD, amount_cents=TOP_UP_CENTS
        )

    def teardown(self) -> None:
        self.fake.call("DELETE", "/_test/faults")

    def intents(self) -> list[Any]:
        listing = stripe_client().v1.payment_intents.list(params={"customer": self.customer_id, "limit": 100})
        return list(listing.auto_paging_iter())

    def new_intents(self) -> list[Any]:
        """The PaymentIntents Stripe made for the organization's payments."""
        ours = {str(pk) for pk in Payment.objects.filter(organization=self.organization).values_list("pk", flat=True)}
        return [intent for intent in self.intents() if field(field(intent, "metadata"), "payment_id") in ours]

    def pending_top_up(self) -> bool:
        return Payment.objects.filter(
            organization=self.organization, kind=PaymentKind.AUTO_TOP_UP, status=PaymentStatus.PENDING
        ).exists()

    # --- What can happen to a top-up, and around it --------------------------------------------------------------

    @precondition(lambda self: not self.pending_top_up())
    @rule()
    def top_up_lost_before_stripe(self) -> None:
        """The top-up's row committed, then its process died before its request reached Stripe."""
        account = Account.objects.get(pk=self.organization.pk)
        if topups.charges_now(account):
            Payment.objects.create(
                organization=self.organization,
                kind=PaymentKind.AUTO_TOP_UP,
                amount_cents=account.auto_top_up_amount_cents,
                currency=account.currency,
                stripe_customer_id=account.stripe_customer_id,
                stripe_payment_method_id=account.default_payment_method_id,
            )

    @precondition(lambda self: not self.pending_top_up())
    @rule()
    def top_up_answer_lost(self) -> None:
        """Stripe charged; every answer was lost on the way back."""
        self.fake.call(
            "POST", "/_test/faults", request_path=PAYMENT_INTENTS, count=settings.STRIPE_MAX_NETWORK_RETRIES + 1
        )
        topups.auto_top_up(organization_id=self.organization.pk)
        self.fake.call("DELETE", "/_test/faults")

    @rule(enabled=st.booleans())
    def auto_top_up(self, enabled: bool) -> None:
        controls.set_auto_top_up(organization=self.organization, enabled=enabled)

    @rule(suspended=st.booleans())
    def suspend(self, suspended: bool) -> None:
        Organization.objects.filter(pk=self.organization.pk).update(suspended_at=timezone.now() if suspended else None)

    @rule(amount=st.sampled_from([-30_000_000, -3_000_000, 3_000_000, 30_000_000]))
    def adjust(self, amount: int) -> None:
        grant_credits(organization=self.organization, amount_micros=amount, reason="x", kind=EntryKind.ADJUSTMENT)

    @rule()
    def sweep(self) -> None:
        """The sweep, once every pending payment is old enough for it: charges nothing new unless the organization
        would be charged now."""
        charged_now = topups.charges_now(Account.objects.get(pk=self.organization.pk))
        before = {intent.id for intent in self.new_intents()}
        Payment.objects.filter(organization=self.organization, status=PaymentStatus.PENDING).update(
            created_at=timezone.now() - timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS + 1)
        )
        stale_payments.settle_stale_payments()
        made = {intent.id for intent in self.new_intents()} - before
        assert charged_now or not made, f"the sweep charged {made} while the organization is not charged unattended"

    # --- Invariants --------------------------------------------------------------------------------------------

    @invariant()
    def the_balance_is_the_ledger(self) -> None:
        if not hasattr(self, "organization"):
            return
        account = Account.objects.get(pk=self.organization.pk)
        assert account.balance_micros == total(
            CreditEntry.objects.filter(organization=self.organization), "amount_micros"
        )

    @invariant()
    def every_charge_is_credited_at_most_once_and_a_settled_one_exactly_once(self) -> None:
        if not hasattr(self, "organization"):
            return
        for intent in self.new_intents():
            payment = Payment.objects.get(pk=int(field(field(intent, "metadata"), "payment_id")))
            credited = CreditEntry.objects.filter(payment=payment, kind=EntryKind.AUTO_TOP_UP)
            assert credited.count() <= 1
            if payment.status != PaymentStatus.PENDING:
                assert credited.count() == (intent.status == "succeeded")


def test_a_top_up_is_charged_only_while_the_organization_would_be_and_credited_once(
    fake_stripe: FakeStripe, make_user: Callable[..., Any]
) -> None:
    TopUps.new_organization = staticmethod(lambda: personal_organization(make_user(password=None)))  # type: ignore[assignment]
    TopUps.fake = fake_stripe
    run_state_machine_as_test(
        TopUps, settings=hypothesis_settings(STATE_MACHINES, max_examples=12, stateful_step_count=8)
    )


@pytest.mark.parametrize("meanwhile", ["auto top-up turned off", "suspended", "credit bought"])
def test_a_top_up_whose_send_never_reached_stripe_is_not_sent_once_the_organization_would_not_be_charged(
    fake_stripe: FakeStripe, make_user: Callable[..., Any], meanwhile: str
) -> None:
    organization = personal_organization(make_user(password=None))
    customer_id = save_card(organization)
    available = Account.objects.get(pk=organization.pk).available_micros
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=available + 1)
    account = Account.objects.get(pk=organization.pk)
    payment = Payment.objects.create(  # committed by auto_top_up, whose process then died before calling Stripe
        organization=organization,
        kind=PaymentKind.AUTO_TOP_UP,
        amount_cents=account.auto_top_up_amount_cents,
        stripe_customer_id=account.stripe_customer_id,
        stripe_payment_method_id=account.default_payment_method_id,
    )
    if meanwhile == "auto top-up turned off":
        controls.set_auto_top_up(organization=organization, enabled=False)
    elif meanwhile == "suspended":
        Organization.objects.filter(pk=organization.pk).update(suspended_at=timezone.now())
    else:
        grant_credits(organization=organization, amount_micros=20_000_000, reason="bought", kind=EntryKind.ADJUSTMENT)

    assert stale_payments.settle_stale_payments(older_than=timedelta(0)) == 1
    payment.refresh_from_db()
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.FAILED, None)
    listing = stripe_client().v1.payment_intents.list(params={"customer": customer_id, "limit": 100})
    assert list(listing.auto_paging_iter()) == []
    assert not CreditEntry.objects.filter(payment=payment).exists()
