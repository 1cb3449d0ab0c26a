"""Stripe for the billing tests: localstripe (extended by ``fake_stripe.py``) on a loopback port, the SDK
pointed at it, and webhook deliveries signed with the SDK's own scheme. And what the property tests of the books
share: the settings of their state machines and the base of those of one organization, sums of rows, and a refund
checked against what its request cost."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import stripe
from django.db.models import Sum
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

from accounts.models import ApiKey, Organization
from billing.ledger import BillingError, refund_job
from billing.models import EntryKind, UsageRecord
from inference.models import Endpoint, Job
from tests.stripe_support import (
    PUBLISHABLE_KEY,
    SECRET_KEY,
    WEBHOOK_PATH,
    WEBHOOK_SECRET,
    FakeStripe,
    running_fake_stripe,
)


@pytest.fixture(scope="session")
def fake_stripe_server() -> Iterator[FakeStripe]:
    with running_fake_stripe() as fake:
        yield fake


@pytest.fixture
def fake_stripe(fake_stripe_server: FakeStripe, settings: Any) -> FakeStripe:
    """Payments on, against the fake Stripe, each test as its own Stripe account."""
    # The fake scopes idempotency keys to the API key, as Stripe does, and ours (payment-<id>) repeat from one
    # test to the next wherever the test database hands out the same ids again (SQLite rolls its counters back).
    settings.STRIPE_SECRET_KEY = f"{SECRET_KEY}_{uuid.uuid4().hex}"
    settings.STRIPE_PUBLISHABLE_KEY = PUBLISHABLE_KEY
    settings.STRIPE_WEBHOOK_SECRET = WEBHOOK_SECRET
    settings.STRIPE_API_BASE = fake_stripe_server.url
    return fake_stripe_server


def signed(event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> tuple[str, str]:
    """The body and the ``Stripe-Signature`` header Stripe would send for ``event``."""
    payload = json.dumps(event)
    return payload, stripe.WebhookSignature.generate_signature_header(payload, secret)


def deliver(client: Any, event: dict[str, Any], secret: str = WEBHOOK_SECRET) -> Any:
    """Posts ``event`` to our webhook endpoint as Stripe does (Django's test client)."""
    payload, signature = signed(event, secret)
    return client.post(WEBHOOK_PATH, data=payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=signature)


@pytest.fixture
def quiet_books(priced_without_broker: None, settings: Any) -> None:
    """Jobs dispatched with no broker, the opening rate card in force, Stripe off (reconciliation skips it)."""
    settings.STRIPE_SECRET_KEY = ""


# What the state machines of the books run under; each test sets how many examples of how many steps.
STATE_MACHINES = hypothesis_settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


class OneOrganization(RuleBasedStateMachine):
    """A state machine of one organization's books: the organization, its key and an endpoint are the test's."""

    organization: Organization
    api_key: ApiKey
    endpoint: Endpoint

    @classmethod
    def run_for(cls, tenant: dict[str, Any], endpoint: Endpoint, *, max_examples: int, steps: int) -> None:
        """Runs the machine with the tenant's organization (room for all its requests at once), its key and
        ``endpoint``: ``max_examples`` examples of up to ``steps`` steps."""
        organization = tenant["organization"]
        Organization.objects.filter(pk=organization.pk).update(concurrency_limit=1_000)
        cls.organization, cls.api_key, cls.endpoint = organization, tenant["api_key"], endpoint
        settings = hypothesis_settings(STATE_MACHINES, max_examples=max_examples, stateful_step_count=steps)
        run_state_machine_as_test(cls, settings=settings)


def total(queryset: Any, column: str) -> int:
    """The sum of ``column`` over the rows, 0 where there are none."""
    return int(queryset.aggregate(total=Sum(column))["total"] or 0)


def refund_once(job: Job, *, refunded: set[Any]) -> bool:
    """Asks for a refund of ``job``, as an operator may any number of times: the first one of a request that cost
    something is made, for what its billable usage cost, and the job's id added to ``refunded`` (the requests refunded
    so far); any other is refused. Whether this one was made."""
    charged = total(UsageRecord.objects.filter(job=job, billable=True), "cost_micros")
    if charged == 0 or job.pk in refunded:
        with pytest.raises(BillingError):
            refund_job(job=job, reason="property test")
        return False
    entry = refund_job(job=job, reason="property test")
    assert (entry.kind, entry.amount_micros) == (EntryKind.REFUND, charged)
    refunded.add(job.pk)
    return True
