"""Reconciliation: every night, prove that the books agree with themselves and with Stripe.

Each check compares two records of the same money or time that are written together (a closed attempt and
its usage record, a usage record and its debit, the entries and the cached balance, raw usage and its
rollups, a payment and its credit) and reports every disagreement. Expected: none. Each check is a fixed
number of aggregate queries, whatever the number of rows; Python only compares grouped sums.

What a run stores (``ReconciliationRun``):

- ``checked``: ``{check: {"checked": rows looked at, "drift": discrepancies found, ...}}``, plus a check's
  own figures (``unbilled_never_started`` for jobs; ``skipped`` with the reason when a check could not run);
- ``drift``: one item per kind of discrepancy, ``{"check", "kind", "count", "examples"}``, with at most
  ``EXAMPLES_PER_KIND`` example rows (ids, both sides, the difference);
- ``ok``: no drift in any check. A skipped check (Stripe without a key) is recorded as skipped, not passed.

On PostgreSQL the database checks read one REPEATABLE READ snapshot, so work that commits meanwhile cannot
show up as drift. On SQLite (the embedded run, where a transaction would take the write lock and stall the
worker) each query reads the latest commit.

Full and incremental runs. A full run checks every row, which grows with history (14 s at 1M usage records on
PostgreSQL). An incremental run (the nightly default) checks what was written since the last *proven* run: the
latest one whose database checks all ran and found nothing stores its start as ``watermark``, and the next run
checks the rows stamped from that watermark less ``BILLING_RECONCILE_OVERLAP_SECONDS`` (``since``). A row is
stamped in Python before its transaction commits, so one committed after that run's snapshot may carry an
earlier time; the overlap bounds the stamp-to-commit delay (and clock skew) tolerated. A run that found drift,
or could not run a check, proves nothing and moves no watermark: the next run looks again from the same place
and keeps reporting drift in new rows until it is corrected. The first run ever is full, and so is one asked for
(``full=True``: weekly in the beat schedule, ``manage.py reconcile --full``, the admin's button), and one whose
last proof is older than ``BILLING_RECONCILE_MAX_WINDOW_DAYS``.

On PostgreSQL an incremental run's snapshot turns hash and merge joins off (``_snapshot``): its queries start from
the window and reach the rest through indexes, which the planner's default costs would trade for scans of whole
tables. Its cost grows with what was written since the last proof, not with history.

What an incremental run checks, and why that suffices when older rows were proven and are left alone (an edit
of an old row, which no writer makes, is what the weekly full run is for):

- jobs, attempts: those that ended since (``finished_at``; indexed), and any final or closed one never stamped;
- usage records and their debits: records stamped since (``recorded_at``), entries posted since (``created_at``),
  each against its other half wherever that lies (a debit carries its record's stamp, so both halves fall in the
  same window, day and month). The per-organization totals follow from those row checks (a one-to-one pairing of
  equal amounts) and are compared in full runs only;
- the ledger chain: each entry posted since against the entry before it, which may be older (one indexed lookup
  per entry). With the chain proven to the newest entry, the latest ``balance_after_micros`` is the sum of all
  entries, so every account's cached balance is compared with its latest entry (one indexed lookup per account):
  this catches a balance overwritten without any entry, which no window on the entries would. The sum of all
  entries itself is a full run's;
- active jobs: every organization's active jobs as its dispatch reads them against its jobs counted (a job's
  lifecycle, not money: a disagreement would hold a queue back or pass a concurrency limit);
- holds: every account's held amount against its open holds, every open hold (few: jobs in flight), and the holds
  placed since (``created_at``, set again on a requeue's new hold);
- rollups: the UTC days of the usage records stamped since, each compared in full (raw records of those days
  against their day rollups, their hour rollups against those days); the end user tags' day rows likewise;
- what the rollups say refunds gave back: the request refunds posted since, each against its records, and each
  organization's UTC days that its usage records stamped since were added to or those refunds gave back in (the days
  of the refunded requests' records, however old), each organization's day whole;
- payments: those created, paid (``succeeded_at``) or credited, refunded or disputed (an entry) since, and every
  pending one;
- receipts: the payments paid since (each has its receipt) and the receipts issued since (each matches its payment);
- statements: those issued since, and those of months ending after the window opens, against the ledger.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import stripe
from django.conf import settings
from django.db import connection, transaction
from django.db.models import (
    BigIntegerField,
    Count,
    Exists,
    F,
    FilteredRelation,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    Window,
)
from django.db.models.functions import Coalesce, Lag, TruncDay, TruncMonth
from django.utils import timezone

from accounts.models import ApiKey
from billing import metering
from billing.models import (
    NO_KEY,
    Account,
    CreditEntry,
    EndUserRollup,
    EntryKind,
    Granularity,
    Hold,
    Payment,
    PaymentStatus,
    Receipt,
    ReconciliationRun,
    ReconciliationScope,
    Statement,
    UsageRecord,
    UsageRollup,
)
from billing.money import MICROS_PER_CENT, cents_to_micros
from billing.stripe_client import field as stripe_field
from billing.stripe_client import object_id, stripe_client
from inference import active_jobs
from inference.models import (
    BILLABLE_OUTCOMES,
    FINAL_STATUSES,
    ActiveJobCount,
    AttemptOutcome,
    Endpoint,
    Job,
    JobAttempt,
    JobStatus,
)

logger = logging.getLogger(__name__)

EXAMPLES_PER_KIND = 20
ROLLUP_SUMS = (
    "attempts",
    "billable_attempts",
    "gpu_ms",
    "unbilled_gpu_ms",
    "cost_micros",
    "work_units",
    "video_ms",
    "audio_ms",
)
CREDITED_KINDS = (EntryKind.PURCHASE, EntryKind.AUTO_TOP_UP)  # the entry that buys credits with a payment


@dataclass(frozen=True)
class Scope:
    """What a run covers: every row (``since`` is None), or the rows written from ``since`` on."""

    since: datetime | None = None

    @property
    def full(self) -> bool:
        return self.since is None

    def written(self, rows: QuerySet[Any], stamp: str) -> QuerySet[Any]:
        """``rows`` stamped in the window by ``stamp`` (an indexed column); all of them in a full run."""
        return rows if self.since is None else rows.filter(**{f"{stamp}__gte": self.since})

    def ended(self, rows: QuerySet[Any]) -> list[QuerySet[Any]]:
        """``rows`` that ended in the window by ``finished_at``, and apart those with no end stamped (rows still open,
        few: work in flight; and any closed without one, which a window on the stamp would never see).

        Two parts, not one OR: each is a range of the ``finished_at`` index, where ``>= since OR IS NULL`` would be
        a bitmap scan that PostgreSQL prices as if the window's rows lay all over the table, and so scans it all.
        """
        if self.since is None:
            return [rows]
        return [rows.filter(finished_at__gte=self.since), rows.filter(finished_at__isnull=True)]


FULL = Scope()


@dataclass
class Check:
    """One check's findings: how many rows it looked at, and each kind of drift with examples."""

    name: str
    checked: int = 0
    drift_count: int = 0
    drift: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    skipped: str = ""

    def found(self, kind: str, count: int, examples: Iterable[Mapping[str, Any]]) -> None:
        if count:
            self.drift_count += count
            shown = [_plain(example) for _, example in zip(range(EXAMPLES_PER_KIND), examples, strict=False)]
            self.drift.append({"check": self.name, "kind": kind, "count": count, "examples": shown})

    def found_in(self, kind: str, rows: QuerySet[Any] | Sequence[QuerySet[Any]], *fields: str) -> None:
        """Drift of this kind is every row of ``rows``, or of each part of it (counted in SQL; a few fetched as
        examples)."""
        parts = [rows] if isinstance(rows, QuerySet) else list(rows)
        count = sum(part.count() for part in parts)
        if count:
            examples = itertools.chain.from_iterable(part.values(*fields)[:EXAMPLES_PER_KIND] for part in parts)
            self.found(kind, count, examples)

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"checked": self.checked, "drift": self.drift_count, **self.figures}
        if self.skipped:
            summary["skipped"] = self.skipped
        return summary


def _plain(value: Any) -> Any:
    """JSON for the run's drift list: ids and moments as strings, amounts as integers."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    return value


def _total(column: str) -> Coalesce:
    return Coalesce(Sum(column), Value(0), output_field=BigIntegerField())


def _sum_per_organization(queryset: QuerySet[Any], column: str) -> Coalesce:
    """A correlated SUM over ``queryset`` for each account row (0 when it has none)."""
    summed = queryset.filter(organization_id=OuterRef("pk")).order_by().values("organization_id")
    subquery = Subquery(summed.annotate(total=Sum(column)).values("total"), output_field=BigIntegerField())
    return Coalesce(subquery, Value(0), output_field=BigIntegerField())


# --- Jobs, attempts and usage records ----------------------------------------------------------------------


def check_jobs(scope: Scope = FULL) -> Check:
    """Every final job ran at least one attempt, or ended (cancelled or failed) before it ever started."""
    check = Check("jobs")
    final = scope.ended(Job.objects.filter(status__in=FINAL_STATUSES))
    has_attempt = Exists(JobAttempt.objects.filter(job_id=OuterRef("pk")))
    never_started = 0
    for part in final:
        counts = part.aggregate(
            jobs=Count("pk"),
            never_started=Count("pk", filter=~Q(has_attempt) & ~Q(status=JobStatus.COMPLETED)),
        )
        check.checked += counts["jobs"]
        never_started += counts["never_started"]
    check.figures["unbilled_never_started"] = never_started
    fields = ("id", "organization_id", "status", "finished_at")
    check.found_in(
        "completed_without_attempt", [part.filter(~has_attempt, status=JobStatus.COMPLETED) for part in final], *fields
    )
    open_attempt = Exists(JobAttempt.objects.filter(job_id=OuterRef("pk"), outcome=AttemptOutcome.RUNNING))
    check.found_in("final_job_with_open_attempt", [part.filter(open_attempt) for part in final], *fields)
    # An accepted cancel is never lost: no attempt may start after it (an operator's requeue clears the request).
    started_after_cancel = scope.ended(
        JobAttempt.objects.filter(
            job__cancel_requested_at__isnull=False, started_at__gt=F("job__cancel_requested_at")
        ).annotate(cancel_requested_at=F("job__cancel_requested_at"))
    )
    check.found_in(
        "ran_after_its_cancel_was_accepted",
        started_after_cancel,
        *("job_id", "number", "started_at", "cancel_requested_at", "outcome"),
    )
    return check


def check_attempts(scope: Scope = FULL) -> Check:
    """Every closed attempt (final or retried) has exactly one usage record (the unique constraint: at most one)."""
    check = Check("attempts")
    closed = scope.ended(JobAttempt.objects.exclude(outcome=AttemptOutcome.RUNNING))
    check.checked = sum(part.count() for part in closed)
    recorded = Exists(UsageRecord.objects.filter(job_id=OuterRef("job_id"), attempt_number=OuterRef("number")))
    check.found_in(
        "closed_attempt_without_usage",
        [part.filter(~recorded) for part in closed],
        *("job_id", "number", "outcome", "gpu_ms", "finished_at"),
    )
    return check


def check_usage_records(scope: Scope = FULL) -> Check:
    """Every usage record belongs to a closed attempt of its job, and says what that attempt says."""
    check = Check("usage_records")
    in_scope = scope.written(UsageRecord.objects.all(), "recorded_at")
    # The attempt's columns as plain values of one LEFT JOIN: conditions on them never fan out into subqueries.
    records = in_scope.annotate(
        attempt=FilteredRelation("job__attempts", condition=Q(job__attempts__number=F("attempt_number")))
    ).annotate(
        attempt_id=F("attempt__id"),
        attempt_outcome=F("attempt__outcome"),
        attempt_gpu_ms=F("attempt__gpu_ms"),
        attempt_cold_start_ms=F("attempt__cold_start_ms"),
        attempt_wasted_ms=F("attempt__wasted_ms"),
        job_organization_id=F("job__organization_id"),
        total_ms=F("gpu_ms") + F("unbilled_gpu_ms"),
    )
    check.checked = in_scope.count()
    fields = ("id", "job_id", "attempt_number", "organization_id", "outcome", "gpu_ms", "unbilled_gpu_ms")
    unclosed = Q(attempt_id__isnull=True) | Q(attempt_outcome=AttemptOutcome.RUNNING)
    check.found_in("usage_without_closed_attempt", records.filter(unclosed).order_by("id"), *fields)
    attempt_billable = Q(attempt_outcome__in=BILLABLE_OUTCOMES)
    disagrees = (
        ~Q(organization_id=F("job_organization_id"))
        | ~Q(outcome=F("attempt_outcome"))
        | (Q(billable=True) & ~attempt_billable)
        | (Q(billable=False) & attempt_billable)
        # GPU time is conserved: billed plus unbilled is the attempt's whole time, cold start and waste included...
        | ~Q(total_ms=F("attempt_gpu_ms") + F("attempt_cold_start_ms") + F("attempt_wasted_ms"))
        # ...and a billable attempt is billed for no more than its time (less where its hold ran out first).
        | (Q(billable=True) & Q(gpu_ms__gt=F("attempt_gpu_ms")))
    )
    check.found_in(
        "usage_disagrees_with_attempt",
        records.exclude(unclosed).filter(disagrees).order_by("id"),
        *fields,
        "job_organization_id",
        "attempt_outcome",
        "attempt_gpu_ms",
        "attempt_cold_start_ms",
        "attempt_wasted_ms",
    )
    return check


# --- Usage against the credit ledger ----------------------------------------------------------------------


def check_usage_debits(scope: Scope = FULL) -> Check:
    """Each billable record's cost is debited once, as exactly its cost; per organization the totals agree (full runs:
    the totals follow from the rows, and an incremental run checks the rows of its window)."""
    check = Check("usage_debits")
    billable = scope.written(UsageRecord.objects.filter(billable=True), "recorded_at")
    entries = scope.written(CreditEntry.objects.all(), "created_at")
    debits = entries.filter(kind=EntryKind.USAGE)
    check.checked = billable.count() + debits.count()
    check.found_in(
        "billable_usage_without_debit",
        billable.filter(cost_micros__gt=0, credit_entry__isnull=True),
        "id",
        "job_id",
        "attempt_number",
        "organization_id",
        "cost_micros",
    )
    check.found_in(
        "debit_differs_from_cost",
        debits.exclude(
            amount_micros=-F("usage_record__cost_micros"), organization_id=F("usage_record__organization_id")
        )
        .annotate(cost_micros=F("usage_record__cost_micros"), record_organization_id=F("usage_record__organization_id"))
        .order_by("id"),
        "id",
        "usage_record_id",
        "organization_id",
        "amount_micros",
        "cost_micros",
        "record_organization_id",
    )
    check.found_in(
        "usage_record_on_other_entry",
        entries.filter(usage_record__isnull=False).exclude(kind=EntryKind.USAGE).order_by("id"),
        "id",
        "kind",
        "usage_record_id",
        "amount_micros",
    )
    if not scope.full:
        return check
    costs = dict(billable.order_by().values_list("organization_id").annotate(total=_total("cost_micros")))
    debited = dict(debits.order_by().values_list("organization_id").annotate(total=_total("amount_micros")))
    differences = [
        {
            "organization_id": organization_id,
            "usage_cost_micros": costs.get(organization_id, 0),
            "usage_debits_micros": -debited.get(organization_id, 0),
            "difference_micros": costs.get(organization_id, 0) + debited.get(organization_id, 0),
        }
        for organization_id in sorted(costs.keys() | debited.keys(), key=str)
        if costs.get(organization_id, 0) + debited.get(organization_id, 0) != 0
    ]
    check.found("organization_usage_not_debited", len(differences), differences)
    return check


def check_balances(scope: Scope = FULL) -> Check:
    """The cached balance is the latest entry's balance_after (0 without entries) and, in a full run, the sum of the
    organization's entries: with the chain proven (``check_ledger_chain``) the first implies the second."""
    check = Check("balances")
    # The latest entry of each account: one lookup on the (organization, -id) index, not a sum over its entries.
    last_balance_after = Subquery(
        CreditEntry.objects.filter(organization_id=OuterRef("pk")).order_by("-id").values("balance_after_micros")[:1],
        output_field=BigIntegerField(),
    )
    accounts = Account.objects.annotate(
        last_balance_after_micros=Coalesce(last_balance_after, Value(0), output_field=BigIntegerField())
    )
    fields: tuple[str, ...] = ("organization_id", "balance_micros", "last_balance_after_micros")
    check.checked = accounts.count()
    if scope.full:
        accounts = accounts.annotate(entries_micros=_sum_per_organization(CreditEntry.objects.all(), "amount_micros"))
        fields = (*fields, "entries_micros")
        check.found_in(
            "balance_not_sum_of_entries",
            accounts.exclude(balance_micros=F("entries_micros")).order_by("pk"),
            *fields,
        )
    check.found_in(
        "balance_not_last_balance_after",
        accounts.exclude(balance_micros=F("last_balance_after_micros")).order_by("pk"),
        *fields,
    )
    orphans = (
        scope.written(CreditEntry.objects.all(), "created_at")
        .filter(~Exists(Account.objects.filter(pk=OuterRef("organization_id"))))
        .order_by()
        .values("organization_id")
        .annotate(entries=Count("id"), entries_micros=_total("amount_micros"))
    )
    orphan_rows = list(orphans)
    check.found("entries_without_account", len(orphan_rows), orphan_rows)
    return check


def check_ledger_chain(scope: Scope = FULL) -> Check:
    """Each entry's balance_after is the previous entry's (of its organization, by id) plus its amount.

    A full run reads every entry once, in order; an incremental one looks up the entry before each entry of its
    window, which may be older than the window (the (organization, -id) index).
    """
    check = Check("ledger_chain")
    in_scope = scope.written(CreditEntry.objects.all(), "created_at")
    chained: QuerySet[Any]
    if scope.full:
        chained = CreditEntry.objects.annotate(
            previous_balance_after_micros=Window(
                Lag("balance_after_micros"), partition_by=F("organization_id"), order_by=F("id").asc()
            )
        )
    else:
        previous = (
            CreditEntry.objects.filter(organization_id=OuterRef("organization_id"), id__lt=OuterRef("id"))
            .order_by("-id")
            .values("balance_after_micros")[:1]
        )
        chained = in_scope.annotate(previous_balance_after_micros=Subquery(previous, output_field=BigIntegerField()))
    check.checked = in_scope.count()
    broken = chained.exclude(
        balance_after_micros=Coalesce(F("previous_balance_after_micros"), Value(0), output_field=BigIntegerField())
        + F("amount_micros")
    ).order_by("id")
    check.found_in(
        "balance_after_breaks_the_chain",
        broken,
        "id",
        "organization_id",
        "kind",
        "amount_micros",
        "balance_after_micros",
        "previous_balance_after_micros",
    )
    # Usage is debited within the job's hold and never below zero (docs/money.md): only a refunded or disputed payment
    # may take a balance negative.
    check.found_in(
        "usage_took_the_balance_below_zero",
        in_scope.filter(kind=EntryKind.USAGE, balance_after_micros__lt=0).order_by("id"),
        "id",
        "organization_id",
        "job_id",
        "amount_micros",
        "balance_after_micros",
    )
    return check


def check_holds(scope: Scope = FULL) -> Check:
    """Held credit is the sum of open holds; a final job holds nothing; a hold belongs to its job's organization.

    Every run compares every account and every open hold (few: jobs in flight); an incremental run checks the
    organization of the open holds and those placed since, a full run of every hold.
    """
    check = Check("holds")
    open_holds = Hold.objects.filter(released_at__isnull=True)
    # Incremental: two parts, each read through its own index (see ``Scope.ended``), that never share a row.
    holds = (
        [Hold.objects.all()]
        if scope.full
        else [open_holds, scope.written(Hold.objects.filter(released_at__isnull=False), "created_at")]
    )
    accounts = Account.objects.annotate(open_holds_micros=_sum_per_organization(open_holds, "amount_micros"))
    check.checked = accounts.count() + sum(part.count() for part in holds)
    check.found_in(
        "held_not_sum_of_open_holds",
        accounts.exclude(held_micros=F("open_holds_micros")).order_by("pk"),
        "organization_id",
        "held_micros",
        "open_holds_micros",
    )
    check.found_in(
        "open_hold_for_final_job",
        open_holds.filter(job__status__in=FINAL_STATUSES).annotate(job_status=F("job__status")).order_by("pk"),
        "job_id",
        "organization_id",
        "amount_micros",
        "job_status",
        "created_at",
    )
    check.found_in(
        "hold_of_another_organization",
        [
            part.exclude(organization_id=F("job__organization_id"))
            .annotate(job_organization_id=F("job__organization_id"))
            .order_by("pk")
            for part in holds
        ],
        "job_id",
        "organization_id",
        "job_organization_id",
    )
    return check


def check_active_jobs(scope: Scope = FULL) -> Check:
    """Every organization's active jobs as its dispatch reads them (the rows the jobs table's triggers keep, on
    PostgreSQL) are its DISPATCHED and RUNNING jobs counted (``inference.active_jobs``): a sum above the count would
    hold its queue back, below it let the dispatch pass its concurrency limit. Every run, whatever its window (the
    jobs in flight are few). ``manage.py recount_active_jobs`` puts a disagreement right."""
    check = Check("active_jobs")
    if connection.vendor != "postgresql":
        return check  # the dispatch counts the jobs: nothing kept to compare
    if not active_jobs.triggers_in_place():
        # The dispatch of a process that found them so counts the jobs; one that found them in place reads rows
        # that nothing keeps now.
        check.found("triggers_missing", 1, [{"triggers": list(active_jobs.TRIGGERS)}])
        return check
    check.checked = ActiveJobCount.objects.values("organization_id").distinct().count()
    found = active_jobs.disagreements()
    check.found("sum_not_count", len(found), found)
    return check


# --- Rollups against raw usage ----------------------------------------------------------------------------


def _rollup_sums() -> dict[str, Any]:
    return {name: _total(name) for name in ROLLUP_SUMS}


def _differences(
    expected: dict[tuple[Any, ...], dict[str, int]],
    actual: dict[tuple[Any, ...], dict[str, int]],
    key_names: tuple[str, ...],
    expected_name: str,
    actual_name: str,
) -> list[dict[str, Any]]:
    zero = dict.fromkeys(ROLLUP_SUMS, 0)
    found = []
    for key in sorted(expected.keys() | actual.keys(), key=str):
        want, have = expected.get(key, zero), actual.get(key, zero)
        differing = {
            name: {expected_name: want[name], actual_name: have[name]}
            for name in ROLLUP_SUMS
            if want[name] != have[name]
        }
        if differing:
            found.append({**dict(zip(key_names, key, strict=True)), "differences": differing})
    return found


def _grouped(rows: Iterable[Mapping[str, Any]], key: Callable[[Mapping[str, Any]], tuple[Any, ...]]) -> dict[Any, Any]:
    return {key(row): {name: int(row[name]) for name in ROLLUP_SUMS} for row in rows}


def _on_day(moment: datetime) -> date:
    return moment.astimezone(UTC).date()


def _within_days(column: str, days: Iterable[date]) -> Q:
    """``column`` falls on one of these UTC days: one range per run of consecutive days (index range scans)."""
    ranges: list[tuple[datetime, datetime]] = []
    for day in sorted(set(days)):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], start + timedelta(days=1))
        else:
            ranges.append((start, start + timedelta(days=1)))
    within = Q(pk__in=[])  # no day: no row
    for start, end in ranges:
        within |= Q(**{f"{column}__gte": start, f"{column}__lt": end})
    return within


def check_rollups(scope: Scope = FULL) -> Check:
    """Daily rollups are the sums of raw usage (per organization, UTC day, endpoint, GPU class), and the hourly
    rollups of each day add up to that day's rows (per key too).

    Raw usage is compared without the key: a deleted API key empties its records' key (SET NULL) but not
    the rollups' ``key_id``; the hourly-against-daily comparison covers the key.

    An incremental run compares the days its window's usage records fall on, each day whole: the rollups of a
    day are sums over all of that day's records, old and new.
    """
    check = Check("rollups")
    records = UsageRecord.objects.order_by()
    rollups = UsageRollup.objects.order_by()
    if not scope.full:
        records, rollups = _whole_days_written(check, scope, records, rollups)
    raw = (
        records.annotate(day=TruncDay("recorded_at", tzinfo=UTC))
        .values("organization_id", "day", "endpoint_id", "gpu_class")
        .annotate(
            attempts=Count("id"),
            billable_attempts=Count("id", filter=Q(billable=True)),
            **{name: _total(name) for name in ROLLUP_SUMS if name not in ("attempts", "billable_attempts")},
        )
    )
    days = rollups.filter(granularity=Granularity.DAY)
    by_class = days.values("organization_id", "bucket_start", "endpoint_id", "gpu_class").annotate(**_rollup_sums())
    full_days = days.values("organization_id", "bucket_start", "endpoint_id", "key_id", "gpu_class").annotate(
        **_rollup_sums()
    )
    hours = (
        rollups.filter(granularity=Granularity.HOUR)
        .annotate(day=TruncDay("bucket_start", tzinfo=UTC))
        .values("organization_id", "day", "endpoint_id", "key_id", "gpu_class")
        .annotate(**_rollup_sums())
    )
    raw_sums = _grouped(raw, lambda r: (r["organization_id"], _on_day(r["day"]), r["endpoint_id"], r["gpu_class"]))
    day_sums = _grouped(
        by_class, lambda r: (r["organization_id"], _on_day(r["bucket_start"]), r["endpoint_id"], r["gpu_class"])
    )
    full_day_sums = _grouped(
        full_days,
        lambda r: (r["organization_id"], _on_day(r["bucket_start"]), r["endpoint_id"], r["key_id"], r["gpu_class"]),
    )
    hour_sums = _grouped(
        hours, lambda r: (r["organization_id"], _on_day(r["day"]), r["endpoint_id"], r["key_id"], r["gpu_class"])
    )
    check.checked = sum(group["attempts"] for group in raw_sums.values()) + len(full_day_sums)
    check.figures["groups"] = len(raw_sums)
    day_key = ("organization_id", "day", "endpoint_id", "gpu_class")
    differences = _differences(raw_sums, day_sums, day_key, "usage_records", "day_rollups")
    check.found("day_rollup_differs_from_usage", len(differences), differences)
    hour_key = ("organization_id", "day", "endpoint_id", "key_id", "gpu_class")
    differences = _differences(full_day_sums, hour_sums, hour_key, "day_rollup", "hour_rollups")
    check.found("hour_rollups_differ_from_day", len(differences), differences)
    return check


def _whole_days_written(check: Check, scope: Scope, records: Any, rollups: Any) -> tuple[Any, Any]:
    """An incremental run's records and day rows: every day its window's usage records fall on, each day whole (a
    day row sums all of that day's records, old and new); the days go in the check's figures."""
    stamped = scope.written(records, "recorded_at")
    touched = sorted(
        {
            _on_day(day)
            for day in stamped.annotate(day=TruncDay("recorded_at", tzinfo=UTC))
            .values_list("day", flat=True)
            .distinct()
        }
    )
    check.figures["days"] = [day.isoformat() for day in touched]
    return records.filter(_within_days("recorded_at", touched)), rollups.filter(_within_days("bucket_start", touched))


def check_end_user_rollups(scope: Scope = FULL) -> Check:
    """Each end user tag's day rows are the sums of its raw usage (per organization, UTC day, tag, endpoint).

    An incremental run compares the days its window's tagged usage records fall on, each day whole, as
    ``check_rollups`` does."""
    check = Check("end_user_rollups")
    records = UsageRecord.objects.order_by().exclude(end_user="")
    rollups = EndUserRollup.objects.order_by()
    if not scope.full:
        records, rollups = _whole_days_written(check, scope, records, rollups)
    raw = (
        records.annotate(day=TruncDay("recorded_at", tzinfo=UTC))
        .values("organization_id", "day", "end_user", "endpoint_id")
        .annotate(
            attempts=Count("id"),
            billable_attempts=Count("id", filter=Q(billable=True)),
            **{name: _total(name) for name in ROLLUP_SUMS if name not in ("attempts", "billable_attempts")},
        )
    )
    days = rollups.values("organization_id", "bucket_start", "end_user", "endpoint_id").annotate(
        **{name: _total(name) for name in ROLLUP_SUMS}
    )
    raw_sums = _grouped(raw, lambda r: (r["organization_id"], _on_day(r["day"]), r["end_user"], r["endpoint_id"]))
    day_sums = _grouped(
        days, lambda r: (r["organization_id"], _on_day(r["bucket_start"]), r["end_user"], r["endpoint_id"])
    )
    check.checked = sum(group["attempts"] for group in raw_sums.values())
    key = ("organization_id", "day", "end_user", "endpoint_id")
    differences = _differences(raw_sums, day_sums, key, "usage_records", "end_user_rollups")
    check.found("end_user_rollup_differs_from_usage", len(differences), differences)
    return check


# --- Refunds given back in the rollups --------------------------------------------------------------------

REFUND_BUCKET = ("organization_id", "day", "endpoint_id", "gpu_class", "key_id")
TAG_REFUND_BUCKET = ("organization_id", "day", "end_user", "endpoint_id")


def check_refunded_rollups(scope: Scope = FULL) -> Check:
    """What the rollups say refunds gave back of their cost (``refunded_micros``, which budgets and keys' and end users'
    limits take off spend: ``billing.models.net_spend``) is what the refunded usage cost, by the refunds' own
    definition of the records they gave back (``billing.metering.refunded_records``):

    - each request's refund (a refund entry with its job) is what its refunded records cost: all its request was billed
      until the refund, nothing an operator's run again billed after it;
    - per organization, UTC day, endpoint, GPU class and key, the day rows gave back what the refunded records of that
      day cost. A record without a key (made without one, or its key deleted since) comes off any row of its bucket
      whose key is not an existing key (``count_as_refunded``): those rows are compared together, as all zeros;
    - the hour rows of each day gave back what its day rows did, key by key alike;
    - per organization, UTC day, end user tag and endpoint, the tag's day row gave back what its refunded records
      cost: the same records as the usage rows', so the tags' rows agree with the organization's on tagged usage;
    - no row gave back less than nothing or more than it cost;
    - full runs: per organization, its request refunds add up to what its day rows gave back.

    Only the rows that gave something back are read: a row that gave back nothing is right wherever none of its
    records was refunded, which the records' side says. A full run reads the records of refunded requests (a
    semi-join on the request refunds). An incremental run compares each organization's UTC days that its window's
    usage records were added to, and those its window's refunds gave back in (the days of the refunded requests'
    records, however old), each organization's day whole; and the refunds posted in its window. An edit of another
    row is the weekly full run's. It reads every record of those days, each looking up its request's refund by its
    job, and a refunded request's records from its job's creation on (the months' partitions before it are not
    read): what it costs follows those days and that window, not the number of refunds made before
    (``tests/bench/refunded_reconciliation.py``).
    """
    check = Check("refunded_rollups")
    request_refunds = CreditEntry.objects.filter(kind=EntryKind.REFUND, job__isnull=False).order_by()
    refunds = scope.written(request_refunds, "created_at")
    records = UsageRecord.objects.order_by()
    rollups = UsageRollup.objects.order_by().exclude(refunded_micros=0)
    tag_rows = EndUserRollup.objects.order_by().exclude(refunded_micros=0)
    if scope.full:
        records = metering.of_refunded_requests(records)  # a semi-join on every refund: few records among all
    else:
        # Every record of its days, each looking up its request's refund: what those days hold is read, whatever the
        # number of refunds made before them.
        touched = _organization_days_touched(scope, refunds)
        check.figures["days"] = [day.isoformat() for day in sorted(touched)]
        check.figures["organization_days"] = sum(len(organizations) for organizations in touched.values())
        records = records.filter(_on_organization_days("recorded_at", touched))
        rollups = rollups.filter(_on_organization_days("bucket_start", touched))
        tag_rows = tag_rows.filter(_on_organization_days("bucket_start", touched))

    covered = (
        metering.refunded_records(
            # A record is never written before its job was created: the months' partitions before it are not read.
            UsageRecord.objects.filter(job_id=OuterRef("job_id"), recorded_at__gte=OuterRef("job__created_at"))
        )
        .order_by()
        .values("job_id")
        .annotate(total=Sum("cost_micros"))
        .values("total")
    )
    compared = refunds.annotate(
        records_micros=Coalesce(
            Subquery(covered, output_field=BigIntegerField()), Value(0), output_field=BigIntegerField()
        )
    )
    check.checked = refunds.count()
    check.found_in(
        "refund_differs_from_its_records",
        compared.exclude(amount_micros=F("records_micros")).order_by("pk"),
        *("id", "job_id", "organization_id", "created_at", "amount_micros", "records_micros"),
    )

    refunded: list[Any] = list(
        metering.refunded_records(records)
        .annotate(day=TruncDay("recorded_at", tzinfo=UTC))
        .values("organization_id", "day", "endpoint_id", "gpu_class", "api_key_id", "end_user")
        .annotate(micros=_total("cost_micros"), records=Count("id"))
    )
    # With each group, how many of its rows gave back less than nothing or more than they cost: the rows are read once.
    outside = Q(refunded_micros__lt=0) | Q(refunded_micros__gt=F("cost_micros"))
    given_back = {
        "outside": Count("id", filter=outside),  # first: after it, "refunded_micros" names the sum, not the column
        "refunded_micros": _total("refunded_micros"),
        "rows": Count("id"),
    }
    days: list[Any] = list(
        rollups.filter(granularity=Granularity.DAY)
        .annotate(day=F("bucket_start"))
        .values("organization_id", "day", "endpoint_id", "gpu_class", "key_id")
        .annotate(**given_back)
    )
    hours: list[Any] = list(
        rollups.filter(granularity=Granularity.HOUR)
        .annotate(day=TruncDay("bucket_start", tzinfo=UTC))
        .values("organization_id", "day", "endpoint_id", "gpu_class", "key_id")
        .annotate(**given_back)
    )
    tag_days: list[Any] = list(
        tag_rows.annotate(day=F("bucket_start"))
        .values("organization_id", "day", "end_user", "endpoint_id")
        .annotate(**given_back)
    )
    check.checked += sum(row["records"] for row in refunded) + sum(row["rows"] for row in [*days, *hours, *tag_days])

    live = _live_keys([row["api_key_id"] for row in refunded] + [row["key_id"] for row in [*days, *hours]])
    records_by_bucket: dict[tuple[Any, ...], int] = {}
    records_by_tag: dict[tuple[Any, ...], int] = {}
    for row in refunded:
        bucket = _refund_bucket(row, row["api_key_id"], live)
        records_by_bucket[bucket] = records_by_bucket.get(bucket, 0) + int(row["micros"])
        if row["end_user"]:
            tag = (row["organization_id"], _on_day(row["day"]), row["end_user"], row["endpoint_id"])
            records_by_tag[tag] = records_by_tag.get(tag, 0) + int(row["micros"])
    day_sums: dict[tuple[Any, ...], int] = {}
    hour_sums: dict[tuple[Any, ...], int] = {}
    for rows, sums in ((days, day_sums), (hours, hour_sums)):
        for row in rows:
            bucket = _refund_bucket(row, row["key_id"], live)
            sums[bucket] = sums.get(bucket, 0) + int(row["refunded_micros"])
    tag_sums = {
        (row["organization_id"], _on_day(row["day"]), row["end_user"], row["endpoint_id"]): int(row["refunded_micros"])
        for row in tag_days
    }

    differences = _amount_differences(records_by_bucket, day_sums, REFUND_BUCKET, "refunded_records", "day_rollups")
    check.found("day_rollups_refunded_differ_from_refunds", len(differences), _refunds_and_rows(differences, live))
    differences = _amount_differences(day_sums, hour_sums, REFUND_BUCKET, "day_rollups", "hour_rollups")
    check.found("hour_rollups_refunded_differ_from_day", len(differences), differences)
    differences = _amount_differences(records_by_tag, tag_sums, TAG_REFUND_BUCKET, "refunded_records", "tag_rollups")
    check.found("end_user_rollups_refunded_differ_from_refunds", len(differences), _refunds_and_rows(differences))

    row_fields = ("id", "organization_id", "bucket_start", "endpoint_id", "cost_micros", "refunded_micros")
    check.found(
        "rollup_refunded_outside_its_cost",
        sum(row["outside"] for row in [*days, *hours]),
        rollups.filter(outside)
        .order_by("pk")
        .values(*row_fields, "granularity", "gpu_class", "key_id")[:EXAMPLES_PER_KIND],
    )
    check.found(
        "end_user_rollup_refunded_outside_its_cost",
        sum(row["outside"] for row in tag_days),
        tag_rows.filter(outside).order_by("pk").values(*row_fields, "end_user")[:EXAMPLES_PER_KIND],
    )

    if scope.full:
        refunded_by_organization = dict(
            request_refunds.values_list("organization_id").annotate(total=_total("amount_micros"))
        )
        given_by_organization: dict[Any, int] = {}
        for (organization_id, *_), micros in day_sums.items():
            given_by_organization[organization_id] = given_by_organization.get(organization_id, 0) + micros
        differences = _amount_differences(
            {(organization_id,): int(total) for organization_id, total in refunded_by_organization.items()},
            {(organization_id,): total for organization_id, total in given_by_organization.items()},
            ("organization_id",),
            "refund_entries",
            "day_rollups",
        )
        check.found("organization_refunds_differ_from_rollups", len(differences), differences)
    return check


def _organization_days_touched(scope: Scope, refunds: QuerySet[Any]) -> dict[date, set[Any]]:
    """An incremental run's UTC days, each with the organizations whose rows of it were written in its window: those
    its usage records were added to, and those its request refunds gave back in (their requests' billed records'
    days, however old)."""
    touched: dict[date, set[Any]] = {}
    stamped = scope.written(UsageRecord.objects.order_by(), "recorded_at")
    # From each refund's job to its records, written after it was created: the months' partitions before are not read.
    refunded = UsageRecord.objects.order_by().filter(
        job_id__in=refunds.values("job_id"), recorded_at__gte=F("job__created_at"), billable=True, cost_micros__gt=0
    )
    for rows in (stamped, refunded):
        days = rows.annotate(day=TruncDay("recorded_at", tzinfo=UTC)).values_list("organization_id", "day").distinct()
        for organization_id, day in days:
            touched.setdefault(_on_day(day), set()).add(organization_id)
    return touched


def _on_organization_days(column: str, touched: Mapping[date, set[Any]]) -> Q:
    """``column`` falls on one of these UTC days, for one of that day's organizations: a range of the organization's
    index on the moment per day (none: no row)."""
    within = Q(pk__in=[])
    for day, organizations in sorted(touched.items()):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        within |= Q(
            organization_id__in=sorted(organizations, key=str),
            **{f"{column}__gte": start, f"{column}__lt": start + timedelta(days=1)},
        )
    return within


def _live_keys(key_ids: Iterable[Any]) -> set[Any]:
    """Those of ``key_ids`` that are existing API keys."""
    wanted = {key_id for key_id in key_ids if key_id is not None and key_id != NO_KEY}
    return set(ApiKey.objects.filter(pk__in=wanted).values_list("pk", flat=True)) if wanted else set()


def _refund_bucket(row: Mapping[str, Any], key_id: Any, live: set[Any]) -> tuple[Any, ...]:
    """The bucket a refund comes off in: a row's or a record's organization, UTC day, endpoint, GPU class and key, the
    key all zeros for none or one deleted since (``billing.metering.count_as_refunded``)."""
    key = key_id if key_id in live else NO_KEY
    return (row["organization_id"], _on_day(row["day"]), row["endpoint_id"], row["gpu_class"], key)


def _amount_differences(
    expected: Mapping[tuple[Any, ...], int],
    actual: Mapping[tuple[Any, ...], int],
    key_names: tuple[str, ...],
    expected_name: str,
    actual_name: str,
) -> list[dict[str, Any]]:
    found = []
    for key in sorted(expected.keys() | actual.keys(), key=str):
        want, have = expected.get(key, 0), actual.get(key, 0)
        if want != have:
            found.append(
                {
                    **dict(zip(key_names, key, strict=True)),
                    f"{expected_name}_micros": want,
                    f"{actual_name}_micros": have,
                    "difference_micros": have - want,
                }
            )
    return found


def _refunds_and_rows(differences: list[dict[str, Any]], live: set[Any] | None = None) -> list[dict[str, Any]]:
    """The examples shown of buckets that gave back other than their refunded records cost, each with the refunded
    requests whose records fall in it (``jobs``) and its day rows (``rows``, what to put right), in two queries for
    them all. ``live``: the existing API keys, for the usage rows' buckets (by key); None for the end user tags'."""
    shown = [dict(difference) for difference in differences[:EXAMPLES_PER_KIND]]
    if not shown:
        return shown
    in_records, in_rows = Q(pk__in=[]), Q(pk__in=[])
    for example in shown:
        start = datetime(example["day"].year, example["day"].month, example["day"].day, tzinfo=UTC)
        where = {"organization_id": example["organization_id"], "endpoint_id": example["endpoint_id"]}
        where |= {"end_user": example["end_user"]} if live is None else {"gpu_class": example["gpu_class"]}
        in_records |= Q(**where, recorded_at__gte=start, recorded_at__lt=start + timedelta(days=1))
        in_rows |= Q(**where, bucket_start=start)
    records: list[Any] = list(
        metering.refunded_records(UsageRecord.objects.filter(in_records))
        .order_by("job_id")
        .annotate(day=TruncDay("recorded_at", tzinfo=UTC), key_id=F("api_key_id"))
        .values("job_id", "organization_id", "day", "endpoint_id", "end_user", "gpu_class", "key_id")
    )
    shown_columns: tuple[str, ...] = ("id", "cost_micros", "refunded_micros")
    rows: list[Any]
    if live is None:
        tag_rows = EndUserRollup.objects.filter(in_rows).order_by("pk").annotate(day=F("bucket_start"))
        rows = list(tag_rows.values("organization_id", "day", "end_user", "endpoint_id", *shown_columns))
    else:
        day_rows = UsageRollup.objects.filter(in_rows, granularity=Granularity.DAY).order_by("pk")
        shown_columns = ("id", "key_id", "cost_micros", "refunded_micros")
        rows = list(
            day_rows.annotate(day=F("bucket_start")).values(
                "organization_id", "day", "endpoint_id", "gpu_class", *shown_columns
            )
        )
        live = live | _live_keys(row["key_id"] for row in rows)

    def bucket_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
        if live is None:
            return (row["organization_id"], _on_day(row["day"]), row["end_user"], row["endpoint_id"])
        return _refund_bucket(row, row["key_id"], live)

    jobs: dict[tuple[Any, ...], list[Any]] = {}
    for record in records:
        bucket_jobs = jobs.setdefault(bucket_of(record), [])
        if record["job_id"] not in bucket_jobs:
            bucket_jobs.append(record["job_id"])
    found_rows: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        found_rows.setdefault(bucket_of(row), []).append({column: row[column] for column in shown_columns})
    key_names = TAG_REFUND_BUCKET if live is None else REFUND_BUCKET
    for example in shown:
        bucket = tuple(example[name] for name in key_names)
        example["jobs"] = jobs.get(bucket, [])
        example["rows"] = found_rows.get(bucket, [])
    return shown


# --- Payments ---------------------------------------------------------------------------------------------


def _entries_of_payment(kinds: Iterable[str]) -> Coalesce:
    """The sum of the payment's entries of these kinds, for each payment row (0 when it has none)."""
    summed = (
        CreditEntry.objects.filter(payment_id=OuterRef("pk"), kind__in=list(kinds))
        .order_by()
        .values("payment_id")
        .annotate(total=Sum("amount_micros"))
        .values("total")
    )
    return Coalesce(Subquery(summed, output_field=BigIntegerField()), Value(0), output_field=BigIntegerField())


def check_payments(scope: Scope = FULL) -> Check:
    """A succeeded payment bought exactly its amount of credit, once, and any other payment none; what a payment
    says was refunded or disputed is what its refund and dispute entries took back.

    An incremental run checks the payments created or paid since, those with an entry posted since (a purchase,
    a refund, a dispute, or its reversal: each changes what the payment says in the same transaction), and every
    pending one.
    """
    check = Check("payments")
    payments = Payment.objects.all()
    if not scope.full:
        # Each set through its own index (payment_created, payment_succeeded, payment_pending, the entries' stamp):
        # a day's payments are a short list, where one OR of the four would read the whole table.
        in_window: set[int] = set()
        for ids in (
            scope.written(Payment.objects.order_by(), "created_at").values_list("pk", flat=True),
            scope.written(Payment.objects.order_by(), "succeeded_at").values_list("pk", flat=True),
            Payment.objects.order_by().filter(status=PaymentStatus.PENDING).values_list("pk", flat=True),
            scope.written(CreditEntry.objects.order_by().filter(payment__isnull=False), "created_at").values_list(
                "payment_id", flat=True
            ),
        ):
            in_window.update(ids)
        payments = payments.filter(pk__in=sorted(in_window))
    payments = payments.annotate(
        credited_micros=_entries_of_payment(CREDITED_KINDS),
        paid_micros=F("amount_cents") * MICROS_PER_CENT,
        refund_entries_micros=_entries_of_payment([EntryKind.REFUND]),
        dispute_entries_micros=_entries_of_payment([EntryKind.DISPUTE]),
    )
    check.checked = payments.count()
    fields = ("id", "organization_id", "status", "amount_cents", "credited_micros")
    check.found_in(
        "succeeded_payment_not_credited_its_amount",
        payments.filter(status=PaymentStatus.SUCCEEDED).exclude(credited_micros=F("paid_micros")).order_by("pk"),
        *fields,
    )
    check.found_in(
        "credit_for_unpaid_payment",
        payments.exclude(status=PaymentStatus.SUCCEEDED).exclude(credited_micros=0).order_by("pk"),
        *fields,
    )
    for taken, entries in (("refunded", "refund_entries_micros"), ("disputed", "dispute_entries_micros")):
        column = f"amount_{taken}_cents"
        check.found_in(
            f"{taken}_amount_differs_from_entries",
            payments.exclude(**{entries: -F(column) * MICROS_PER_CENT}).order_by("pk"),
            "id",
            "organization_id",
            column,
            entries,
        )
    return check


def check_receipts(scope: Scope = FULL) -> Check:
    """Every payment paid (succeeded, with the moment stamped) has its receipt, for its amount, and no other payment
    has one.

    An incremental run checks the payments paid since and the receipts issued since.
    """
    check = Check("receipts")
    paid = Payment.objects.filter(status=PaymentStatus.SUCCEEDED, succeeded_at__isnull=False)
    succeeded = scope.written(paid, "succeeded_at")
    receipts = scope.written(Receipt.objects.all(), "issued_at")
    check.checked = succeeded.count() + receipts.count()
    check.found_in(
        "succeeded_payment_without_receipt",
        succeeded.filter(receipt__isnull=True).order_by("pk"),
        "id",
        "organization_id",
        "amount_cents",
        "succeeded_at",
    )
    check.found_in(
        "receipt_differs_from_payment",
        receipts.exclude(
            payment__status=PaymentStatus.SUCCEEDED,
            payment__amount_cents=F("amount_cents"),
            payment__organization_id=F("organization_id"),
            payment__kind=F("kind"),
        ).order_by("pk"),
        "id",
        "number",
        "payment_id",
        "amount_cents",
        "payment__amount_cents",
        "payment__status",
    )
    return check


def check_statements(scope: Scope = FULL) -> Check:
    """Every issued statement's figures are still the ledger's: its opening and closing balances, its movements by
    kind and what each endpoint's usage debited. One query for the balances (``statements.balance_before``: a few
    bounded range reads per statement) and one aggregate each for the movements and the usage of the statements' months.

    The ledger is append-only, so a statement can only fall out of line through an entry stamped inside its month
    after it was issued. An incremental run checks the statements issued since and those of months that end after
    the window opens (where an entry written since may be stamped).
    """
    # The statement's own definitions of a balance and of each movement.
    from billing.statements import MOVEMENTS, balance_before

    check = Check("statements")
    statements = Statement.objects.all()
    if not scope.full:
        statements = statements.filter(Q(issued_at__gte=scope.since) | Q(period_end__gt=scope.since))
    statements = statements.annotate(
        ledger_opening=balance_before(OuterRef("organization_id"), OuterRef("period_start")),
        ledger_closing=balance_before(OuterRef("organization_id"), OuterRef("period_end")),
    ).order_by("pk")
    issued = list(
        statements.values(
            "id", "number", "organization_id", "month", "period_start", "period_end", "opening_balance_micros",
            "closing_balance_micros", "ledger_opening", "ledger_closing", "content",
        )
    )  # fmt: skip
    check.checked = len(issued)
    if not issued:
        return check
    balances = [
        {key: row[key] for key in ("id", "number", "organization_id", "month")}
        | {"issued": (row["opening_balance_micros"], row["closing_balance_micros"])}
        | {"ledger": (row["ledger_opening"], row["ledger_closing"])}
        for row in issued
        if (row["opening_balance_micros"], row["closing_balance_micros"])
        != (row["ledger_opening"], row["ledger_closing"])
    ]
    check.found("balances_differ_from_ledger", len(balances), balances)
    entries = CreditEntry.objects.filter(
        organization_id__in={row["organization_id"] for row in issued},
        created_at__gte=min(row["period_start"] for row in issued),
        created_at__lt=max(row["period_end"] for row in issued),
    ).annotate(month=TruncMonth("created_at", tzinfo=UTC))
    movements: dict[tuple[Any, date], dict[str, Any]] = {
        (row["organization_id"], _as_day(row["month"])): dict(row)
        for row in entries.order_by()
        .values("organization_id", "month")
        .annotate(**{name: _total_where("amount_micros", condition) for name, condition in MOVEMENTS.items()})
    }
    debits: dict[tuple[Any, date], dict[int, int]] = {}
    usage_debits: Any = (
        entries.filter(kind=EntryKind.USAGE)
        .order_by()
        .values("organization_id", "month", "usage_record__endpoint_id")
        .annotate(debited=Sum("amount_micros"))
    )
    for debit in usage_debits:
        by_endpoint = debits.setdefault((debit["organization_id"], _as_day(debit["month"])), {})
        by_endpoint[debit["usage_record__endpoint_id"]] = -int(debit["debited"] or 0)
    endpoint_ids = {endpoint_id for by_endpoint in debits.values() for endpoint_id in by_endpoint}
    names = {endpoint.pk: endpoint.endpoint_id for endpoint in Endpoint.objects.filter(pk__in=endpoint_ids)}
    moved, used = [], []
    for row in issued:
        key = (row["organization_id"], row["month"])
        ledger = {name: int((movements.get(key) or {}).get(name) or 0) for name in MOVEMENTS}
        if ledger != row["content"].get("movements"):
            moved.append(
                {"id": row["id"], "number": row["number"], "issued": row["content"].get("movements"), "ledger": ledger}
            )
        ledger_usage = {
            names.get(endpoint_id, str(endpoint_id)): debited
            for endpoint_id, debited in debits.get(key, {}).items()
            if debited
        }
        issued_usage = {
            usage["endpoint"]: usage["debited_micros"]
            for usage in row["content"].get("usage", [])
            if usage.get("debited_micros")
        }
        if ledger_usage != issued_usage:
            used.append({"id": row["id"], "number": row["number"], "issued": issued_usage, "ledger": ledger_usage})
    check.found("movements_differ_from_ledger", len(moved), moved)
    check.found("usage_differs_from_ledger", len(used), used)
    return check


def _total_where(column: str, condition: Q) -> Coalesce:
    return Coalesce(Sum(column, filter=condition), Value(0), output_field=BigIntegerField())


def _as_day(value: date | datetime) -> date:
    return value.astimezone(UTC).date() if isinstance(value, datetime) else value


def check_stripe(scope: Scope = FULL) -> Check:
    """Our payments against Stripe's (``compare_with_stripe``); skipped without a Stripe key.

    Either scope compares the last ``BILLING_STRIPE_RECONCILE_DAYS`` of payments: Stripe's side is a listing over the
    network, and what changes on it (refunds, disputes) changes payments of those weeks.
    """
    check = Check("stripe")
    if not settings.STRIPE_SECRET_KEY:
        check.skipped = "STRIPE_SECRET_KEY is not set: payments were not compared with Stripe"
        return check
    counts, drifts = compare_with_stripe()
    check.checked = sum(counts.values())
    check.figures["counts"] = dict(counts)
    kinds: dict[str, list[dict[str, Any]]] = {}
    for drift in drifts:
        kinds.setdefault(str(drift.get("check") or "differs_from_stripe"), []).append(drift)
    for kind, found in sorted(kinds.items()):
        check.found(kind, len(found), found)
    return check


def compare_with_stripe(*, since: datetime | None = None) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Counts checked and every drift between our succeeded payments and Stripe's succeeded PaymentIntents.

    Ours → Stripe: each succeeded payment created since ``since`` has a succeeded PaymentIntent of
    the same amount, currency and customer, its credit entry posted once with the right micros, and
    refund entries that add up to what Stripe refunded. Stripe → ours: every succeeded PaymentIntent
    of our customers created since ``since`` is a succeeded payment of ours. Our customers are the accounts' and
    those our payments since then were made for (a customer deleted at Stripe and replaced since,
    ``cards.forget_deleted_customer``, is still the one its payments were made through).
    """
    since = since or timezone.now() - timedelta(days=settings.BILLING_STRIPE_RECONCILE_DAYS)
    client = stripe_client()
    customers = set(Account.objects.exclude(stripe_customer_id="").values_list("stripe_customer_id", flat=True))
    # A day before: our row is made before Stripe's PaymentIntent, by Stripe's clock perhaps a little later.
    made_for = Payment.objects.filter(created_at__gte=since - timedelta(days=1)).exclude(stripe_customer_id="")
    customers |= set(made_for.values_list("stripe_customer_id", flat=True).distinct())
    listing = client.v1.payment_intents.list(
        params={"created": {"gte": int(since.timestamp())}, "limit": 100, "expand": ["data.latest_charge"]}
    )
    intents = {
        intent.id: intent
        for intent in listing.auto_paging_iter()
        if (object_id(stripe_field(intent, "customer")) or "") in customers
    }
    checked = {"payments": 0, "stripe_payment_intents": 0, "refunds": 0}
    drift: list[dict[str, Any]] = []

    def report(check: str, payment: Payment | None, intent_id: str | None, detail: str) -> None:
        drift.append(
            {
                "check": check,
                "payment_id": payment.pk if payment else None,
                "organization_id": str(payment.organization_id) if payment else None,
                "payment_intent": intent_id,
                "detail": detail,
            }
        )

    ours = Payment.objects.filter(status=PaymentStatus.SUCCEEDED, created_at__gte=since).select_related(
        "organization__billing_account"
    )
    for payment in ours.order_by("pk"):
        checked["payments"] += 1
        checked["refunds"] += _compare_payment(client, payment, intents, report)

    succeeded = {intent_id for intent_id, intent in intents.items() if intent.status == "succeeded"}
    known = {
        payment.stripe_payment_intent_id: payment
        for payment in Payment.objects.filter(stripe_payment_intent_id__in=succeeded)
    }
    for intent_id in sorted(succeeded):
        checked["stripe_payment_intents"] += 1
        recorded = known.get(intent_id)
        if recorded is None:
            report("stripe_payment_missing", None, intent_id, "Stripe has this succeeded payment; our ledger does not.")
        elif recorded.status != PaymentStatus.SUCCEEDED:
            report("stripe_payment_missing", recorded, intent_id, f"Stripe says succeeded; we say {recorded.status}.")
    return checked, drift


def _compare_payment(client: stripe.StripeClient, payment: Payment, intents: dict[str, Any], report: Any) -> int:
    """Reports the drifts of one payment; answers 1 if its refunds could be compared, else 0."""
    intent_id = payment.stripe_payment_intent_id
    if not intent_id:
        report("payment_without_intent", payment, None, "A succeeded payment with no PaymentIntent.")
        return 0
    intent = intents.get(intent_id)
    if intent is None:
        try:
            intent = client.v1.payment_intents.retrieve(intent_id, params={"expand": ["latest_charge"]})
        except stripe.InvalidRequestError:
            report("intent_missing", payment, intent_id, "Stripe has no such PaymentIntent.")
            return 0
    customer = payment.stripe_customer_id or payment.organization.billing_account.stripe_customer_id
    received = int(stripe_field(intent, "amount_received") or 0)
    if intent.status != "succeeded":
        report("intent_not_succeeded", payment, intent_id, f"Stripe says {intent.status}.")
    if received != payment.amount_cents or intent.currency != payment.currency:
        report(
            "amount",
            payment,
            intent_id,
            f"Stripe received {received} {intent.currency}; we say {payment.amount_cents} {payment.currency}.",
        )
    if object_id(stripe_field(intent, "customer")) != customer:
        report(
            "customer",
            payment,
            intent_id,
            f"Stripe's customer {object_id(stripe_field(intent, 'customer'))}, ours {customer}.",
        )
    posted = list(CreditEntry.objects.filter(payment=payment, kind__in=CREDITED_KINDS))
    expected = cents_to_micros(payment.amount_cents)
    if len(posted) != 1 or posted[0].idempotency_key != payment.idempotency_key:
        report("credit_count", payment, intent_id, f"{len(posted)} credit entries for the payment; expected one.")
    elif posted[0].amount_micros != expected:
        report("credit_amount", payment, intent_id, f"Credited {posted[0].amount_micros} µ$; paid {expected} µ$.")
    charge = stripe_field(intent, "latest_charge")
    if charge is None or isinstance(charge, str):
        return 0
    refunded_cents = int(stripe_field(charge, "amount_refunded") or 0)
    entries = CreditEntry.objects.filter(payment=payment, kind=EntryKind.REFUND).aggregate(total=Sum("amount_micros"))
    refunded_micros = -(entries["total"] or 0)
    if refunded_micros != cents_to_micros(refunded_cents) or payment.amount_refunded_cents != refunded_cents:
        report(
            "refunds",
            payment,
            intent_id,
            f"Stripe refunded {refunded_cents}¢; our entries {refunded_micros} µ$, "
            f"our payment {payment.amount_refunded_cents}¢.",
        )
    return 1


DATABASE_CHECKS: tuple[Callable[[Scope], Check], ...] = (
    check_jobs,
    check_attempts,
    check_usage_records,
    check_usage_debits,
    check_balances,
    check_ledger_chain,
    check_holds,
    check_active_jobs,
    check_rollups,
    check_end_user_rollups,
    check_refunded_rollups,
    check_payments,
    check_receipts,
    check_statements,
)


# --- The run ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _snapshot(scope: Scope) -> Iterator[None]:
    """One consistent view for every database check (PostgreSQL; see the module's docstring).

    An incremental run's queries start from its window, and reach every other row they need through the index on
    its key (a job's attempts, an attempt's usage record, a record's debit...): nested loops over the window. With
    the default costs PostgreSQL prices a scan of the whole other table below that many index lookups until the
    window is a small fraction of a percent of it (a hash join against all 1M attempts for 10k new jobs), which
    brings back the rescan of history this run exists to avoid; so hash and merge joins are off for its snapshot.
    So is JIT compilation: PostgreSQL prices a per-row subquery as if it ran on every row a scan reads, and the price
    of a few thousand index lookups in milliseconds then calls for seconds of compiling (the refund check's records
    of its days: 55 ms to run, 2.4 s to compile, ``tests/bench/refunded_reconciliation.py``).
    """
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        yield
        return
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            if not scope.full:
                cursor.execute("SET LOCAL enable_hashjoin = off")
                cursor.execute("SET LOCAL enable_mergejoin = off")
                cursor.execute("SET LOCAL jit = off")
        yield


def _run_one(run_check: Callable[[Scope], Check], scope: Scope) -> Check:
    """A check that fails is reported as drift of its own (the books were not proven), not raised."""
    name = run_check.__name__.removeprefix("check_")
    savepoint = transaction.atomic() if connection.in_atomic_block else contextlib.nullcontext()
    try:
        with savepoint:
            return run_check(scope)
    except Exception as exc:
        logger.exception("reconciliation check %s failed", name)
        failed = Check(name)
        failed.found("check_failed", 1, [{"error": f"{type(exc).__name__}: {exc}"}])
        return failed


def scope_of_next_run(*, full: bool = False) -> Scope:
    """Everything when asked, when no run has proven the books yet, or when the last proof is older than
    ``BILLING_RECONCILE_MAX_WINDOW_DAYS`` (the books have been in drift for a while: prove all of them again, and
    a window that long, read by index lookups, would cost more than a full pass); else the rows written since the
    last proven run's watermark, less the overlap (see the module's docstring)."""
    proven = None if full else ReconciliationRun.objects.proven().first()
    if proven is None or proven.watermark is None:
        return FULL
    if proven.watermark < timezone.now() - timedelta(days=settings.BILLING_RECONCILE_MAX_WINDOW_DAYS):
        return FULL
    return Scope(since=proven.watermark - timedelta(seconds=settings.BILLING_RECONCILE_OVERLAP_SECONDS))


def run_reconciliation(*, full: bool = False) -> ReconciliationRun:
    """Runs every check and stores the run: its scope, what was checked, every drift found, whether the books are ok,
    and, when the database checks found nothing, the watermark the next incremental run starts from.

    ``full``: check every row, not only what was written since the last proven run.
    """
    # Taken before the snapshot: whatever commits after it is stamped (almost always) after it too.
    started_at = timezone.now()
    scope = scope_of_next_run(full=full)
    with _snapshot(scope):
        checks = [_run_one(run_check, scope) for run_check in DATABASE_CHECKS]
    proven = not any(check.drift for check in checks)
    checks.append(_run_one(check_stripe, scope))  # outside the snapshot: no transaction held open across the network
    drift = [item for check in checks for item in check.drift]
    run = ReconciliationRun.objects.create(
        started_at=started_at,
        finished_at=timezone.now(),
        ok=not drift,
        scope=ReconciliationScope.FULL if scope.full else ReconciliationScope.INCREMENTAL,
        since=scope.since,
        watermark=started_at if proven else None,
        checked={check.name: check.summary() for check in checks},
        drift=drift,
    )
    if drift:
        logger.error(
            "reconciliation %s (%s) found drift: %s",
            run.pk,
            run.coverage,
            ", ".join(f"{d['check']}.{d['kind']}={d['count']}" for d in drift),
        )
    return run


__all__ = ["Check", "Scope", "run_reconciliation", "scope_of_next_run"]
