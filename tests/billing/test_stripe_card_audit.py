"""Saved-card changes are audited: who added, chose or removed which card (brand, last 4, Stripe id), never a secret.

Against localstripe, through the API (an API key acts) and the dashboard's billing page (a person acts).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditAction, AuditEvent
from billing import controls
from billing.models import Account
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

CARD_ACTIONS = (
    AuditAction.PAYMENT_METHOD_ADDED,
    AuditAction.PAYMENT_METHOD_DEFAULT_CHANGED,
    AuditAction.PAYMENT_METHOD_REMOVED,
)


def save_card(tenant: dict[str, Any], **body: Any) -> dict[str, Any]:
    response = tenant["client"].post(
        "/v1/billing/payment-methods", {"payment_method": "pm_card_visa", **body}, format="json"
    )
    assert response.status_code == 201, response.json()
    return response.json()  # type: ignore[no-any-return]


def card_events() -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action__in=CARD_ACTIONS).order_by("pk"))


def card(saved: dict[str, Any]) -> dict[str, Any]:
    return {"payment_method_id": saved["id"], "brand": "visa", "last4": "4242"}


def test_adding_choosing_and_removing_cards_through_the_api_is_audited(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    organization, client = tenant["organization"], tenant["client"]
    first = save_card(tenant)
    second = save_card(tenant)
    assert client.post(f"/v1/billing/payment-methods/{second['id']}/default").status_code == 200
    controls.set_auto_top_up(organization=organization, enabled=True)
    assert client.delete(f"/v1/billing/payment-methods/{second['id']}").status_code == 204

    events = card_events()
    assert [(event.action, event.metadata) for event in events] == [
        (AuditAction.PAYMENT_METHOD_ADDED, {**card(first), "made_default": True}),
        (AuditAction.PAYMENT_METHOD_ADDED, {**card(second), "made_default": False}),
        (AuditAction.PAYMENT_METHOD_DEFAULT_CHANGED, {**card(second), "previous_default_id": first["id"]}),
        (AuditAction.PAYMENT_METHOD_REMOVED, {**card(second), "was_default": True}),
    ]
    for event in events:
        assert event.organization_id == organization.pk
        assert (event.actor_api_key_id, event.actor_user_id) == (tenant["api_key"].pk, None)
        assert (event.target_type, event.target_id) == ("billing.account", str(organization.pk))
        stored = json.dumps(event.metadata)
        assert "secret" not in stored
        assert Account.objects.get(pk=organization.pk).stripe_customer_id not in stored
    # Removing the default card turned auto top-up off, audited as its own change after the removal.
    top_up = AuditEvent.objects.get(action=AuditAction.TOP_UP_CHANGED, metadata__enabled=False)
    assert top_up.pk > events[-1].pk


def test_the_dashboard_audits_the_person_who_changed_a_card(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    first = save_card(tenant)
    second = save_card(tenant)
    browser = Client()
    browser.force_login(tenant["user"])

    assert browser.post(f"/dashboard/billing/cards/{second['id']}", {"action": "default"}).status_code == 302
    assert browser.post(f"/dashboard/billing/cards/{first['id']}", {"action": "remove"}).status_code == 302

    *_, chosen, removed = card_events()
    assert (chosen.action, chosen.metadata) == (
        AuditAction.PAYMENT_METHOD_DEFAULT_CHANGED,
        {**card(second), "previous_default_id": first["id"]},
    )
    assert (removed.action, removed.metadata) == (
        AuditAction.PAYMENT_METHOD_REMOVED,
        {**card(first), "was_default": False},
    )
    for event in (chosen, removed):
        assert (event.actor_user_id, event.actor_api_key_id) == (tenant["user"].pk, None)
        assert event.organization_id == organization.pk
        assert event.ip_address == "127.0.0.1"
    assert Account.objects.get(pk=organization.pk).default_payment_method_id == second["id"]


def test_a_card_change_that_fails_records_nothing(
    fake_stripe: FakeStripe, tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    theirs = save_card(other_tenant)
    save_card(tenant)
    before = AuditEvent.objects.filter(action__in=CARD_ACTIONS).count()
    client = tenant["client"]
    # Another organization's card: neither made the default nor removed, and no audit row says it was.
    assert client.post(f"/v1/billing/payment-methods/{theirs['id']}/default").status_code == 404
    assert client.delete(f"/v1/billing/payment-methods/{theirs['id']}").status_code == 404
    assert client.delete("/v1/billing/payment-methods/pm_unknown").status_code == 404
    assert AuditEvent.objects.filter(action__in=CARD_ACTIONS).count() == before
