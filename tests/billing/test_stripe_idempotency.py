"""Idempotency keys against a fake Stripe that honours them (``fake_stripe.py``), and what that buys us:
a charge whose answer was lost and is sent again, by the SDK's retries or by our sweep, charges once.

Our keys come from our own rows (``payment-<id>``, committed before Stripe is called), so a resend of
the same payment is the same request to Stripe; these tests lose Stripe's answer on purpose (the fake
processes the request, then drops the connection) and count the PaymentIntents Stripe ends up with.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
import stripe
from django.conf import settings
from django.utils import timezone

from accounts.sweeps import SweepIncomplete
from billing import cards, charges, controls, stale_payments, topups
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentKind, PaymentStatus
from billing.stripe_client import stripe_client
from billing.tasks import stripe_sweep
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

DOLLARS_20 = 20_000_000  # micros
PAYMENT_INTENTS = "/v1/payment_intents"


@pytest.fixture
def lost_answers(fake_stripe: FakeStripe) -> Iterator[Any]:
    """``lose(path, count)``: the next ``count`` POSTs to ``path`` are processed by Stripe, their answers lost."""
    fake_stripe.call("DELETE", "/_test/faults")

    def lose(path: str, count: int = 1) -> None:
        fake_stripe.call("POST", "/_test/faults", request_path=path, count=count)

    yield lose
    fake_stripe.call("DELETE", "/_test/faults")  # a test that failed early leaves none for the next


def faults_left(fake_stripe: FakeStripe) -> list[dict[str, Any]]:
    return fake_stripe.call("GET", "/_test/faults")["data"]


def intent_params(customer_id: str, amount: int = 2_000) -> dict[str, Any]:
    return {
        "amount": amount,
        "currency": "usd",
        "customer": customer_id,
        "payment_method": "pm_card_visa",
        "payment_method_types": ["card"],
        "confirm": True,
    }


def intents_of(customer_id: str) -> list[Any]:
    return list(stripe_client().v1.payment_intents.list(params={"customer": customer_id, "limit": 100}).data)


def stripe_client_key() -> str:
    """The API key of this test's Stripe account (the ``fake_stripe`` fixture gives each test its own)."""
    return str(settings.STRIPE_SECRET_KEY)


def new_customer() -> str:
    return stripe_client().v1.customers.create(params={"name": "idempotency"}).id


# The fake itself.


def test_the_same_key_and_parameters_replay_the_first_answer(fake_stripe: FakeStripe) -> None:
    customer_id = new_customer()
    first = stripe_client().v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-1"},
    )
    again = stripe_client().v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-1"},
    )
    assert again.id == first.id
    assert (again.status, again.amount_received) == ("succeeded", 2_000)
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert first.last_response.headers.get("Idempotent-Replayed") is None
    assert [intent.id for intent in intents_of(customer_id)] == [first.id]

    # The same parameters in another order are the same request (Stripe compares parameters, not bytes).
    form = {"currency": "usd", "amount": "2000", "confirm": "true", "payment_method": "pm_card_visa"}
    replayed = httpx.post(
        fake_stripe.url + PAYMENT_INTENTS,
        data={"customer": customer_id, "payment_method_types[0]": "card", **form},
        headers={"Authorization": f"Bearer {stripe_client_key()}", "Idempotency-Key": "order-1"},
    )
    assert (replayed.status_code, replayed.headers.get("Idempotent-Replayed")) == (200, "true")
    assert replayed.json()["id"] == first.id


def test_the_same_key_with_other_parameters_or_path_is_an_idempotency_error(fake_stripe: FakeStripe) -> None:
    customer_id = new_customer()
    first = stripe_client().v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-2"},
    )
    with pytest.raises(stripe.IdempotencyError) as other_body:
        stripe_client().v1.payment_intents.create(
            params=intent_params(customer_id, amount=2_001),  # type: ignore[arg-type]
            options={"idempotency_key": "order-2"},
        )
    assert other_body.value.http_status == 400
    assert (other_body.value.user_message or "").startswith(
        "Keys for idempotent requests can only be used with the same parameters they were first used with."
    )
    with pytest.raises(stripe.IdempotencyError):
        stripe_client().v1.customers.create(params={"name": "idempotency"}, options={"idempotency_key": "order-2"})
    assert [intent.id for intent in intents_of(customer_id)] == [first.id]  # neither made anything

    raw = httpx.post(
        fake_stripe.url + PAYMENT_INTENTS,
        data={"amount": "1", "currency": "usd"},
        headers={"Authorization": f"Bearer {stripe_client_key()}", "Idempotency-Key": "order-2"},
    )
    assert raw.status_code == 400
    assert raw.json()["error"]["type"] == "idempotency_error"


def test_keys_belong_to_one_api_key_and_a_refused_request_keeps_none(fake_stripe: FakeStripe) -> None:
    customer_id = new_customer()
    mine = stripe_client().v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-3"},
    )
    another_account = stripe.StripeClient(stripe_client_key() + "_other", base_addresses={"api": fake_stripe.url})
    theirs = another_account.v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-3"},
    )
    assert theirs.id != mine.id

    # Stripe keeps no answer for a request it refused before acting (here: no such customer), so the key is free.
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client().v1.payment_intents.create(
            params=intent_params("cus_missing"),  # type: ignore[arg-type]
            options={"idempotency_key": "order-4"},
        )
    made = stripe_client().v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-4"},
    )
    assert made.last_response.headers.get("Idempotent-Replayed") is None
    assert {intent.id for intent in intents_of(customer_id)} == {mine.id, theirs.id, made.id}


def test_a_lost_answer_is_retried_by_the_sdk_and_replayed(fake_stripe: FakeStripe, lost_answers: Any) -> None:
    customer_id = new_customer()
    lost_answers(PAYMENT_INTENTS)
    intent = stripe_client().v1.payment_intents.create(
        params=intent_params(customer_id),  # type: ignore[arg-type]
        options={"idempotency_key": "order-5"},
    )
    assert faults_left(fake_stripe) == []  # the first answer was really lost
    assert intent.last_response.headers.get("Idempotent-Replayed") == "true"
    assert [found.id for found in intents_of(customer_id)] == [intent.id]


# The product: a charge sent again is the same charge.


def save_card(organization: Any) -> str:
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
    return Account.objects.get(pk=organization.pk).stripe_customer_id


def credited(payment: Payment) -> list[tuple[str, int, str]]:
    return [
        (entry.kind, entry.amount_micros, entry.idempotency_key)
        for entry in CreditEntry.objects.filter(payment=payment).order_by("pk")
    ]


def test_a_purchase_whose_answer_is_lost_charges_and_credits_once(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lost_answers: Any
) -> None:
    customer_id = save_card(tenant["organization"])
    before = Account.objects.get(pk=tenant["organization"].pk).balance_micros
    lost_answers(PAYMENT_INTENTS)

    response = tenant["client"].post("/v1/billing/purchases", {"amount_cents": 2_000}, format="json")

    assert response.status_code == 201, response.json()
    assert faults_left(fake_stripe) == []
    [intent] = intents_of(customer_id)  # Stripe made one charge, however many times it was asked
    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert intent.metadata["payment_id"] == str(payment.pk)
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, intent.id)
    assert credited(payment) == [(EntryKind.PURCHASE, DOLLARS_20, f"payment-{payment.pk}")]
    assert Account.objects.get(pk=tenant["organization"].pk).balance_micros == before + DOLLARS_20


def test_an_auto_top_up_with_no_answer_is_resent_by_the_sweep_and_charges_once(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lost_answers: Any, sent_tasks: list[Any]
) -> None:
    organization = tenant["organization"]
    customer_id = save_card(organization)
    account = Account.objects.get(pk=organization.pk)
    before = account.balance_micros
    # Just below the threshold now, above it after one top-up: a second charge could only be a duplicate.
    threshold = account.available_micros + 1
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=threshold, amount_cents=2_000)
    # Every try the SDK makes loses its answer: the top-up ends with its outcome unknown.
    lost_answers(PAYMENT_INTENTS, count=settings.STRIPE_MAX_NETWORK_RETRIES + 1)

    pending = topups.auto_top_up(organization_id=organization.pk)

    assert pending is not None
    assert faults_left(fake_stripe) == []
    pending.refresh_from_db()
    assert (pending.kind, pending.status) == (PaymentKind.AUTO_TOP_UP, PaymentStatus.PENDING)
    assert not pending.stripe_payment_intent_id  # we never heard which PaymentIntent it made
    [charged] = intents_of(customer_id)  # Stripe did charge, on the first try
    assert charged.status == "succeeded"
    assert topups.auto_top_up(organization_id=organization.pk) is None  # one pending top-up at a time

    # Once it is old enough, the sweep sends the pending top-up again (same payment row, same key): Stripe
    # answers with the charge it made the first time.
    stale = timezone.now() - timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS + 1)
    Payment.objects.filter(pk=pending.pk).update(created_at=stale)
    assert stripe_sweep()["payments"] == 1
    pending.refresh_from_db()
    assert (pending.status, pending.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, charged.id)
    assert [intent.id for intent in intents_of(customer_id)] == [charged.id]
    assert credited(pending) == [(EntryKind.AUTO_TOP_UP, DOLLARS_20, f"payment-{pending.pk}")]
    assert Account.objects.get(pk=organization.pk).balance_micros == before + DOLLARS_20

    # Nothing more happens however often the sweep or the task runs again.
    assert stripe_sweep() == {"events": 0, "payments": 0, "top_ups": 0}
    assert topups.auto_top_up(organization_id=organization.pk) is None
    assert [intent.id for intent in intents_of(customer_id)] == [charged.id]
    assert len(credited(pending)) == 1


def test_an_auto_top_up_resent_after_the_default_card_changed_still_settles_from_the_first_charge(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lost_answers: Any, sent_tasks: list[Any]
) -> None:
    organization = tenant["organization"]
    customer_id = save_card(organization)
    account = Account.objects.get(pk=organization.pk)
    controls.set_auto_top_up(
        organization=organization, enabled=True, threshold_micros=account.available_micros + 1, amount_cents=2_000
    )
    lost_answers(PAYMENT_INTENTS, count=settings.STRIPE_MAX_NETWORK_RETRIES + 1)
    pending = topups.auto_top_up(organization_id=organization.pk)
    assert pending is not None
    [charged] = intents_of(customer_id)
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa", make_default=True)
    stale = timezone.now() - timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS + 1)
    Payment.objects.filter(pk=pending.pk).update(created_at=stale)

    stripe_sweep()

    pending.refresh_from_db()
    assert [intent.id for intent in intents_of(customer_id)] == [charged.id]
    assert (pending.status, pending.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, charged.id)
    assert credited(pending) == [(EntryKind.AUTO_TOP_UP, DOLLARS_20, f"payment-{pending.pk}")]


def pending_top_up(organization: Any) -> Payment:
    """An auto top-up row as ``auto_top_up`` commits it before calling Stripe, with the request it names, for an
    organization whose auto top-up is on and due (the sweep sends again only what would be charged now)."""
    account = Account.objects.get(pk=organization.pk)
    threshold = account.available_micros + 1
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=threshold, amount_cents=2_000)
    return Payment.objects.create(
        organization=organization,
        kind=PaymentKind.AUTO_TOP_UP,
        amount_cents=2_000,
        currency="usd",
        stripe_customer_id=account.stripe_customer_id,
        stripe_payment_method_id=account.default_payment_method_id,
    )


def test_an_idempotency_error_settles_from_the_payment_intent_the_first_send_made(
    fake_stripe: FakeStripe, tenant: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    organization = tenant["organization"]
    customer_id = save_card(organization)
    before = Account.objects.get(pk=organization.pk).balance_micros
    payment = pending_top_up(organization)
    # An earlier send of this payment (say, by the release before this one) named other parameters: Stripe
    # charged it, and refuses our send under the same key with 400 idempotency_error.
    earlier = stripe_client().v1.payment_intents.create(
        params={
            **intent_params(customer_id),
            "payment_method": payment.stripe_payment_method_id,
            "metadata": {"payment_id": str(payment.pk), "organization_id": str(organization.pk), "kind": payment.kind},
        },  # type: ignore[arg-type]
        options={"idempotency_key": payment.idempotency_key},
    )
    assert earlier.status == "succeeded"

    # older_than=0 settles this payment now (not after the default age).
    assert stale_payments.settle_stale_payments(older_than=timedelta(0)) == 1

    payment.refresh_from_db()
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, earlier.id)
    assert payment.failure_message == ""
    assert [intent.id for intent in intents_of(customer_id)] == [earlier.id]
    assert credited(payment) == [(EntryKind.AUTO_TOP_UP, DOLLARS_20, f"payment-{payment.pk}")]
    assert Account.objects.get(pk=organization.pk).balance_micros == before + DOLLARS_20
    assert f"payment-{payment.pk}: Stripe had seen its key; settled from {earlier.id}" in caplog.text


def test_an_idempotency_error_with_no_payment_intent_found_leaves_the_payment_pending(
    fake_stripe: FakeStripe, tenant: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    organization = tenant["organization"]
    customer_id = save_card(organization)
    payment = pending_top_up(organization)
    # Stripe has seen the key, on a request that made no PaymentIntent of ours.
    stripe_client().v1.customers.create(params={"name": "other"}, options={"idempotency_key": payment.idempotency_key})

    for _ in range(2):  # every sweep sends it again, and leaves it pending again
        assert stale_payments.settle_stale_payments(older_than=timedelta(0)) == 1
        payment.refresh_from_db()
        assert (payment.status, payment.failure_message) == (PaymentStatus.PENDING, "")
        assert not payment.stripe_payment_intent_id
    assert intents_of(customer_id) == []
    assert f"payment-{payment.pk}: Stripe has seen its key" in caplog.text
    assert not CreditEntry.objects.filter(payment=payment).exists()

    # Once Stripe no longer keeps the key a re-send could charge anew, so none is sent: Stripe's PaymentIntents
    # say what happened, and with none for the payment it failed.
    Payment.objects.filter(pk=payment.pk).update(created_at=timezone.now() - charges.RESEND_WITHIN)
    stale_payments.settle_stale_payments(older_than=timedelta(0))
    payment.refresh_from_db()
    assert (payment.status, payment.failure_message) == (PaymentStatus.FAILED, "No answer from the payment provider.")
    assert intents_of(customer_id) == []


def test_a_payment_that_raises_leaves_the_others_settled_and_the_sweeps_top_ups_sent(
    fake_stripe: FakeStripe,
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One payment whose settling raises something no one foresaw (not Stripe's refusal) neither keeps the payments
    after it pending nor the top-ups a lost message missed unsent; the sweep is recorded failed, naming it."""
    save_card(tenant["organization"])
    poisoned = pending_top_up(tenant["organization"])
    save_card(other_tenant["organization"])
    healthy = pending_top_up(other_tenant["organization"])
    stale = timezone.now() - timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS + 60)
    Payment.objects.filter(pk=healthy.pk).update(created_at=stale)
    Payment.objects.filter(pk=poisoned.pk).update(created_at=stale - timedelta(minutes=1))  # the sweep's first
    settle = stale_payments._settle

    def poisoned_first(client: Any, payment: Payment, **kwargs: Any) -> None:
        if payment.pk == poisoned.pk:
            raise KeyError("a field no one foresaw")
        settle(client, payment, **kwargs)

    monkeypatch.setattr(stale_payments, "_settle", poisoned_first)
    queued: list[str] = []
    monkeypatch.setattr(topups, "enqueue_top_up", lambda organization_id: queued.append(organization_id) or True)

    with pytest.raises(SweepIncomplete, match="payments"):
        stripe_sweep()

    healthy.refresh_from_db()
    assert healthy.status == PaymentStatus.SUCCEEDED
    assert credited(healthy) == [(EntryKind.AUTO_TOP_UP, DOLLARS_20, f"payment-{healthy.pk}")]
    assert Payment.objects.get(pk=poisoned.pk).status == PaymentStatus.PENDING
    assert f"settling payment-{poisoned.pk} failed" in caplog.text
    assert str(tenant["organization"].pk) in queued  # its top-up still due: sent by the sweep's last part


def test_a_purchase_left_waiting_for_the_customer_a_day_is_cancelled_at_stripe_under_a_key_of_its_own(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lost_answers: Any
) -> None:
    """A card that asks for authentication the customer never gives: after a day the sweep cancels its
    PaymentIntent (under the payment's own key); a cancel whose every answer was lost is settled by the next sweep
    from Stripe's state, never credited."""
    card = stripe_client().v1.payment_methods.create(
        params={"type": "card", "card": {"number": "4000002760003184", "exp_month": 12, "exp_year": 2030, "cvc": "123"}}
    )
    saved = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": card.id}, format="json")
    assert saved.status_code == 201, saved.json()
    bought = tenant["client"].post("/v1/billing/purchases", {"amount_cents": 2_000}, format="json")
    assert bought.status_code in (201, 202), bought.json()
    payment = Payment.objects.get(pk=bought.json()["id"])
    assert payment.status == PaymentStatus.PENDING
    intent_id = payment.stripe_payment_intent_id
    assert stripe_client().v1.payment_intents.retrieve(intent_id).status == "requires_action"

    Payment.objects.filter(pk=payment.pk).update(created_at=timezone.now() - timedelta(days=1, minutes=1))
    # Stripe cancels it; every answer, the SDK's retries' too, is lost.
    lost_answers(f"{PAYMENT_INTENTS}/{intent_id}/cancel", count=settings.STRIPE_MAX_NETWORK_RETRIES + 1)
    assert stripe_sweep()["payments"] == 0
    assert Payment.objects.get(pk=payment.pk).status == PaymentStatus.PENDING
    assert stripe_client().v1.payment_intents.retrieve(intent_id).status == "canceled"

    assert stripe_sweep()["payments"] == 1
    payment.refresh_from_db()
    assert payment.status == PaymentStatus.CANCELED
    assert not CreditEntry.objects.filter(payment=payment).exists()


def test_a_purchase_whose_answers_and_webhook_were_lost_is_settled_from_stripe_not_failed(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lost_answers: Any
) -> None:
    organization = tenant["organization"]
    customer_id = save_card(organization)
    before = Account.objects.get(pk=organization.pk).balance_micros
    lost_answers(PAYMENT_INTENTS, count=settings.STRIPE_MAX_NETWORK_RETRIES + 1)

    response = tenant["client"].post("/v1/billing/purchases", {"amount_cents": 2_000}, format="json")

    assert response.status_code == 503, response.json()
    assert response.json()["error_type"] == "payment_provider_unavailable"
    [payment] = Payment.objects.filter(organization=organization)
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.PENDING, None)
    [charged] = intents_of(customer_id)
    assert charged.status == "succeeded"

    # No webhook comes: the sweep finds Stripe's PaymentIntent by the payment id in its metadata.
    stale = timezone.now() - timedelta(seconds=settings.BILLING_PAYMENT_SETTLE_AFTER_SECONDS + 1)
    Payment.objects.filter(pk=payment.pk).update(created_at=stale)
    assert stale_payments.settle_stale_payments() == 1
    payment.refresh_from_db()
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, charged.id)
    assert credited(payment) == [(EntryKind.PURCHASE, DOLLARS_20, f"payment-{payment.pk}")]
    assert Account.objects.get(pk=organization.pk).balance_micros == before + DOLLARS_20
    assert [intent.id for intent in intents_of(customer_id)] == [charged.id]


@pytest.mark.parametrize(
    "error",
    [
        stripe.IdempotencyError("Keys for idempotent requests can only be used with the same parameters."),
        # Another request with the same key still executing: Stripe answers 409, which the SDK raises as a plain
        # APIError unless the body types it idempotency_error.
        stripe.APIError("There is currently another in-progress request using this Idempotent Key.", http_status=409),
    ],
)
def test_a_key_stripe_is_still_settling_is_in_progress_never_refused(error: stripe.StripeError) -> None:
    from billing.stripe_errors import PaymentInProgress, payment_error

    answer = payment_error(error)
    assert isinstance(answer, PaymentInProgress)
    assert not answer.refused  # the first send may still charge the card: the payment is not marked failed
    assert (answer.status_code, answer.error_type) == (409, "payment_in_progress")
