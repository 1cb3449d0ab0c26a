"""A purchase whose database fails after Stripe charged the card: the charge is recorded on a new connection and
answered 201 (credited once), or, where the database does not answer again, a 503 that says the card was charged and
not to buy again; a database that fails before Stripe is called answers a 503 that says nothing was charged. The
card is never charged twice for one purchase, the ledger never credited twice."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError

from billing import charges
from billing.models import CreditEntry, EntryKind, Payment, PaymentStatus
from tests.billing.test_purchase_idempotency_key import DOLLARS_20, balance, buy, intents_of, save_card
from tests.outages import commit_lost
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db(transaction=True)


def _credited(tenant: dict[str, Any]) -> Any:
    return lambda: CreditEntry.objects.filter(
        payment__organization=tenant["organization"], kind=EntryKind.PURCHASE
    ).exists()


def _purchase_row(tenant: dict[str, Any]) -> Any:
    return lambda: Payment.objects.filter(organization=tenant["organization"]).exists()


@pytest.mark.parametrize("after_commit", [True, False], ids=["after-commit", "before-commit"])
def test_a_charge_whose_record_loses_its_connection_is_recorded_once_and_answered(
    fake_stripe: FakeStripe, tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch, after_commit: bool
) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)
    with commit_lost(monkeypatch, _credited(tenant), after_commit=after_commit):
        response = buy(tenant["client"], None)
    assert response.status_code == 201, response.content
    assert response.json()["status"] == PaymentStatus.SUCCEEDED
    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert payment.status == PaymentStatus.SUCCEEDED
    assert len(intents_of(customer_id)) == 1
    assert list(CreditEntry.objects.filter(payment=payment).values_list("amount_micros", flat=True)) == [DOLLARS_20]
    assert balance(tenant) == before + DOLLARS_20


def test_a_charge_the_database_cannot_record_says_so_and_a_keyed_retry_charges_once(
    fake_stripe: FakeStripe, tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)

    def no_answer(read: Any) -> Any:
        raise OperationalError("connection refused")

    with monkeypatch.context() as patch:
        patch.setattr(charges, "on_a_new_connection", no_answer)
        with commit_lost(patch, _credited(tenant), after_commit=False):
            response = buy(tenant["client"], "order-1")
    assert response.status_code == 503, response.content
    assert int(response["Retry-After"]) > 0
    body = response.json()
    [payment] = Payment.objects.filter(organization=tenant["organization"])
    assert (body["error_type"], body["payment_id"]) == ("service_unavailable", payment.pk)
    assert "do not buy again" in body["detail"]
    assert balance(tenant) == before  # not recorded yet: the webhook or the sweep will
    # The same purchase sent again under its key: Stripe's first charge, recorded now, once.
    again = buy(tenant["client"], "order-1")
    assert again.status_code == 201, again.content
    assert again.json()["id"] == payment.pk
    assert len(intents_of(customer_id)) == 1
    assert balance(tenant) == before + DOLLARS_20


def test_a_purchase_whose_row_is_lost_before_stripe_is_called_charges_nothing(
    fake_stripe: FakeStripe, tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    customer_id = save_card(tenant)
    before = balance(tenant)
    with commit_lost(monkeypatch, _purchase_row(tenant), after_commit=True):
        response = buy(tenant["client"], None)
    assert response.status_code == 503, response.content
    assert int(response["Retry-After"]) > 0
    assert "nothing was charged" in response.json()["detail"]
    assert intents_of(customer_id) == []
    assert balance(tenant) == before
