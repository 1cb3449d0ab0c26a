"""Spend control in real time: what inference asks billing before and while a job runs.

Admission holds the job's estimated cost against the organization's available credit (balance less
holds), its monthly budget, its key's monthly limit and the monthly limit of the member who made the key (which
every key that member made shares: ``MemberSpendLimit``). Before each further unit of work the worker asks
``reserve``: the hold grows to cover it, within the same limits, or the job stops there. The end of a job
settles (``billing.metering``), never debiting more than the hold. So usage never takes a prepaid balance below
zero, nor spending past a budget, a key's limit or a member's.

**One tenant's admissions do not queue behind each other for a whole transaction.** All of them write the organization's
account row (its cached held amount), and its lock is held from the statement that takes it to COMMIT, so one
organization's admissions and settlements (measured with ``make bench-tenants``) wait for each other on it for as long
as each holds it. Admission takes it last, with one statement: everything else (the price, the estimate, the key's
limits, the job's own hold row) is done first, and when the organization has no budget and the key no limit,
``_hold_within_credit`` is one conditional UPDATE, ``held += estimate`` where ``balance - held >= estimate`` and no
budget is set. PostgreSQL checks that condition again on the row as committed when the UPDATE had to wait for its lock,
and it reads only the row's own columns, so two admissions never take the same credit. A budget or a key's or member's
limit is checked through other rows (the month's spend in the rollups, the open holds of the key or of the member's
keys), which that re-check would not see change: those admissions, and any the condition refuses (to word the refusal,
or to find the credit a settlement just freed), are decided on the locked account (``_admit_under_the_lock``). The key's
limit and its maker's are read behind a share lock on the key, which a new limit on the key takes exclusively, and a new
limit on the member takes on every key the member made (``billing.locks.share_key``, ``lock_member_keys``). A
submission's job with no end user tag, the common case, is admitted in one round trip on PostgreSQL (``_held_at_once``):
the key's share lock, the hold's insert, then the account's conditional UPDATE which also requires that neither the key
nor its maker has a limit (read once the share lock is granted); where that changed nothing the decision is made under
the lock as above. With no transaction open (an API request), they ride in the submission's own one-query transaction
after the job's insert (``admit_in_query``), the UPDATE made to fail that query where it changes nothing, so the
account's lock is held to the query's end, never across a client's COMMIT, and the submission is then decided in a
transaction as above. Those statements are written out once, not built by the ORM per admission: built per call they
cost more of the web process's CPU than the database's work. Weighed and not taken: the credit split over sub-rows
(every refusal and budget check would sum them; its upper bound, admissions that never touch the account, measured on
2026-12-07: one organization's submissions +3-5%, its finishes -3-5% on two cores, the one / four ratio unmoved: README,
"The credit split over sub-rows, measured and not kept"), the held amount kept in Redis (the database would no longer be
the truth for money).
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

from django.db import connection
from django.db.models import F, OuterRef, Subquery, Sum
from django.utils import timezone

from accounts import statements
from accounts.locking import retrying_atomic
from accounts.models import ApiKey
from billing import end_users, holds, pricing
from billing.locks import key_share_lock, locked_account, locked_open_hold, share_key
from billing.models import (
    Account,
    Granularity,
    Hold,
    KeySpendLimit,
    MemberSpendLimit,
    PriceUnit,
    UsageRecord,
    UsageRollup,
    net_spend,
)
from billing.money import format_micros, gpu_cost_micros, gpu_ms_within
from billing.periods import month_bounds, month_start
from inference.deliveries import asked
from inference.hooks import ListedPrice, Refusal, Reservation, Usage
from inference.models import Endpoint, Job

INSUFFICIENT = "insufficient_credits"
OVER_LIMIT = "spend_limit_exceeded"
END_USER_OVER_LIMIT = "end_user_limit_exceeded"
UNLIMITED = Reservation(covered_gpu_ms=None)


def spent_this_month(*, organization_id: Any, key_id: Any = None) -> int:
    """Cost recorded in this UTC month less what refunds gave back of it, from the daily rollups (one indexed query)."""
    start, end = month_bounds()
    rows = UsageRollup.objects.filter(granularity=Granularity.DAY, bucket_start__gte=start, bucket_start__lt=end)
    rows = rows.filter(key_id=key_id) if key_id is not None else rows.filter(organization_id=organization_id)
    return int(rows.aggregate(total=net_spend())["total"] or 0)


def member_spent_this_month(*, organization_id: Any, user_id: Any) -> int:
    """What the API keys the member made in the organization spent this UTC month, less what refunds gave back of it,
    from the daily rollups (one indexed query). The rollups keep spend per key: a deleted key's rollups keep its id,
    but no key row says whose it was any more, so what it spent leaves the member's spend (never the organization's)."""
    start, end = month_bounds()
    keys = ApiKey.objects.filter(organization_id=organization_id, created_by_id=user_id).values("pk")
    rows = UsageRollup.objects.filter(
        granularity=Granularity.DAY, bucket_start__gte=start, bucket_start__lt=end, key_id__in=Subquery(keys)
    )
    return int(rows.aggregate(total=net_spend())["total"] or 0)


def member_held(*, organization_id: Any, user_id: Any, besides_job_id: Any = None) -> int:
    """What the open holds of jobs under the keys the member made in the organization add up to, less
    ``besides_job_id``'s (the hold an admission is placing)."""
    holds_of_member = Hold.objects.filter(
        organization_id=organization_id, released_at=None, api_key__created_by_id=user_id
    ).exclude(job_id=besides_job_id)
    return int(holds_of_member.aggregate(total=Sum("amount_micros"))["total"] or 0)


def _key_held(key_id: Any, *, besides_job_id: Any = None) -> int:
    """What the key's open holds add up to, less ``besides_job_id``'s (the hold an admission is placing)."""
    holds_of_key = Hold.objects.filter(api_key_id=key_id, released_at=None).exclude(job_id=besides_job_id)
    return int(holds_of_key.aggregate(total=Sum("amount_micros"))["total"] or 0)


class KeyLimits(NamedTuple):
    """The monthly limits over a job's API key: the key's own, and that of the member who made it (``maker_id``),
    which every key that member made shares. None: no such limit."""

    key_micros: int | None = None
    member_micros: int | None = None
    maker_id: Any = None

    @property
    def any(self) -> bool:
        return self.key_micros is not None or self.member_micros is not None


NO_LIMITS = KeyLimits()


def _key_limits(job: Job) -> KeyLimits:
    """The monthly limits over the job's API key, read behind the key's share lock (``billing.locks.share_key``)."""
    if job.api_key_id is None:
        return NO_LIMITS
    share_key(job.api_key_id)
    return _read_key_limits(job)


def _read_key_limits(job: Job) -> KeyLimits:
    """The monthly limits over the job's API key, its own and its maker's, in one query; the caller holds the key's
    share lock (admission) or the account's lock (a reservation)."""
    if job.api_key_id is None:
        return NO_LIMITS
    members = MemberSpendLimit.objects.filter(
        organization_id=OuterRef("organization_id"), user_id=OuterRef("created_by_id")
    )
    row = (
        ApiKey.objects.filter(pk=job.api_key_id)
        .annotate(member_limit=Subquery(members.values("monthly_limit_micros")[:1]))
        .values_list("spend_limit__monthly_limit_micros", "member_limit", "created_by_id")
        .first()
    )
    if row is None:
        return NO_LIMITS  # the key is gone: its limits with it
    return KeyLimits(key_micros=row[0], member_micros=row[1], maker_id=row[2])


def _spend_room(
    account: Account,
    job: Job,
    limits: KeyLimits,
    *,
    end_user_limit: int | None = None,
    admitting: bool = False,
) -> tuple[int, Refusal]:
    """How much more the job may hold beyond what is held now, and the refusal that names the tightest limit.

    Five limits, each less what is spent and held against it: the available credit (balance less every open hold
    of the organization), the organization's monthly budget, ``limits``: the monthly limit of the job's API key and
    that of the member who made the key (spent and held by all the keys they made), and ``end_user_limit``, that of
    the job's end user tag. The credit's refusal is worded for a running job; admission words its own, with the
    estimate. ``admitting``: the job's hold row already holds the new estimate (the account does not yet), so the
    key's, the member's and the tag's holds leave it out.
    """
    room, refusal = account.available_micros, Refusal("Credits ran out while this request ran.", INSUFFICIENT)
    if account.monthly_budget_micros is not None:
        spent = spent_this_month(organization_id=account.organization_id)
        budget_room = account.monthly_budget_micros - spent - account.held_micros
        if budget_room < room:
            room, refusal = (
                budget_room,
                Refusal(
                    f"The organization's monthly budget of {format_micros(account.monthly_budget_micros)} is spent "
                    f"({format_micros(spent)} used, {format_micros(account.held_micros)} held by running requests).",
                    OVER_LIMIT,
                ),
            )
    if limits.key_micros is not None:
        spent = spent_this_month(organization_id=account.organization_id, key_id=job.api_key_id)
        key_held = _key_held(job.api_key_id, besides_job_id=job.pk if admitting else None)
        key_room = limits.key_micros - spent - key_held
        if key_room < room:
            room, refusal = (
                key_room,
                Refusal(
                    f"This API key's monthly limit of {format_micros(limits.key_micros)} is spent "
                    f"({format_micros(spent)} used).",
                    OVER_LIMIT,
                ),
            )
    if limits.member_micros is not None:
        spent = member_spent_this_month(organization_id=account.organization_id, user_id=limits.maker_id)
        held = member_held(
            organization_id=account.organization_id,
            user_id=limits.maker_id,
            besides_job_id=job.pk if admitting else None,
        )
        member_room = limits.member_micros - spent - held
        if member_room < room:
            room, refusal = (
                member_room,
                Refusal(
                    f"The monthly member spend limit of {format_micros(limits.member_micros)} on the person who made "
                    f"this API key, shared by every key they made, is spent ({format_micros(spent)} used, "
                    f"{format_micros(held)} held by their running requests).",
                    OVER_LIMIT,
                ),
            )
    if end_user_limit is not None:
        spent = end_users.spent_in_month(organization_id=account.organization_id, end_user=job.end_user,
                                         month=month_start())  # fmt: skip
        tag_held = end_users.held(account.organization_id, job.end_user, besides_job_id=job.pk if admitting else None)
        tag_room = end_user_limit - spent - tag_held
        if tag_room < room:
            room, refusal = (
                tag_room,
                Refusal(
                    f"The monthly limit of end user {job.end_user!r} ({format_micros(end_user_limit)}) is spent "
                    f"({format_micros(spent)} used, {format_micros(tag_held)} held by its running requests).",
                    END_USER_OVER_LIMIT,
                ),
            )
    return room, refusal


def admit(job: Job, *, new: bool = False) -> Refusal | None:
    """Inference's ``admit`` hook: holds the job's estimated cost, or says why it may not start.

    Called for a submission and again for an operator's requeue, so the estimate is priced when admitted (a job
    requeued days later holds today's price, which the hold's extensions and the settlement then use). ``new``: a
    submission's job, inserted by this transaction, which has no hold row to look for.
    """
    hold = _hold_for(job)
    estimate = hold.amount_micros
    if new and not job.end_user:
        if _held_at_once(hold):
            return None
        # The hold row is in and the key share-locked; the account took nothing. Decided under its lock.
        return _admit_under_the_lock(
            job, estimate=estimate, held_change=estimate, limits=_read_key_limits(job), end_user_limit=None
        )
    # The end user's limit behind the organization's share lock, then the key's and its maker's behind the key's (the
    # lock order).
    end_user_limit = end_users.limit_for_admission(job.organization_id, job.end_user) if job.end_user else None
    limits = _key_limits(job)
    # The job's own hold row first: no other transaction waits for it. A refusal rolls it back with the caller's
    # transaction (the hook's contract).
    held_change = holds.place(hold=hold, new=new)
    if (
        not limits.any
        and end_user_limit is None
        and _hold_within_credit(job.organization_id, estimate=estimate, held_change=held_change)
    ):
        return None
    return _admit_under_the_lock(
        job, estimate=estimate, held_change=held_change, limits=limits, end_user_limit=end_user_limit
    )


def _hold_for(job: Job) -> Hold:
    """The hold a job's admission places: its estimated cost at the price in force now (the price of its resolution
    tier, where the line has tiers)."""
    quote = pricing.price_for(job.endpoint, timezone.now(), job.organization_id)
    estimate = pricing.hold_micros(job.endpoint, job.input, quote)
    quote = quote.for_outputs(asked(job.input))
    return Hold(
        job=job,
        organization_id=job.organization_id,
        api_key_id=job.api_key_id,
        end_user=job.end_user,
        amount_micros=estimate,
        unit_price_micros=quote.unit_price_micros,
        unit=quote.unit,
    )


def admit_in_query(job: Job) -> list[statements.Statement] | None:
    """Inference's ``admit_in_query`` hook: a new job's admission on the common path (no end user tag) as the statements
    of ``_held_at_once``, sent in the submission's own one-query transaction after the job's insert, the account's
    conditional UPDATE made to fail that query where it changes nothing (``statements.or_unmet``): no credit, a budget,
    a key's limit or its maker's, no account. The submission then runs again in a transaction, where ``admit`` decides
    it under the account's lock. With no transaction of the client's around it, the account's lock is held from that
    UPDATE to the end of the query, in the database: no round trip of the client's (COMMIT) inside it."""
    if job.end_user:
        return None
    held_at_once = _at_once(_hold_for(job))
    return [*held_at_once[:-1], statements.or_unmet(held_at_once[-1])]


_ACCOUNT = {field.name: field for field in Account._meta.concrete_fields}
_KEY_LIMIT = {field.name: field for field in KeySpendLimit._meta.concrete_fields}
_MEMBER_LIMIT = {field.name: field.column for field in MemberSpendLimit._meta.concrete_fields}
_KEY = {field.name: field.column for field in ApiKey._meta.concrete_fields}


@cache
def _within_credit(with_key: bool) -> str:
    """``_hold_within_credit``'s UPDATE written out (built once; the ORM's would be built anew for every admission),
    with, when the job has a key, the conditions that the key has no spend limit and its maker no member limit in the
    organization (two index lookups: the limit tables' keys; the key's id is given twice)."""
    column = {name: field.column for name, field in _ACCOUNT.items()}
    sql = (
        f"UPDATE {Account._meta.db_table} SET {column['held_micros']} = {column['held_micros']} + %s "  # noqa: S608
        f"WHERE {column['organization']} = %s AND {column['monthly_budget_micros']} IS NULL "
        f"AND {column['balance_micros']} >= {column['held_micros']} + %s"
    )
    if with_key:
        member, key = _MEMBER_LIMIT, _KEY
        sql += (
            f" AND NOT EXISTS (SELECT 1 FROM {KeySpendLimit._meta.db_table} "  # noqa: S608
            f"WHERE {_KEY_LIMIT['api_key'].column} = %s)"
            f" AND NOT EXISTS (SELECT 1 FROM {MemberSpendLimit._meta.db_table} m "
            f"JOIN {ApiKey._meta.db_table} k ON m.{member['user']} = k.{key['created_by']} "
            f"AND m.{member['organization']} = k.{key['organization']} WHERE k.{key['id']} = %s)"
        )
    return sql


def _hold_within_credit(organization_id: Any, *, estimate: int, held_change: int) -> bool:
    """Adds the hold to the account where the available credit covers ``estimate`` and no budget is set: one
    conditional UPDATE, the statement that takes the account's lock and the last before COMMIT. False: it changed
    nothing (no credit, a budget, or no account yet)."""
    values = [held_change, _ACCOUNT["organization"].get_db_prep_value(organization_id, connection), estimate]
    with connection.cursor() as cursor:
        cursor.execute(_within_credit(with_key=False), values)
        return bool(cursor.rowcount)


def _held_at_once(hold: Hold) -> bool:
    """A new job's admission on the common path, in one round trip on PostgreSQL: the key share-locked (``share_key``),
    the hold's insert, then the account's conditional UPDATE, which adds the hold where the credit covers it, no budget
    is set and neither the key nor its maker has a spend limit (``accounts.statements.in_turn``: three statements of one
    query, each in its own snapshot). The UPDATE's snapshot is taken once the key's share lock is granted, so it sees
    any limit of the key or of its maker committed before it, and none can be committed after until this transaction
    commits (a member's limit locks every key the member made: ``billing.locks.lock_member_keys``); and the hold's
    insert (its foreign keys checked) is done before the UPDATE takes the account's lock, held from there to COMMIT.
    False: the hold row is in, the key share-locked, and the account unchanged.
    """
    with connection.cursor() as cursor:
        statements.in_turn(cursor, *_at_once(hold))
        return bool(cursor.rowcount)


def _at_once(hold: Hold) -> list[statements.Statement]:
    """``_held_at_once``'s statements, the account's UPDATE last."""
    key_id = hold.api_key_id
    values: list[Any] = [
        hold.amount_micros,
        _ACCOUNT["organization"].get_db_prep_value(hold.organization_id, connection),
        hold.amount_micros,
    ]
    if key_id is not None:
        key = _KEY_LIMIT["api_key"].get_db_prep_value(key_id, connection)
        values += [key, key]
    update = (_within_credit(key_id is not None), values)
    if key_id is not None and connection.features.has_select_for_update:
        return [key_share_lock(key_id), statements.insertion(hold), update]
    return [statements.insertion(hold), update]  # no key; or SQLite, one writer at a time: no share lock


def _admit_under_the_lock(
    job: Job, *, estimate: int, held_change: int, limits: KeyLimits, end_user_limit: int | None
) -> Refusal | None:
    """Admission decided on the locked account: the budget's, the key's, the member's and the end user's spend and
    holds cannot change under it."""
    account = locked_account(job.organization_id)
    room, refusal = _spend_room(account, job, limits, end_user_limit=end_user_limit, admitting=True)
    if estimate > room:
        if refusal.error_type == INSUFFICIENT:
            refusal = Refusal(
                f"Not enough credits: this request needs about {format_micros(estimate)} and "
                f"{format_micros(max(account.available_micros, 0))} is available. Add credits in billing.",
                INSUFFICIENT,
            )
        return refusal
    account.held_micros += held_change
    account.save(update_fields=["held_micros"])
    return None


def _coverage(held_micros: int, quote: pricing.Quote) -> Reservation:
    """The GPU time ``held_micros`` pays for at the price the job will be billed at (the one in force at its start)."""
    if quote.unit != PriceUnit.GPU_SECOND or quote.unit_price_micros == 0:
        return UNLIMITED  # priced by output (held whole at admission), or free
    return Reservation(covered_gpu_ms=gpu_ms_within(held_micros, quote.unit_price_micros))


def _in_the_red(organization_id: Any) -> Refusal | None:
    """A refusal when the organization's balance no longer covers what it holds (a refund or dispute took it)."""
    row = Account.objects.filter(pk=organization_id).values_list("balance_micros", "held_micros").first()
    if row is None or row[0] >= row[1]:
        return None
    return Refusal(
        "The organization's balance no longer covers the credit held for its requests (a payment was refunded or "
        "disputed); add credits in billing.",
        INSUFFICIENT,
    )


def reserve(job: Job, gpu_ms: int, ahead_ms: int) -> Reservation | Refusal:
    """Inference's ``reserve`` hook: the job's hold grows before the work it pays for is done.

    The hold is extended to cover ``gpu_ms`` of GPU time in total, and up to ``ahead_ms`` more while the credit,
    the budget, the key's limit and its maker's leave room (so the next steps need no call). When even ``gpu_ms`` does
    not fit, the job stops before that work. A hold that already covers ``gpu_ms`` is answered from three reads.
    """
    hold = Hold.objects.filter(job_id=job.pk, released_at=None).first()
    if hold is None:
        return UNLIMITED  # nothing held (no price in force when admitted): settlement bills nothing beyond it
    red = _in_the_red(job.organization_id)
    if red is not None:
        return red
    # Settlement prices the job at the price in force when it started, which may differ from the admission's.
    quote = pricing.price_for(job.endpoint, job.started_at or timezone.now(), job.organization_id)
    coverage = _coverage(hold.amount_micros, quote)
    if coverage.covered_gpu_ms is None:
        # Priced by output (or free): held whole at admission, at the price then. Where the price at the start asks
        # more (a new version took effect while the job waited), the hold grows to the asked outputs' cost at it
        # before any work, within the same limits, or the job stops here: settlement bills at the start's price,
        # capped at the hold, and would otherwise bill fewer outputs than it delivered.
        asked = pricing.hold_micros(job.endpoint, job.input, quote)
        if asked <= hold.amount_micros:
            return coverage
        return _grow(job, quote, needed_micros=asked, wanted_micros=asked)
    if gpu_ms <= coverage.covered_gpu_ms:
        return coverage
    price = quote.unit_price_micros
    return _grow(
        job, quote, needed_micros=gpu_cost_micros(gpu_ms, price),
        wanted_micros=gpu_cost_micros(gpu_ms + max(ahead_ms, 0), price),
    )  # fmt: skip


@retrying_atomic
def _grow(job: Job, quote: pricing.Quote, *, needed_micros: int, wanted_micros: int) -> Reservation | Refusal:
    """The job's hold grown to ``needed_micros`` at least and ``wanted_micros`` where the limits leave room, decided
    on its locked hold and account; the refusal of the tightest limit where even ``needed_micros`` does not fit."""
    hold = locked_open_hold(job.pk)  # the job's hold, then its account (the lock order)
    if hold is None:
        return UNLIMITED
    needed = needed_micros - hold.amount_micros
    if needed <= 0:
        return _coverage(hold.amount_micros, quote)
    wanted = wanted_micros - hold.amount_micros
    account = locked_account(job.organization_id)
    limits = _read_key_limits(job)
    end_user_limit = end_users.limit_of(job.organization_id, job.end_user) if job.end_user else None
    room, refusal = _spend_room(account, job, limits, end_user_limit=end_user_limit)
    if needed > room:
        return refusal
    extra = min(wanted, room)
    Hold.objects.filter(pk=hold.pk).update(amount_micros=F("amount_micros") + extra)
    account.held_micros += extra
    account.save(update_fields=["held_micros"])
    return _coverage(hold.amount_micros + extra, quote)


def may_continue(job: Job, gpu_ms: int) -> Refusal | None:
    """Inference's ``may_continue`` hook, at each heartbeat: stops a running job whose organization went into the red.

    Holds are placed against the balance; a refunded or disputed payment can take the balance below what is held,
    and the work those holds stand for is then no longer paid for. (Work beyond the hold is ``reserve``'s to refuse.)
    """
    return _in_the_red(job.organization_id)


def ended_unstarted(job: Job) -> None:
    """Inference's ``ended_unstarted`` hook: a job cancelled in the queue gives its hold back."""
    holds.take_off_held(organization_id=job.organization_id, amount_micros=holds.release(job_id=job.pk))


def job_usage(job: Job) -> Usage | None:
    """Inference's ``usage`` hook: the ``usage`` object of a finished request's status and result."""
    if not job.is_final:
        return None
    # A record is written after its job was created: the bound prunes earlier months' partitions (billing.partitions).
    records = list(
        UsageRecord.objects.filter(job=job, billable=True, recorded_at__gte=job.created_at).order_by("attempt_number")
    )
    if records:
        last = records[-1]
        unit, unit_price = last.unit, last.unit_price_micros
    else:
        quote = pricing.price_for(job.endpoint, job.started_at or job.created_at, job.organization_id)
        quote = quote.for_outputs(asked(job.input))
        unit, unit_price = quote.unit, quote.unit_price_micros
    return {
        "gpu_class": job.gpu_class,
        "gpu_ms": sum(record.gpu_ms for record in records),
        "billable_units": float(sum(record.billable_units for record in records)),
        "unit": unit,
        "unit_price_micros": unit_price,
        "cost_micros": sum(record.cost_micros for record in records),
    }


def endpoint_price(endpoint: Endpoint) -> ListedPrice | None:
    """Inference's ``price`` hook: the public price in force now, as /v1/models shows it (no negotiated price)."""
    return pricing.price_for(endpoint, timezone.now()).as_json()
