"""The usage ledger: one record per closed attempt, its debit, and the hourly and daily rollups.

``record_attempt`` is inference's ``attempt_finished`` hook: it runs inside the transaction that
closes the attempt, so a job's final state, its usage record, its credit debit, the rollups and the
release of its hold commit together or not at all.

**Settlement takes the organization's account row last.** Every settlement and admission of the organization writes that
row, and its lock is held from the statement that takes it to COMMIT, so a busy tenant's jobs queue for it. The job's
own rows come first, uncontended: its hold released, its usage record. The debit is then one conditional UPDATE of the
account (``ledger.debit_usage``: ``balance -= cost`` where ``balance >= cost``; on PostgreSQL the usage record's insert
is part of that statement), followed only by the debit's entry (which records the balance that UPDATE left, so it must
follow it) and the rollups' upsert (their rows are shared by the organization's settlements too, so they are written
under the account's lock rather than before it, where they would be locked longer). The cost is computed before the lock
with the hold as its ceiling: wherever the balance covers that cost, ``cost_within`` with the balance as a further
ceiling gives the same answer (``tests/billing/test_settlement_properties.py``), so the condition is exactly what the
debit needs. Where the balance does not cover it (a refund or dispute took credit back), the settlement is decided on
the locked account as before and the record corrected to the smaller cost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import connection
from django.db.models import BigIntegerField, Exists, F, Max, OuterRef, Q, QuerySet, Subquery, Sum

from accounts import statements
from accounts.models import ApiKey
from billing import alerts, holds, pricing
from billing.ledger import debit_usage, post_entry
from billing.locks import locked_account
from billing.models import (
    NO_KEY,
    Account,
    CreditEntry,
    EndUserRollup,
    EntryKind,
    Granularity,
    Hold,
    PriceUnit,
    UsageRecord,
    UsageRollup,
)
from billing.money import cost_within
from billing.periods import day_start, hour_start
from inference.deliveries import NOTHING, asked, delivered
from inference.models import Job, JobAttempt

logger = logging.getLogger(__name__)


def record_attempt(job: Job, attempt: JobAttempt) -> UsageRecord:
    """Writes the usage of a closed attempt (billed or not), debits its cost and settles the hold if final.

    A price per output bills what the attempt delivered (``inference.deliveries``): its images, its video's
    seconds as the frames written to the file make them, its audio's seconds; a run that failed or stopped before
    storing its output delivered nothing and costs nothing. Its GPU time is recorded either way.

    The debit is never more than the job's hold, nor more than the balance (so usage never takes it below zero):
    GPU time beyond what the hold covers is recorded unbilled. The worker extends the hold before each step, so
    this ceiling binds only when a measurement outruns the reservation (or a refund took the balance away). The
    attempt's cold start and its batch's wasted time (``JobAttempt.wasted_ms``) are recorded unbilled too.
    """
    started_at = job.started_at or attempt.started_at
    billable = attempt.billable
    outputs = delivered(job) if billable else NOTHING
    # The tier of the size asked (what the outputs have, or would have had: a request that delivered nothing is
    # shown at the price it was held at).
    quote = pricing.price_for(job.endpoint, started_at, job.organization_id).for_outputs(asked(job.input))
    gpu_ms = attempt.gpu_ms if billable else 0
    quantities = pricing.billed_quantities(quote, outputs, gpu_ms)
    # The job's hold first (the lock order: the hold, then the account).
    if job.is_final:
        held = released = holds.release(job_id=job.pk)
    else:
        held = Hold.objects.filter(job_id=job.pk, released_at=None).values_list("amount_micros", flat=True).first() or 0
        released = 0
    # Priced as if the balance covers the hold; ``debit_usage`` debits it only where the balance covers the cost.
    units, cost, billed_ms = cost_within(**quantities, ceiling_micros=held)
    video_ms, audio_ms = output_ms(quote.unit, units, quantities)
    record = UsageRecord(
        organization_id=job.organization_id,
        job=job,
        attempt_number=attempt.number,
        api_key_id=job.api_key_id,
        endpoint_id=job.endpoint_id,
        end_user=job.end_user,
        gpu_class=job.gpu_class,
        outcome=attempt.outcome,
        billable=billable,
        gpu_ms=billed_ms,
        unbilled_gpu_ms=attempt.cold_start_ms + attempt.wasted_ms + attempt.gpu_ms - billed_ms,
        price=quote.price,
        unit=quote.unit,
        billable_units=units,
        unit_price_micros=quote.unit_price_micros,
        cost_micros=cost,
        work_units=pricing.work_units(job.input) if billable else 0,
        video_ms=video_ms,
        audio_ms=audio_ms,
        started_at=attempt.started_at,
        # The settlement's one instant: its debit's entry is stamped with it and its rollup rows are its hour and day,
        # so the record, the ledger and the rollups put the cost in the same UTC day and month (``debit_usage``).
        recorded_at=attempt.finished_at or job.finished_at or started_at,
    )
    description = f"{job.endpoint.endpoint_id}: {units} {quote.unit}"
    if not cost:
        statements.insert(record)
        # The account's lock first, then the rollups' (the lock order), and the COMMIT with them where this is the
        # transaction's last statement (``accounts.statements.commits_along``; nothing here can be unmet).
        settled = [*holds.taking_off_held(organization_id=job.organization_id, amount_micros=released)]
        settled += summaries(record)
        with connection.cursor() as cursor:
            if statements.commits_along(connection):
                statements.commit_along(cursor, *settled)
            else:
                statements.in_turn(cursor, *settled)
        return record
    # The record is inserted by the debit's own statement (PostgreSQL), whether or not the debit is made.
    account = debit_usage(
        usage_record=record, released_micros=released, job=job, description=description, along=summaries
    )
    if account is None:
        account = _settle_on_the_locked_account(record, job, held=held, released=released, quantities=quantities)
        add_to_rollups(record)
    if account.alerts_armed and record.cost_micros:
        # Spend moved: once this commits, see whether it crossed a threshold the organization watches.
        alerts.look_after_settlement(record, hold_micros=held)
    return record


def _settle_on_the_locked_account(
    record: UsageRecord, job: Job, *, held: int, released: int, quantities: dict[str, Any]
) -> Account:
    """The debit where the balance no longer covers the record's cost: the balance, read under the account's lock,
    is a further ceiling; the record is corrected to what fits under it, and the account saved."""
    account = locked_account(job.organization_id)
    units, cost, billed_ms = cost_within(**quantities, ceiling_micros=min(held, max(account.balance_micros, 0)))
    record.unbilled_gpu_ms += record.gpu_ms - billed_ms
    record.billable_units, record.cost_micros, record.gpu_ms = units, cost, billed_ms
    record.video_ms, record.audio_ms = output_ms(record.unit, units, quantities)
    record.save(update_fields=["billable_units", "cost_micros", "gpu_ms", "unbilled_gpu_ms", "video_ms", "audio_ms"])
    account.held_micros -= released
    if cost:
        # Saves the account's balance and the held amount just released in one UPDATE.
        post_entry(
            account=account,
            kind=EntryKind.USAGE,
            amount_micros=-cost,
            idempotency_key=f"usage-{record.pk}",
            description=f"{job.endpoint.endpoint_id}: {units} {record.unit}",
            usage_record=record,
            job=job,
            key_is_new=True,
            created_at=record.recorded_at,
        )
    elif released:
        account.save(update_fields=["held_micros"])
    return account


def output_ms(unit: str, units: Decimal, quantities: dict[str, Any]) -> tuple[int, int]:
    """Seconds of video and of audio a record counts, in ms: what was billed for a price per second of them (the
    hold may have cut it), what was delivered otherwise."""
    billed = int(units * 1000)
    video_ms = billed if unit == PriceUnit.VIDEO_SECOND else int(quantities["video_ms"])
    audio_ms = billed if unit == PriceUnit.AUDIO_SECOND else int(quantities["audio_ms"])
    return video_ms, audio_ms


_ROLLUP_COLUMNS = (
    "attempts",
    "billable_attempts",
    "gpu_ms",
    "unbilled_gpu_ms",
    "cost_micros",
    "work_units",
    "video_ms",
    "audio_ms",
)


def bucket_start(moment: datetime, granularity: str) -> datetime:
    """The UTC hour or day that holds ``moment``."""
    if granularity == Granularity.DAY:
        return day_start(moment)
    return hour_start(moment)


def add_to_rollups(record: UsageRecord) -> None:
    """Adds one record to its hour and day rows with one two-row upsert (PostgreSQL and SQLite alike), and a tagged
    one to its end user's day row."""
    with connection.cursor() as cursor:
        for sql, parameters in summaries(record):
            cursor.execute(sql, parameters)


def summaries(record: UsageRecord, *, only_where: str = "") -> list[tuple[str, list[Any]]]:
    """The upserts that add ``record`` to the rollups: its hour and day rows, and its end user's day if tagged."""
    statements = [rollup_upsert(record, only_where=only_where)]
    if record.end_user:
        statements.append(end_user_upsert(record, only_where=only_where))
    return statements


_END_USER_COLUMNS = _ROLLUP_COLUMNS


def end_user_upsert(record: UsageRecord, *, only_where: str = "") -> tuple[str, list[Any]]:
    """The upsert that adds a tagged ``record`` to its end user's row of the day (``EndUserRollup``)."""
    table = EndUserRollup._meta.db_table
    fields = {field.column: field for field in EndUserRollup._meta.concrete_fields}
    key_columns = ["organization_id", "end_user", "bucket_start", "endpoint_id"]
    columns = key_columns + list(_END_USER_COLUMNS)
    values = {
        "organization_id": record.organization_id,
        "end_user": record.end_user,
        "bucket_start": bucket_start(record.recorded_at, Granularity.DAY),
        "endpoint_id": record.endpoint_id,
        "attempts": 1,
        "billable_attempts": int(record.billable),
        "gpu_ms": record.gpu_ms,
        "unbilled_gpu_ms": record.unbilled_gpu_ms,
        "cost_micros": record.cost_micros,
        "work_units": record.work_units,
        "video_ms": record.video_ms,
        "audio_ms": record.audio_ms,
    }
    rows = f"VALUES ({', '.join(['%s'] * len(columns))})"
    if only_where:
        rows = f"SELECT * FROM ({rows}) AS additions WHERE {only_where}"  # noqa: S608
    increments = ", ".join(f"{column} = {table}.{column} + excluded.{column}" for column in _END_USER_COLUMNS)
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) {rows} "
        f"ON CONFLICT ({', '.join(key_columns)}) DO UPDATE SET {increments}"
    )
    return sql, [fields[column].get_db_prep_value(values[column], connection) for column in columns]


def rollup_upsert(record: UsageRecord, *, only_where: str = "") -> tuple[str, list[Any]]:
    """The two-row upsert that adds ``record`` to its hour and day rows; ``only_where``: a condition the rows are
    added under (a statement of its own, or a part of a larger one that decides whether they are)."""
    amounts = {
        "attempts": 1,
        "billable_attempts": int(record.billable),
        "gpu_ms": record.gpu_ms,
        "unbilled_gpu_ms": record.unbilled_gpu_ms,
        "cost_micros": record.cost_micros,
        "work_units": record.work_units,
        "video_ms": record.video_ms,
        "audio_ms": record.audio_ms,
    }
    return _rollups_statement(
        recorded_at=record.recorded_at,
        organization_id=record.organization_id,
        endpoint_id=record.endpoint_id,
        key_id=record.api_key_id or NO_KEY,
        gpu_class=record.gpu_class,
        amounts=amounts,
        only_where=only_where,
    )


def add_amounts_to_rollups(
    *,
    recorded_at: datetime,
    organization_id: Any,
    endpoint_id: int,
    key_id: Any,
    gpu_class: str,
    amounts: dict[str, int],
) -> None:
    """Adds ``amounts`` to one hour's and one day's rollups; a column left out adds nothing."""
    sql, parameters = _rollups_statement(
        recorded_at=recorded_at,
        organization_id=organization_id,
        endpoint_id=endpoint_id,
        key_id=key_id,
        gpu_class=gpu_class,
        amounts={**dict.fromkeys(_ROLLUP_COLUMNS, 0), **amounts},
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, parameters)


def _rollups_statement(
    *,
    recorded_at: datetime,
    organization_id: Any,
    endpoint_id: int,
    key_id: Any,
    gpu_class: str,
    amounts: dict[str, int],
    only_where: str = "",
) -> tuple[str, list[Any]]:
    table = UsageRollup._meta.db_table
    fields = {field.column: field for field in UsageRollup._meta.concrete_fields}
    key_columns = ["granularity", "bucket_start", "organization_id", "endpoint_id", "key_id", "gpu_class"]
    columns = key_columns + list(_ROLLUP_COLUMNS)
    increments = ", ".join(f"{column} = {table}.{column} + excluded.{column}" for column in _ROLLUP_COLUMNS)
    granularities = (Granularity.HOUR, Granularity.DAY)
    # Both rows in one statement (one round trip); they never meet in ON CONFLICT, their granularities differ.
    row_placeholders = f"({', '.join(['%s'] * len(columns))})"
    rows = f"VALUES {', '.join([row_placeholders] * len(granularities))}"
    if only_where:
        rows = f"SELECT * FROM ({rows}) AS additions WHERE {only_where}"  # noqa: S608
    sql = (
        f"INSERT INTO {table} ({', '.join(columns)}) {rows} "
        f"ON CONFLICT ({', '.join(key_columns)}) DO UPDATE SET {increments}"
    )
    parameters: list[Any] = []
    for granularity in granularities:
        values = {
            "granularity": granularity.value,
            "bucket_start": bucket_start(recorded_at, granularity),
            "organization_id": organization_id,
            "endpoint_id": endpoint_id,
            "key_id": key_id,
            "gpu_class": gpu_class,
            **amounts,
        }
        parameters += [fields[column].get_db_prep_value(values[column], connection) for column in columns]
    return sql, parameters


def refunded_records(records: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
    """Of ``records``, those whose cost a refund of their request gave back (``count_as_refunded``): each refunded
    request's billed records that cost something, in the order of their attempts, as far as they add up to its
    refund's amount.

    ``billing.ledger.refund_job`` refunds all that its request was billed until then, so at the refund these are all
    of its records. An operator may run a refunded request again (``inference.requeue``), and its later attempts are
    billed again: their records come after the refund's amount is used up, and were not refunded (the request's one
    refund is spent). Migration 0016 gave back the refunds made before the rollups counted them by this rule, in a
    copy of its own (a migration keeps the code it ran with); reconciliation proves the rollups' ``refunded_micros``
    against it (``billing.reconciliation.check_refunded_rollups``).

    One query however many records: each record looks up its request's refund among its job's entries (its debits and
    its refund: the entries' index of the job), and only a record that has one sums what its request's records cost
    up to its attempt (the records' index of the job, from the job's creation on: a record is never written before
    its job was created, and the bound spares PostgreSQL the partitions of the months before it,
    ``billing.partitions``). That is a few index lookups per record of ``records`` and none per refund: whoever reads
    many records among few refunds (a full reconciliation) narrows them to the refunded requests first
    (``of_refunded_requests``). The request's refund is one entry (its idempotency key).

    The kind is not a condition of the lookup: with it, PostgreSQL may read the partial index of every request refund
    (``credit_entry_job_refunds``) for each record instead, and does where its statistics count few refunds."""
    refund = (
        CreditEntry.objects.filter(job_id=OuterRef("job_id"))
        .order_by()
        .values("job_id")
        .annotate(amount=Max("amount_micros", filter=Q(kind=EntryKind.REFUND)))
        .values("amount")
    )
    job_created = Job.objects.filter(pk=OuterRef(OuterRef("job_id"))).order_by().values("created_at")[:1]
    billed_through = (
        UsageRecord.objects.filter(
            job_id=OuterRef("job_id"),
            recorded_at__gte=Subquery(job_created),
            billable=True,
            cost_micros__gt=0,
            attempt_number__lte=OuterRef("attempt_number"),
        )
        .order_by()
        .values("job_id")
        .annotate(total=Sum("cost_micros"))
        .values("total")
    )
    return (
        records.filter(billable=True, cost_micros__gt=0)
        .alias(
            refund_micros=Subquery(refund, output_field=BigIntegerField()),
            billed_through_micros=Subquery(billed_through, output_field=BigIntegerField()),
        )
        # The lookup of the refund first (PostgreSQL evaluates the cheaper condition first): the sum only where one is.
        .filter(refund_micros__isnull=False, billed_through_micros__lte=F("refund_micros"))
    )


def of_refunded_requests(records: QuerySet[UsageRecord]) -> QuerySet[UsageRecord]:
    """Those of ``records`` whose request was refunded (a semi-join on the request refunds): what a reader of many
    records among few refunds hands ``refunded_records``."""
    return records.filter(
        job_id__in=CreditEntry.objects.filter(kind=EntryKind.REFUND, job__isnull=False).order_by().values("job_id")
    )


def count_as_refunded(records: Iterable[UsageRecord]) -> None:
    """Gives back ``records``' cost in the rollup rows their settlements added it to: their hour's and day's rows, and
    their end user's day row if tagged (``refunded_micros``). What budgets, keys' and end users' limits and the
    budget alerts count (``billing.models.net_spend``) is then usage less refunds.

    ``billing.ledger.refund_job`` calls it once per request, with the refund's one entry, under the organization's
    account lock: refunds are one at a time, and what each reads of a row's refunded amount cannot change under it
    (every settlement that adds cost to these rows holds that lock too; one that adds none changes no cost).

    **The month the usage was recorded in.** A refund gives back in the rows of each record's own hour and day, as
    the statements put its cost in that month: refunded in May, April's usage comes off April's spend, and May's
    budget stays as May's usage has spent it. The refund is no new room to spend in May: April's budget is history,
    and a refund counted in the month it is made would let a tenant refunded at the start of a month spend more than
    its budget in that month.

    A record's key is its rows' key. A record with none was made without a key, or its key was deleted since (the
    record forgets it, the rows keep its id): its cost is given back in any row of its hour (or day) whose key is not
    an existing key, as far as each row's cost leaves room, so no row gives back more than it counted. Together those
    rows hold at least what their records not yet refunded cost, so there is always room for it."""
    for record in records:
        if not record.cost_micros:
            continue
        for granularity in (Granularity.HOUR, Granularity.DAY):
            rows = UsageRollup.objects.filter(
                granularity=granularity,
                bucket_start=bucket_start(record.recorded_at, granularity),
                organization_id=record.organization_id,
                endpoint_id=record.endpoint_id,
                gpu_class=record.gpu_class,
            )
            if record.api_key_id is not None:
                rows = rows.filter(key_id=record.api_key_id)
            else:
                rows = rows.exclude(Exists(ApiKey.objects.filter(pk=OuterRef("key_id"))))
            _give_back(rows, record.cost_micros, record)
        if record.end_user:
            tag_day = EndUserRollup.objects.filter(
                organization_id=record.organization_id,
                end_user=record.end_user,
                bucket_start=bucket_start(record.recorded_at, Granularity.DAY),
                endpoint_id=record.endpoint_id,
            )
            _give_back(tag_day, record.cost_micros, record)


def _give_back(rows: QuerySet[Any], amount_micros: int, record: UsageRecord) -> None:
    """Adds ``amount_micros`` to the refunded amount of ``rows``, in order, each up to what its cost leaves."""
    left = amount_micros
    rooms = rows.annotate(room=F("cost_micros") - F("refunded_micros")).filter(room__gt=0).order_by("pk")
    for pk, room in rooms.values_list("pk", "room"):
        taken = min(room, left)
        rows.model.objects.filter(pk=pk).update(refunded_micros=F("refunded_micros") + taken)
        left -= taken
        if not left:
            return
    # The rollups no longer hold the record's cost (reconciliation's rollup checks report them): the rest of it was
    # never counted there, and giving it back would count less than nothing.
    logger.error(
        "%s µ$ of usage record %s refunded had no %s row to come off", left, record.pk, rows.model._meta.model_name
    )
