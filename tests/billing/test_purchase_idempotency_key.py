"""``POST /v1/billing/purchases`` with an ``Idempotency-Key``: a client's retry of a purchase answers the payment its
first try made and never charges twice, even when every answer of the first try was lost (the fake Stripe's fault
hook processes a request and then drops its answer); the same key with another purchase is refused."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from billing import charges
from billing.models import Account, CreditEntry, EntryKind, Payment, PaymentStatus
from billing.stripe_client import stripe_client
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

DOLLARS_20 = 20_000_000  # micros
PAYMENT_INTENTS = "/v1/payment_intents"
CHECKOUT_SESSIONS = "/v1/checkout/sessions"
CHECKOUT = {"mode": "checkout", "success_url": "https://app.example/ok", "cancel_url": "https://app.example/no"}


@pytest.fixture
def lose_answers(fake_stripe: FakeStripe) -> Iterator[Callable[..., None]]:
    """``lose(path, count)``: the next ``count`` POSTs to ``path`` are processed by Stripe, their answers lost."""
    fake_stripe.call("DELETE", "/_test/faults")

    def lose(path: str, count: int = 1) -> None:
        fake_stripe.call("POST", "/_test/faults", request_path=path, count=count)

    yield lose
    fake_stripe.call("DELETE", "/_test/faults")


def save_card(tenant: dict[str, Any], card: str = "pm_card_visa") -> str:
    response = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": card}, format="json")
    assert response.status_code == 201, response.json()
    return Account.objects.get(pk=tenant["organization"].pk).stripe_customer_id


def buy(client: APIClient, key: str | None, **body: Any) -> Any:
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post("/v1/billing/purchases", {"amount_cents": 2_000, **body}, format="json", **headers)


def intents_of(customer_id: str) -> list[Any]:
    return list(stripe_client().v1.payment_intents.list(params={"customer": customer_id, "limit": 100}).data)


def balance(tenant: dict[str, Any]) -> int:
    return Account.objects.get(pk=tenant["organization"].pk).balance_micros


def credits_of(payment_id: int) -> list[tuple[str, int]]:
    return [(entry.kind, entry.amount_micros) for entry in CreditEntry.objects.filter(payment_id=payment_id)]


def faults_left(fake_stripe: FakeStripe) -> list[dict[str, Any]]:
    return fake_stripe.call("GET", "/_test/faults")["data"]


def test_a_retry_with_the_same_key_answers_the_same_payment(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)

    first = buy(tenant["client"], "order-1")
    again = buy(tenant["client"], "order-1", mode="card")  # the default spelled out is the same purchase

    assert (first.status_code, again.status_code) == (201, 201), (first.json(), again.json())
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert first.json()["status"] == "succeeded"
    assert len(intents_of(customer_id)) == 1
    assert credits_of(first.json()["id"]) == [(EntryKind.PURCHASE, DOLLARS_20)]
    assert balance(tenant) == before + DOLLARS_20

    other = buy(tenant["client"], "order-2")
    assert other.status_code == 201
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["id"] != first.json()["id"]
    assert len(intents_of(customer_id)) == 2
    assert balance(tenant) == before + 2 * DOLLARS_20


def test_the_same_key_with_another_purchase_is_a_422_and_charges_nothing(
    fake_stripe: FakeStripe, tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    customer_id = save_card(tenant)
    first = buy(tenant["client"], "order-1")
    assert first.status_code == 201

    for body in ({"amount_cents": 3_000}, {"payment_method": "pm_card_mastercard"}, CHECKOUT):
        reused = buy(tenant["client"], "order-1", **body)
        assert reused.status_code == 422, reused.json()
        assert reused.json() == {
            "detail": [
                {
                    "loc": ["header", "Idempotency-Key"],
                    "msg": "This Idempotency-Key was already used with a different purchase.",
                    "type": "idempotency_key_reused",
                }
            ],
            "error_type": "idempotency_key_reused",
        }
    assert Payment.objects.filter(organization=tenant["organization"]).count() == 1
    assert len(intents_of(customer_id)) == 1

    # Keys belong to one organization: another may use the same one.
    save_card(other_tenant)
    theirs = buy(other_tenant["client"], "order-1")
    assert theirs.status_code == 201, theirs.json()
    assert "Idempotent-Replayed" not in theirs.headers
    assert theirs.json()["id"] != first.json()["id"]


def test_a_key_longer_than_255_characters_is_a_422_on_the_header(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    save_card(tenant)
    response = buy(tenant["client"], "k" * 256)
    assert response.status_code == 422
    assert response.json() == {
        "detail": [{"loc": ["header", "Idempotency-Key"], "msg": "At most 255 characters.", "type": "string_too_long"}],
        "error_type": "validation_error",
    }
    assert not Payment.objects.filter(organization=tenant["organization"]).exists()


def test_a_retry_after_stripe_dropped_the_first_answer_charges_once(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lose_answers: Callable[..., None]
) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)
    lose_answers(PAYMENT_INTENTS)  # the SDK's own retry gets Stripe's replay

    first = buy(tenant["client"], "order-1")
    assert first.status_code == 201, first.json()
    assert faults_left(fake_stripe) == []
    again = buy(tenant["client"], "order-1")

    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    [intent] = intents_of(customer_id)
    assert intent.metadata["payment_id"] == str(first.json()["id"])
    assert balance(tenant) == before + DOLLARS_20


def test_a_retry_after_every_answer_was_lost_charges_once_and_answers_the_charge(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lose_answers: Callable[..., None]
) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)
    lose_answers(PAYMENT_INTENTS, count=settings.STRIPE_MAX_NETWORK_RETRIES + 1)

    lost = buy(tenant["client"], "order-1")

    assert lost.status_code == 503, lost.json()
    assert lost.json()["error_type"] == "payment_provider_unavailable"
    assert faults_left(fake_stripe) == []
    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert (payment.status, payment.client_idempotency_key) == (PaymentStatus.PENDING, "order-1")
    [charged] = intents_of(customer_id)  # Stripe charged on the first try; nobody heard it
    assert charged.status == "succeeded"

    # The client retries: the same payment is sent to Stripe again, the identical request under its key,
    # and Stripe answers with the charge it made.
    again = buy(tenant["client"], "order-1")

    assert again.status_code == 201, again.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert (again.json()["id"], again.json()["status"]) == (payment.pk, "succeeded")
    payment.refresh_from_db()
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, charged.id)
    assert [intent.id for intent in intents_of(customer_id)] == [charged.id]
    assert credits_of(payment.pk) == [(EntryKind.PURCHASE, DOLLARS_20)]
    assert balance(tenant) == before + DOLLARS_20

    # However often it retries after that.
    assert buy(tenant["client"], "order-1").json()["id"] == payment.pk
    assert len(intents_of(customer_id)) == 1
    assert balance(tenant) == before + DOLLARS_20


def test_a_retry_of_a_declined_purchase_answers_402_and_charges_nothing_more(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    customer_id = save_card(tenant, "pm_card_chargeCustomerFail")
    declined = buy(tenant["client"], "order-1")
    assert declined.status_code == 402
    assert declined.json()["error_type"] == "card_declined"
    attempts = len(intents_of(customer_id))

    again = buy(tenant["client"], "order-1")

    assert again.status_code == 402
    assert again.json() == {"detail": "Your card was declined.", "error_type": "payment_failed"}
    assert len(intents_of(customer_id)) == attempts
    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert payment.status == PaymentStatus.FAILED


def test_a_retried_checkout_answers_the_same_page_even_when_its_answers_were_lost(
    fake_stripe: FakeStripe, tenant: dict[str, Any], lose_answers: Callable[..., None]
) -> None:
    first = buy(tenant["client"], "checkout-1", **CHECKOUT)
    assert first.status_code == 201, first.json()
    again = buy(tenant["client"], "checkout-1", **CHECKOUT)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert first.json()["checkout_url"]

    lose_answers(CHECKOUT_SESSIONS, count=settings.STRIPE_MAX_NETWORK_RETRIES + 1)
    lost = buy(tenant["client"], "checkout-2", **CHECKOUT)
    assert lost.status_code == 503, lost.json()
    payment = Payment.objects.get(organization=tenant["organization"], client_idempotency_key="checkout-2")
    assert (payment.status, payment.stripe_checkout_session_id) == (PaymentStatus.PENDING, None)

    retried = buy(tenant["client"], "checkout-2", **CHECKOUT)

    assert retried.status_code == 201, retried.json()
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.json()["id"] == payment.pk
    payment.refresh_from_db()
    assert payment.stripe_checkout_session_id
    assert retried.json()["checkout_url"].endswith(payment.stripe_checkout_session_id)
    session = stripe_client().v1.checkout.sessions.retrieve(payment.stripe_checkout_session_id)
    assert session.metadata["payment_id"] == str(payment.pk)
    assert Payment.objects.filter(organization=tenant["organization"]).count() == 2


def test_the_openapi_schema_documents_the_idempotency_key_header(db: None) -> None:
    schema = APIClient().get("/v1/openapi.json").json()
    [parameter] = [
        parameter
        for parameter in schema["paths"]["/v1/billing/purchases"]["post"]["parameters"]
        if parameter["name"] == "Idempotency-Key"
    ]
    assert parameter["in"] == "header"
    assert "idempotency_key_reused" in parameter["description"]


postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs a database where two transactions run at once"
)


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_tries_at_once_with_one_key_make_one_payment_and_one_charge(
    fake_stripe: FakeStripe, tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)
    both_checked = threading.Barrier(2, timeout=10)
    ensure_customer = charges.ensure_customer

    def after_both_checked(organization: Any) -> str:
        both_checked.wait()  # both have looked for a payment with the key and found none
        return ensure_customer(organization)

    monkeypatch.setattr(charges, "ensure_customer", after_both_checked)
    answers: list[Any] = [None, None]

    def try_once(index: int) -> None:
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
        try:
            answers[index] = buy(client, "order-1")
        finally:
            connection.close()

    threads = [threading.Thread(target=try_once, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)

    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert len(intents_of(customer_id)) == 1
    assert credits_of(payment.pk) == [(EntryKind.PURCHASE, DOLLARS_20)]
    assert balance(tenant) == before + DOLLARS_20
    # Each try answers that payment, or (while the other's charge is still under way at Stripe) asks to retry.
    for answer in answers:
        assert answer is not None
        assert (answer.status_code, answer.json().get("id")) in {(201, payment.pk), (409, None)}, answer.json()
    assert sorted(answer.status_code for answer in answers)[0] == 201
    assert sorted("Idempotent-Replayed" in answer.headers for answer in answers) == [False, True]


def test_the_dashboard_sends_the_payer_to_the_checkout_page(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    client = Client()
    client.force_login(tenant["user"])
    response = client.post("/dashboard/billing/buy", {"amount_dollars": "20", "method": "checkout"})
    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert response.status_code == 302
    assert response["Location"].endswith(str(payment.stripe_checkout_session_id))
