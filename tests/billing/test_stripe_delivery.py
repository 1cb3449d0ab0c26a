"""Stripe delivering its own webhooks: the fake Stripe posts signed events to our app served by uvicorn.

The server shares the test database (committed data: a transactional test) and has a broker that
delivers nowhere (``memory://``); the test processes the stored events as the worker would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection

from billing import cards, charges, stripe_events
from billing.models import Account, CreditEntry, Payment, StripeEvent, StripeEventStatus
from billing.stripe_client import stripe_client
from config.embedded_process import free_port
from tests.stripe_support import SECRET_KEY, WEBHOOK_PATH, WEBHOOK_SECRET, FakeStripe
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[2]


def shared_database_url() -> str:
    database = connection.settings_dict
    if database["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{database['NAME']}"
    user = database["USER"] + (f":{database['PASSWORD']}" if database["PASSWORD"] else "")
    return f"postgres://{user}@{database['HOST'] or '127.0.0.1'}:{database['PORT'] or 5432}/{database['NAME']}"


@pytest.fixture(scope="module")
def web(django_db_setup: Any, django_db_blocker: Any, fake_stripe_server: FakeStripe) -> Iterator[str]:
    with django_db_blocker.unblock():
        database_url = shared_database_url()
    port = free_port()
    log = fake_stripe_server.log.with_name("web.log")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATABASE_POOL_MAX_SIZE": "2",
        "BROKER_URL": "memory://",
        "STRIPE_SECRET_KEY": SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": fake_stripe_server.url,
    }
    argv = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"the web server exited: {log.read_text()[-3000:]}"
        return httpx.get(base_url + "/healthz", timeout=2).status_code == 200

    try:
        wait_until(
            healthy,
            timeout=60,
            ignoring=(httpx.HTTPError,),
            message=lambda: f"the web server to answer /healthz: {log.read_text()[-3000:]}",
        )
        yield base_url
    finally:
        process.terminate()
        process.wait(20)


def concerns(event: StripeEvent, payment_intent_id: str) -> bool:
    """Whether ``event`` is about this payment intent (itself, or one of its charges)."""
    stripe_object = event.payload["data"]["object"]
    return payment_intent_id in (stripe_object.get("id"), stripe_object.get("payment_intent"))


def wait_for_events(count: int, payment_intent_id: str, timeout: float = 15) -> list[StripeEvent]:
    """The first ``count`` deliveries about this payment intent.

    The fake Stripe is shared by the whole session and sends an event a moment after it happens, to the
    URL configured at that moment: an event left by an earlier test can arrive here too, as one from
    another account would never do on Stripe. Only this test's own events count.
    """

    def delivered() -> list[StripeEvent] | None:
        events = [event for event in StripeEvent.objects.order_by("received_at") if concerns(event, payment_intent_id)]
        return events if len(events) >= count else None

    return wait_until(
        delivered,
        timeout=timeout,
        message=lambda: f"{count} deliveries; {StripeEvent.objects.count()} arrived",
    )


def test_stripe_delivers_the_payment_and_its_refund_and_they_are_applied_once(
    web: str, fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    organization = tenant["organization"]
    fake_stripe.send_webhooks_to(web + WEBHOOK_PATH, types=("payment_intent.succeeded", "charge.refunded"))
    try:
        cards.attach_payment_method(organization=organization, payment_method_id="pm_card_visa")
        before = Account.objects.get(pk=organization.pk).balance_micros
        payment = charges.buy_credits(organization=organization, amount_cents=2_000).payment
        stripe_client().v1.refunds.create(params={"payment_intent": payment.stripe_payment_intent_id, "amount": 250})
        delivered = wait_for_events(2, payment.stripe_payment_intent_id)
    finally:
        fake_stripe.send_webhooks_to(None)

    assert sorted(event.type for event in delivered) == ["charge.refunded", "payment_intent.succeeded"]
    assert {event.status for event in delivered} == {StripeEventStatus.PENDING}  # stored, left to the worker
    for event in delivered * 2:
        stripe_events.process_event(event.id)
    assert {StripeEvent.objects.get(pk=event.pk).status for event in delivered} == {StripeEventStatus.PROCESSED}
    payment = Payment.objects.get(pk=payment.pk)
    assert (payment.status, payment.amount_refunded_cents) == ("succeeded", 250)
    assert CreditEntry.objects.filter(payment=payment).count() == 2
    assert Account.objects.get(pk=organization.pk).balance_micros == before + 20_000_000 - 2_500_000
