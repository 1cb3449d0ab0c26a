"""Spend alerts (billing/alerts.py): each threshold an organization watches is told once per period and limit (a
budget or key's limit changed in the month is told its own), by email to the people who manage its billing, by a
signed webhook to its billing webhook URL and on the dashboard; found after a settlement commits; and set, audited,
on the dashboard and through ``/v1/billing/alerts/settings``.

Jobs run through the real services (tests/lifecycle.py) and their on-commit work runs as it would after COMMIT
(``django_capture_on_commit_callbacks(execute=True)``); webhooks go to a real HTTP receiver on 127.0.0.1.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.apps import apps as django_apps
from django.core import mail
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient
from standardwebhooks import Webhook

from accounts.models import AuditAction, AuditEvent, Membership, Role, Scope
from accounts.services import add_member, create_api_key
from billing import alerts, controls
from billing.ledger import grant_credits
from billing.models import Account, AlertEvent, AlertScope, AlertSettings, EntryKind, Hold, SpendAlert
from inference import webhook_signing
from inference.models import Endpoint, Job, WebhookDelivery
from inference.submission import SubmissionRefused
from inference.webhooks import deliver, webhook_secret_for
from tests.inference.local_http import LocalServer, Received, local_server
from tests.lifecycle import run_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]

JOB_MS = 2_000  # at the opening CPU price of 100 µ$ per GPU-second: 200 µ$ a job
JOB_COST = 200
EMAIL_TASK = "billing.send_alert_email"


@pytest.fixture
def receiver(settings: Any) -> Iterator[LocalServer]:
    settings.OUTBOUND_ALLOW_PRIVATE = True  # the receiver is on 127.0.0.1
    with local_server() as server:
        yield server


@pytest.fixture
def settle(
    django_capture_on_commit_callbacks: Callable[..., Any], sent_tasks: list[tuple[str, list[Any]]]
) -> Callable[..., Job]:
    """One request of the tenant run to its end, then what its commit runs (the alerts' look among it)."""

    def run(tenant: dict[str, Any], endpoint: Endpoint, **kwargs: Any) -> Job:
        with django_capture_on_commit_callbacks(execute=True):
            return run_as(tenant, endpoint, gpu_ms=kwargs.pop("gpu_ms", JOB_MS), **kwargs)

    return run


@dataclass(frozen=True)
class WatchedBudget:
    """A tenant whose monthly budget is watched: the built-in endpoint it runs, how one of its requests is settled, the
    receiver of its alerts' webhooks and the Celery tasks sent."""

    tenant: dict[str, Any]
    endpoint: Endpoint
    settle: Callable[..., Job]
    receiver: LocalServer
    sent_tasks: list[tuple[str, list[Any]]]


@pytest.fixture
def watch_budget(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    settle: Callable[..., Job],
    receiver: LocalServer,
    sent_tasks: list[tuple[str, list[Any]]],
    clock_held_in_the_hour: datetime,
) -> Callable[[int], WatchedBudget]:
    """Gives the tenant a monthly budget of so many micro-dollars, watched at the default thresholds with its webhooks
    sent to the receiver, once a request has measured the endpoint (admission then holds 240 µ$ for each request).
    Django's clock held in its hour: one month's spend even when the test crosses a month's end."""

    def watch(budget_micros: int) -> WatchedBudget:
        organization = tenant["organization"]
        settle(tenant, builtin_endpoint)
        controls.set_monthly_budget(organization=organization, budget_micros=budget_micros)
        controls.set_alert_settings(organization=organization, webhook_url=receiver.url("/billing-hooks"))
        return WatchedBudget(tenant, builtin_endpoint, settle, receiver, sent_tasks)

    return watch


def alert_rows(organization: Any) -> list[tuple[str, str, int, str]]:
    rows = SpendAlert.objects.filter(organization=organization).order_by("scope", "threshold", "period")
    return list(rows.values_list("scope", "event_type", "threshold", "period"))


def verify_standard_webhooks(organization_id: Any, request: Received) -> dict[str, Any]:
    secret = webhook_secret_for(organization_id)
    return dict(Webhook(secret).verify(request.body, request.headers))


def verify_fal_signature(request: Received) -> None:
    """fal's ED25519 scheme: request id, user id, timestamp and the body's SHA-256, signed with a published key."""
    headers = request.headers
    message = webhook_signing.signed_message(
        request_id=headers["x-fal-webhook-request-id"],
        user_id=headers["x-fal-webhook-user-id"],
        timestamp=headers["x-fal-webhook-timestamp"],
        body=request.body,
    )
    public = webhook_signing.signing_keys().published[0]
    Ed25519PublicKey.from_public_bytes(public).verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message)


def this_month() -> str:
    """The month of Django's clock (held in its hour by the tests that ask: ``clock_held_in_the_hour``)."""
    return f"{timezone.now():%Y-%m}"


def test_the_budgets_thresholds_are_each_told_once_by_email_webhook_and_dashboard(
    watch_budget: Callable[[int], WatchedBudget],
) -> None:
    watched = watch_budget(10 * JOB_COST)
    tenant, builtin_endpoint, settle, receiver = watched.tenant, watched.endpoint, watched.settle, watched.receiver
    organization, sent_tasks = tenant["organization"], watched.sent_tasks
    billing_member = add_member(
        organization=organization,
        user=tenant["user"].__class__.objects.create_user("books@example.com"),
        role="billing",
    )
    developer = tenant["user"].__class__.objects.create_user("dev@example.com")
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)

    spent = JOB_COST
    refused = None
    while refused is None:
        try:
            settle(tenant, builtin_endpoint)
        except SubmissionRefused as exc:
            refused = exc
        else:
            spent += JOB_COST
            reached = {row[2] for row in alert_rows(organization)}
            # Each threshold is recorded by the settlement that reached it, not before, not later.
            assert reached == {p for p in (50, 80) if spent * 100 >= p * 10 * JOB_COST} | (
                {100} if 10 * JOB_COST - spent < 240 else set()
            ), (spent, reached)
    assert refused.error_type == "spend_limit_exceeded"
    assert spent == 9 * JOB_COST  # the tenth request's hold no longer fit: what is left of the budget is 200 µ$

    month = this_month()
    assert alert_rows(organization) == [
        (AlertScope.BUDGET, AlertEvent.THRESHOLD_REACHED, 50, month),
        (AlertScope.BUDGET, AlertEvent.THRESHOLD_REACHED, 80, month),
        (AlertScope.BUDGET, AlertEvent.BUDGET_EXHAUSTED, 100, month),
    ]
    made = list(SpendAlert.objects.filter(organization=organization).order_by("threshold"))

    # Email: one task per alert, each sent once to the owner and the billing member (not the developer).
    queued = [args[0] for name, args in sent_tasks if name == EMAIL_TASK]
    assert sorted(queued) == [alert.pk for alert in made]
    for alert_id in queued + queued:  # a duplicate message sends nothing more
        alerts.send_alert_email(alert_id)
    assert len(mail.outbox) == 3
    for email in mail.outbox:
        assert sorted(email.to) == sorted([tenant["user"].email, billing_member.user.email])
    assert "80% of the monthly budget ($0.002) is spent" in mail.outbox[1].body
    assert "used up" in mail.outbox[2].body

    # Webhooks: one delivery per alert, signed both ways, Standard Webhooks' event shape.
    deliveries = list(WebhookDelivery.objects.filter(organization=organization).order_by("pk"))
    assert [delivery.event_type for delivery in deliveries] == [alert.event_type for alert in made]
    for delivery in deliveries:
        assert deliver(delivery.pk)
    assert len(receiver.received) == 3
    seen = []
    for request in receiver.received:
        body = verify_standard_webhooks(organization.pk, request)
        verify_fal_signature(request)
        assert request.headers["x-fal-webhook-user-id"] == str(organization.pk)
        assert request.headers["webhook-id"] == request.headers["x-fal-webhook-request-id"]
        seen.append((body["type"], body["data"]["threshold_percent"], body["data"]["limit_micros"]))
        assert body["data"]["scope"] == "budget"
        assert body["data"]["period"] == month
    assert seen == [
        ("billing.threshold_reached", 50, 2000),
        ("billing.threshold_reached", 80, 2000),
        ("billing.budget_exhausted", 100, 2000),
    ]

    # The dashboard: every page shows them; a developer sees them but may not dismiss them.
    page = Client()
    page.force_login(tenant["user"])
    overview = page.get("/dashboard/").content.decode()
    assert 'data-testid="spend-alerts"' in overview
    assert "80% of the monthly budget ($0.002) is spent" in overview
    assert "is used up for" in overview
    onlooker = Client()
    onlooker.force_login(developer)
    assert "is used up for" in onlooker.get("/dashboard/requests").content.decode()
    assert onlooker.post(f"/dashboard/billing/alerts/{made[0].pk}/dismiss").status_code == 403
    assert page.post(f"/dashboard/billing/alerts/{made[0].pk}/dismiss", {"next": "/dashboard/"}).status_code == 302
    assert "50% of the monthly budget" not in page.get("/dashboard/").content.decode()


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_keys_limit_is_watched_at_its_own_thresholds(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    settle: Callable[..., Job],
    django_capture_on_commit_callbacks: Callable[..., Any],
    clock_held_in_the_hour: datetime,
) -> None:
    organization, api_key = tenant["organization"], tenant["api_key"]
    settle(tenant, builtin_endpoint)
    controls.set_alert_settings(organization=organization, key_thresholds=[25, 90])
    with django_capture_on_commit_callbacks(execute=True):  # the key's limit arms the alerts once it commits
        controls.set_key_limit(api_key=api_key, monthly_limit_micros=20 * JOB_COST)
    assert Account.objects.get(pk=organization.pk).alerts_armed
    for _ in range(4):
        settle(tenant, builtin_endpoint)
    assert alert_rows(organization) == [(AlertScope.KEY, AlertEvent.THRESHOLD_REACHED, 25, this_month())]
    alert = SpendAlert.objects.get(organization=organization)
    assert alert.subject == str(api_key.pk)
    assert alert.limit_micros == 20 * JOB_COST
    assert alerts.event_body(alert)["data"]["api_key"] == {"id": str(api_key.pk), "name": api_key.name}
    assert "the monthly limit of key “test key”" in alerts.describe(alert, key_name=api_key.name)
    # Work under another key (or none) does not count against this key's limit.
    other, _ = create_api_key(organization=organization, scopes=[Scope.ADMIN], name="other", created_by=None)
    for _ in range(16):
        settle({**tenant, "api_key": other}, builtin_endpoint)
    assert len(alert_rows(organization)) == 1


def spend_until_refused(tenant: dict[str, Any], endpoint: Endpoint, settle: Callable[..., Job]) -> int:
    """Settles the tenant's requests until admission refuses one for its spend limit; how many settled."""
    settled = 0
    refused = None
    while refused is None:
        try:
            settle(tenant, endpoint)
        except SubmissionRefused as exc:
            refused = exc
        else:
            settled += 1
    assert refused.error_type == "spend_limit_exceeded"
    return settled


def told(organization: Any) -> list[tuple[str, str, int, str, int | None]]:
    """The alerts recorded, oldest first: scope, event, threshold, period and the limit each was told for."""
    rows = SpendAlert.objects.filter(organization=organization).order_by("pk")
    return list(rows.values_list("scope", "event_type", "threshold", "period", "limit_micros"))


def test_a_budget_changed_in_the_month_is_told_at_its_own_thresholds_once_each(
    watch_budget: Callable[[int], WatchedBudget],
) -> None:
    watched = watch_budget(5 * JOB_COST)
    tenant, builtin_endpoint, settle, receiver = watched.tenant, watched.endpoint, watched.settle, watched.receiver
    organization, sent_tasks = tenant["organization"], watched.sent_tasks
    month = this_month()
    exhausted, reached = AlertEvent.BUDGET_EXHAUSTED, AlertEvent.THRESHOLD_REACHED
    budget = AlertScope.BUDGET
    assert spend_until_refused(tenant, builtin_endpoint, settle) == 3  # 800 of 1,000: 200 left, under a hold
    first = [(budget, reached, 50, month, 1_000), (budget, reached, 80, month, 1_000),
             (budget, exhausted, 100, month, 1_000)]  # fmt: skip
    assert told(organization) == first

    # Raised: its thresholds are armed again, for the new budget, and told as the spend reaches them.
    controls.set_monthly_budget(organization=organization, budget_micros=20 * JOB_COST)
    settle(tenant, builtin_endpoint)
    assert told(organization) == first  # 1,000 of 4,000: nothing of the new budget reached yet
    assert spend_until_refused(tenant, builtin_endpoint, settle) == 14  # 3,800 of 4,000
    second = [(budget, reached, 50, month, 4_000), (budget, reached, 80, month, 4_000),
              (budget, exhausted, 100, month, 4_000)]  # fmt: skip
    assert told(organization) == first + second

    # Each told once, by webhook and by email, as any alert; the public period stays the month.
    made = list(SpendAlert.objects.filter(organization=organization).order_by("pk"))
    assert sorted(args[0] for name, args in sent_tasks if name == EMAIL_TASK) == [alert.pk for alert in made]
    deliveries = {
        delivery.message_id: delivery.pk for delivery in WebhookDelivery.objects.filter(organization=organization)
    }
    assert sorted(deliveries) == sorted(alerts.message_id_of(alert) for alert in made)
    for alert in made[3:]:
        assert deliver(deliveries[alerts.message_id_of(alert)])
    bodies = [verify_standard_webhooks(organization.pk, request)["data"] for request in receiver.received]
    assert sorted((data["threshold_percent"], data["period"], data["limit_micros"]) for data in bodies) == [
        (50, month, 4_000), (80, month, 4_000), (100, month, 4_000)
    ]  # fmt: skip
    listed = tenant["client"].get("/v1/billing/alerts").json()["results"]
    assert [(item["threshold_percent"], item["period"], item["limit_micros"]) for item in listed[:3]] == [
        (100, month, 4_000), (80, month, 4_000), (50, month, 4_000)
    ]  # fmt: skip

    # Back to a budget already told this month, and up again: nothing is told twice.
    for limit in (5 * JOB_COST, 20 * JOB_COST, 5 * JOB_COST):
        controls.set_monthly_budget(organization=organization, budget_micros=limit)
        with pytest.raises(SubmissionRefused):
            settle(tenant, builtin_endpoint)
        assert alerts.look(organization_id=organization.pk, hold_micros=240) == []
    assert told(organization) == first + second
    assert WebhookDelivery.objects.filter(organization=organization).count() == 6


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_budget_lowered_under_the_spend_is_told_at_the_next_settlement(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job], clock_held_in_the_hour: datetime
) -> None:
    organization = tenant["organization"]
    settle(tenant, builtin_endpoint)
    controls.set_monthly_budget(organization=organization, budget_micros=10 * JOB_COST)
    for _ in range(4):
        settle(tenant, builtin_endpoint)
    assert [row[2:] for row in told(organization)] == [(50, this_month(), 2_000)]  # 1,000 of 2,000
    controls.set_monthly_budget(organization=organization, budget_micros=8 * JOB_COST)
    settle(tenant, builtin_endpoint)  # 1,200 of 1,600: the new budget's 50% was reached already, told now
    assert [row[2:] for row in told(organization)] == [(50, this_month(), 2_000), (50, this_month(), 1_600)]


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_keys_limit_changed_in_the_month_is_told_at_its_own_thresholds_once_each(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    settle: Callable[..., Job],
    sent_tasks: list[tuple[str, list[Any]]],
    django_capture_on_commit_callbacks: Callable[..., Any],
    settings: Any,
    clock_held_in_the_hour: datetime,
) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = True  # never called here: deliveries are only counted
    organization, api_key = tenant["organization"], tenant["api_key"]
    settle(tenant, builtin_endpoint)
    controls.set_alert_settings(organization=organization, key_thresholds=[50, 100], webhook_url="http://127.0.0.1:9/")

    def limit_key(limit: int) -> None:
        with django_capture_on_commit_callbacks(execute=True):
            controls.set_key_limit(api_key=api_key, monthly_limit_micros=limit)

    limit_key(5 * JOB_COST)
    month, key = this_month(), AlertScope.KEY
    assert spend_until_refused(tenant, builtin_endpoint, settle) == 3
    first = [
        (key, AlertEvent.THRESHOLD_REACHED, 50, month, 1_000),
        (key, AlertEvent.BUDGET_EXHAUSTED, 100, month, 1_000),
    ]
    assert told(organization) == first
    limit_key(10 * JOB_COST)
    assert spend_until_refused(tenant, builtin_endpoint, settle) == 5  # 1,800 of 2,000
    second = [
        (key, AlertEvent.THRESHOLD_REACHED, 50, month, 2_000),
        (key, AlertEvent.BUDGET_EXHAUSTED, 100, month, 2_000),
    ]
    assert told(organization) == first + second
    assert {alert.subject for alert in SpendAlert.objects.filter(organization=organization)} == {str(api_key.pk)}
    made = list(SpendAlert.objects.filter(organization=organization).order_by("pk"))
    assert sorted(args[0] for name, args in sent_tasks if name == EMAIL_TASK) == [alert.pk for alert in made]
    assert sorted(WebhookDelivery.objects.filter(organization=organization).values_list("message_id", flat=True)) == (
        sorted(alerts.message_id_of(alert) for alert in made)
    )
    for limit in (5 * JOB_COST, 10 * JOB_COST):  # limits already told this month: nothing new
        limit_key(limit)
        assert alerts.look(organization_id=organization.pk, api_key_id=api_key.pk, hold_micros=240) == []
    assert told(organization) == first + second


def test_the_credit_floor_is_told_once_whatever_the_budget_does(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job]
) -> None:
    organization = tenant["organization"]
    settle(tenant, builtin_endpoint)
    account = Account.objects.get(pk=organization.pk)
    grant_credits(organization=organization, amount_micros=2_000 - account.available_micros, reason="test",
                  kind=EntryKind.ADJUSTMENT)  # fmt: skip
    controls.set_alert_settings(organization=organization, credit_floor_micros=1_700, budget_thresholds=[])
    settle(tenant, builtin_endpoint)
    settle(tenant, builtin_endpoint)  # 1,600 available: below the floor
    for budget in (10 * JOB_COST, 20 * JOB_COST, None, 10 * JOB_COST):
        controls.set_monthly_budget(organization=organization, budget_micros=budget)
        settle(tenant, builtin_endpoint)
    low = SpendAlert.objects.filter(organization=organization, scope=AlertScope.CREDITS)
    assert [(alert.threshold, alert.limit_micros, alert.limit_key_micros) for alert in low] == [(1_700, None, 0)]
    assert low.get().period.startswith("credit-")


def test_the_alerts_told_before_the_limit_was_their_key_keep_their_limit(tenant: dict[str, Any]) -> None:
    """billing/migrations/0017 keys the alerts already told by the limit they were told for (0 for the credit floor), so
    a budget or key's limit already told this month is not told again once it is released."""
    migration = importlib.import_module("billing.migrations.0017_spend_alert_once_per_limit")
    organization, month, key = tenant["organization"], this_month(), str(tenant["api_key"].pk)
    told_before = [(AlertScope.BUDGET, "", 80, month, 1_000), (AlertScope.KEY, key, 100, month, 500),
                   (AlertScope.CREDITS, "", 700, "credit-0", None)]  # fmt: skip
    for scope, subject, threshold, period, limit in told_before:
        SpendAlert.objects.create(
            organization=organization, scope=scope, subject=subject, threshold=threshold, period=period,
            event_type=AlertEvent.CREDITS_LOW, spent_micros=0, limit_micros=limit, available_micros=0,
        )  # fmt: skip
    migration.fill_limit_keys(django_apps, SimpleNamespace(connection=connection))
    rows = SpendAlert.objects.filter(organization=organization).order_by("pk")
    assert list(rows.values_list("scope", "limit_key_micros")) == [
        (AlertScope.BUDGET, 1_000), (AlertScope.KEY, 500), (AlertScope.CREDITS, 0)
    ]  # fmt: skip


def test_low_credit_is_told_once_per_refill(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job]
) -> None:
    organization = tenant["organization"]
    settle(tenant, builtin_endpoint)
    account = Account.objects.get(pk=organization.pk)
    # Leave 1,000 µ$ available, with an alert floor at 700: the second request's settlement goes below it.
    grant_credits(organization=organization, amount_micros=1_000 - account.available_micros, reason="test",
                  kind=EntryKind.ADJUSTMENT)  # fmt: skip
    controls.set_alert_settings(organization=organization, credit_floor_micros=700)
    settle(tenant, builtin_endpoint)
    assert alert_rows(organization) == []
    settle(tenant, builtin_endpoint)
    settle(tenant, builtin_endpoint)
    first = list(SpendAlert.objects.filter(organization=organization))
    assert [(alert.scope, alert.event_type, alert.threshold) for alert in first] == [
        (AlertScope.CREDITS, AlertEvent.CREDITS_LOW, 700)
    ]
    assert first[0].available_micros == 600
    grant_credits(organization=organization, amount_micros=500, reason="top up")  # a refill re-arms it
    settle(tenant, builtin_endpoint)
    assert SpendAlert.objects.filter(organization=organization).count() == 1  # 900 available: above the floor
    settle(tenant, builtin_endpoint)
    settle(tenant, builtin_endpoint)
    periods = list(SpendAlert.objects.filter(organization=organization).order_by("pk").values_list("period", flat=True))
    assert len(periods) == 2
    assert periods[0] != periods[1]


def test_an_organization_that_watches_nothing_never_looks(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job]
) -> None:
    with mock.patch.object(alerts, "look", side_effect=AssertionError("looked")):
        settle(tenant, builtin_endpoint)
        controls.set_alert_settings(organization=tenant["organization"], budget_thresholds=[10])  # no budget: unarmed
        settle(tenant, builtin_endpoint)
    assert not Account.objects.get(pk=tenant["organization"].pk).alerts_armed


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_look_lost_with_its_process_is_made_good_by_the_next_settlement_and_looks_never_repeat_an_alert(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job], clock_held_in_the_hour: datetime
) -> None:
    organization = tenant["organization"]
    settle(tenant, builtin_endpoint)
    controls.set_monthly_budget(organization=organization, budget_micros=6 * JOB_COST)
    run_as(tenant, builtin_endpoint, gpu_ms=JOB_MS)  # its commit's work never runs: the process died
    assert alert_rows(organization) == []
    settle(tenant, builtin_endpoint)  # 600 of 1,200: the 50% is found now
    assert [row[2] for row in alert_rows(organization)] == [50]
    # Any number of looks at the same spend (concurrent settlements, a replayed callback) add nothing.
    for _ in range(3):
        assert alerts.look(organization_id=organization.pk, hold_micros=240) == []
    assert SpendAlert.objects.filter(organization=organization).count() == 1
    assert WebhookDelivery.objects.filter(organization=organization).count() == 0  # no webhook URL set


def test_alert_settings_through_the_api_with_the_permission_model_and_audited(
    tenant: dict[str, Any], make_key: Callable[..., Any], settings: Any
) -> None:
    organization, client = tenant["organization"], tenant["client"]
    assert client.get("/v1/billing/alerts/settings").json() == {
        "budget_thresholds": [50, 80, 100],
        "key_thresholds": [50, 80, 100],
        "credit_floor_micros": None,
        "webhook_url": "",
    }
    settings.OUTBOUND_ALLOW_PRIVATE = False
    refused = client.put("/v1/billing/alerts/settings", {"webhook_url": "http://127.0.0.1:9/hook"}, format="json")
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "webhook_url"]
    bad = client.put("/v1/billing/alerts/settings", {"budget_thresholds": [0, 101, "50"]}, format="json")
    assert bad.status_code == 422
    changed = client.put(
        "/v1/billing/alerts/settings",
        {"budget_thresholds": [90, 75, 90], "credit_floor_micros": 5_000_000},
        format="json",
    )
    assert changed.status_code == 200, changed.content
    assert changed.json()["budget_thresholds"] == [75, 90]
    assert Account.objects.get(pk=organization.pk).alerts_armed  # a floor is watched from now on
    event = AuditEvent.objects.filter(organization=organization, action=AuditAction.ALERT_SETTINGS_CHANGED).get()
    assert event.metadata == {"budget_thresholds": [75, 90], "credit_floor_micros": 5_000_000}
    assert event.actor_api_key_id == tenant["api_key"].pk

    # Reading needs usage:read; changing needs admin (owners and admins grant it; billing members use the dashboard).
    _, reader = make_key(organization, scopes=[Scope.USAGE_READ], created_by=tenant["user"])
    reading = APIClient()
    reading.credentials(HTTP_AUTHORIZATION=f"Key {reader}")
    assert reading.get("/v1/billing/alerts/settings").status_code == 200
    assert reading.get("/v1/billing/alerts").json()["results"] == []
    assert reading.put("/v1/billing/alerts/settings", {"key_thresholds": [10]}, format="json").status_code == 403


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://hooks.chat.example/services/T0/B0/s3cr3t", "https://hooks.chat.example/…"),
        ("https://bot:pa55@books.example:8443/alerts?token=s3cr3t", "https://books.example:8443/…"),
        ("http://[2001:db8::1]/hook", "http://[2001:db8::1]/…"),
    ],
)
def test_the_billing_webhook_url_is_read_in_full_only_by_a_key_that_may_change_it(
    tenant: dict[str, Any], make_key: Callable[..., Any], url: str, shown: str
) -> None:
    """Its path, query and user are often the secret itself (a chat service's incoming webhook posts to the billing
    channel for whoever has it); the dashboard shows it to the members who manage billing only, and a developer's
    ``usage:read`` key reads where it goes."""
    organization = tenant["organization"]
    AlertSettings.objects.update_or_create(organization=organization, defaults={"webhook_url": url})
    assert tenant["client"].get("/v1/billing/alerts/settings").json()["webhook_url"] == url  # an admin key
    _, reader = make_key(organization, scopes=[Scope.USAGE_READ], created_by=tenant["user"])
    reading = APIClient()
    reading.credentials(HTTP_AUTHORIZATION=f"Key {reader}")
    answer = reading.get("/v1/billing/alerts/settings").json()
    assert answer["webhook_url"] == shown
    assert "s3cr3t" not in str(answer)
    assert "pa55" not in str(answer)


def test_the_dashboard_sets_budget_alerts_and_limits_for_owners_and_billing_members_only(
    tenant: dict[str, Any], settings: Any
) -> None:
    organization = tenant["organization"]
    User = tenant["user"].__class__
    billing_member, developer = User.objects.create_user("books@example.com"), User.objects.create_user("d@x.com")
    add_member(organization=organization, user=billing_member, role=Role.BILLING)
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    form = {
        "budget_dollars": "12.50",
        "budget_thresholds": "50, 90%",
        "key_thresholds": "80",
        "credit_floor_dollars": "",
        "webhook_url": "",
    }
    refused = Client()
    refused.force_login(developer)
    assert refused.post("/dashboard/billing/spend", form).status_code == 403
    assert refused.post(f"/dashboard/billing/keys/{tenant['api_key'].pk}/limit", {}).status_code == 403
    books = Client()
    books.force_login(billing_member)
    assert books.post("/dashboard/billing/spend", form).status_code == 302
    prefix = str(tenant["api_key"].pk)
    assert books.post(f"/dashboard/billing/keys/{prefix}/limit", {f"{prefix}-limit_dollars": "3"}).status_code == 302
    assert (
        books.post("/dashboard/billing/end-users/limit", {"end_user": "alice", "limit_dollars": "1.5"}).status_code
        == 302
    )
    account = Account.objects.get(pk=organization.pk)
    assert account.monthly_budget_micros == 12_500_000
    assert alerts.settings_of(organization.pk).budget_thresholds == [50, 90]
    page = books.get("/dashboard/billing").content.decode()
    assert "$12.50" in page
    assert "<code>alice</code>" in page
    assert "$1.50" in page
    actions = sorted(
        AuditEvent.objects.filter(organization=organization, actor_user=billing_member).values_list("action", flat=True)
    )
    assert actions == sorted(
        [AuditAction.SPEND_LIMITS_CHANGED] * 3 + [AuditAction.ALERT_SETTINGS_CHANGED]
    )  # the budget, the key, the end user, and the alert settings
    # The keys page shows each key's limit and its spend so far.
    owner = Client()
    owner.force_login(tenant["user"])
    keys_page = owner.get("/dashboard/keys").content.decode()
    assert "Spent this month" in keys_page
    assert "$3.00" in keys_page
    assert Membership.objects.filter(organization=organization).count() == 3


def keys_table(page: str) -> dict[str, dict[str, str]]:
    """The keys page's table: each key's name to its cells, by their ``data-label``."""
    table = re.search(r'<table[^>]*data-testid="keys".*?</table>', page, re.DOTALL)
    assert table, page
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table.group(0), re.DOTALL):
        cells = dict(re.findall(r'<td data-label="([^"]+)">(.*?)</td>', row, re.DOTALL))
        if cells:
            rows[cells["Name"]] = cells
    return rows


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_the_keys_page_shows_what_each_key_spent_this_month(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job], clock_held_in_the_hour: datetime
) -> None:
    organization = tenant["organization"]
    busy, _ = create_api_key(organization=organization, scopes=[Scope.ADMIN], name="busy key", created_by=None)
    create_api_key(organization=organization, scopes=[Scope.ADMIN], name="idle key", created_by=None)
    settle(tenant, builtin_endpoint)
    for gpu_ms in (JOB_MS, 12_345):
        settle({**tenant, "api_key": busy}, builtin_endpoint, gpu_ms=gpu_ms)
    owner = Client()
    owner.force_login(tenant["user"])
    rows = keys_table(owner.get("/dashboard/keys").content.decode())
    # 2 s and 12.345 s at 100 µ$ a GPU-second: 200 + 1,235 µ$ (halves round up).
    assert rows["busy key"]["Spent this month"] == "$0.001435"
    assert rows["test key"]["Spent this month"] == "$0.0002"
    assert rows["idle key"]["Spent this month"] == "$0.00"


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_alerts_are_listed_in_the_api(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, settle: Callable[..., Job], clock_held_in_the_hour: datetime
) -> None:
    organization = tenant["organization"]
    settle(tenant, builtin_endpoint)
    controls.set_monthly_budget(organization=organization, budget_micros=4 * JOB_COST)
    settle(tenant, builtin_endpoint)
    listed = tenant["client"].get("/v1/billing/alerts").json()["results"]
    assert [(item["type"], item["threshold_percent"], item["scope"]) for item in listed] == [
        ("billing.threshold_reached", 50, "budget")
    ]
    assert listed[0]["spent_micros"] == 2 * JOB_COST
    assert listed[0]["limit_micros"] == 4 * JOB_COST
    assert json.dumps(listed[0])  # plain JSON
    assert Hold.objects.filter(organization=organization, released_at=None).count() == 0


def test_the_email_sweep_goes_past_an_alert_the_mail_server_refuses(
    tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """One alert whose email raises (the mail server refusing it, a bad address) is logged and left for the next
    sweep; the alerts after it are still sent, not held behind it every time its claim lapses."""
    organization = tenant["organization"]
    long_ago = timezone.now() - timezone.timedelta(seconds=alerts.EMAIL_SWEEP_AFTER_SECONDS + 60)
    made = []
    for threshold in (50, 80):
        alert = SpendAlert.objects.create(
            organization=organization, scope=AlertScope.BUDGET, subject="", threshold=threshold, period=this_month(),
            event_type=AlertEvent.THRESHOLD_REACHED, spent_micros=0, limit_micros=1_000, available_micros=0,
        )  # fmt: skip
        made.append(alert)
    SpendAlert.objects.filter(pk__in=[alert.pk for alert in made]).update(created_at=long_ago)
    real_send_mail = alerts.send_mail

    def refusing(*, subject: str, **fields: Any) -> int:
        if "50%" in subject:
            raise ConnectionRefusedError("the mail server refused it")
        return real_send_mail(subject=subject, **fields)

    monkeypatch.setattr(alerts, "send_mail", refusing)
    with caplog.at_level("ERROR", logger="billing.alerts"):
        assert alerts.send_due_alert_emails() == 1
    assert [email.subject for email in mail.outbox] == [f"[{organization.name}] 80% of your spend limit reached"]
    assert SpendAlert.objects.get(pk=made[0].pk).emailed_at is None  # tried again once its claim lapses
    assert SpendAlert.objects.get(pk=made[1].pk).emailed_at is not None
    assert any(f"spend alert {made[0].pk}" in record.getMessage() for record in caplog.records)


# --- A member's limit (``MemberSpendLimit``), shared by every key the member made ---------------------------------


@pytest.fixture
def limited_member(tenant: dict[str, Any], make_user: Callable[..., Any]) -> dict[str, Any]:
    """A developer of the tenant's organization with two keys of their own ("dev 1", "dev 2"), and a billing member;
    no concurrency limit in the way."""
    organization = tenant["organization"]
    organization.concurrency_limit = 1_000
    organization.save(update_fields=["concurrency_limit"])
    developer, books = make_user(), make_user()
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    add_member(organization=organization, user=books, role=Role.BILLING)
    keys = [
        create_api_key(organization=organization, name=name, scopes=[Scope.INFERENCE], created_by=developer)[0]
        for name in ("dev 1", "dev 2")
    ]
    return {"developer": developer, "books": books, "tenants": [{**tenant, "api_key": key} for key in keys]}


def spend_under_keys_until_refused(
    tenants: list[dict[str, Any]], endpoint: Endpoint, settle: Callable[..., Job]
) -> int:
    """Settles requests under each of the keys in turn until admission refuses one for its spend limit; how many
    settled."""
    settled = 0
    refused = None
    while refused is None:
        try:
            settle(tenants[settled % len(tenants)], endpoint)
        except SubmissionRefused as exc:
            refused = exc
        else:
            settled += 1
    assert refused.error_type == "spend_limit_exceeded"
    return settled


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_members_limit_is_told_once_per_threshold_whichever_of_their_keys_spends(
    tenant: dict[str, Any],
    limited_member: dict[str, Any],
    builtin_endpoint: Endpoint,
    settle: Callable[..., Job],
    receiver: LocalServer,
    sent_tasks: list[tuple[str, list[Any]]],
    django_capture_on_commit_callbacks: Callable[..., Any],
    clock_held_in_the_hour: datetime,
) -> None:
    organization, developer = tenant["organization"], limited_member["developer"]
    tenants = limited_member["tenants"]
    settle(tenant, builtin_endpoint)  # measures the endpoint (admission then holds 240 µ$), under the owner's key
    controls.set_alert_settings(organization=organization, webhook_url=receiver.url("/billing-hooks"))
    assert not Account.objects.get(pk=organization.pk).alerts_armed
    with django_capture_on_commit_callbacks(execute=True):  # the member's limit arms the alerts once it commits
        controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=10 * JOB_COST)
    assert Account.objects.get(pk=organization.pk).alerts_armed

    assert spend_under_keys_until_refused(tenants, builtin_endpoint, settle) == 9  # 1,800 of 2,000: 200 left < 240
    month, member = this_month(), AlertScope.MEMBER
    assert told(organization) == [
        (member, AlertEvent.THRESHOLD_REACHED, 50, month, 2_000),
        (member, AlertEvent.THRESHOLD_REACHED, 80, month, 2_000),
        (member, AlertEvent.BUDGET_EXHAUSTED, 100, month, 2_000),
    ]
    made = list(SpendAlert.objects.filter(organization=organization).order_by("pk"))
    assert {alert.subject for alert in made} == {str(developer.pk)}
    # Work under a key the member did not make does not count against their limit.
    for _ in range(3):
        settle(tenant, builtin_endpoint)
    assert len(told(organization)) == 3
    for key in tenants:  # every look under either key finds them told already
        assert alerts.look(organization_id=organization.pk, api_key_id=key["api_key"].pk, hold_micros=240) == []

    # Webhook: which member and their limit; the 100% one with scope member.
    deliveries = list(WebhookDelivery.objects.filter(organization=organization).order_by("pk"))
    assert [delivery.message_id for delivery in deliveries] == [alerts.message_id_of(alert) for alert in made]
    for delivery in deliveries:
        assert deliver(delivery.pk)
    bodies = [verify_standard_webhooks(organization.pk, request) for request in receiver.received]
    assert [(body["type"], body["data"]["scope"], body["data"]["threshold_percent"]) for body in bodies] == [
        ("billing.threshold_reached", "member", 50),
        ("billing.threshold_reached", "member", 80),
        ("billing.budget_exhausted", "member", 100),
    ]
    for body in bodies:
        assert body["data"]["member"] == {"user_id": developer.pk, "email": developer.email}
        assert body["data"]["api_key"] is None
        assert (body["data"]["limit_micros"], body["data"]["period"]) == (2_000, month)
    assert f"the monthly member limit of {developer.email} ($0.002)" in bodies[1]["data"]["message"]

    # Email: to the billing managers and to the limited member themself.
    queued = [args[0] for name, args in sent_tasks if name == EMAIL_TASK]
    assert sorted(queued) == [alert.pk for alert in made]
    for alert_id in queued:
        alerts.send_alert_email(alert_id)
    assert len(mail.outbox) == 3
    for email in mail.outbox:
        assert sorted(email.to) == sorted([tenant["user"].email, limited_member["books"].email, developer.email])
    assert f"The monthly member limit of {developer.email} ($0.002) is used up" in mail.outbox[2].body

    # The API's list and the dashboard's notices say which member.
    listed = tenant["client"].get("/v1/billing/alerts").json()["results"]
    assert [(item["scope"], item["threshold_percent"], item["member_user_id"], item["member_email"],
             item["api_key_id"]) for item in listed] == [
        ("member", percent, developer.pk, developer.email, None) for percent in (100, 80, 50)
    ]  # fmt: skip
    page = Client()
    page.force_login(tenant["user"])
    overview = page.get("/dashboard/").content.decode()
    assert f"80% of the monthly member limit of {developer.email} ($0.002) is spent" in overview


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_members_limit_changed_in_the_month_is_told_at_its_own_thresholds_once_each(
    tenant: dict[str, Any],
    limited_member: dict[str, Any],
    builtin_endpoint: Endpoint,
    settle: Callable[..., Job],
    django_capture_on_commit_callbacks: Callable[..., Any],
    clock_held_in_the_hour: datetime,
) -> None:
    organization, developer, tenants = tenant["organization"], limited_member["developer"], limited_member["tenants"]
    settle(tenant, builtin_endpoint)
    controls.set_alert_settings(organization=organization, key_thresholds=[50, 100])

    def limit_member(limit: int | None) -> None:
        with django_capture_on_commit_callbacks(execute=True):
            controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=limit)

    limit_member(5 * JOB_COST)
    month, member = this_month(), AlertScope.MEMBER
    assert spend_under_keys_until_refused(tenants, builtin_endpoint, settle) == 4  # 800 of 1,000: 200 left < 240
    first = [
        (member, AlertEvent.THRESHOLD_REACHED, 50, month, 1_000),
        (member, AlertEvent.BUDGET_EXHAUSTED, 100, month, 1_000),
    ]
    assert told(organization) == first
    limit_member(10 * JOB_COST)
    assert spend_under_keys_until_refused(tenants, builtin_endpoint, settle) == 5  # 1,800 of 2,000
    second = [
        (member, AlertEvent.THRESHOLD_REACHED, 50, month, 2_000),
        (member, AlertEvent.BUDGET_EXHAUSTED, 100, month, 2_000),
    ]
    assert told(organization) == first + second
    for limit in (5 * JOB_COST, 10 * JOB_COST):  # limits already told this month: nothing new
        limit_member(limit)
        for key in tenants:
            assert alerts.look(organization_id=organization.pk, api_key_id=key["api_key"].pk, hold_micros=240) == []
    limit_member(None)  # no limit any more: nothing watched, nothing told, whatever the member spends
    for _ in range(4):
        settle(tenants[0], builtin_endpoint)
    assert told(organization) == first + second


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_member_without_a_limit_is_told_nothing(
    tenant: dict[str, Any],
    limited_member: dict[str, Any],
    builtin_endpoint: Endpoint,
    settle: Callable[..., Job],
    django_capture_on_commit_callbacks: Callable[..., Any],
    clock_held_in_the_hour: datetime,
) -> None:
    """Another member's limit arms the organization's alerts: the spend of a member without one is told nothing."""
    organization = tenant["organization"]
    settle(tenant, builtin_endpoint)
    with django_capture_on_commit_callbacks(execute=True):
        controls.set_member_limit(
            organization=organization, user=limited_member["books"], monthly_limit_micros=2 * JOB_COST
        )
    assert Account.objects.get(pk=organization.pk).alerts_armed
    for index in range(8):
        settle(limited_member["tenants"][index % 2], builtin_endpoint)
        settle(tenant, builtin_endpoint)
    assert told(organization) == []
