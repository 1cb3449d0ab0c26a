"""Properties of the books under random sequences of everything that moves money or GPU time.

A Hypothesis state machine submits, starts, finishes (any outcome, any GPU time, retried or not), cancels
queued and running jobs, lets leases expire, grants and adjusts credit, refunds requests and changes the
price, all through the real services. After every step the ledger invariants hold; at the end, with
every job brought to a final state, nothing is held and reconciliation finds no drift (Stripe skipped). Operators
requeue failed and cancelled requests, also as the archive of old requests reaches them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.conf import settings as django_settings
from django.db import transaction
from django.db.models import OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from accounts.models import Organization
from billing import pricing
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Hold, Price, PriceUnit, UsageRecord
from billing.reconciliation import run_reconciliation
from inference import archive, closing, submission
from inference.models import FINAL_STATUSES, AttemptOutcome, Endpoint, Job, JobStatus
from inference.requeue import RequeueRefused, requeue_job
from tests import lifecycle
from tests.billing.conftest import STATE_MACHINES, refund_once, total

pytestmark = pytest.mark.django_db

OUTCOMES = [outcome.value for outcome in AttemptOutcome if outcome != AttemptOutcome.RUNNING]
NOT_FINAL = (JobStatus.QUEUED, JobStatus.DISPATCHED, JobStatus.RUNNING)
# How an attempt ends: its outcome, GPU ms, cold start ms, and whether the platform may retry it.
ATTEMPTS = st.tuples(st.sampled_from(OUTCOMES), st.integers(0, 120_000), st.sampled_from([0, 0, 1_500]), st.booleans())


@pytest.fixture
def world(tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None) -> Any:
    """Two organizations and three endpoints: priced per CPU-second (the class), per image and per megapixel."""
    organizations = [tenant["organization"], other_tenant["organization"]]
    Organization.objects.filter(pk__in=[o.pk for o in organizations]).update(concurrency_limit=1_000)
    endpoints = [builtin_endpoint]
    for name, unit, micros in (("per-image", PriceUnit.IMAGE, 2_500), ("per-megapixel", PriceUnit.MEGAPIXEL, 7_777)):
        endpoint = Endpoint.objects.create(owner="test", name=name, kind="text-to-image", weights="builtin:tiny-sd")
        Price.objects.create(endpoint=endpoint, unit=unit, unit_price_micros=micros)
        endpoints.append(endpoint)
    return organizations, endpoints


class Books(RuleBasedStateMachine):
    organizations: list[Organization]
    endpoints: list[Endpoint]

    @initialize()
    def open_books(self) -> None:
        # Each example runs in a savepoint of the test's transaction and is rolled back at teardown. What the cache
        # keeps (admission's measured GPU time per work unit) outlives it: each example starts without it.
        for endpoint in self.endpoints:
            pricing.forget_measurement(endpoint.pk)
        self.example = transaction.atomic()
        self.example.__enter__()
        self.jobs: list[Any] = []
        self.refunded: set[Any] = set()

    def teardown(self) -> None:
        if not hasattr(self, "example"):
            return
        try:
            self.bring_every_job_to_an_end()
        finally:
            transaction.set_rollback(True)
            self.example.__exit__(None, None, None)

    def bring_every_job_to_an_end(self) -> None:
        for job in Job.objects.filter(pk__in=self.jobs, status__in=NOT_FINAL):
            closing.cancel_job(job=job)
        for job in Job.objects.filter(pk__in=self.jobs, status=JobStatus.RUNNING):
            closing.finish_attempt(job_id=str(job.pk), attempt=job.attempt, outcome=AttemptOutcome.CANCELLED, gpu_ms=10)
        assert not Job.objects.filter(pk__in=self.jobs, status__in=NOT_FINAL).exists()
        assert total(Account.objects.filter(pk__in=[o.pk for o in self.organizations]), "held_micros") == 0
        assert not Hold.objects.filter(released_at__isnull=True).exists()
        run = run_reconciliation()
        assert run.drift == []
        assert run.ok
        assert run.checked["stripe"]["skipped"]

    def pick(self, data: st.DataObject, statuses: tuple[str, ...]) -> Job:
        candidates = list(Job.objects.filter(pk__in=self.jobs, status__in=statuses).order_by("created_at", "pk"))
        return data.draw(st.sampled_from(candidates))

    def any_in(self, *statuses: str) -> bool:
        return Job.objects.filter(pk__in=self.jobs, status__in=statuses).exists()

    # --- What customers, workers and operators do ------------------------------------------------------------

    @rule(
        organization=st.integers(0, 1),
        endpoint=st.integers(0, 2),
        num_images=st.integers(1, 3),
        steps=st.integers(1, 8),
    )
    def submit(self, organization: int, endpoint: int, num_images: int, steps: int) -> None:
        self.submit_request(organization, endpoint, num_images, steps)

    def submit_request(self, organization: int, endpoint: int, num_images: int, steps: int) -> Job | None:
        try:
            job = lifecycle.submit(
                self.organizations[organization],
                self.endpoints[endpoint],
                num_images=num_images,
                num_inference_steps=steps,
            )
        except submission.SubmissionRefused as refused:
            if (refused.status_code, refused.error_type) != (402, "insufficient_credits"):
                raise  # running out of credit is the only refusal these requests may meet
            return None
        self.jobs.append(job.pk)
        return job

    @rule(
        organization=st.integers(0, 1),
        endpoint=st.integers(0, 2),
        num_images=st.integers(1, 3),
        attempts=st.lists(ATTEMPTS, min_size=1, max_size=3),
        cancel_first=st.booleans(),
    )
    def a_whole_request(
        self,
        organization: int,
        endpoint: int,
        num_images: int,
        attempts: list[tuple[str, int, int, bool]],
        cancel_first: bool,
    ) -> None:
        """One request from submission to its end (most steps of a run are these; the rules below interleave)."""
        job = self.submit_request(organization, endpoint, num_images, 2)
        if job is None:
            return
        if cancel_first and len(attempts) == 1:
            closing.cancel_job(job=job)  # in the queue: never started, never billed
            return
        for outcome, gpu_ms, cold_start_ms, retry in attempts:
            job = lifecycle.start(job)
            self.finish_job(job, outcome, gpu_ms, cold_start_ms, retry)
            job.refresh_from_db()
            if job.is_final:
                return

    def finish_job(self, job: Job, outcome: str, gpu_ms: int, cold_start_ms: int, retry: bool) -> None:
        lifecycle.finish(
            job,
            outcome,
            gpu_ms=gpu_ms,
            cold_start_ms=cold_start_ms,
            error="" if outcome == AttemptOutcome.SUCCEEDED else "it went wrong",
            retry=retry and outcome in (AttemptOutcome.ERRORED, AttemptOutcome.LOST),
        )

    @precondition(lambda self: self.any_in(JobStatus.QUEUED, JobStatus.DISPATCHED))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        lifecycle.start(self.pick(data, (JobStatus.QUEUED, JobStatus.DISPATCHED)))

    @precondition(lambda self: self.any_in(JobStatus.RUNNING))
    @rule(data=st.data(), attempt=ATTEMPTS)
    def finish(self, data: st.DataObject, attempt: tuple[str, int, int, bool]) -> None:
        self.finish_job(self.pick(data, (JobStatus.RUNNING,)), *attempt)

    @precondition(lambda self: self.any_in(*NOT_FINAL))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = self.pick(data, NOT_FINAL)
        assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"

    @precondition(lambda self: self.any_in(JobStatus.RUNNING))
    @rule(data=st.data(), held_ms=st.integers(0, 30_000))
    def worker_dies(self, data: st.DataObject, held_ms: int) -> None:
        job = self.pick(data, (JobStatus.RUNNING,))
        attempt = job.attempts.get(number=job.attempt)
        job.attempts.filter(pk=attempt.pk).update(heartbeat_at=attempt.started_at + timedelta(milliseconds=held_ms))
        Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
        assert closing.reap_expired_leases() == 1

    @rule(organization=st.integers(0, 1), amount=st.integers(-500_000, 3_000_000).filter(bool))
    def credit(self, organization: int, amount: int) -> None:
        """A grant, or an operator's adjustment of either sign (a negative one may take the balance below zero)."""
        kind = EntryKind.GRANT if amount > 0 and amount % 2 else EntryKind.ADJUSTMENT
        grant_credits(organization=self.organizations[organization], amount_micros=amount, reason="test", kind=kind)

    @precondition(lambda self: self.any_in(*FINAL_STATUSES))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        refund_once(self.pick(data, FINAL_STATUSES), refunded=self.refunded)

    @precondition(lambda self: self.any_in(JobStatus.FAILED, JobStatus.CANCELLED))
    @rule(data=st.data())
    def requeue(self, data: st.DataObject) -> None:
        """An operator's requeue of a failed or cancelled request (an archived one, or one the credit no longer covers,
        is refused and left as it was)."""
        job = self.pick(data, (JobStatus.FAILED, JobStatus.CANCELLED))
        self.requeue_if_allowed(job)

    def requeue_if_allowed(self, job: Job) -> None:
        try:
            requeue_job(job=job)
        except RequeueRefused as refused:
            if refused.error_type not in ("insufficient_credits", "request_archived"):
                raise  # running out of credit, or an archived request, are the only refusals it may meet

    @precondition(lambda self: self.any_in(*FINAL_STATUSES))
    @rule(data=st.data(), requeue_as_it_runs=st.booleans())
    def archive_old_requests(self, data: st.DataObject, requeue_as_it_runs: bool) -> None:
        """The requests that ended are aged past the retention period and archived (those that never started,
        deleted); ``requeue_as_it_runs``: an operator requeues one of them as the archive reaches it."""
        aged = Job.objects.filter(pk__in=self.jobs, status__in=FINAL_STATUSES, archived_at__isnull=True)
        ended_long_ago = timezone.now() - timedelta(days=django_settings.JOB_RETENTION_DAYS + 1)
        aged.update(finished_at=ended_long_ago, outputs_expire_at=None)
        requeueable = (JobStatus.FAILED, JobStatus.CANCELLED)
        chosen = self.pick(data, requeueable) if requeue_as_it_runs and self.any_in(*requeueable) else None
        delete, archive_one = archive._delete, archive._archive

        def requeued_then_deleted(job_ids: list[Any], *args: Any) -> set[Any]:
            if chosen is not None and chosen.pk in job_ids:
                self.requeue_if_allowed(chosen)
            return delete(job_ids, *args)

        def requeued_then_archived(job_id: Any, *args: Any) -> int:
            if chosen is not None and chosen.pk == job_id:
                self.requeue_if_allowed(chosen)
            return archive_one(job_id, *args)

        with (
            mock.patch.object(archive, "_delete", requeued_then_deleted),
            mock.patch.object(archive, "_archive", requeued_then_archived),
        ):
            archive.archive_old_jobs()

    @rule(micros=st.integers(0, 5_000))
    def change_the_cpu_price(self, micros: int) -> None:
        Price.objects.create(gpu_class="cpu", unit_price_micros=micros)

    # --- What must hold after every step ---------------------------------------------------------------------

    @invariant()
    def balances_are_the_ledger(self) -> None:
        entries = CreditEntry.objects.filter(organization_id=OuterRef("pk")).order_by("-id")
        accounts = Account.objects.filter(pk__in=[o.pk for o in self.organizations]).annotate(
            entries_sum=Subquery(
                entries.order_by().values("organization_id").annotate(total=Sum("amount_micros")).values("total")
            ),
            latest_balance_after=Subquery(entries.values("balance_after_micros")[:1]),
        )
        for balance, entries_sum, latest in accounts.values_list(
            "balance_micros", "entries_sum", "latest_balance_after"
        ):
            assert balance == entries_sum == latest  # every organization has its sign-up grant at least

    @invariant()
    def usage_costs_are_the_usage_debits(self) -> None:
        costs = dict(
            UsageRecord.objects.filter(billable=True)
            .values_list("organization_id")
            .annotate(total=Sum("cost_micros"))
            .order_by()
        )
        debits = dict(
            CreditEntry.objects.filter(kind=EntryKind.USAGE)
            .values_list("organization_id")
            .annotate(total=-Sum("amount_micros"))
            .order_by()
        )
        assert {organization: cost for organization, cost in costs.items() if cost} == debits  # free runs debit nothing
        # No usage without its job, nor of a job that never ran (the constraint keeps unbilled records at zero cost).
        assert UsageRecord.objects.filter(job__in=self.jobs, job__attempt__gt=0).count() == UsageRecord.objects.count()

    @invariant()
    def held_is_the_open_holds(self) -> None:
        open_holds = Hold.objects.filter(organization_id=OuterRef("pk"), released_at__isnull=True).order_by()
        accounts = Account.objects.filter(pk__in=[o.pk for o in self.organizations]).annotate(
            open_sum=Coalesce(
                Subquery(open_holds.values("organization_id").annotate(total=Sum("amount_micros")).values("total")), 0
            )
        )
        held = list(accounts.values_list("held_micros", "open_sum"))
        assert all(held_micros == open_sum for held_micros, open_sum in held)
        assert not Hold.objects.filter(released_at__isnull=True, job__status__in=FINAL_STATUSES).exists()
        if not self.any_in(*NOT_FINAL):
            assert all(held_micros == 0 for held_micros, _ in held)


def test_the_books_balance_under_any_sequence_of_operations(world: tuple[list[Organization], list[Endpoint]]) -> None:
    Books.organizations, Books.endpoints = world
    run_state_machine_as_test(
        Books,
        settings=settings(STATE_MACHINES, max_examples=25, stateful_step_count=15),
    )
