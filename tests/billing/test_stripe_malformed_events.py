"""A signed body that is no event Stripe sends is stored, ignored with why, answered 200 and never processed;
an unsigned one is still a 400; neither is ever a 5xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
import stripe
from django.test import Client

from billing import stripe_events
from billing.models import StripeEvent, StripeEventStatus
from tests.stripe_support import WEBHOOK_PATH, WEBHOOK_SECRET

pytestmark = pytest.mark.django_db

DEEP = 5000
MALFORMED = {
    "type-only": '{"type": "x"}',
    "empty-object": "{}",
    "list": "[]",
    "string": '"payment_intent.succeeded"',
    "number": "5",
    "null": "null",
    "numeric-id": '{"id": 5, "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1"}}}',
    "long-id": json.dumps({"id": "evt_" + "x" * 300, "type": "x", "data": {"object": {}}}),
    "nul-in-id": '{"id": "evt_\\u0000", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1"}}}',
    "long-type": json.dumps({"id": "evt_long_type", "type": "x" * 300, "data": {"object": {}}}),
    "data-list": '{"id": "evt_data_list", "type": "payment_intent.succeeded", "data": []}',
    "object-string": '{"id": "evt_object_string", "type": "charge.refunded", "data": {"object": "ch_1"}}',
    "nan": '{"id": "evt_nan", "type": "x", "data": {"object": {"amount": NaN}}}',
    "infinity": '{"id": "evt_inf", "type": "x", "data": {"object": {"amount": 1e400}}}',
    "nul-in-value": '{"id": "evt_nul_value", "type": "x", "data": {"object": {"note": "a\\u0000b"}}}',
    "lone-surrogate": '{"id": "evt_surrogate", "type": "x", "data": {"object": {"note": "\\ud800"}}}',
    "deep": '{"id": "evt_deep", "type": "x", "data": {"object": {"a": ' + "[" * DEEP + "]" * DEEP + "}}}",
    "not-json": "this is not JSON",
}


def post(body: str, *, signed: bool = True) -> Any:
    header = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET) if signed else "t=1,v1=forged"
    return Client().post(WEBHOOK_PATH, data=body, content_type="application/json", HTTP_STRIPE_SIGNATURE=header)


@pytest.fixture(autouse=True)
def webhook_secret(settings: Any) -> None:
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_signed_malformed_event_is_stored_ignored_and_answered_200(
    body: str, sent_tasks: list[tuple[str, list[Any]]]
) -> None:
    response = post(body)
    assert response.status_code == 200, response.content
    answer = response.json()
    assert answer["duplicate"] is False
    stored = StripeEvent.objects.get(pk=answer["id"])
    assert stored.status == StripeEventStatus.IGNORED
    assert stored.error.startswith("Malformed event: ")
    assert stored.processed_at is not None
    # Stored as given where it can be, and never handed to a worker.
    assert json.dumps(stored.payload)
    assert sent_tasks == []

    again = post(body)
    assert again.status_code == 200
    assert again.json() == {"id": answer["id"], "duplicate": True}
    assert StripeEvent.objects.count() == 1


def test_a_malformed_event_keeps_its_own_id_when_it_has_a_usable_one() -> None:
    response = post(MALFORMED["data-list"])
    assert response.json()["id"] == "evt_data_list"
    event = StripeEvent.objects.get(pk="evt_data_list")
    assert event.type == "payment_intent.succeeded"
    assert event.payload == {"id": "evt_data_list", "type": "payment_intent.succeeded", "data": []}
    assert "data.object" in event.error


def test_a_body_without_an_id_is_stored_under_one_made_from_it() -> None:
    first = post('{"type": "x"}').json()["id"]
    second = post('{"type": "y"}').json()["id"]
    assert first.startswith("malformed_")
    assert first != second
    assert StripeEvent.objects.get(pk=first).type == "x"


def test_values_a_json_column_cannot_hold_are_stored_as_text() -> None:
    post(MALFORMED["nan"])
    post(MALFORMED["nul-in-value"])
    assert StripeEvent.objects.get(pk="evt_nan").payload["data"]["object"]["amount"] == "nan"
    assert StripeEvent.objects.get(pk="evt_nul_value").payload["data"]["object"]["note"] == "a\\u0000b"


@pytest.mark.parametrize("body", list(MALFORMED.values()), ids=list(MALFORMED))
def test_an_unsigned_malformed_body_is_still_400_and_stores_nothing(body: str) -> None:
    response = post(body, signed=False)
    assert response.status_code == 400
    assert response.json()["error_type"] == "invalid_signature"
    assert not StripeEvent.objects.exists()


def test_a_body_that_is_not_utf8_is_400() -> None:
    response = Client().post(
        WEBHOOK_PATH, data=b"\xff\xfe{}", content_type="application/json", HTTP_STRIPE_SIGNATURE="t=1,v1=x"
    )
    assert response.status_code == 400
    assert not StripeEvent.objects.exists()


def test_a_well_formed_event_is_still_queued(
    sent_tasks: list[tuple[str, list[Any]]], django_capture_on_commit_callbacks: Any
) -> None:
    event = {"id": "evt_fine", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_1"}}}
    with django_capture_on_commit_callbacks(execute=True):
        response = post(json.dumps(event))
    assert response.json() == {"id": "evt_fine", "duplicate": False}
    assert StripeEvent.objects.get(pk="evt_fine").status == StripeEventStatus.PENDING
    assert sent_tasks == [(stripe_events.PROCESS_TASK, ["evt_fine"])]
