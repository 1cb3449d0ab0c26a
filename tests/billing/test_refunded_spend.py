"""A refunded request's usage stops counting as spend: the monthly budget, a key's monthly limit and an end user
tag's monthly limit (and the budget alerts) count what was used less what was refunded, in the month the usage was
recorded in, each refund once (``billing.ledger.refund_job``, ``UsageRollup.refunded_micros``).

A Hypothesis state machine settles requests (with the organization's key, with a second key an admin may delete, or
with none; tagged or not; retried; some cut short because credit was taken back while they ran), lets months pass,
has operators run failed requests again (refunded ones too, billed again) and refund any finished request in any
order and any number of times, and checks the limits through the real admission. After every step, for every month
it played in, the spend each limit counts is the usage recorded in that month less the refunds of that usage, never
negative, and each refund counted once.
"""

from __future__ import annotations

import importlib
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from accounts.models import ApiKey, Organization, Scope
from accounts.services import create_api_key
from billing import admission, alerts, controls, end_users, periods, pricing
from billing.admission import END_USER_OVER_LIMIT, OVER_LIMIT
from billing.ledger import grant_credits, refund_job
from billing.models import (
    NO_KEY,
    Account,
    CreditEntry,
    EndUserRollup,
    EntryKind,
    Granularity,
    UsageRecord,
    UsageRollup,
)
from billing.money import MICROS_PER_DOLLAR
from inference import closing, requeue, submission
from inference.models import FINAL_STATUSES, AttemptOutcome, Endpoint, Job, JobStatus
from tests import lifecycle
from tests.billing.conftest import OneOrganization, refund_once, total

pytestmark = pytest.mark.django_db

QUEUE = "/queue/platform/tiny-sd"
TAGS = ("", "alice", "bob")
MONTHS = 3  # the month the test starts in and the two after it
OUTCOMES = [AttemptOutcome.SUCCEEDED, AttemptOutcome.FAILED, AttemptOutcome.ERRORED, AttemptOutcome.CANCELLED]


class MonthsClock:
    """Django's clock in month ``ahead`` after the real one's: the real clock this month (held inside it), the 11th
    of a later month at the real time of day, moving as real time does."""

    def __init__(self) -> None:
        self.real = timezone.now
        self.started = self.real()
        self.months = [periods.month_start(self.started)]
        while len(self.months) < MONTHS + 1:
            self.months.append(periods.next_month(self.months[-1]))
        self.ahead = 0

    def __call__(self) -> datetime:
        now = self.real()
        if self.ahead == 0:
            return min(now, self.months[1] - timedelta(microseconds=1))
        return self.months[self.ahead] + timedelta(days=10) + (now - self.started)


class RefundedSpend(OneOrganization):
    @initialize()
    def open_books(self) -> None:
        pricing.forget_measurement(self.endpoint.pk)
        self.example = transaction.atomic()
        self.example.__enter__()
        self.clock = MonthsClock()
        self.patch = mock.patch.object(timezone, "now", self.clock)
        self.patch.start()
        grant_credits(organization=self.organization, amount_micros=100 * MICROS_PER_DOLLAR, reason="room to spend")
        # A second key, which an admin may delete: its usage records forget it, its rollup rows keep its id.
        self.spare_key: ApiKey | None = create_api_key(
            organization=self.organization, name="spare", scopes=[Scope.ADMIN], created_by=None
        )[0]
        self.jobs: list[Any] = []
        self.refunded: set[Any] = set()  # the requests refunded
        self.refunded_records: set[Any] = set()  # the usage records their refunds gave back

    def teardown(self) -> None:
        if hasattr(self, "example"):
            self.patch.stop()
            transaction.set_rollback(True)
            self.example.__exit__(None, None, None)

    def finished(self) -> list[Job]:
        return list(Job.objects.filter(pk__in=self.jobs, status__in=FINAL_STATUSES).order_by("created_at", "pk"))

    def requeueable(self) -> list[Job]:
        statuses = (JobStatus.FAILED, JobStatus.CANCELLED)
        return list(Job.objects.filter(pk__in=self.jobs, status__in=statuses).order_by("created_at", "pk"))

    # --- What happens ------------------------------------------------------------------------------------------

    @rule(
        key=st.sampled_from(["none", "main", "spare"]),
        end_user=st.sampled_from(TAGS),
        attempts=st.lists(st.tuples(st.sampled_from(OUTCOMES), st.integers(0, 30_000)), min_size=1, max_size=3),
        squeezed=st.one_of(st.none(), st.none(), st.integers(0, 2_000)),
    )
    def settle(self, key: str, end_user: str, attempts: list[tuple[str, int]], squeezed: int | None) -> None:
        """A request run to its end (retried while attempts are left and the platform erred). ``squeezed``: credit
        is taken back while it runs, leaving that much, so its settlement is cut to what the balance covers."""
        api_key = {"none": None, "main": self.api_key, "spare": self.spare_key}[key]
        try:
            job = lifecycle.submit(self.organization, self.endpoint, api_key=api_key, end_user=end_user)
        except submission.SubmissionRefused:
            return
        self.jobs.append(job.pk)
        self.run_to_its_end(job, attempts, squeezed)

    @precondition(lambda self: hasattr(self, "jobs") and bool(self.requeueable()))
    @rule(
        data=st.data(),
        attempts=st.lists(st.tuples(st.sampled_from(OUTCOMES), st.integers(0, 30_000)), min_size=1, max_size=2),
    )
    def an_operator_requeues(self, data: st.DataObject, attempts: list[tuple[str, int]]) -> None:
        """An operator runs a failed or cancelled request again (a refunded one too): billed again, in this month."""
        job = data.draw(st.sampled_from(self.requeueable()))
        try:
            assert requeue.requeue_job(job=job)
        except requeue.RequeueRefused:
            return
        self.run_to_its_end(Job.objects.get(pk=job.pk), attempts, None)

    def run_to_its_end(self, job: Job, attempts: list[tuple[str, int]], squeezed: int | None) -> None:
        for number, (outcome, gpu_ms) in enumerate(attempts):
            job = lifecycle.start(job)
            if squeezed is not None:
                self.leave_balance(squeezed)
            lifecycle.finish(
                job, outcome, gpu_ms=gpu_ms, error="" if outcome == AttemptOutcome.SUCCEEDED else "it went wrong",
                retry=outcome == AttemptOutcome.ERRORED and number < len(attempts) - 1,
            )  # fmt: skip
            job.refresh_from_db()
            if job.is_final:
                break
        if not job.is_final:
            closing.cancel_job(job=job)
        if squeezed is not None:
            self.leave_balance(100 * MICROS_PER_DOLLAR)

    def leave_balance(self, micros: int) -> None:
        balance = Account.objects.get(pk=self.organization.pk).balance_micros
        if balance != micros:
            grant_credits(
                organization=self.organization, amount_micros=micros - balance, reason="test",
                kind=EntryKind.ADJUSTMENT,
            )  # fmt: skip

    @precondition(lambda self: getattr(self, "spare_key", None) is not None)
    @rule()
    def an_admin_deletes_the_spare_key(self) -> None:
        assert self.spare_key is not None
        self.spare_key.delete()
        self.spare_key = None

    @precondition(lambda self: hasattr(self, "clock") and self.clock.ahead < MONTHS - 1)
    @rule()
    def a_month_passes(self) -> None:
        self.clock.ahead += 1

    def billed_unrefunded(self) -> list[Job]:
        return [job for job in self.finished() if job.pk not in self.refunded and self.charged(job)]

    @staticmethod
    def charged(job: Job) -> int:
        return total(UsageRecord.objects.filter(job=job, billable=True), "cost_micros")

    @precondition(lambda self: hasattr(self, "jobs") and bool(self.finished()))
    @rule(data=st.data())
    def refund_any(self, data: st.DataObject) -> None:
        """An operator refunds a finished request: any of them, in any order, again and again."""
        self.refund(data.draw(st.sampled_from(self.finished())))

    @precondition(lambda self: hasattr(self, "jobs") and bool(self.billed_unrefunded()))
    @rule(data=st.data())
    def refund_one_that_cost_something(self, data: st.DataObject) -> None:
        self.refund(data.draw(st.sampled_from(self.billed_unrefunded())))

    def refund(self, job: Job) -> None:
        if refund_once(job, refunded=self.refunded):
            billed = UsageRecord.objects.filter(job=job, billable=True)
            self.refunded_records |= set(billed.values_list("pk", flat=True))

    @precondition(lambda self: hasattr(self, "jobs"))
    @rule(scope=st.sampled_from(["budget", "key", *TAGS[1:]]), slack=st.sampled_from([-1, 0, 1]))
    def check_a_limit(self, scope: str, slack: int) -> None:
        """A limit set to what this month's net spend leaves room for, give or take a micro-dollar, then a request
        through the real admission: admitted exactly when its estimate fits."""
        month = periods.month_start()
        estimate = pricing.hold_micros(
            self.endpoint, {**lifecycle.SMALL}, pricing.price_for(self.endpoint, timezone.now(), self.organization.pk)
        )
        key_only = scope == "key"
        end_user = scope if scope in TAGS else ""
        limit = self.expected(month, key=key_only, end_user=end_user or None) + estimate + slack
        if scope == "budget":
            controls.set_monthly_budget(organization=self.organization, budget_micros=limit)
        elif key_only:
            controls.set_key_limit(api_key=self.api_key, monthly_limit_micros=limit)
        else:
            end_users.set_end_user_limit(organization=self.organization, end_user=end_user, monthly_limit_micros=limit)
        if slack < 0:
            with pytest.raises(submission.SubmissionRefused) as refused:
                lifecycle.submit(self.organization, self.endpoint, api_key=self.api_key, end_user=end_user)
            assert refused.value.error_type == (END_USER_OVER_LIMIT if end_user else OVER_LIMIT)
        else:
            job = lifecycle.submit(self.organization, self.endpoint, api_key=self.api_key, end_user=end_user)
            closing.cancel_job(job=job)  # never started: never billed, its hold given back
        controls.set_monthly_budget(organization=self.organization, budget_micros=None)
        controls.set_key_limit(api_key=self.api_key, monthly_limit_micros=None)
        for tag in TAGS[1:]:
            end_users.set_end_user_limit(organization=self.organization, end_user=tag, monthly_limit_micros=None)

    # --- The model: usage less refunds, from the usage records and the refunds this test made ---------------

    def expected(self, month: datetime, *, key: bool = False, end_user: str | None = None) -> int:
        start, end = periods.month_bounds(month)
        records = UsageRecord.objects.filter(
            organization=self.organization, billable=True, recorded_at__gte=start, recorded_at__lt=end
        )
        if key:
            records = records.filter(api_key=self.api_key)
        if end_user is not None:
            records = records.filter(end_user=end_user)
        return total(records, "cost_micros") - total(records.filter(pk__in=self.refunded_records), "cost_micros")

    # --- What must hold ----------------------------------------------------------------------------------------

    @invariant()
    def the_limits_count_usage_less_refunds_in_each_month(self) -> None:
        if not hasattr(self, "clock"):
            return
        organization = self.organization.pk
        for month in self.clock.months[:MONTHS]:
            spent = self.expected(month)
            assert spent >= 0
            assert alerts.spent_in_month(organization_id=organization, month=month) == spent
            key_spent = self.expected(month, key=True)
            assert key_spent >= 0
            assert alerts.spent_in_month(organization_id=organization, month=month, key_id=self.api_key.pk) == key_spent
            for tag in TAGS[1:]:
                tag_spent = self.expected(month, end_user=tag)
                assert tag_spent >= 0
                assert end_users.spent_in_month(organization_id=organization, end_user=tag, month=month) == tag_spent
        this_month = periods.month_start()
        assert admission.spent_this_month(organization_id=organization) == self.expected(this_month)
        assert admission.spent_this_month(organization_id=organization, key_id=self.api_key.pk) == self.expected(
            this_month, key=True
        )

    @invariant()
    def no_row_gives_back_more_than_it_counted(self) -> None:
        if not hasattr(self, "clock"):
            return
        for rows in (UsageRollup.objects.filter(organization=self.organization),
                     EndUserRollup.objects.filter(organization=self.organization)):  # fmt: skip
            assert not rows.filter(refunded_micros__gt=F("cost_micros")).exists()
        # The hours of a month give back what its days do.
        for month in self.clock.months[:MONTHS]:
            start, end = periods.month_bounds(month)
            within = UsageRollup.objects.filter(
                organization=self.organization, bucket_start__gte=start, bucket_start__lt=end
            )
            hours, days = within.filter(granularity=Granularity.HOUR), within.filter(granularity=Granularity.DAY)
            assert total(hours, "refunded_micros") == total(days, "refunded_micros")

    @invariant()
    def each_refund_is_posted_once(self) -> None:
        if not hasattr(self, "clock"):
            return
        refunds = CreditEntry.objects.filter(organization=self.organization, kind=EntryKind.REFUND)
        assert sorted(refunds.values_list("job_id", flat=True)) == sorted(self.refunded)
        usage = UsageRollup.objects.filter(organization=self.organization, granularity=Granularity.DAY)
        assert total(usage, "refunded_micros") == total(refunds, "amount_micros")


def test_the_limits_count_usage_less_refunds_under_any_sequence(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None
) -> None:
    RefundedSpend.run_for(tenant, builtin_endpoint, max_examples=25, steps=20)


# --- Through the real admission path ---------------------------------------------------------------------------


JOB_MS = 2_000  # 200 µ$ at the opening CPU price


def over_the_limit(answer: Any, error_type: str = OVER_LIMIT) -> bool:
    return answer.status_code == 402 and answer.json()["error_type"] == error_type


def estimate(organization: Organization, endpoint: Endpoint) -> int:
    """What admission holds for ``lifecycle.SMALL`` now: a limit with less room than this refuses it."""
    quote = pricing.price_for(endpoint, timezone.now(), organization.pk)
    return pricing.hold_micros(endpoint, {**lifecycle.SMALL}, quote)


def test_a_refund_gives_a_tenant_at_its_budget_its_room_back(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None, clock_held_in_the_hour: datetime
) -> None:
    organization, client = tenant["organization"], tenant["client"]
    failed = lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=JOB_MS, outcome=AttemptOutcome.FAILED)
    cost = total(UsageRecord.objects.filter(job=failed), "cost_micros")
    assert cost > 0
    # One micro-dollar short of room for the next request.
    controls.set_monthly_budget(
        organization=organization, budget_micros=cost + estimate(organization, builtin_endpoint) - 1
    )
    answer = client.post(QUEUE, lifecycle.SMALL, format="json")
    assert over_the_limit(answer), answer.content

    refund_job(job=failed, reason="it failed")

    answer = client.post(QUEUE, lifecycle.SMALL, format="json")
    assert answer.status_code == 200, answer.content
    assert admission.spent_this_month(organization_id=organization.pk) == 0
    assert client.get("/v1/billing/limits").json()["spent_this_month_micros"] == 0


def test_a_refund_gives_a_key_and_an_end_user_at_their_limits_their_room_back(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None, clock_held_in_the_hour: datetime
) -> None:
    organization, client, key = tenant["organization"], tenant["client"], tenant["api_key"]
    answer = client.post(QUEUE, lifecycle.SMALL, format="json", HTTP_X_FAL_END_USER="alice")
    job = lifecycle.finish(lifecycle.start(Job.objects.get(pk=answer.json()["request_id"])), gpu_ms=JOB_MS)
    limit = total(UsageRecord.objects.filter(job=job), "cost_micros") + estimate(organization, builtin_endpoint) - 1
    controls.set_key_limit(api_key=key, monthly_limit_micros=limit)
    assert over_the_limit(client.post(QUEUE, lifecycle.SMALL, format="json"))
    controls.set_key_limit(api_key=key, monthly_limit_micros=None)
    end_users.set_end_user_limit(organization=organization, end_user="alice", monthly_limit_micros=limit)
    tagged = client.post(QUEUE, lifecycle.SMALL, format="json", HTTP_X_FAL_END_USER="alice")
    assert over_the_limit(tagged, END_USER_OVER_LIMIT), tagged.content
    controls.set_key_limit(api_key=key, monthly_limit_micros=limit)

    refund_job(job=job, reason="bad output")

    tagged = client.post(QUEUE, lifecycle.SMALL, format="json", HTTP_X_FAL_END_USER="alice")
    assert tagged.status_code == 200, tagged.content
    limits = client.get("/v1/billing/limits").json()
    assert [row["spent_this_month_micros"] for row in limits["keys"]] == [0]
    assert [row["spent_this_month_micros"] for row in limits["end_users"]] == [0]


def test_a_refund_of_last_months_usage_gives_back_last_months_spend_not_this_months(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None
) -> None:
    """Usage counts in the month it was recorded in; its refund comes off that month (its budget is history) and
    leaves this month's spend, and what this month's limits allow, as they were."""
    organization, client = tenant["organization"], tenant["client"]
    clock = MonthsClock()
    with mock.patch.object(timezone, "now", clock):
        last_month = lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=JOB_MS)
        clock.ahead = 1
        this_month = lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=JOB_MS)
        cost = total(UsageRecord.objects.filter(job=this_month), "cost_micros")
        budget = cost + estimate(organization, builtin_endpoint) - 1
        controls.set_monthly_budget(organization=organization, budget_micros=budget)
        assert over_the_limit(client.post(QUEUE, lifecycle.SMALL, format="json"))

        refund_job(job=last_month)

        assert alerts.spent_in_month(organization_id=organization.pk, month=clock.months[0]) == 0
        assert admission.spent_this_month(organization_id=organization.pk) == cost
        assert over_the_limit(client.post(QUEUE, lifecycle.SMALL, format="json"))
        refund_job(job=this_month)
        assert client.post(QUEUE, lifecycle.SMALL, format="json").status_code == 200


def test_a_refund_of_usage_whose_key_was_deleted_comes_off_the_organizations_spend(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    quiet_books: None,
    make_key: Any,
    clock_held_in_the_hour: datetime,
) -> None:
    organization = tenant["organization"]
    doomed, _ = make_key(organization, name="doomed")
    job = lifecycle.run(organization, builtin_endpoint, api_key=doomed, gpu_ms=JOB_MS)
    doomed.delete()  # its usage records forget it (SET NULL); its rollup rows keep its id
    assert UsageRecord.objects.get(job=job).api_key_id is None
    refund_job(job=job)
    assert admission.spent_this_month(organization_id=organization.pk) == 0
    rows = UsageRollup.objects.filter(organization=organization)
    assert not rows.filter(refunded_micros__gt=F("cost_micros")).exists()
    assert not rows.filter(key_id=NO_KEY).exists()


# --- The credit floor ------------------------------------------------------------------------------------------


def test_low_credit_is_told_once_per_crossing_below_the_floor(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    quiet_books: None,
    django_capture_on_commit_callbacks: Any,
    sent_tasks: list[Any],
) -> None:
    """Told when the available credit goes below the floor; not again while it stays below, whatever credit is
    added meanwhile (a refund, a reversed dispute) that leaves it below; again once it has been back at or above
    the floor and goes below it once more."""
    from billing.models import AlertScope, SpendAlert

    organization = tenant["organization"]

    def settle(gpu_ms: int = JOB_MS) -> Job:
        with django_capture_on_commit_callbacks(execute=True):
            return lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=gpu_ms)

    def told() -> int:
        return SpendAlert.objects.filter(organization=organization, scope=AlertScope.CREDITS).count()

    small = settle(gpu_ms=500)  # 50 µ$
    account = Account.objects.get(pk=organization.pk)
    grant_credits(organization=organization, amount_micros=1_000 - account.available_micros, reason="test",
                  kind=EntryKind.ADJUSTMENT)  # fmt: skip
    controls.set_alert_settings(organization=organization, credit_floor_micros=700)
    settle()  # 800 left
    assert told() == 0
    settle()  # 600: below the floor
    assert told() == 1
    refund_job(job=small)  # +50: 650, still below
    settle()  # 450
    grant_credits(organization=organization, amount_micros=100, reason="a dispute won back")  # 550, still below
    settle()  # 350
    assert alerts.look(organization_id=organization.pk) == []
    assert told() == 1
    grant_credits(organization=organization, amount_micros=350, reason="at the floor again")  # 700: not below
    assert alerts.look(organization_id=organization.pk) == []
    settle()  # 500: below again
    assert told() == 2
    settle()
    assert told() == 2
    grant_credits(organization=organization, amount_micros=1_000, reason="top up")  # 1,300
    settle()  # 1,100
    settle()  # 900
    assert told() == 2
    settle()  # 700
    assert told() == 2
    settle()  # 500
    assert told() == 3
    periods_told = list(SpendAlert.objects.filter(organization=organization).values_list("period", flat=True))
    assert len(set(periods_told)) == 3


# --- Refunds made before the rollups counted them ------------------------------------------------------------------


def test_the_migration_gives_back_the_refunds_made_before_it_as_a_refund_now_does(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    quiet_books: None,
    make_key: Any,
    clock_held_in_the_hour: datetime,
) -> None:
    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module("billing.migrations.0016_give_back_earlier_refunds")
    organization = tenant["organization"]
    doomed, _ = make_key(organization, name="doomed")
    jobs = [
        lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=JOB_MS),
        lifecycle.run(organization, builtin_endpoint, gpu_ms=3_000),
        lifecycle.finish(
            lifecycle.start(
                lifecycle.submit(organization, builtin_endpoint, api_key=tenant["api_key"], end_user="bob")
            ),
            gpu_ms=1_000,
        ),
        lifecycle.run(organization, builtin_endpoint, api_key=doomed, gpu_ms=4_000),
        lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=5_000),  # not refunded
        lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=6_000, outcome=AttemptOutcome.FAILED),
    ]
    doomed.delete()
    for job in [*jobs[:4], jobs[5]]:
        refund_job(job=job)
    # Run again by an operator after its refund, and billed again: that usage was not refunded.
    assert requeue.requeue_job(job=jobs[5])
    lifecycle.finish(lifecycle.start(Job.objects.get(pk=jobs[5].pk)), gpu_ms=7_000)
    rows = [
        UsageRollup.objects.filter(organization=organization),
        EndUserRollup.objects.filter(organization=organization),
    ]
    as_refunded = [dict(each.values_list("pk", "refunded_micros")) for each in rows]
    assert all(any(refunded.values()) for refunded in as_refunded)
    migrating = SimpleNamespace(connection=connection)
    # Counted already by the refunds (made by a release that counts them, while this migration ran): counted once.
    migration.give_back_earlier_refunds(apps, migrating)
    assert [dict(each.values_list("pk", "refunded_micros")) for each in rows] == as_refunded
    for each in rows:
        each.update(refunded_micros=0)  # as the rows were before the migration

    migration.give_back_earlier_refunds(apps, migrating)

    assert [dict(each.values_list("pk", "refunded_micros")) for each in rows] == as_refunded
