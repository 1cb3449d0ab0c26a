"""The operators' console for money: pages render, ledgers are read-only, money moves only through audited services."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import AuditEvent, Organization, User
from billing.ledger import grant_credits
from billing.models import (
    Account,
    AlertEvent,
    AlertScope,
    CreditEntry,
    EntryKind,
    Granularity,
    Hold,
    KeySpendLimit,
    MemberSpendLimit,
    Payment,
    PaymentKind,
    Price,
    PriceUnit,
    ReconciliationRun,
    SpendAlert,
    StripeEvent,
    UsageRecord,
    UsageRollup,
)
from inference.models import AttemptOutcome, Endpoint, Job
from tests.lifecycle import finish, run, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]

OPERATOR_EMAIL = "ops@example.com"


@pytest.fixture
def operator(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser(email=OPERATOR_EMAIL, password="operator password 1"))
    return client


@pytest.fixture
def organization(tenant: dict[str, Any]) -> Organization:
    return tenant["organization"]


@pytest.fixture
def billed(organization: Organization, builtin_endpoint: Endpoint) -> Job:
    """A request that ran 2 s on the CPU class: 200 µ$ debited, with its hold released and its rollups."""
    return run(organization, builtin_endpoint, gpu_ms=2_000)


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def run_action(client: Client, model: str, action: str, objects: list[Any], **data: Any) -> Any:
    return client.post(
        f"/admin/billing/{model}/",
        {"action": action, "_selected_action": [str(obj.pk) for obj in objects], "index": 0, **data},
    )


def audits(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("pk"))


# Pages.


def test_every_billing_page_renders(operator: Client, organization: Organization, billed: Job, tenant: Any) -> None:
    KeySpendLimit.objects.create(api_key=tenant["api_key"], monthly_limit_micros=5_000_000)
    member_limit = MemberSpendLimit.objects.create(
        organization=tenant["organization"], user=tenant["user"], monthly_limit_micros=9_000_000
    )
    payment = Payment.objects.create(organization=organization, kind=PaymentKind.PURCHASE, amount_cents=2_000)
    event = StripeEvent.objects.create(id="evt_1", type="payment_intent.succeeded", payload={"id": "evt_1"})
    reconciliation = ReconciliationRun.objects.create(checked={"jobs": {"checked": 1, "drift": 0}}, ok=True)
    pages = {
        "price": Price.objects.first().pk,  # type: ignore[union-attr]
        "account": organization.pk,
        "keyspendlimit": tenant["api_key"].pk,
        "memberspendlimit": member_limit.pk,
        "usagerecord": UsageRecord.objects.get(job=billed).pk,
        "usagerollup": UsageRollup.objects.first().pk,  # type: ignore[union-attr]
        "creditentry": CreditEntry.objects.filter(organization=organization).first().pk,  # type: ignore[union-attr]
        "hold": billed.pk,
        "payment": payment.pk,
        "stripeevent": event.pk,
        "reconciliationrun": reconciliation.pk,
    }
    for model, pk in pages.items():
        assert operator.get(f"/admin/billing/{model}/").status_code == 200, model
        assert operator.get(f"/admin/billing/{model}/{pk}/change/").status_code == 200, model
    assert operator.get("/admin/billing/price/create/").status_code == 200
    index = operator.get("/admin/").content.decode()
    assert "Reconciliation runs" in index
    assert "Credit entries" in index


def test_the_spend_alerts_list_shows_the_limit_and_threshold_each_was_told_for(
    operator: Client, organization: Organization
) -> None:
    """A budget changed in the month tells its thresholds again: the list tells them apart by the limit each was told
    for, in dollars; the credit floor's has none."""
    told = {"organization": organization, "spent_micros": 0, "available_micros": 0}
    for limit in (25_000_000, 40_500_000):
        SpendAlert.objects.create(
            scope=AlertScope.BUDGET,
            event_type=AlertEvent.THRESHOLD_REACHED,
            threshold=50,
            period="2026-12",
            limit_micros=limit,
            limit_key_micros=limit,
            **told,
        )
    SpendAlert.objects.create(
        scope=AlertScope.CREDITS, event_type=AlertEvent.CREDITS_LOW, threshold=5_000_000, period="credit-1", **told
    )
    listing = operator.get("/admin/billing/spendalert/")
    assert listing.status_code == 200
    page = listing.content.decode()
    assert 'column-limit">' in page
    cells = [cell.split("<")[0] for cell in page.split('<td class="field-limit">')[1:]]
    assert sorted(cells) == ["$25.00", "$40.50", "—"]
    # The thresholds: a budget's percentage, the credit floor in dollars (it was micro-dollars: 5000000).
    thresholds = [cell.split("<")[0] for cell in page.split('<td class="field-threshold_told">')[1:]]
    assert sorted(thresholds) == ["$5.00", "50%", "50%"]


def test_ledger_lists_do_not_grow_queries_with_their_rows(
    operator: Client, organization: Organization, builtin_endpoint: Endpoint
) -> None:
    counts = []
    for runs in (1, 6):
        for _ in range(runs):
            run(organization, builtin_endpoint, gpu_ms=1_000)
        for model in ("usagerecord", "creditentry", "hold", "usagerollup", "account"):
            with CaptureQueriesContext(connection) as queries:
                assert operator.get(f"/admin/billing/{model}/").status_code == 200
            counts.append((model, len(queries)))
    assert counts[:5] == counts[5:]


# Ledgers are history.


@pytest.mark.parametrize(
    "model", ["usagerecord", "usagerollup", "creditentry", "hold", "payment", "stripeevent", "reconciliationrun"]
)
def test_ledgers_cannot_be_added_edited_or_deleted(
    operator: Client, organization: Organization, billed: Job, model: str
) -> None:
    rows = {
        "usagerecord": lambda: UsageRecord.objects.get(job=billed),
        "usagerollup": lambda: UsageRollup.objects.first(),
        "creditentry": lambda: CreditEntry.objects.filter(kind=EntryKind.USAGE).first(),
        "hold": lambda: Hold.objects.get(job=billed),
        "payment": lambda: Payment.objects.create(organization=organization, kind="purchase", amount_cents=500),
        "stripeevent": lambda: StripeEvent.objects.create(id="evt_2", type="charge.refunded", payload={}),
        "reconciliationrun": lambda: ReconciliationRun.objects.create(),
    }
    row = rows[model]()
    assert operator.get(f"/admin/billing/{model}/add/").status_code == 403
    assert operator.get(f"/admin/billing/{model}/{row.pk}/delete/").status_code == 403
    assert operator.post(f"/admin/billing/{model}/{row.pk}/change/", {}).status_code == 403
    page = operator.get(f"/admin/billing/{model}/{row.pk}/change/").content.decode()
    assert 'name="_save"' not in page
    listing = operator.get(f"/admin/billing/{model}/")
    actions = (
        {name for name, _ in listing.context["action_form"].fields["action"].choices}
        if listing.context["action_form"]
        else set()
    )
    assert "delete_selected" not in actions


def test_an_entry_is_found_by_its_idempotency_key(operator: Client, billed: Job) -> None:
    debit = CreditEntry.objects.get(kind=EntryKind.USAGE)
    response = operator.get("/admin/billing/creditentry/", {"q": debit.idempotency_key})
    assert [entry.pk for entry in response.context["cl"].result_list] == [debit.pk]
    by_job = operator.get("/admin/billing/usagerecord/", {"q": str(billed.pk)})
    assert [record.job_id for record in by_job.context["cl"].result_list] == [billed.pk]


# Prices are read-only; versions are added, and scheduled ones corrected, through billing.price_changes.


def price_form(**changes: Any) -> dict[str, Any]:
    values = {
        "gpu_class": "cpu",
        "endpoint": "",
        "unit": PriceUnit.GPU_SECOND,
        "unit_price_micros": 150,
        "effective_from_0": "",
        "effective_from_1": "",
        "note": "CPU price rise",
    }
    values.update(changes)
    return values


def at(moment: Any) -> dict[str, str]:
    return {"effective_from_0": moment.strftime("%Y-%m-%d"), "effective_from_1": moment.strftime("%H:%M:%S")}


def test_a_new_price_version_is_added_and_audited(operator: Client) -> None:
    listing = operator.get("/admin/billing/price/").content.decode()
    assert "/admin/billing/price/create/" in listing
    assert "/admin/billing/price/add/" not in listing
    response = operator.post("/admin/billing/price/create/", price_form(**at(timezone.now())))
    assert response.status_code == 302, response.content.decode()[:3000]
    price = Price.objects.get(note="CPU price rise")
    assert response["Location"] == f"/admin/billing/price/{price.pk}/change/"
    assert price.created_by is not None
    assert price.created_by.email == OPERATOR_EMAIL
    assert price.effective_from <= timezone.now()
    (event,) = audits("billing.price_changed")
    assert (event.target_type, event.target_id) == ("billing.price", str(price.pk))
    assert event.actor_user == price.created_by
    assert event.metadata["change"] == "added"
    assert (event.metadata["gpu_class"], event.metadata["unit_price_micros"]) == ("cpu", 150)


def test_a_price_in_force_is_read_only(operator: Client) -> None:
    price = Price.objects.filter(gpu_class="cpu", endpoint=None).first()
    assert price is not None
    page = operator.get(f"/admin/billing/price/{price.pk}/change/").content.decode()
    assert 'name="_save"' not in page
    assert f"/admin/billing/price/{price.pk}/edit/" not in page
    response = operator.post(f"/admin/billing/price/{price.pk}/change/", price_form(unit_price_micros=1))
    assert response.status_code == 403
    # Its form view refuses it too, shown and posted: the service checks under the row's lock.
    edit_page = operator.get(f"/admin/billing/price/{price.pk}/edit/")
    assert "is in force and is never edited" in edit_page.content.decode()
    assert 'value="Save"' not in edit_page.content.decode()
    posted = operator.post(
        f"/admin/billing/price/{price.pk}/edit/", price_form(unit_price_micros=1, **at(timezone.now()))
    )
    assert posted.status_code == 200
    assert "is in force and is never edited" in str(posted.context["form"].errors)
    assert Price.objects.get(pk=price.pk).unit_price_micros == 100
    assert operator.get("/admin/billing/price/add/").status_code == 403
    assert operator.get(f"/admin/billing/price/{price.pk}/delete/").status_code == 403
    assert not audits("billing.price_changed")


def test_a_scheduled_price_may_be_edited_until_it_starts(operator: Client) -> None:
    tomorrow = timezone.now() + timedelta(days=1)
    scheduled = Price.objects.create(gpu_class="cpu", unit_price_micros=120, effective_from=tomorrow)
    page = operator.get(f"/admin/billing/price/{scheduled.pk}/change/").content.decode()
    assert f"/admin/billing/price/{scheduled.pk}/edit/" in page
    assert 'value="Save"' in operator.get(f"/admin/billing/price/{scheduled.pk}/edit/").content.decode()
    response = operator.post(
        f"/admin/billing/price/{scheduled.pk}/edit/", price_form(unit_price_micros=125, **at(tomorrow))
    )
    assert response.status_code == 302
    assert Price.objects.get(pk=scheduled.pk).unit_price_micros == 125
    (event,) = audits("billing.price_changed")
    assert (event.metadata["change"], event.metadata["before"]["unit_price_micros"]) == ("edited", 120)
    assert event.actor_user is not None
    assert event.actor_user.email == OPERATOR_EMAIL
    # Moved into the past, it is refused like a new version would be.
    backdated = price_form(unit_price_micros=130, **at(timezone.now() - timedelta(days=1)))
    refused = operator.post(f"/admin/billing/price/{scheduled.pk}/edit/", backdated)
    assert "cannot start in the past" in str(refused.context["form"].errors)
    assert Price.objects.get(pk=scheduled.pk).unit_price_micros == 125
    assert len(audits("billing.price_changed")) == 1


def test_a_backdated_price_is_refused(operator: Client) -> None:
    response = operator.post("/admin/billing/price/create/", price_form(**at(timezone.now() - timedelta(days=1))))
    assert response.status_code == 200
    assert "cannot start in the past" in str(response.context["adminform"].form.errors)
    assert not Price.objects.filter(note="CPU price rise").exists()


def test_a_class_price_cannot_be_per_image(operator: Client, builtin_endpoint: Endpoint) -> None:
    response = operator.post("/admin/billing/price/create/", price_form(unit=PriceUnit.IMAGE, **at(timezone.now())))
    assert response.status_code == 200
    assert not Price.objects.filter(note="CPU price rise").exists()
    per_image = price_form(gpu_class="", endpoint=builtin_endpoint.pk, unit=PriceUnit.IMAGE, **at(timezone.now()))
    assert operator.post("/admin/billing/price/create/", per_image).status_code == 302


def test_only_operators_who_may_add_prices_add_them(billed: Job) -> None:
    viewer = User.objects.create_user(email="viewer@example.com", password="viewer password 1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_price"))
    client = Client()
    client.force_login(viewer)
    listing = client.get("/admin/billing/price/")
    assert listing.status_code == 200
    assert "/admin/billing/price/create/" not in listing.content.decode()
    assert client.post("/admin/billing/price/create/", price_form(**at(timezone.now()))).status_code == 403
    assert not Price.objects.filter(note="CPU price rise").exists()


# Accounts.


def account_form(account: Account, **changes: Any) -> dict[str, Any]:
    values = {"monthly_budget_micros": account.monthly_budget_micros or "", "balance_micros": 999_999_999}
    values.update(changes)
    return values


def test_the_budget_is_set_through_its_service_and_the_balance_is_untouched(
    operator: Client, organization: Organization
) -> None:
    account = Account.objects.get(pk=organization.pk)
    page = operator.get(f"/admin/billing/account/{organization.pk}/budget/").content.decode()
    assert 'name="monthly_budget_micros"' in page
    assert 'name="balance_micros"' not in page
    # Credit moves while the page is open; saving the budget must not write the old balance back.
    grant_credits(organization=organization, amount_micros=3_000_000, reason="meanwhile")
    response = operator.post(
        f"/admin/billing/account/{organization.pk}/budget/", account_form(account, monthly_budget_micros=50_000_000)
    )
    assert response.status_code == 302
    account = Account.objects.get(pk=organization.pk)
    assert account.monthly_budget_micros == 50_000_000
    assert account.balance_micros == sum(
        CreditEntry.objects.filter(organization=organization).values_list("amount_micros", flat=True)
    )
    (event,) = audits("billing.limits_changed")
    assert event.metadata == {"monthly_budget_micros": 50_000_000}
    assert event.actor_user is not None
    assert event.actor_user.email == OPERATOR_EMAIL
    assert operator.get("/admin/billing/account/add/").status_code == 403
    assert operator.get(f"/admin/billing/account/{organization.pk}/delete/").status_code == 403


def test_granting_credits_asks_then_posts_one_audited_entry_per_account(
    operator: Client, tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    accounts = [
        Account.objects.get(pk=tenant["organization"].pk),
        Account.objects.get(pk=other_tenant["organization"].pk),
    ]
    form_page = run_action(operator, "account", "grant_credits_action", accounts)
    assert form_page.status_code == 200
    assert "Grant or adjust credits" in form_page.content.decode()
    request_id = form_page.context["form"].initial["request_id"]
    data = {
        "apply": "1",
        "kind": EntryKind.GRANT,
        "amount_usd": "25.5",
        "reason": "Outage credit",
        "request_id": request_id,
    }
    response = run_action(operator, "account", "grant_credits_action", accounts, **data)
    assert response.status_code == 302
    assert any("Granted $25.50 on 2 account(s)." in m for m in messages_of(response))
    grants = CreditEntry.objects.filter(kind=EntryKind.GRANT, description="Outage credit")
    assert sorted(grants.values_list("amount_micros", flat=True)) == [25_500_000, 25_500_000]
    assert {entry.created_by.email for entry in grants if entry.created_by} == {OPERATOR_EMAIL}
    events = audits("credits.granted")
    assert len(events) == 2
    assert events[0].metadata == {"amount_micros": 25_500_000, "reason": "Outage credit"}
    # The same form posted twice (a double click, a reload) grants once.
    run_action(operator, "account", "grant_credits_action", accounts, **data)
    assert grants.count() == 2
    assert len(audits("credits.granted")) == 2


def test_an_adjustment_may_remove_credit_but_a_grant_may_not(operator: Client, organization: Organization) -> None:
    account = Account.objects.get(pk=organization.pk)
    before = account.balance_micros
    data = {"apply": "1", "kind": EntryKind.GRANT, "amount_usd": "-1", "reason": "oops", "request_id": uuid.uuid4()}
    refused = run_action(operator, "account", "grant_credits_action", [account], **data)
    assert refused.status_code == 200  # the form again, with the error
    assert "use an adjustment" in str(refused.context["form"].errors)
    data["kind"] = EntryKind.ADJUSTMENT
    run_action(operator, "account", "grant_credits_action", [account], **data)
    assert Account.objects.get(pk=organization.pk).balance_micros == before - 1_000_000
    (event,) = audits("credits.adjusted")
    assert event.metadata == {"amount_micros": -1_000_000, "reason": "oops"}


# Refunds.


def test_refunding_a_request_from_its_usage_record(operator: Client, organization: Organization, billed: Job) -> None:
    record = UsageRecord.objects.get(job=billed)
    balance = Account.objects.get(pk=organization.pk).balance_micros
    response = run_action(operator, "usagerecord", "refund_requests", [record])
    assert any("Refunded 1 request(s), $0.0002 in all." in m for m in messages_of(response))
    assert Account.objects.get(pk=organization.pk).balance_micros == balance + 200
    (event,) = audits("job.refunded")
    assert event.target_id == str(billed.pk)
    assert event.metadata == {"amount_micros": 200, "reason": f"Refunded by {OPERATOR_EMAIL}"}
    again = run_action(operator, "usagerecord", "refund_requests", [record])
    assert any("already been refunded" in m for m in messages_of(again))
    assert CreditEntry.objects.filter(kind=EntryKind.REFUND).count() == 1


def test_a_request_with_several_attempts_is_refunded_once(
    operator: Client, organization: Organization, builtin_endpoint: Endpoint
) -> None:
    job = start(submit(organization, builtin_endpoint))
    finish(job, AttemptOutcome.ERRORED, gpu_ms=700, error="out of memory", retry=True)
    finish(start(job), AttemptOutcome.FAILED, gpu_ms=1_000, error="bad input")
    records = list(UsageRecord.objects.filter(job=job))
    assert len(records) == 2
    response = run_action(operator, "usagerecord", "refund_requests", records)
    assert any("Refunded 1 request(s), $0.0001 in all." in m for m in messages_of(response))
    free = run(organization, builtin_endpoint, outcome=AttemptOutcome.ERRORED, gpu_ms=500, error="oom")
    response = run_action(operator, "usagerecord", "refund_requests", list(UsageRecord.objects.filter(job=free)))
    assert any("cost nothing" in m for m in messages_of(response))


# Reconciliation.


def test_running_reconciliation_now_shows_the_new_run(operator: Client, billed: Job) -> None:
    listing = operator.get("/admin/billing/reconciliationrun/").content.decode()
    assert "Run reconciliation now" in listing
    assert operator.get("/admin/billing/reconciliationrun/run/").status_code == 405
    response = operator.post("/admin/billing/reconciliationrun/run/")
    run_ = ReconciliationRun.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/admin/billing/reconciliationrun/{run_.pk}/change/"
    assert any("no drift" in m for m in messages_of(response))
    page = operator.get(response["Location"]).content.decode()
    assert "usage_debits" in page
    assert "STRIPE_SECRET_KEY is not set" in page


def test_runs_are_listed_newest_first_with_their_drift(operator: Client, billed: Job) -> None:
    older = ReconciliationRun.objects.create(started_at=timezone.now() - timedelta(days=1), ok=True)
    Account.objects.filter(pk=billed.organization_id).update(held_micros=7)
    operator.post("/admin/billing/reconciliationrun/run/")
    newest = ReconciliationRun.objects.exclude(pk=older.pk).get()
    assert not newest.ok
    response = operator.get("/admin/billing/reconciliationrun/")
    assert [r.pk for r in response.context["cl"].result_list] == [newest.pk, older.pk]
    content = response.content.decode()
    assert "DRIFT" in content
    assert "stripe" in content  # the skipped check is named
    detail = operator.get(f"/admin/billing/reconciliationrun/{newest.pk}/change/").content.decode()
    assert "held_not_sum_of_open_holds" in detail


def test_only_operators_with_the_change_permission_can_run_it(billed: Job) -> None:
    viewer = User.objects.create_user(email="viewer@example.com", password="viewer password 1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_reconciliationrun"))
    client = Client()
    client.force_login(viewer)
    listing = client.get("/admin/billing/reconciliationrun/")
    assert listing.status_code == 200
    assert "Run reconciliation now" not in listing.content.decode()
    assert client.post("/admin/billing/reconciliationrun/run/").status_code == 403
    assert not ReconciliationRun.objects.exists()


def test_rollup_list_filters_by_granularity(operator: Client, billed: Job) -> None:
    response = operator.get("/admin/billing/usagerollup/", {"granularity__exact": Granularity.DAY})
    assert {rollup.granularity for rollup in response.context["cl"].result_list} == {Granularity.DAY}
    open_holds = operator.get("/admin/billing/hold/", {"state": "open"})
    assert list(open_holds.context["cl"].result_list) == []
    released = operator.get("/admin/billing/hold/", {"state": "released"})
    assert [hold.job_id for hold in released.context["cl"].result_list] == [billed.pk]
