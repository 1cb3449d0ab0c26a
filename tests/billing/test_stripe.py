"""Stripe through our API and services, against localstripe (``fake_stripe.py`` says what it adds).

Webhook events here are the ones the fake Stripe made, fetched from its ``/v1/events`` and delivered
to our endpoint signed with the SDK's scheme; ``test_stripe_delivery.py`` has the fake deliver them
itself to a running server. Checkout Sessions and disputes do not exist in localstripe: the small
fakes in ``fake_stripe.py`` stand in for them at the HTTP boundary, the SDK calls being the real ones.
"""

from __future__ import annotations

import itertools
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import AuditAction, AuditEvent, Organization, Scope
from billing import cards, controls, reconciliation, stripe_events, stripe_state, stripe_sweep, tasks, topups
from billing.ledger import grant_credits
from billing.models import (
    Account,
    CreditEntry,
    EntryKind,
    Granularity,
    Payment,
    PaymentKind,
    PaymentStatus,
    Price,
    StripeEvent,
    StripeEventStatus,
    UsageRollup,
)
from billing.rates import ensure_opening_prices
from billing.stripe_client import stripe_client
from inference import dispatch
from inference.models import Endpoint
from tests import lifecycle
from tests.billing.conftest import deliver, signed
from tests.conftest import personal_organization
from tests.stripe_support import WEBHOOK_SECRET, FakeStripe

pytestmark = pytest.mark.django_db

DOLLARS_20 = 20_000_000  # micros


def balance(tenant: dict[str, Any]) -> int:
    return Account.objects.get(pk=tenant["organization"].pk).balance_micros


def save_card(tenant: dict[str, Any], card: str = "pm_card_visa", **body: Any) -> dict[str, Any]:
    response = tenant["client"].post("/v1/billing/payment-methods", {"payment_method": card, **body}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()  # type: ignore[no-any-return]


def buy(tenant: dict[str, Any], **body: Any) -> Any:
    return tenant["client"].post("/v1/billing/purchases", {"amount_cents": 2_000, **body}, format="json")


def deliver_all(client: Any, events: list[dict[str, Any]]) -> list[StripeEvent]:
    """Each event delivered (as Stripe would) and processed (as the worker would)."""
    processed = []
    for event in events:
        assert deliver(client, event).status_code == 200
        processed.append(stripe_events.process_event(event["id"]))
    return processed


def test_a_customer_is_made_once_per_organization(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    first = cards.ensure_customer(tenant["organization"])
    assert cards.ensure_customer(tenant["organization"]) == first
    customer = stripe_client().v1.customers.retrieve(first)
    assert customer.metadata["organization_id"] == str(tenant["organization"].pk)
    assert customer.email == tenant["user"].email


def test_saving_listing_choosing_and_removing_cards(
    fake_stripe: FakeStripe, tenant: dict[str, Any], make_key: Any
) -> None:
    client = tenant["client"]
    first = save_card(tenant)
    assert (first["last4"], first["is_default"]) == ("4242", True)  # the first card becomes the default
    second = save_card(tenant)
    assert second["is_default"] is False
    listing = client.get("/v1/billing/payment-methods").json()
    assert {card["id"] for card in listing["data"]} == {first["id"], second["id"]}
    assert (listing["default_payment_method"], listing["publishable_key"]) == (first["id"], "pk_test_platform")

    assert client.post(f"/v1/billing/payment-methods/{second['id']}/default").json()["is_default"] is True
    assert Account.objects.get(pk=tenant["organization"].pk).default_payment_method_id == second["id"]
    customer = stripe_client().v1.customers.retrieve(
        Account.objects.get(pk=tenant["organization"].pk).stripe_customer_id
    )
    assert customer.invoice_settings.default_payment_method == second["id"]

    controls.set_auto_top_up(organization=tenant["organization"], enabled=True)
    assert client.delete(f"/v1/billing/payment-methods/{second['id']}").status_code == 204
    account = Account.objects.get(pk=tenant["organization"].pk)
    assert (account.default_payment_method_id, account.auto_top_up_enabled) == ("", False)  # nothing left to charge
    assert [card["id"] for card in client.get("/v1/billing/payment-methods").json()["data"]] == [first["id"]]

    missing = client.delete("/v1/billing/payment-methods/pm_not_ours")
    assert (missing.status_code, missing.json()["error_type"]) == (404, "not_found")
    _, token = make_key(tenant["organization"], scopes=[Scope.USAGE_READ])
    reader = APIClient()
    reader.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    assert reader.get("/v1/billing/payment-methods").status_code == 403  # cards: admin scope only
    assert reader.get("/v1/billing/purchases").status_code == 200
    card = {"payment_method": "pm_card_visa"}
    assert reader.post("/v1/billing/payment-methods", card, format="json").status_code == 403
    assert reader.post("/v1/billing/purchases", {"amount_cents": 2_000}, format="json").status_code == 403
    assert reader.delete(f"/v1/billing/payment-methods/{first['id']}").status_code == 403


def test_another_organizations_card_cannot_be_charged(
    fake_stripe: FakeStripe, tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    theirs = save_card(other_tenant)
    save_card(tenant)
    refused = buy(tenant, payment_method=theirs["id"])
    assert (refused.status_code, refused.json()["error_type"]) == (404, "not_found")
    assert not Payment.objects.filter(organization=tenant["organization"]).exists()


def test_buying_with_a_saved_card_credits_once_however_often_stripe_tells_us(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    save_card(tenant)
    before = balance(tenant)
    response = buy(tenant)
    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["status"], body["amount_cents"], body["client_secret"]) == ("succeeded", 2_000, None)
    payment = Payment.objects.get(pk=body["id"])
    assert balance(tenant) == before + DOLLARS_20  # credited from the synchronous answer
    [entry] = CreditEntry.objects.filter(payment=payment)
    assert (entry.kind, entry.idempotency_key, entry.amount_micros) == (
        EntryKind.PURCHASE,
        f"payment-{payment.pk}",
        DOLLARS_20,
    )

    [succeeded] = fake_stripe.events(payment.stripe_payment_intent_id, types=("payment_intent.succeeded",))
    for delivery in range(3):  # Stripe delivers at least once
        with django_capture_on_commit_callbacks(execute=True):
            answer = deliver(tenant["client"], succeeded).json()
        assert answer == {"id": succeeded["id"], "duplicate": delivery > 0}
    assert sent_tasks == [("billing.process_stripe_event", [succeeded["id"]])]  # queued once, on commit
    assert stripe_events.process_event(succeeded["id"]).status == StripeEventStatus.PROCESSED
    assert stripe_events.process_event(succeeded["id"], force=True).status == StripeEventStatus.PROCESSED
    assert balance(tenant) == before + DOLLARS_20
    assert StripeEvent.objects.count() == 1

    listing = tenant["client"].get("/v1/billing/purchases").json()
    assert [(row["id"], row["status"]) for row in listing["results"]] == [(payment.pk, "succeeded")]


def test_a_declined_card_is_a_402_and_credits_nothing(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    save_card(tenant, "pm_card_chargeCustomerFail")
    before = balance(tenant)
    declined = buy(tenant)
    assert declined.status_code == 402
    assert declined.json() == {"detail": "Your card was declined.", "error_type": "card_declined"}
    payment = Payment.objects.get(organization=tenant["organization"])
    assert (payment.status, payment.failure_message) == (PaymentStatus.FAILED, "Your card was declined.")

    # Stripe's own word on it, later, finds the payment by its metadata and changes nothing.
    customer = Account.objects.get(pk=tenant["organization"].pk).stripe_customer_id
    intents = stripe_client().v1.payment_intents.list(params={"customer": customer}).data
    [failed] = fake_stripe.events(intents[0].id, types=("payment_intent.payment_failed",))
    [event] = deliver_all(tenant["client"], [failed])
    assert event.status == StripeEventStatus.PROCESSED
    payment.refresh_from_db()
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.FAILED, intents[0].id)
    assert balance(tenant) == before
    assert not CreditEntry.objects.filter(payment=payment).exists()


def test_checkout_credits_when_stripe_says_paid_and_cancels_when_expired(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any]
) -> None:
    response = buy(tenant, mode="checkout", success_url="https://app.example/ok", cancel_url="https://app.example/no")
    assert response.status_code == 201, response.json()
    payment = Payment.objects.get(pk=response.json()["id"])
    assert response.json()["checkout_url"].endswith(payment.stripe_checkout_session_id)
    assert payment.status == PaymentStatus.PENDING
    before = balance(tenant)

    session = fake_stripe.pay_checkout(payment.stripe_checkout_session_id)
    events = fake_stripe.events(session["id"], session["payment_intent"])
    assert [event["type"] for event in events] == ["payment_intent.succeeded", "checkout.session.completed"]
    deliver_all(tenant["client"], events + events)
    payment.refresh_from_db()
    assert (payment.status, payment.stripe_payment_intent_id) == (PaymentStatus.SUCCEEDED, session["payment_intent"])
    assert balance(tenant) == before + DOLLARS_20

    abandoned = buy(tenant, mode="checkout", success_url="https://app.example/ok", cancel_url="https://app.example/no")
    expired = fake_stripe.expire_checkout(abandoned.json()["checkout_url"].rsplit("/", 1)[1])
    deliver_all(tenant["client"], fake_stripe.events(expired["id"]))
    assert Payment.objects.get(pk=abandoned.json()["id"]).status == PaymentStatus.CANCELED
    assert balance(tenant) == before + DOLLARS_20

    missing_urls = buy(tenant, mode="checkout")
    assert missing_urls.status_code == 422


def test_refunds_and_disputes_follow_stripe_in_any_order(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    """Paid through Checkout (no synchronous answer), refunded in part and disputed, and the events
    processed newest first: the refund's event arrives before the payment's."""
    started = buy(tenant, mode="checkout", success_url="https://app.example/ok", cancel_url="https://app.example/no")
    session = fake_stripe.pay_checkout(started.json()["checkout_url"].rsplit("/", 1)[1])
    intent = stripe_client().v1.payment_intents.retrieve(session["payment_intent"])
    charge_id = intent.latest_charge.id
    stripe_client().v1.refunds.create(params={"payment_intent": intent.id, "amount": 500})
    dispute = fake_stripe.open_dispute(charge_id, amount=700)
    before = balance(tenant)

    events = fake_stripe.events(session["id"], intent.id, charge_id, dispute["id"])
    assert [event["type"] for event in events] == [
        "payment_intent.succeeded", "checkout.session.completed", "charge.refunded", "charge.dispute.created",
    ]  # fmt: skip
    deliver_all(tenant["client"], list(reversed(events)))
    payment = Payment.objects.get(pk=started.json()["id"])
    assert (payment.status, payment.amount_refunded_cents, payment.amount_disputed_cents) == ("succeeded", 500, 700)
    entries = {entry.idempotency_key: entry.amount_micros for entry in CreditEntry.objects.filter(payment=payment)}
    refund_id = stripe_client().v1.refunds.list(params={"charge": charge_id}).data[0].id
    assert entries == {
        f"payment-{payment.pk}": DOLLARS_20,
        f"refund-{refund_id}": -5_000_000,
        f"dispute-{dispute['id']}": -7_000_000,
    }
    assert balance(tenant) == before + DOLLARS_20 - 5_000_000 - 7_000_000

    fake_stripe.close_dispute(dispute["id"], "won")
    deliver_all(tenant["client"], fake_stripe.events(dispute["id"], types=("charge.dispute.closed",)))
    payment.refresh_from_db()
    assert payment.amount_disputed_cents == 0
    assert balance(tenant) == before + DOLLARS_20 - 5_000_000
    assert reconciliation.compare_with_stripe()[1] == []


def test_forged_or_unsigned_deliveries_are_refused_and_change_nothing(
    fake_stripe: FakeStripe, tenant: dict[str, Any], client: Any
) -> None:
    event = {"id": "evt_forged", "type": "payment_intent.succeeded", "data": {"object": {"id": "pi_x"}}}
    payload, signature = signed(event)
    attempts = [
        {},  # no signature at all
        {"HTTP_STRIPE_SIGNATURE": signed(event, secret="whsec_someone_else")[1]},
        {"HTTP_STRIPE_SIGNATURE": signature.replace("v1=", "v1=00")},
        {"HTTP_STRIPE_SIGNATURE": "t=1,v1=" + signature.rsplit("v1=", 1)[1]},  # replayed long after
    ]
    for headers in attempts:
        response = client.post("/billing/stripe/webhook", data=payload, content_type="application/json", **headers)
        assert (response.status_code, response.json()["error_type"]) == (400, "invalid_signature")
    tampered = payload.replace("pi_x", "pi_y")
    response = client.post(
        "/billing/stripe/webhook", data=tampered, content_type="application/json", HTTP_STRIPE_SIGNATURE=signature
    )
    assert response.status_code == 400
    assert client.get("/billing/stripe/webhook").status_code == 405
    assert not StripeEvent.objects.exists()
    assert deliver(client, event, secret=WEBHOOK_SECRET).status_code == 200  # the same event, signed: stored


def test_a_failed_event_is_kept_and_the_replay_command_applies_it_once(
    fake_stripe: FakeStripe, tenant: dict[str, Any], settings: Any, capsys: Any
) -> None:
    started = buy(tenant, mode="checkout", success_url="https://app.example/ok", cancel_url="https://app.example/no")
    session = fake_stripe.pay_checkout(started.json()["checkout_url"].rsplit("/", 1)[1])
    [succeeded] = fake_stripe.events(session["payment_intent"])
    before = balance(tenant)

    settings.STRIPE_API_BASE = "http://127.0.0.1:9"  # Stripe unreachable while the event is processed
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    [event] = deliver_all(tenant["client"], [succeeded])
    assert (event.status, event.attempts) == (StripeEventStatus.FAILED, 1)
    assert "APIConnectionError" in event.error
    assert balance(tenant) == before

    settings.STRIPE_API_BASE = fake_stripe.url
    call_command("replay_stripe_events")
    assert "1 replayed, 0 failed." in capsys.readouterr().out
    assert StripeEvent.objects.get(pk=succeeded["id"]).status == StripeEventStatus.PROCESSED
    call_command("replay_stripe_events", "--id", succeeded["id"])
    received = StripeEvent.objects.get(pk=succeeded["id"]).received_at  # the day it came (today, or yesterday)
    call_command("replay_stripe_events", "--since", f"{received:%Y-%m-%d}")
    assert balance(tenant) == before + DOLLARS_20
    assert AuditEvent.objects.filter(action=AuditAction.STRIPE_EVENT_REPLAYED, target_id=succeeded["id"]).count() == 3


def test_auto_top_up_fires_when_a_usage_debit_crosses_the_threshold_and_credits_once(
    fake_stripe: FakeStripe,
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    sent_tasks: list[Any],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ensure_opening_prices(Price)
    monkeypatch.setattr(dispatch, "send_run_message", lambda *args: True)
    organization = tenant["organization"]
    save_card(tenant)
    start = balance(tenant)
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=start - 50, amount_cents=2_000)
    with django_capture_on_commit_callbacks(execute=True):
        lifecycle.run(organization, builtin_endpoint, gpu_ms=100)  # 10 µ$: still above the threshold
    assert not [task for task in sent_tasks if task[0] == "billing.auto_top_up"]
    with django_capture_on_commit_callbacks(execute=True):
        lifecycle.run(organization, builtin_endpoint, gpu_ms=1_000)  # 100 µ$: below it
        lifecycle.run(organization, builtin_endpoint, gpu_ms=1_000)
    queued = [task for task in sent_tasks if task[0] == "billing.auto_top_up"]
    assert queued == [("billing.auto_top_up", [str(organization.pk)])]  # one message, not one per debit

    for _ in range(3):  # a redelivered message, or the sweep's, tops up once
        tasks.auto_top_up(str(organization.pk))
    [top_up] = Payment.objects.filter(organization=organization)
    assert (top_up.kind, top_up.status, top_up.amount_cents) == (PaymentKind.AUTO_TOP_UP, "succeeded", 2_000)
    [entry] = CreditEntry.objects.filter(payment=top_up)
    assert (entry.kind, entry.amount_micros) == (EntryKind.AUTO_TOP_UP, DOLLARS_20)
    assert balance(tenant) == start - 210 + DOLLARS_20
    [succeeded] = fake_stripe.events(top_up.stripe_payment_intent_id, types=("payment_intent.succeeded",))
    deliver_all(tenant["client"], [succeeded, succeeded])
    assert balance(tenant) == start - 210 + DOLLARS_20


def test_a_declined_auto_top_up_waits_before_trying_again(
    fake_stripe: FakeStripe, tenant: dict[str, Any], sent_tasks: list[Any], settings: Any
) -> None:
    organization = tenant["organization"]
    save_card(tenant, "pm_card_chargeCustomerFail")
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=50_000_000)
    assert topups.auto_top_up(organization_id=organization.pk).status == PaymentStatus.FAILED  # type: ignore[union-attr]
    assert topups.auto_top_up(organization_id=organization.pk) is None
    Payment.objects.update(created_at=timezone.now() - timedelta(seconds=settings.BILLING_AUTO_TOP_UP_RETRY_SECONDS))
    assert topups.auto_top_up(organization_id=organization.pk) is not None
    assert Payment.objects.filter(organization=organization).count() == 2
    assert not CreditEntry.objects.filter(payment__organization=organization).exists()


def test_at_most_one_auto_top_up_is_pending(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    save_card(tenant)
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=50_000_000)
    Payment.objects.create(organization=organization, kind=PaymentKind.AUTO_TOP_UP, amount_cents=2_000)
    assert topups.auto_top_up(organization_id=organization.pk) is None  # one is on its way
    assert Payment.objects.filter(organization=organization).count() == 1


def test_comparing_with_stripe_finds_every_drift(fake_stripe: FakeStripe, tenant: dict[str, Any]) -> None:
    save_card(tenant)
    paid = Payment.objects.get(pk=buy(tenant).json()["id"])
    assert reconciliation.compare_with_stripe() == ({"payments": 1, "stripe_payment_intents": 1, "refunds": 1}, [])

    account = Account.objects.get(pk=tenant["organization"].pk)
    stripe_client().v1.payment_intents.create(
        params={
            "amount": 999,
            "currency": "usd",
            "customer": account.stripe_customer_id,
            "payment_method": account.default_payment_method_id,
            "confirm": True,
        }
    )  # paid at Stripe, never recorded by us
    CreditEntry.objects.filter(payment=paid).update(amount_micros=DOLLARS_20 + 1)
    stripe_client().v1.refunds.create(params={"payment_intent": paid.stripe_payment_intent_id, "amount": 100})
    checked, drift = reconciliation.compare_with_stripe()
    assert checked == {"payments": 1, "stripe_payment_intents": 2, "refunds": 1}
    assert sorted(item["check"] for item in drift) == ["credit_amount", "refunds", "stripe_payment_missing"]


def test_the_monthly_statement_balances(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    organization = tenant["organization"]
    [signup] = CreditEntry.objects.filter(organization=organization)
    thanks = grant_credits(organization=organization, amount_micros=3_000_000, reason="Thanks")
    fix = grant_credits(organization=organization, amount_micros=-500_000, reason="Fix", kind=EntryKind.ADJUSTMENT)
    # This month is the grant's: the adjustment joins it there (a month may have ended between the two).
    now = thanks.created_at
    CreditEntry.objects.filter(pk=fix.pk).update(created_at=now)
    last_month = (now.replace(day=1) - timedelta(days=1)).replace(day=1, hour=12)
    CreditEntry.objects.filter(pk=signup.pk).update(created_at=last_month)
    Organization.objects.filter(pk=organization.pk).update(created_at=last_month)  # statements start with it
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    UsageRollup.objects.create(
        granularity=Granularity.DAY,
        bucket_start=today,
        organization=organization,
        endpoint=builtin_endpoint,
        gpu_class=builtin_endpoint.gpu_class,
        attempts=3,
        billable_attempts=2,
        gpu_ms=2_500,
        cost_micros=250,
    )
    month = f"{now:%Y-%m}"
    statement = tenant["client"].get(f"/v1/billing/statements/{month}").json()
    assert statement["opening_balance_micros"] == 1_000_000
    assert statement["closing_balance_micros"] == 3_500_000
    assert statement["movements"]["grants_micros"] == 3_000_000
    assert statement["movements"]["adjustments_micros"] == -500_000
    assert statement["balanced"] is True
    assert (
        statement["opening_balance_micros"] + statement["total_movements_micros"] == statement["closing_balance_micros"]
    )
    assert statement["usage"] == [
        {"endpoint": builtin_endpoint.endpoint_id, "attempts": 3, "billable_attempts": 2, "gpu_ms": 2_500,
         "unbilled_gpu_ms": 0, "cost_micros": 250, "debited_micros": 0},
    ]  # fmt: skip
    previous = tenant["client"].get(f"/v1/billing/statements/{last_month:%Y-%m}").json()
    assert (previous["opening_balance_micros"], previous["closing_balance_micros"]) == (0, 1_000_000)

    csv_text = tenant["client"].get(f"/v1/billing/statements/{month}?format=csv").content.decode()
    assert "balance,opening,,,1000000" in csv_text
    assert f"usage,{builtin_endpoint.endpoint_id},3,2500,250" in csv_text
    assert tenant["client"].get("/v1/billing/statements/2025-13").status_code == 404
    not_begun = now.year + 2  # a month still ahead when the test ends, even on New Year's Eve
    assert tenant["client"].get(f"/v1/billing/statements/{not_begun}-01").status_code == 404


def test_a_refund_that_fails_after_being_counted_gives_the_credit_back(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    """localstripe's refunds always succeed: Stripe's later word on one (failed) is given to the service."""
    save_card(tenant)
    payment = Payment.objects.get(pk=buy(tenant).json()["id"])
    client = stripe_client()
    intent = client.v1.payment_intents.retrieve(payment.stripe_payment_intent_id)
    refund = client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 400})
    after_purchase = balance(tenant)
    stripe_state.apply_refunds(charge=intent.latest_charge, intent=intent, refunds=[refund])
    assert balance(tenant) == after_purchase - 4_000_000
    failed = SimpleNamespace(id=refund.id, amount=400, status="failed")
    for _ in range(2):
        stripe_state.apply_refunds(charge=intent.latest_charge, intent=intent, refunds=[failed])
    payment.refresh_from_db()
    assert (payment.amount_refunded_cents, balance(tenant)) == (0, after_purchase)
    assert CreditEntry.objects.get(idempotency_key=f"refund-{refund.id}-reversed").amount_micros == 4_000_000


def test_the_sweep_processes_lost_events_settles_stale_payments_and_queues_missed_top_ups(
    fake_stripe: FakeStripe, tenant: dict[str, Any], other_tenant: dict[str, Any], sent_tasks: list[Any]
) -> None:
    organization = tenant["organization"]
    save_card(tenant)
    controls.set_auto_top_up(organization=organization, enabled=True, threshold_micros=30_000_000)
    # A top-up whose worker died before Stripe answered: Stripe is asked again under the same key.
    stale = Payment.objects.create(organization=organization, kind=PaymentKind.AUTO_TOP_UP, amount_cents=2_000)
    # A delivery stored while the broker was down, so never processed.
    started = buy(tenant, mode="checkout", success_url="https://app.example/ok", cancel_url="https://app.example/no")
    session = fake_stripe.pay_checkout(started.json()["checkout_url"].rsplit("/", 1)[1])
    [lost] = fake_stripe.events(session["payment_intent"])
    deliver(tenant["client"], lost)
    save_card(other_tenant)
    controls.set_auto_top_up(organization=other_tenant["organization"], enabled=True, threshold_micros=50_000_000)
    long_ago = timezone.now() - timedelta(hours=1)
    Payment.objects.filter(pk=stale.pk).update(created_at=long_ago)
    StripeEvent.objects.update(received_at=long_ago)
    before = balance(tenant)

    assert stripe_sweep.sweep() == {"events": 1, "payments": 1, "top_ups": 1}
    stale.refresh_from_db()
    assert (stale.status, stale.stripe_payment_intent_id is not None) == (PaymentStatus.SUCCEEDED, True)
    assert StripeEvent.objects.get().status == StripeEventStatus.PROCESSED
    assert balance(tenant) == before + 2 * DOLLARS_20
    assert sent_tasks == [("billing.auto_top_up", [str(other_tenant["organization"].pk)])]


def test_the_sweeps_query_finds_exactly_the_accounts_that_need_a_top_up(make_user: Any) -> None:
    """``accounts_needing_top_up`` is ``needs_top_up`` as one query, for every combination of its conditions: enabled,
    a default card, a Stripe customer, and the available credit (balance less holds) below, at or above the
    threshold."""
    for enabled, card, customer, available in itertools.product(
        (True, False), ("pm_card", ""), ("cus_1", ""), (29, 30, 31)
    ):
        organization = personal_organization(make_user())
        Account.objects.filter(pk=organization.pk).update(
            auto_top_up_enabled=enabled,
            default_payment_method_id=card,
            stripe_customer_id=customer,
            auto_top_up_threshold_micros=30,
            balance_micros=available + 7,
            held_micros=7,
        )
    accounts = list(Account.objects.all())
    expected = {account.pk for account in accounts if topups.needs_top_up(account)}
    assert len(expected) == 1
    assert set(topups.accounts_needing_top_up().values_list("pk", flat=True)) == expected
