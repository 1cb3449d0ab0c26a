"""A refund's or a dispute's state read from Stripe before a newer one was applied, and applied after it.

Each Stripe event reads the object's state before it takes the payment's lock (``billing.stripe_events``), so two
events about one refund can apply their states in the opposite order to Stripe's: "pending" read, the refund fails
and ``refund.failed`` is processed to the end, then the "pending" read earlier is applied. Stripe moves a refund or a
dispute one way only (taken, then perhaps given back, never taken again), and so must the books: whatever order the
states of a history are applied in, and however often, once its last state has been applied the books are what
that last state alone says.
"""

from __future__ import annotations

from typing import Any

import pytest
import stripe
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing import stripe_events, stripe_state
from billing.models import Account, CreditEntry, Payment, PaymentKind, PaymentStatus, StripeEvent

pytestmark = pytest.mark.django_db

REFUND_CENTS, DISPUTE_CENTS, PAID_CENTS = 1_000, 2_000, 5_000
# Stripe's histories of one refund and of one dispute, in Stripe's order; the last state is where each ends.
REFUND_HISTORIES = (
    ("pending", "succeeded"),
    ("pending", "failed"),
    ("pending", "succeeded", "failed"),
    ("requires_action", "canceled"),
    ("requires_action", "pending", "succeeded"),
)
DISPUTE_HISTORIES = (
    ("needs_response", "under_review", "won"),
    ("needs_response", "under_review", "lost"),
    ("warning_needs_response", "warning_closed"),
    ("warning_needs_response", "needs_response", "won"),
)


def _object(cls: Any, values: dict[str, Any]) -> Any:
    return cls.construct_from(values, "sk_test_stale")


def _refund(status: str, suffix: str) -> Any:
    return _object(stripe.Refund, {"id": f"re_{suffix}", "object": "refund", "amount": REFUND_CENTS,
                                   "status": status, "charge": f"ch_{suffix}"})  # fmt: skip


def _dispute(status: str, suffix: str) -> Any:
    return _object(stripe.Dispute, {"id": f"dp_{suffix}", "object": "dispute", "amount": DISPUTE_CENTS,
                                    "status": status, "reason": "fraudulent", "charge": f"ch_{suffix}",
                                    "payment_intent": f"pi_{suffix}"})  # fmt: skip


def _paid(organization: Any, suffix: str) -> tuple[Payment, Any, Any]:
    """A purchase paid at Stripe and credited; its PaymentIntent and charge as Stripe has them."""
    payment = Payment.objects.create(organization=organization, kind=PaymentKind.PURCHASE, amount_cents=PAID_CENTS)
    intent = _object(stripe.PaymentIntent, {"id": f"pi_{suffix}", "object": "payment_intent", "status": "succeeded",
                                            "amount_received": PAID_CENTS, "currency": "usd", "livemode": False,
                                            "metadata": {"payment_id": str(payment.pk)}})  # fmt: skip
    stripe_state.apply_payment_intent(intent)
    assert Payment.objects.get(pk=payment.pk).status == PaymentStatus.SUCCEEDED
    charge = _object(stripe.Charge, {"id": f"ch_{suffix}", "object": "charge", "payment_intent": intent.id})
    return payment, intent, charge


def _ends_taken(status: str) -> bool:
    return status in stripe_state.REFUND_COUNTED or status in stripe_state.DISPUTE_FUNDS_WITHDRAWN


def _applied_in(order: st.DrawFn, history: tuple[str, ...]) -> list[str]:
    """States of ``history`` in any order, any of them repeated, the last one among them at least once."""
    states = order(st.lists(st.sampled_from(history), max_size=6))
    at = order(st.integers(0, len(states)))
    return [*states[:at], history[-1], *states[at:]]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_states_applied_in_any_order_leave_what_the_last_one_says(tenant: dict[str, Any], data: Any) -> None:
    organization = tenant["organization"]
    refund_history = data.draw(st.sampled_from(REFUND_HISTORIES))
    dispute_history = data.draw(st.sampled_from(DISPUTE_HISTORIES))
    refund_states = _applied_in(data.draw, refund_history)
    dispute_states = _applied_in(data.draw, dispute_history)
    with transaction.atomic():
        payment, intent, charge = _paid(organization, "stale")
        before = Account.objects.get(pk=organization.pk).balance_micros
        for index in range(max(len(refund_states), len(dispute_states))):
            if index < len(refund_states):
                refund = _refund(refund_states[index], "stale")
                stripe_state.apply_refunds(charge=charge, intent=intent, refunds=[refund])
            if index < len(dispute_states):
                stripe_state.apply_dispute(dispute=_dispute(dispute_states[index], "stale"), intent=intent)
        refunded = REFUND_CENTS if _ends_taken(refund_history[-1]) else 0
        disputed = DISPUTE_CENTS if _ends_taken(dispute_history[-1]) else 0
        payment.refresh_from_db()
        assert (payment.amount_refunded_cents, payment.amount_disputed_cents) == (refunded, disputed)
        after = Account.objects.get(pk=organization.pk).balance_micros
        assert before - after == (refunded + disputed) * 10_000
        # Each Stripe object's entries: none, its one taken entry, or the taken entry with its reversal.
        for prefix in ("refund-re_stale", "dispute-dp_stale"):
            keys = sorted(CreditEntry.objects.filter(idempotency_key__startswith=prefix).values_list(
                "idempotency_key", flat=True))  # fmt: skip
            assert keys in ([], [prefix], [prefix, f"{prefix}-reversed"])
        transaction.set_rollback(True)


@pytest.mark.django_db(transaction=True)
def test_a_pending_refund_read_before_its_failure_was_processed_takes_nothing(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race itself, through the Stripe inbox: ``refund.created`` reads "pending"; before it takes its locks, the
    refund fails and ``refund.failed`` is processed to the end; then "pending" is applied."""
    organization = tenant["organization"]
    payment, intent, charge = _paid(organization, "race")
    before = Account.objects.get(pk=organization.pk).balance_micros
    created = StripeEvent.objects.create(id="evt_stale_created", type="refund.created",
                                         payload={"data": {"object": {"id": "re_race"}}})  # fmt: skip
    failed = StripeEvent.objects.create(id="evt_stale_failed", type="refund.failed",
                                        payload={"data": {"object": {"id": "re_race"}}})  # fmt: skip

    def read_pending(_refund_id: str) -> Any:
        snapshot = [_refund("pending", "race")]
        stripe_events.process_event(failed.id)  # meanwhile: the refund failed, and its event was processed
        return lambda: stripe_state.apply_refunds(charge=charge, intent=intent, refunds=snapshot)

    def read_failed(_refund_id: str) -> Any:
        return lambda: stripe_state.apply_refunds(charge=charge, intent=intent, refunds=[_refund("failed", "race")])

    monkeypatch.setitem(stripe_events.FETCHERS, "refund.created", read_pending)
    monkeypatch.setitem(stripe_events.FETCHERS, "refund.failed", read_failed)
    stripe_events.process_event(created.id)
    assert StripeEvent.objects.get(pk=created.pk).status == "processed"
    assert Account.objects.get(pk=organization.pk).balance_micros == before
    assert Payment.objects.get(pk=payment.pk).amount_refunded_cents == 0
    entries = CreditEntry.objects.filter(payment=payment, kind="refund").values_list("idempotency_key", "description")
    assert sorted(entries) == [("refund-re_race", "Refunded to the card"),
                               ("refund-re_race-reversed", "Refund to the card failed")]  # fmt: skip
