"""The books after real work: jobs on the real workers, an auto top-up charged by the housekeeping
worker, a purchase, and Stripe's webhooks delivered twice and in reverse order. Reconciliation,
including the comparison with (the fake) Stripe, must find no drift."""

from __future__ import annotations

import json
import ssl
from typing import Any

import fal_client
import httpx
import pytest
import stripe
from django.db.models import Sum

from billing import cards, charges, controls
from billing.ledger import account_of
from billing.models import (
    Account,
    CreditEntry,
    EntryKind,
    Payment,
    PaymentKind,
    PaymentStatus,
    StripeEvent,
    StripeEventStatus,
    UsageRecord,
)
from billing.rates import ensure_opening_prices
from billing.reconciliation import run_reconciliation
from tests.e2e.conftest import Stack
from tests.stripe_support import PUBLISHABLE_KEY, SECRET_KEY, WEBHOOK_PATH, WEBHOOK_SECRET
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

BODY = {"prompt": "books", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


def housekeeping_log(stack: Stack) -> str:
    return f"--- housekeeping ---\n{stack.log_tail('housekeeping', 40)}"


def test_reconciliation_finds_no_drift_after_real_work(stack: Stack, e2e_tenant: dict[str, Any], settings: Any) -> None:
    settings.STRIPE_SECRET_KEY, settings.STRIPE_PUBLISHABLE_KEY = SECRET_KEY, PUBLISHABLE_KEY
    settings.STRIPE_WEBHOOK_SECRET, settings.STRIPE_API_BASE = WEBHOOK_SECRET, stack.stripe.url
    from billing.models import Price

    ensure_opening_prices(Price)
    organization = e2e_tenant["organization"]
    cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
    # Any debit leaves the available balance under the threshold: the next usage triggers a top-up.
    threshold = account_of(organization).available_micros
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=threshold, amount_cents=500)

    client = fal_client.SyncClient(key=e2e_tenant["key"])
    for n in range(2):
        client.subscribe("platform/tiny-sd", arguments={**BODY, "seed": n})
    wait_until(
        lambda: Payment.objects.filter(
            organization=organization, kind=PaymentKind.AUTO_TOP_UP, status=PaymentStatus.SUCCEEDED
        ).exists(),
        timeout=60,
        message=lambda: f"the auto top-up to succeed\n{housekeeping_log(stack)}",
    )
    bought = charges.buy_credits(organization=organization, amount_cents=700)
    assert bought.payment.status == PaymentStatus.SUCCEEDED

    # Stripe's events about both payments, delivered to the running server twice each, newest first.
    intents = list(Payment.objects.filter(organization=organization).values_list("stripe_payment_intent_id", flat=True))
    events = stack.stripe.events(*intents)
    assert {event["type"] for event in events} >= {"payment_intent.succeeded"}
    trust = ssl.create_default_context(cafile=stack.ca_file)
    with httpx.Client(base_url=stack.base_url, verify=trust, timeout=30) as server:
        for event in [*reversed(events), *reversed(events)]:
            payload = json.dumps(event)
            signature = stripe.WebhookSignature.generate_signature_header(payload, WEBHOOK_SECRET)
            answer = server.post(
                WEBHOOK_PATH,
                content=payload,
                headers={"Content-Type": "application/json", "Stripe-Signature": signature},
            )
            assert answer.status_code == 200, answer.text
    done = (StripeEventStatus.PROCESSED, StripeEventStatus.IGNORED)
    wait_until(
        lambda: StripeEvent.objects.filter(pk__in=[e["id"] for e in events], status__in=done).count() == len(events),
        timeout=60,
        message=lambda: f"the housekeeping worker to process the webhooks\n{housekeeping_log(stack)}",
    )

    # Each payment credited exactly once; usage debited once per billable attempt; the cache is the sum.
    for payment in Payment.objects.filter(organization=organization):
        entries = CreditEntry.objects.filter(payment=payment, kind__in=(EntryKind.PURCHASE, EntryKind.AUTO_TOP_UP))
        assert [entry.amount_micros for entry in entries] == [payment.amount_cents * 10_000]
    billable = UsageRecord.objects.filter(organization=organization, billable=True)
    assert billable.count() == 2
    assert CreditEntry.objects.filter(organization=organization, kind=EntryKind.USAGE).count() == 2
    total = CreditEntry.objects.filter(organization=organization).aggregate(total=Sum("amount_micros"))["total"]
    assert Account.objects.get(pk=organization.pk).balance_micros == total

    run = run_reconciliation()
    assert run.drift == [], run.drift
    assert run.ok
    assert "skipped" not in run.checked["stripe"]  # compared with Stripe, not passed by default
    assert run.checked["stripe"]["checked"] >= 2
