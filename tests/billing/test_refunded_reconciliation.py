"""Reconciliation proves what refunds gave back in the rollups (``refunded_micros``, which budgets and keys' and end
users' limits take off spend): books written by real refunds (``billing.ledger.refund_job``) have no drift, and a row
given back too much or too little, a refund whose give-back was lost or counted twice, a row giving back more than it
cost and a refund entry that is not its records' cost are each found, with the rows and requests to put right, in
full runs and in the incremental runs whose window touched them (``billing.reconciliation.check_refunded_rollups``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import pytest
from django.db import connection, transaction
from django.db.models import F, Sum
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from accounts.models import ApiKey, Organization, User
from billing import metering, partitions, periods, reconciliation
from billing.ledger import grant_credits, post_entry, refund_job
from billing.locks import locked_account
from billing.models import (
    NO_KEY,
    CreditEntry,
    EndUserRollup,
    EntryKind,
    Granularity,
    ReconciliationRun,
    UsageRecord,
    UsageRollup,
)
from billing.money import MICROS_PER_DOLLAR
from inference import attempts, requeue
from inference.models import AttemptOutcome, Endpoint, Job
from tests.billing.test_refunded_spend import RefundedSpend
from tests.lifecycle import finish, run, run_as, start, submit

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]

CHECK = "refunded_rollups"
DAY_DIFFERS = f"{CHECK}.day_rollups_refunded_differ_from_refunds"
HOUR_DIFFERS = f"{CHECK}.hour_rollups_refunded_differ_from_day"
TAG_DIFFERS = f"{CHECK}.end_user_rollups_refunded_differ_from_refunds"
ORGANIZATION_DIFFERS = f"{CHECK}.organization_refunds_differ_from_rollups"
REFUND_DIFFERS = f"{CHECK}.refund_differs_from_its_records"
ROW_OUTSIDE = f"{CHECK}.rollup_refunded_outside_its_cost"
TAG_ROW_OUTSIDE = f"{CHECK}.end_user_rollup_refunded_outside_its_cost"


def kinds(run_: ReconciliationRun) -> set[str]:
    return {f"{item['check']}.{item['kind']}" for item in run_.drift}


def drift_of(run_: ReconciliationRun, kind: str) -> dict[str, Any]:
    [item] = [item for item in run_.drift if f"{item['check']}.{item['kind']}" == kind]
    return item


def cost_of(job: Job) -> int:
    return int(UsageRecord.objects.filter(job=job, billable=True).aggregate(total=Sum("cost_micros"))["total"] or 0)


def recorded_in(record: UsageRecord, granularity: str) -> datetime:
    """The start of the UTC hour or day the record was recorded in."""
    hour = record.recorded_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return hour.replace(hour=0) if granularity == Granularity.DAY else hour


def rollup_row(job: Job, granularity: str) -> UsageRollup:
    """The hour or day row its (one) usage record was added to."""
    record = UsageRecord.objects.get(job=job)
    return UsageRollup.objects.get(
        granularity=granularity,
        bucket_start=recorded_in(record, granularity),
        organization_id=record.organization_id,
        endpoint_id=record.endpoint_id,
        gpu_class=record.gpu_class,
        key_id=record.api_key_id or NO_KEY,
    )


def day_row(job: Job) -> UsageRollup:
    return rollup_row(job, Granularity.DAY)


def hour_row(job: Job) -> UsageRollup:
    return rollup_row(job, Granularity.HOUR)


def tag_row(job: Job) -> EndUserRollup:
    """The end user's day row its (one) usage record was added to."""
    record = UsageRecord.objects.get(job=job)
    return EndUserRollup.objects.get(
        organization_id=record.organization_id,
        end_user=record.end_user,
        bucket_start=recorded_in(record, Granularity.DAY),
        endpoint_id=record.endpoint_id,
    )


def with_room_to_spend(organization: Organization) -> Organization:
    """The organization, granted more credit than its requests here cost."""
    grant_credits(organization=organization, amount_micros=10 * MICROS_PER_DOLLAR, reason="room to spend")
    return organization


def settled_days_ago(organization: Organization, endpoint: Endpoint, days: int, **submitted: Any) -> Job:
    """A request made ``days`` ago and finished then: its record, debit and rollups are that day's."""
    real_now = timezone.now
    then = real_now() - timedelta(days=days)
    running = start(submit(organization, endpoint, **submitted))
    attempts.reserve_work(job=running, gpu_ms=2_000)
    with mock.patch.object(timezone, "now", side_effect=lambda: real_now() - timedelta(days=days)):
        finish(running, gpu_ms=2_000, reserve=False)
    Job.objects.filter(pk=running.pk).update(created_at=then - timedelta(minutes=1))
    return Job.objects.get(pk=running.pk)


@pytest.fixture
def no_overlap(settings: Any) -> None:
    """The window starts at the last proven run's start exactly."""
    settings.BILLING_RECONCILE_OVERLAP_SECONDS = 0


@pytest.fixture
def refunded_books(
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    make_key: Callable[..., tuple[ApiKey, str]],
    clock_held_in_the_hour: datetime,
) -> dict[str, Any]:
    """Two organizations' usage, refunded every way a refund is made: with the organization's key, tagged (beside
    tagged usage of the same tag, key and day that stays), without a key (beside keyless usage that stays), with a key
    deleted after the refund and one deleted before it, a request billed twice before its refund, and one refunded
    and then run again by an operator and billed again (that usage stays). Every refund through ``refund_job``."""
    organization, endpoint, api_key = tenant["organization"], builtin_endpoint, tenant["api_key"]
    other = other_tenant["organization"]
    Organization.objects.filter(pk__in=[organization.pk, other.pk]).update(concurrency_limit=50)
    for each in (organization, other):
        with_room_to_spend(each)
    deleted_after, _ = make_key(organization, name="deleted after its refund")
    deleted_before, _ = make_key(organization, name="deleted before its refund")
    jobs = {
        "keyed": run_as(tenant, endpoint, gpu_ms=2_000),
        "tagged": finish(start(submit(organization, endpoint, api_key=api_key, end_user="alice")), gpu_ms=1_500),
        "tagged_kept": finish(start(submit(organization, endpoint, api_key=api_key, end_user="alice")), gpu_ms=700),
        "keyless": run(organization, endpoint, gpu_ms=3_000),
        "keyless_kept": run(organization, endpoint, gpu_ms=900),
        "deleted_after": run(organization, endpoint, api_key=deleted_after, gpu_ms=2_500),
        "deleted_before": finish(
            start(submit(organization, endpoint, api_key=deleted_before, end_user="bob")), gpu_ms=1_100
        ),
        "billed_twice": run_as(tenant, endpoint, gpu_ms=600, outcome=AttemptOutcome.FAILED),
        "billed_again": run_as(tenant, endpoint, gpu_ms=800, outcome=AttemptOutcome.FAILED),
        "kept": run_as(tenant, endpoint, gpu_ms=1_300),
        "other": run_as(other_tenant, endpoint, gpu_ms=1_700),
    }
    assert requeue.requeue_job(job=jobs["billed_twice"])
    jobs["billed_twice"] = finish(start(Job.objects.get(pk=jobs["billed_twice"].pk)), gpu_ms=1_200)
    deleted_before.delete()
    for name in ("keyed", "tagged", "keyless", "deleted_after", "deleted_before", "billed_twice", "billed_again"):
        refund_job(job=jobs[name], reason="test")
    refund_job(job=jobs["other"], reason="test")
    deleted_after.delete()
    # Run again by an operator after its refund, and billed again: not refunded.
    assert requeue.requeue_job(job=jobs["billed_again"])
    jobs["billed_again"] = finish(start(Job.objects.get(pk=jobs["billed_again"].pk)), gpu_ms=2_200)

    def own_key() -> ApiKey:
        return make_key(organization, name="its own rows")[0]

    return {"organization": organization, "other_organization": other, "endpoint": endpoint, "own_key": own_key, **jobs}


# --- Books written by real refunds -------------------------------------------------------------------------------


def test_books_written_by_real_refunds_have_no_drift(refunded_books: dict[str, Any]) -> None:
    organization = refunded_books["organization"]
    # The books are what the check must accept: partly refunded rows, keys deleted either side of their refunds,
    # usage billed again after its refund.
    assert UsageRecord.objects.filter(job=refunded_books["billed_twice"], billable=True, cost_micros__gt=0).count() == 2
    assert UsageRecord.objects.filter(job=refunded_books["billed_again"], billable=True, cost_micros__gt=0).count() == 2
    rows = UsageRollup.objects.filter(organization=organization)
    assert rows.filter(refunded_micros__gt=0, refunded_micros__lt=F("cost_micros")).exists()
    run_ = reconciliation.run_reconciliation(full=True)
    assert run_.ok, run_.drift
    summary = run_.checked[CHECK]
    assert summary["drift"] == 0
    # 8 request refunds; the records they gave back (the request billed twice: both); the rows giving something back.
    given_back = (
        UsageRollup.objects.exclude(refunded_micros=0).count()
        + EndUserRollup.objects.exclude(refunded_micros=0).count()
    )
    assert summary["checked"] == 8 + 9 + given_back
    refunded = CreditEntry.objects.filter(kind=EntryKind.REFUND, job__isnull=False)
    days = UsageRollup.objects.filter(granularity=Granularity.DAY)
    assert (
        days.aggregate(total=Sum("refunded_micros"))["total"] == refunded.aggregate(total=Sum("amount_micros"))["total"]
    )


def test_the_shared_definition_gives_back_what_each_refund_refunded(refunded_books: dict[str, Any]) -> None:
    """``metering.refunded_records``: each refunded request's records as billed at its refund, never usage billed
    after it, whatever happened to its key."""
    refunded = set(metering.refunded_records(UsageRecord.objects.all()).values_list("pk", flat=True))
    expected = set()
    for name in ("keyed", "tagged", "keyless", "deleted_after", "deleted_before", "billed_twice", "other"):
        expected |= set(
            UsageRecord.objects.filter(job=refunded_books[name], billable=True).values_list("pk", flat=True)
        )
    first = UsageRecord.objects.filter(job=refunded_books["billed_again"]).order_by("attempt_number").first()
    assert first is not None
    expected.add(first.pk)
    assert refunded == expected


@pytest.mark.usefixtures("no_overlap")
def test_an_incremental_run_compares_the_days_its_refunds_gave_back_in_however_old(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = with_room_to_spend(tenant["organization"])
    old = settled_days_ago(organization, builtin_endpoint, 40, api_key=tenant["api_key"], end_user="alice")
    old_day = UsageRecord.objects.get(job=old).recorded_at.astimezone(UTC).date()
    assert reconciliation.run_reconciliation().ok
    quiet = reconciliation.run_reconciliation()
    assert quiet.scope == "incremental"
    assert quiet.checked[CHECK] == {"checked": 0, "drift": 0, "days": [], "organization_days": 0}

    refund_job(job=old, reason="test")

    run_ = reconciliation.run_reconciliation()
    assert run_.scope == "incremental"
    assert run_.ok, run_.drift
    summary = run_.checked[CHECK]
    assert summary["days"] == [old_day.isoformat()]
    assert summary["organization_days"] == 1
    # The refund, its record, and its hour, day and tag rows.
    assert summary["checked"] == 1 + 1 + 3


# --- Drift ---------------------------------------------------------------------------------------------------------


def prove_then_refund(books: dict[str, Any], scope: str) -> Job:
    """A request with a key of its own (rows of its own) refunded: before the books' proof (full) or after it, in the
    incremental run's window."""
    job = run(books["organization"], books["endpoint"], api_key=books["own_key"](), gpu_ms=1_900)
    if scope == "incremental":
        assert reconciliation.run_reconciliation().ok
    refund_job(job=job, reason="test")
    return job


def reconcile(scope: str) -> ReconciliationRun:
    run_ = reconciliation.run_reconciliation(full=scope == "full")
    assert run_.scope == scope
    return run_


SCOPES = pytest.mark.parametrize("scope", ["full", "incremental"])
FULL_ONLY = {"full": {ORGANIZATION_DIFFERS}, "incremental": set()}


@pytest.mark.usefixtures("no_overlap")
@SCOPES
@pytest.mark.parametrize("tampered_by", [-7, 7])
def test_a_day_row_giving_back_more_or_less_than_its_refunds_is_found(
    refunded_books: dict[str, Any], scope: str, tampered_by: int
) -> None:
    job = prove_then_refund(refunded_books, scope)
    row = day_row(job)
    assert row.refunded_micros == cost_of(job)
    UsageRollup.objects.filter(pk=row.pk).update(refunded_micros=F("refunded_micros") + tampered_by)
    run_ = reconcile(scope)
    expected = {DAY_DIFFERS, HOUR_DIFFERS} | FULL_ONLY[scope]
    if tampered_by > 0:  # the row refunded its whole cost: now more than it
        expected.add(ROW_OUTSIDE)
    assert kinds(run_) == expected
    [example] = drift_of(run_, DAY_DIFFERS)["examples"]
    assert example["organization_id"] == str(job.organization_id)
    assert example["day"] == row.bucket_start.date().isoformat()
    assert (example["key_id"], example["gpu_class"]) == (str(row.key_id), row.gpu_class)
    assert example["refunded_records_micros"] + tampered_by == example["day_rollups_micros"]
    assert example["difference_micros"] == tampered_by
    assert str(job.pk) in example["jobs"]
    assert {"id": row.pk, "key_id": str(row.key_id), "cost_micros": row.cost_micros,
            "refunded_micros": row.refunded_micros + tampered_by} in example["rows"]  # fmt: skip
    [hourly] = drift_of(run_, HOUR_DIFFERS)["examples"]
    assert hourly["day_rollups_micros"] - hourly["hour_rollups_micros"] == tampered_by
    assert run_.watermark is None


@pytest.mark.usefixtures("no_overlap")
@SCOPES
def test_an_hour_row_giving_back_other_than_its_day_is_found(refunded_books: dict[str, Any], scope: str) -> None:
    job = prove_then_refund(refunded_books, scope)
    row = hour_row(job)
    UsageRollup.objects.filter(pk=row.pk).update(refunded_micros=F("refunded_micros") - 1)
    run_ = reconcile(scope)
    assert kinds(run_) == {HOUR_DIFFERS}
    [example] = drift_of(run_, HOUR_DIFFERS)["examples"]
    assert (example["day_rollups_micros"], example["hour_rollups_micros"]) == (cost_of(job), cost_of(job) - 1)
    assert example["difference_micros"] == -1


@pytest.mark.usefixtures("no_overlap")
@SCOPES
@pytest.mark.parametrize("tampered_by", [-5, 5])
def test_an_end_user_row_giving_back_other_than_its_refunds_is_found(
    refunded_books: dict[str, Any], scope: str, tampered_by: int
) -> None:
    books = refunded_books
    job = finish(start(submit(books["organization"], books["endpoint"], end_user="carol")), gpu_ms=1_000)
    if scope == "incremental":
        assert reconciliation.run_reconciliation().ok
    refund_job(job=job)
    # The tag's row of the day beside it, tagged usage that stays: it has room for more.
    finish(start(submit(books["organization"], books["endpoint"], end_user="carol")), gpu_ms=1_000)
    row = tag_row(job)
    EndUserRollup.objects.filter(pk=row.pk).update(refunded_micros=F("refunded_micros") + tampered_by)
    run_ = reconcile(scope)
    assert kinds(run_) == {TAG_DIFFERS}
    [example] = drift_of(run_, TAG_DIFFERS)["examples"]
    assert (example["end_user"], example["day"]) == ("carol", row.bucket_start.date().isoformat())
    assert (example["refunded_records_micros"], example["tag_rollups_micros"]) == (
        cost_of(job),
        cost_of(job) + tampered_by,
    )
    assert example["jobs"] == [str(job.pk)]
    assert [each["id"] for each in example["rows"]] == [row.pk]


@pytest.mark.usefixtures("no_overlap")
@SCOPES
def test_a_refund_whose_give_back_was_lost_is_found(refunded_books: dict[str, Any], scope: str) -> None:
    books = refunded_books
    job = finish(
        start(submit(books["organization"], books["endpoint"], api_key=books["own_key"](), end_user="dave")),
        gpu_ms=1_000,
    )
    if scope == "incremental":
        assert reconciliation.run_reconciliation().ok
    with mock.patch.object(metering, "count_as_refunded"):  # the entry posted, the rollups left as they were
        refund_job(job=job)
    run_ = reconcile(scope)
    # Hours and days lost it alike: they still agree with each other.
    assert kinds(run_) == {DAY_DIFFERS, TAG_DIFFERS} | FULL_ONLY[scope]
    [example] = drift_of(run_, DAY_DIFFERS)["examples"]
    assert (example["refunded_records_micros"], example["day_rollups_micros"]) == (cost_of(job), 0)
    assert example["difference_micros"] == -cost_of(job)
    assert example["jobs"] == [str(job.pk)]
    assert [each["id"] for each in example["rows"]] == [day_row(job).pk]
    assert drift_of(run_, TAG_DIFFERS)["examples"][0]["jobs"] == [str(job.pk)]
    if scope == "full":
        [organization] = drift_of(run_, ORGANIZATION_DIFFERS)["examples"]
        assert organization["organization_id"] == str(job.organization_id)
        assert organization["refund_entries_micros"] - organization["day_rollups_micros"] == cost_of(job)


@pytest.mark.usefixtures("no_overlap")
def test_a_lost_give_back_of_an_old_requests_refund_is_found_by_the_incremental_run(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = with_room_to_spend(tenant["organization"])
    old = settled_days_ago(organization, builtin_endpoint, 12)
    assert reconciliation.run_reconciliation().ok
    with mock.patch.object(metering, "count_as_refunded"):
        refund_job(job=old)
    run_ = reconcile("incremental")
    assert kinds(run_) == {DAY_DIFFERS}
    [example] = drift_of(run_, DAY_DIFFERS)["examples"]
    assert example["day"] == UsageRecord.objects.get(job=old).recorded_at.astimezone(UTC).date().isoformat()
    assert example["jobs"] == [str(old.pk)]


@pytest.mark.usefixtures("no_overlap")
@SCOPES
def test_a_give_back_counted_twice_is_found(refunded_books: dict[str, Any], scope: str) -> None:
    """Counted again (a retried task, a hand): rows with room left, holding usage not refunded, take it twice."""
    books = refunded_books
    job = prove_then_refund(books, scope)
    # Usage beside it that stays: its rows have room to give back more.
    run(books["organization"], books["endpoint"], api_key=Job.objects.get(pk=job.pk).api_key, gpu_ms=3_000)
    metering.count_as_refunded(UsageRecord.objects.filter(job=job))
    run_ = reconcile(scope)
    assert kinds(run_) == {DAY_DIFFERS} | FULL_ONLY[scope]
    [example] = drift_of(run_, DAY_DIFFERS)["examples"]
    assert example["difference_micros"] == cost_of(job)
    assert str(job.pk) in example["jobs"]


def test_usage_billed_again_after_a_refund_given_back_too_is_found(refunded_books: dict[str, Any]) -> None:
    again = UsageRecord.objects.filter(job=refunded_books["billed_again"]).order_by("attempt_number").last()
    assert again is not None
    metering.count_as_refunded([again])
    run_ = reconcile("full")
    assert kinds(run_) == {DAY_DIFFERS, ORGANIZATION_DIFFERS}
    [example] = drift_of(run_, DAY_DIFFERS)["examples"]
    assert example["difference_micros"] == again.cost_micros


@SCOPES
@pytest.mark.usefixtures("no_overlap")
def test_a_row_giving_back_more_than_it_cost_or_less_than_nothing_is_found(
    refunded_books: dict[str, Any], scope: str
) -> None:
    """The hour row and the day row alike, so only the rows' own bounds are broken (and the records' sums)."""
    books = refunded_books
    job = prove_then_refund(books, scope)
    UsageRollup.objects.filter(pk__in=[day_row(job).pk, hour_row(job).pk]).update(refunded_micros=F("cost_micros") + 1)
    tagged = finish(start(submit(books["organization"], books["endpoint"], end_user="erin")), gpu_ms=1_000)
    EndUserRollup.objects.filter(pk=tag_row(tagged).pk).update(refunded_micros=-3)
    run_ = reconcile(scope)
    assert kinds(run_) == {DAY_DIFFERS, ROW_OUTSIDE, TAG_ROW_OUTSIDE, TAG_DIFFERS} | FULL_ONLY[scope]
    outside = drift_of(run_, ROW_OUTSIDE)
    assert outside["count"] == 2
    assert {example["granularity"] for example in outside["examples"]} == {"hour", "day"}
    assert all(example["refunded_micros"] == example["cost_micros"] + 1 for example in outside["examples"])
    [below] = drift_of(run_, TAG_ROW_OUTSIDE)["examples"]
    assert (below["id"], below["end_user"], below["refunded_micros"]) == (tag_row(tagged).pk, "erin", -3)


@SCOPES
@pytest.mark.usefixtures("no_overlap")
def test_a_request_refund_that_is_not_what_its_records_cost_is_found(
    refunded_books: dict[str, Any], scope: str
) -> None:
    """A refund entry posted by hand, not through ``refund_job``: half the request's cost, so no record of it was
    refunded (a refund gives back whole records), and nothing given back in the rollups."""
    books = refunded_books
    job = run(books["organization"], books["endpoint"], gpu_ms=2_000)
    if scope == "incremental":
        assert reconciliation.run_reconciliation().ok
    with transaction.atomic():
        account = locked_account(job.organization_id)
        entry, _ = post_entry(
            account=account,
            kind=EntryKind.REFUND,
            amount_micros=cost_of(job) // 2,
            idempotency_key=f"job-refund-{job.pk}",
            job=job,
        )
    run_ = reconcile(scope)
    assert kinds(run_) == {REFUND_DIFFERS} | FULL_ONLY[scope]
    [example] = drift_of(run_, REFUND_DIFFERS)["examples"]
    assert (example["id"], example["job_id"]) == (entry.pk, str(job.pk))
    assert (example["amount_micros"], example["records_micros"]) == (cost_of(job) // 2, 0)


@pytest.mark.usefixtures("no_overlap")
def test_an_incremental_run_leaves_rows_it_did_not_touch_to_the_full_run(refunded_books: dict[str, Any]) -> None:
    """Only the organizations' days written in the window are compared: an edit of an older row is the weekly run's."""
    books = refunded_books
    old = settled_days_ago(books["other_organization"], books["endpoint"], 3)
    refund_job(job=old)
    assert reconciliation.run_reconciliation().ok
    UsageRollup.objects.filter(pk=day_row(old).pk).update(refunded_micros=F("refunded_micros") - 1)
    # New usage of the first organization today: the other organization's days are not touched.
    run(books["organization"], books["endpoint"], gpu_ms=1_000)
    incremental = reconcile("incremental")
    assert incremental.ok, incremental.drift
    summary = incremental.checked[CHECK]
    assert summary["organization_days"] == 1
    full = reconcile("full")
    assert kinds(full) == {DAY_DIFFERS, HOUR_DIFFERS, ORGANIZATION_DIFFERS}
    assert drift_of(full, DAY_DIFFERS)["examples"][0]["jobs"] == [str(old.pk)]


PARTITION_READ = re.compile(r" on (billing_usagerecord_\w+)(?: \w+)?\s+\(actual time=\S+ rows=\d+ loops=(\d+)\)")


@pytest.mark.skipif(connection.vendor != "postgresql", reason="partitions are PostgreSQL's")
@pytest.mark.usefixtures("no_overlap")
def test_an_incremental_run_reads_no_month_before_its_refunded_requests_were_created(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    """A request's records are read from its job's creation on (none is written before): the monthly partitions of
    the months before it are never read, by any of the check's queries (each one explained as it ran)."""
    months = [periods.month_start()]
    with connection.cursor() as cursor:
        for _ in range(6):  # half a year of history, as a platform that has run that long has its months
            months.insert(0, periods.month_start(months[0] - timedelta(days=1)))
            partitions.create_month_partition(cursor, "billing_usagerecord", "recorded_at", months[0])
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=10 * MICROS_PER_DOLLAR, reason="room to spend")
    old = settled_days_ago(organization, builtin_endpoint, 40)
    created = periods.month_start(old.created_at)
    assert created > months[0]
    before_it = {partitions.partition_name("billing_usagerecord", month) for month in months if month < created}
    its_own = partitions.partition_name("billing_usagerecord", periods.month_start(old.finished_at))
    assert reconciliation.run_reconciliation().ok
    refund_job(job=old)
    scope = reconciliation.scope_of_next_run()
    assert not scope.full

    with CaptureQueriesContext(connection) as captured:
        check = reconciliation.check_refunded_rollups(scope)

    assert check.drift == []
    assert check.checked == 1 + 1 + 2  # the refund, its record, its hour and day rows
    read: set[str] = set()
    with connection.cursor() as cursor:
        for query in captured.captured_queries:
            cursor.execute(f"EXPLAIN (ANALYZE, COSTS OFF) {query['sql']}")
            plan = "\n".join(line for (line,) in cursor.fetchall())
            read |= {name for name, loops in PARTITION_READ.findall(plan) if int(loops)}
    assert its_own in read
    assert not read & before_it, sorted(read & before_it)


def test_the_rollup_admin_shows_what_was_refunded(refunded_books: dict[str, Any]) -> None:
    client = Client()
    client.force_login(User.objects.create_superuser(email="ops@example.com", password="operator password 1"))
    listing = client.get("/admin/billing/usagerollup/", {"granularity__exact": Granularity.DAY})
    assert listing.status_code == 200
    assert "refunded" in listing.content.decode()
    row = day_row(refunded_books["keyed"])
    page = client.get(f"/admin/billing/usagerollup/{row.pk}/change/")
    assert page.status_code == 200
    assert "What was given back of this row" in page.content.decode()


# --- Any sequence of settlements, refunds, reruns and deleted keys -------------------------------------------------


class ReconciledRefunds(RefundedSpend):
    """``tests/billing/test_refunded_spend.py``'s machine (settlements with and without keys, tags, retries, months
    passing, reruns of refunded requests, keys deleted, refunds in any order), with reconciliation's check after every
    step: the books it writes prove, full and incremental; and any row's refunded amount moved by any amount is
    found."""

    @invariant()
    def the_books_prove(self) -> None:
        if not hasattr(self, "clock"):
            return
        for scope in (reconciliation.FULL, reconciliation.Scope(since=self.clock.started - timedelta(seconds=1))):
            check = reconciliation.check_refunded_rollups(scope)
            assert check.drift == [], check.drift

    @precondition(lambda self: hasattr(self, "clock"))
    @rule(data=st.data(), by=st.integers(-5_000, 5_000).filter(bool), tags=st.booleans())
    def a_row_moved_is_found(self, data: st.DataObject, by: int, tags: bool) -> None:
        rows: Any = EndUserRollup if tags else UsageRollup
        ids = list(rows.objects.filter(organization=self.organization).order_by("pk").values_list("pk", flat=True))
        if not ids:
            return
        pk = data.draw(st.sampled_from(ids))
        rows.objects.filter(pk=pk).update(refunded_micros=F("refunded_micros") + by)
        for scope in (reconciliation.FULL, reconciliation.Scope(since=self.clock.started - timedelta(seconds=1))):
            check = reconciliation.check_refunded_rollups(scope)
            assert check.drift_count > 0
            if tags:
                assert any(item["kind"] == "end_user_rollups_refunded_differ_from_refunds" for item in check.drift)
        rows.objects.filter(pk=pk).update(refunded_micros=F("refunded_micros") - by)


def test_reconciliation_proves_the_refunds_of_any_sequence(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None
) -> None:
    ReconciledRefunds.run_for(tenant, builtin_endpoint, max_examples=15, steps=20)
