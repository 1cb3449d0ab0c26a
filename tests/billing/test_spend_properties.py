"""The money guarantee under any interleaving of one organization's jobs (docs/money.md).

A Hypothesis state machine runs several jobs of one organization with little credit, a monthly budget, a key's
monthly limit, a monthly limit on the member who made the key (shared by every key they made, and they make more as
it runs; a billing manager raises it) and end user tags with limits of their own (which the reseller raises), step
by step as workers do:
each step first asks billing to extend the job's hold (``attempts.reserve_work``) and stops the job where it is
refused; a finished job may measure more GPU time than it reserved; operators grant credit or take it back (a
refunded or disputed payment); prices change. After every step:

- usage never took the balance below zero (every usage debit leaves it >= 0);
- no job was debited more than its hold;
- spending stays within the budget and the key's limit;
- the member's spend (over all their keys) plus what their keys' running requests hold stays within the member's
  limit, however many keys they made and whichever of them each request was sent with;
- each end user tag's spend plus what its running requests hold stays within the tag's limit (the hold invariant
  of a tag: admission and every reservation hold within it, and a settlement never debits beyond the hold);
- what is held is the sum of open holds, and never more than the balance unless credit was taken back;
- a request whose start deadline passes before it started ends unbilled with its hold released; a started one runs on.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from accounts.models import ApiKey, Scope, User
from accounts.services import create_api_key
from billing import controls, end_users, pricing
from billing.admission import member_held, member_spent_this_month, month_start, spent_this_month
from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Hold, Price, UsageRecord
from inference import attempts, closing, submission
from inference.hooks import Refusal
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus
from tests import lifecycle
from tests.billing.conftest import OneOrganization

pytestmark = pytest.mark.django_db

TAGS = ("alice", "bob")
MOST_KEYS = 4  # the member's keys, the one they start with included


class Spending(OneOrganization):
    member: User  # who made ``api_key``: the member whose limit the machine sets

    @initialize(
        credit=st.integers(0, 60_000),
        budget=st.one_of(st.none(), st.integers(0, 80_000)),
        key_limit=st.one_of(st.none(), st.integers(0, 80_000)),
        member_limit=st.one_of(st.none(), st.integers(0, 20_000)),
        tag_limits=st.fixed_dictionaries({tag: st.one_of(st.none(), st.integers(0, 40_000)) for tag in TAGS}),
    )
    def open_books(
        self,
        credit: int,
        budget: int | None,
        key_limit: int | None,
        member_limit: int | None,
        tag_limits: dict[str, int | None],
    ) -> None:
        # What the cache keeps (admission's measured GPU time per work unit) outlives the rolled-back example: each
        # example starts without it, so a replay of an example decides exactly as the example did.
        pricing.forget_measurement(self.endpoint.pk)
        self.example = transaction.atomic()
        self.example.__enter__()
        account = Account.objects.get(pk=self.organization.pk)
        # Start from exactly ``credit`` (the sign-up grant taken back or topped up).
        if account.balance_micros != credit:
            grant_credits(
                organization=self.organization,
                amount_micros=credit - account.balance_micros,
                reason="start",
                kind=EntryKind.ADJUSTMENT,
            )
        controls.set_monthly_budget(organization=self.organization, budget_micros=budget)
        controls.set_key_limit(api_key=self.api_key, monthly_limit_micros=key_limit)
        controls.set_member_limit(organization=self.organization, user=self.member, monthly_limit_micros=member_limit)
        self.keys: list[ApiKey] = [self.api_key]  # the member's keys (only the first has a limit of its own)
        self.member_limit = member_limit
        for tag, limit in tag_limits.items():
            if limit is not None:
                end_users.set_end_user_limit(organization=self.organization, end_user=tag, monthly_limit_micros=limit)
        self.budget, self.key_limit, self.tag_limits = budget, key_limit, tag_limits
        self.taken_back = False
        # Per running job: GPU ms used so far by its current attempt.
        self.used: dict[Any, int] = {}
        self.started: set[Any] = set()
        self.past_deadline: set[Any] = set()  # jobs whose start deadline the test made pass
        self.jobs: list[Any] = []

    def teardown(self) -> None:
        if hasattr(self, "example"):
            transaction.set_rollback(True)
            self.example.__exit__(None, None, None)

    def running(self) -> list[Job]:
        return list(Job.objects.filter(pk__in=self.jobs, status=JobStatus.RUNNING).order_by("created_at", "pk"))

    def waiting(self) -> list[Job]:
        return list(
            Job.objects.filter(pk__in=self.jobs, status__in=(JobStatus.QUEUED, JobStatus.DISPATCHED)).order_by(
                "created_at", "pk"
            )
        )

    def startable(self) -> list[Job]:
        """Waiting jobs a worker may still claim: none past its start deadline (a retry included) is started."""
        return [job for job in self.waiting() if job.pk not in self.past_deadline]

    # --- What customers, workers and operators do ------------------------------------------------------------

    @precondition(lambda self: hasattr(self, "keys"))
    @rule(steps=st.integers(1, 8), data=st.data(), end_user=st.sampled_from(["", *TAGS]))
    def submit(self, steps: int, data: st.DataObject, end_user: str) -> None:
        try:
            job = lifecycle.submit(
                self.organization,
                self.endpoint,
                api_key=data.draw(st.sampled_from([None, *self.keys])),
                end_user=end_user,
                num_inference_steps=steps,
            )
        except submission.SubmissionRefused as refused:
            if refused.status_code != 402:
                raise  # credit, budget, the key's, the member's or the tag's limit: the only refusals these may meet
            return
        self.jobs.append(job.pk)

    @precondition(lambda self: bool(self.startable()))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        job = lifecycle.start(data.draw(st.sampled_from(self.startable())))
        self.used[job.pk] = 0
        self.started.add(job.pk)

    @precondition(lambda self: bool(self.running()))
    @rule(data=st.data(), step_ms=st.integers(1, 40_000), ahead_ms=st.integers(0, 100_000))
    def step(self, data: st.DataObject, step_ms: int, ahead_ms: int) -> None:
        """A worker about to run one more step: reserved first, or the job stops before it."""
        job = data.draw(st.sampled_from(self.running()))
        answer = attempts.reserve_work(job=job, gpu_ms=self.used[job.pk] + step_ms, ahead_ms=ahead_ms)
        if isinstance(answer, Refusal):
            self.close(job, AttemptOutcome.CANCELLED, self.used[job.pk])
            return
        if answer.covered_gpu_ms is not None:
            assert answer.covered_gpu_ms >= self.used[job.pk] + step_ms
        self.used[job.pk] += step_ms

    @precondition(lambda self: bool(self.running()))
    @rule(data=st.data(), overrun_ms=st.integers(0, 20_000), outcome=st.sampled_from(list(AttemptOutcome)[1:]))
    def finish(self, data: st.DataObject, overrun_ms: int, outcome: AttemptOutcome) -> None:
        """The attempt ends, having measured up to ``overrun_ms`` more than it reserved (decoding, storing)."""
        job = data.draw(st.sampled_from(self.running()))
        self.close(job, outcome, self.used[job.pk] + overrun_ms)

    def close(self, job: Job, outcome: AttemptOutcome, gpu_ms: int) -> None:
        held = Hold.objects.get(job=job).amount_micros
        charged_before = self.charged(job)
        lifecycle.finish(job, outcome, gpu_ms=gpu_ms, reserve=False, retry=outcome == AttemptOutcome.ERRORED)
        # Never debited more than its hold.
        assert self.charged(job) - charged_before <= held
        self.used.pop(job.pk, None)
        job.refresh_from_db()
        if job.status == JobStatus.QUEUED:  # retried: only while its start deadline has not passed
            assert job.pk not in self.past_deadline

    @staticmethod
    def charged(job: Job) -> int:
        return int(UsageRecord.objects.filter(job=job).aggregate(total=Sum("cost_micros"))["total"] or 0)

    @precondition(lambda self: bool(self.waiting() or self.running()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.waiting() + self.running()))
        assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"
        if job.status == JobStatus.RUNNING:
            self.close(job, AttemptOutcome.CANCELLED, self.used[job.pk])

    @precondition(lambda self: bool(self.waiting() or self.running()))
    @rule(data=st.data())
    def a_start_deadline_passes(self, data: st.DataObject) -> None:
        """The request's X-Fal-Request-Timeout runs out: one still waiting ends unbilled, a started one runs on."""
        job = data.draw(st.sampled_from(self.waiting() + self.running()))
        charged_before = self.charged(job)
        Job.objects.filter(pk=job.pk).update(start_deadline=timezone.now() - timedelta(seconds=1))
        self.past_deadline.add(job.pk)
        closing.expire_unstarted()
        job.refresh_from_db()
        if job.pk in self.used:  # it is running: it runs on (and, should the platform fail it, is not retried)
            assert job.status == JobStatus.RUNNING
            return
        # Waiting (never started, or queued again after the platform failed an attempt): it ends, and this adds
        # no charge (a failed attempt was never billed either).
        assert (job.status, job.error_type) == (JobStatus.CANCELLED, "timeout")
        assert (job.started_at is None) == (job.pk not in self.started)
        assert self.charged(job) == charged_before == 0
        assert not Hold.objects.filter(job=job, released_at__isnull=True).exists()

    @rule(amount=st.integers(1, 40_000), take_back=st.booleans())
    def credit(self, amount: int, take_back: bool) -> None:
        """A grant, or credit taken back (a refunded or disputed payment: the balance may go below zero)."""
        grant_credits(
            organization=self.organization,
            amount_micros=-amount if take_back else amount,
            reason="property test",
            kind=EntryKind.ADJUSTMENT if take_back else EntryKind.GRANT,
        )
        self.taken_back |= take_back

    @precondition(lambda self: hasattr(self, "tag_limits"))
    @rule(tag=st.sampled_from(TAGS), more=st.integers(0, 20_000))
    def raise_a_tags_limit(self, tag: str, more: int) -> None:
        """A reseller gives its end user more room (or a limit where there was none)."""
        current = self.tag_limits[tag]
        if current is None:  # a limit where there was none starts from what the tag already spends and holds
            spent = end_users.spent_in_month(organization_id=self.organization.pk, end_user=tag, month=month_start())
            current = spent + end_users.held(self.organization.pk, tag)
        limit = current + more
        end_users.set_end_user_limit(organization=self.organization, end_user=tag, monthly_limit_micros=limit)
        self.tag_limits[tag] = limit

    @precondition(lambda self: len(getattr(self, "keys", ())) < MOST_KEYS)
    @rule()
    def the_member_makes_another_key(self) -> None:
        """The limited member makes a new key, with no limit of its own, to escape the limit (it must not)."""
        key, _ = create_api_key(
            organization=self.organization, name="another", scopes=[Scope.INFERENCE], created_by=self.member
        )
        self.keys.append(key)

    @precondition(lambda self: hasattr(self, "member_limit"))
    @rule(more=st.integers(0, 20_000))
    def raise_the_member_s_limit(self, more: int) -> None:
        """A billing manager gives the member more room (or a limit where there was none)."""
        current = self.member_limit
        if current is None:  # a limit where there was none starts from what the member already spends and holds
            current = self.member_spent_and_held()
        self.member_limit = current + more
        controls.set_member_limit(
            organization=self.organization, user=self.member, monthly_limit_micros=self.member_limit
        )

    def member_spent_and_held(self) -> int:
        spent = member_spent_this_month(organization_id=self.organization.pk, user_id=self.member.pk)
        return spent + member_held(organization_id=self.organization.pk, user_id=self.member.pk)

    @rule(micros=st.integers(0, 5_000))
    def change_the_price(self, micros: int) -> None:
        Price.objects.create(gpu_class="cpu", unit_price_micros=micros)

    # --- What must hold after every step ---------------------------------------------------------------------

    @invariant()
    def usage_never_takes_the_balance_below_zero(self) -> None:
        usage = CreditEntry.objects.filter(organization=self.organization, kind=EntryKind.USAGE)
        assert not usage.filter(balance_after_micros__lt=0).exists()

    @invariant()
    def spending_stays_within_the_budget_and_the_keys_limit(self) -> None:
        if hasattr(self, "budget") and self.budget is not None:
            assert spent_this_month(organization_id=self.organization.pk) <= self.budget
        if hasattr(self, "key_limit") and self.key_limit is not None:
            assert spent_this_month(organization_id=self.organization.pk, key_id=self.api_key.pk) <= self.key_limit

    @invariant()
    def the_member_spends_and_holds_within_their_limit_over_all_their_keys(self) -> None:
        if getattr(self, "member_limit", None) is not None:
            assert self.member_spent_and_held() <= self.member_limit, (self.member_limit, len(self.keys))

    @invariant()
    def each_tag_spends_and_holds_within_its_limit(self) -> None:
        month = month_start()
        for tag, limit in getattr(self, "tag_limits", {}).items():
            if limit is None:
                continue
            spent = end_users.spent_in_month(organization_id=self.organization.pk, end_user=tag, month=month)
            assert spent + end_users.held(self.organization.pk, tag) <= limit, (tag, limit)

    @invariant()
    def held_is_the_open_holds_and_backed_by_the_balance(self) -> None:
        account = Account.objects.get(pk=self.organization.pk)
        open_holds = Hold.objects.filter(organization=self.organization, released_at__isnull=True)
        assert account.held_micros == int(open_holds.aggregate(total=Sum("amount_micros"))["total"] or 0)
        if not getattr(self, "taken_back", True):
            assert account.balance_micros >= account.held_micros


def test_usage_stays_within_credit_holds_budget_key_and_member_limits(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, quiet_books: None
) -> None:
    Spending.member = tenant["user"]  # who made the tenant's key
    Spending.run_for(tenant, builtin_endpoint, max_examples=40, steps=25)
