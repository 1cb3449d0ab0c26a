"""Saved cards (brand, last four digits, expiry) are shown through the API only to a key with the ``admin`` scope, the
one scope whose actions include managing billing (accounts.policy), as the dashboard shows them only to the members
who manage billing. A ``usage:read`` key reads usage, the balance and payments; not the cards that pay."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import Role, Scope
from accounts.services import add_member
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db


def key_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return client


def test_only_an_admin_key_lists_the_saved_cards(
    fake_stripe: FakeStripe, tenant: dict[str, Any], make_key: Any, make_user: Any
) -> None:
    organization = tenant["organization"]
    saved = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": "pm_card_visa"}, format="json")
    assert saved.status_code == 201, saved.json()
    card = saved.json()

    listing = tenant["client"].get("/v1/billing/payment-methods")
    assert listing.status_code == 200
    assert [(each["id"], each["last4"]) for each in listing.json()["data"]] == [(card["id"], "4242")]

    developer = make_user()
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    billing_member = make_user()
    add_member(organization=organization, user=billing_member, role=Role.BILLING)
    keys = {
        "usage:read, made by no one": make_key(organization, scopes=[Scope.USAGE_READ]),
        "usage:read and inference, made by the owner": make_key(
            organization, scopes=[Scope.USAGE_READ, Scope.INFERENCE], created_by=tenant["user"]
        ),
        "usage:read, made by a developer": make_key(organization, scopes=[Scope.USAGE_READ], created_by=developer),
        "usage:read, made by a billing member": make_key(
            organization, scopes=[Scope.USAGE_READ], created_by=billing_member
        ),
        "inference": make_key(organization, scopes=[Scope.INFERENCE]),
    }
    for label, (_, token) in keys.items():
        reader = key_client(token)
        refused = reader.get("/v1/billing/payment-methods")
        assert refused.status_code == 403, label
        assert refused.json() == {
            "detail": "This API key lacks the 'admin' scope.",
            "error_type": "insufficient_scope",
        }, label
        assert card["id"] not in refused.content.decode()
        assert "4242" not in refused.content.decode()
        if Scope.USAGE_READ in keys[label][0].scopes:
            # What usage:read is for still answers.
            assert reader.get("/v1/billing/balance").status_code == 200, label
            assert reader.get("/v1/billing/purchases").status_code == 200, label

    # The dashboard, as before: the card to those who manage billing, not to a developer.
    for person, shown in ((billing_member, True), (developer, False)):
        page = Client()
        page.force_login(person)
        page.post("/dashboard/organization", {"organization": str(organization.pk)})
        body = page.get("/dashboard/billing").content.decode()
        assert ("4242" in body) is shown, person


def test_the_schema_says_listing_cards_needs_the_admin_scope() -> None:
    document = Client().get("/v1/openapi.json").json()
    listing = document["paths"]["/v1/billing/payment-methods"]["get"]
    assert "admin scope" in listing["summary"]
    assert "`admin`" in listing["description"]
    assert "403" in listing["responses"]
    assert "admin" in listing["responses"]["403"]["description"]
