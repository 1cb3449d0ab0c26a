"""Every billing route handed another organization's Stripe ids: refused (404 or another 4xx), nothing moved.

Payment methods belong to the organization whose Stripe customer holds them, checked on every operation,
attaching included: Stripe's attach would move a card saved to another customer onto ours.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditAction, AuditEvent
from billing.models import Account, Payment
from billing.stripe_client import stripe_client
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

PASSWORD = "a-long-enough-passphrase-42"


def save_card(tenant: dict[str, Any]) -> str:
    response = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": "pm_card_visa"}, format="json")
    assert response.status_code == 201, response.json()
    return str(response.json()["id"])


def buy(tenant: dict[str, Any], **body: Any) -> Any:
    return tenant["client"].post("/v1/billing/purchases", {"amount_cents": 2_000, **body}, format="json")


@pytest.fixture
def victim(fake_stripe: FakeStripe, other_tenant: dict[str, Any]) -> dict[str, Any]:
    """The other organization: a saved card, a card purchase and a started checkout, all its own."""
    card = save_card(other_tenant)
    charged = buy(other_tenant)
    assert charged.status_code == 201, charged.json()
    checkout = buy(
        other_tenant, mode="checkout", success_url="https://example.com/ok", cancel_url="https://example.com/no"
    )
    assert checkout.status_code == 201, checkout.json()
    payment = Payment.objects.get(pk=charged.json()["id"])
    checkout_payment = Payment.objects.get(pk=checkout.json()["id"])
    account = Account.objects.get(pk=other_tenant["organization"].pk)
    return {
        **other_tenant,
        "card": card,
        "customer": account.stripe_customer_id,
        "payment_intent": payment.stripe_payment_intent_id,
        "checkout_session": checkout_payment.stripe_checkout_session_id,
        "payment_ids": {payment.pk, checkout_payment.pk},
    }


def snapshot(tenant: dict[str, Any], victim: dict[str, Any]) -> dict[str, Any]:
    """What an attack could move: both accounts, both organizations' payments, where the card is."""
    attacker = Account.objects.get(pk=tenant["organization"].pk)
    owner = Account.objects.get(pk=victim["organization"].pk)
    return {
        "attacker": (attacker.balance_micros, attacker.default_payment_method_id, attacker.stripe_customer_id),
        "victim": (owner.balance_micros, owner.default_payment_method_id, owner.stripe_customer_id),
        "payments": sorted(Payment.objects.values_list("pk", "organization_id", "status", "amount_cents")),
        "card_customer": stripe_client().v1.payment_methods.retrieve(victim["card"]).customer,
        "card_audits": AuditEvent.objects.filter(
            action__in=[
                AuditAction.PAYMENT_METHOD_ADDED,
                AuditAction.PAYMENT_METHOD_DEFAULT_CHANGED,
                AuditAction.PAYMENT_METHOD_REMOVED,
            ]
        ).count(),
    }


def api_attempts(victim: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None]]:
    card = victim["card"]
    other_ids = [card, victim["payment_intent"], victim["checkout_session"], victim["customer"]]
    attempts: list[tuple[str, str, dict[str, Any] | None]] = []
    for stripe_id in other_ids:
        attempts += [
            ("post", "/v1/billing/payment-methods", {"payment_method": stripe_id}),
            ("post", "/v1/billing/payment-methods", {"payment_method": stripe_id, "set_default": True}),
            ("delete", f"/v1/billing/payment-methods/{stripe_id}", None),
            ("post", f"/v1/billing/payment-methods/{stripe_id}/default", None),
            ("post", "/v1/billing/purchases", {"amount_cents": 2_000, "payment_method": stripe_id}),
        ]
    return attempts


def test_the_api_refuses_another_organizations_stripe_ids(tenant: dict[str, Any], victim: dict[str, Any]) -> None:
    save_card(tenant)  # the attacker has a customer and a card of its own: the routes are live for it
    before = snapshot(tenant, victim)
    for method, path, body in api_attempts(victim):
        response = getattr(tenant["client"], method)(path, body, format="json")
        assert 400 <= response.status_code < 500, (method, path, body, response.status_code)
    assert snapshot(tenant, victim) == before
    assert before["card_customer"] == victim["customer"]  # the card never left its owner

    # Fields the purchase body does not take are dropped: the charge is the attacker's own, on its own card.
    own_customer = before["attacker"][2]
    for field, stripe_id in (
        ("customer", victim["customer"]),
        ("payment_intent", victim["payment_intent"]),
        ("checkout_session", victim["checkout_session"]),
    ):
        response = buy(tenant, **{field: stripe_id})
        assert response.status_code == 201, response.json()
        payment = Payment.objects.get(pk=response.json()["id"])
        assert (payment.organization_id, payment.stripe_customer_id) == (tenant["organization"].pk, own_customer)
        assert payment.stripe_payment_intent_id != victim["payment_intent"]
    after = snapshot(tenant, victim)
    assert (after["victim"], after["card_customer"]) == (before["victim"], before["card_customer"])
    assert {row for row in after["payments"] if row[1] == victim["organization"].pk} == {
        row for row in before["payments"] if row[1] == victim["organization"].pk
    }

    listing = tenant["client"].get("/v1/billing/payment-methods").json()
    assert victim["card"] not in {card["id"] for card in listing["data"]}
    purchases = tenant["client"].get("/v1/billing/purchases").json()["results"]
    assert not {payment["id"] for payment in purchases} & victim["payment_ids"]


def test_attaching_another_organizations_card_is_a_404(tenant: dict[str, Any], victim: dict[str, Any]) -> None:
    response = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": victim["card"]}, format="json")
    assert (response.status_code, response.json()["error_type"]) == (404, "not_found")
    assert stripe_client().v1.payment_methods.retrieve(victim["card"]).customer == victim["customer"]
    # The owner still charges it.
    assert buy(victim, payment_method=victim["card"]).status_code == 201


def test_a_card_on_no_customer_may_be_attached(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    fresh = stripe_client().v1.payment_methods.retrieve("pm_card_visa")  # as Stripe.js makes one: on no customer
    assert fresh.customer is None
    response = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": fresh.id}, format="json")
    assert response.status_code == 201, response.json()
    customer = Account.objects.get(pk=tenant["organization"].pk).stripe_customer_id
    assert stripe_client().v1.payment_methods.retrieve(fresh.id).customer == customer


def test_an_unknown_payment_method_is_a_404(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    response = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": "pm_nobody"}, format="json")
    assert (response.status_code, response.json()["error_type"]) == (404, "not_found")


def test_the_dashboard_refuses_another_organizations_card(tenant: dict[str, Any], victim: dict[str, Any]) -> None:
    tenant["user"].set_password(PASSWORD)
    tenant["user"].save(update_fields=["password"])
    browser = Client()
    assert browser.login(email=tenant["user"].email, password=PASSWORD)
    save_card(tenant)
    before = snapshot(tenant, victim)
    for action in ("remove", "default"):
        browser.post(f"/dashboard/billing/cards/{victim['card']}", {"action": action})
    assert snapshot(tenant, victim) == before
