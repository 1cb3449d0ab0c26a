"""Spend control in real time: what inference asks billing before and while a job runs.

Admission holds the job's estimated cost against the organization's available credit (balance less
holds), its monthly budget and its key's monthly limit; a heartbeat checks the time used so far
against the same three; the end of a job settles (``billing.metering``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db.models import Sum
from django.utils import timezone

from billing import holds, pricing
from billing.ledger import locked_account
from billing.models import Account, Granularity, Hold, KeySpendLimit, PriceUnit, UsageRecord, UsageRollup
from billing.money import cost_micros, format_micros
from inference.hooks import Refusal
from inference.models import Endpoint, Job

INSUFFICIENT = "insufficient_credits"
OVER_LIMIT = "spend_limit_exceeded"


def month_start(moment: datetime | None = None) -> datetime:
    moment = moment or timezone.now()
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def spent_this_month(*, organization_id: Any, key_id: Any = None) -> int:
    """Cost recorded since the start of this UTC month, from the daily rollups (one indexed query)."""
    rows = UsageRollup.objects.filter(granularity=Granularity.DAY, bucket_start__gte=month_start())
    rows = rows.filter(key_id=key_id) if key_id is not None else rows.filter(organization_id=organization_id)
    return int(rows.aggregate(total=Sum("cost_micros"))["total"] or 0)


def _key_held(key_id: Any) -> int:
    return int(
        Hold.objects.filter(api_key_id=key_id, released_at=None).aggregate(total=Sum("amount_micros"))["total"] or 0
    )


def _check_limits(account: Account, job: Job, extra_micros: int, *, running: bool) -> Refusal | None:
    """Would spending ``extra_micros`` more (beyond what is held) break the balance, budget or key limit?"""
    needed = format_micros(extra_micros)
    if account.available_micros < extra_micros:
        detail = (
            "Credits ran out while this request ran."
            if running
            else f"Not enough credits: this request needs about {needed} and "
            f"{format_micros(max(account.available_micros, 0))} is available. Add credits in billing."
        )
        return Refusal(detail, INSUFFICIENT)
    if account.monthly_budget_micros is not None:
        spent = spent_this_month(organization_id=account.organization_id)
        if spent + account.held_micros + extra_micros > account.monthly_budget_micros:
            return Refusal(
                f"The organization's monthly budget of {format_micros(account.monthly_budget_micros)} is spent "
                f"({format_micros(spent)} used, {format_micros(account.held_micros)} held by running requests).",
                OVER_LIMIT,
            )
    if job.api_key_id is not None:
        limit = KeySpendLimit.objects.filter(api_key_id=job.api_key_id).first()
        if limit is not None:
            spent = spent_this_month(organization_id=account.organization_id, key_id=job.api_key_id)
            if spent + _key_held(job.api_key_id) + extra_micros > limit.monthly_limit_micros:
                return Refusal(
                    f"This API key's monthly limit of {format_micros(limit.monthly_limit_micros)} is spent "
                    f"({format_micros(spent)} used).",
                    OVER_LIMIT,
                )
    return None


def admit(job: Job) -> Refusal | None:
    """Inference's ``admit`` hook: holds the job's estimated cost, or says why it may not start.

    Called for a submission and again for an operator's requeue, so the estimate is priced when admitted (a job
    requeued days later holds today's price, which the heartbeat checks compare against).
    """
    quote = pricing.price_for(job.endpoint, timezone.now())
    estimate = pricing.estimate_cost_micros(job.endpoint, job.input, quote)
    account = locked_account(job.organization_id)
    refusal = _check_limits(account, job, estimate, running=False)
    if refusal is not None:
        return refusal
    holds.place(
        account=account,
        hold=Hold(
            job=job,
            organization_id=job.organization_id,
            api_key_id=job.api_key_id,
            amount_micros=estimate,
            unit_price_micros=quote.unit_price_micros,
            unit=quote.unit,
        ),
    )
    return None


def may_continue(job: Job, gpu_ms: int) -> Refusal | None:
    """Inference's ``may_continue`` hook: may this running job go on, having used ``gpu_ms``?"""
    hold = Hold.objects.filter(job=job, released_at=None).first()
    if hold is not None:
        unit, unit_price, held = hold.unit, hold.unit_price_micros, hold.amount_micros
    else:
        quote = pricing.price_for(job.endpoint, job.started_at or timezone.now())
        unit, unit_price, held = quote.unit, quote.unit_price_micros, 0
    if unit != PriceUnit.GPU_SECOND:
        return None  # priced by output: the hold is the whole cost
    _, so_far = cost_micros(unit=unit, unit_price_micros=unit_price, gpu_ms=gpu_ms, images=0, pixels=0)
    extra = so_far - held
    if extra <= 0:
        return None
    account = Account.objects.filter(pk=job.organization_id).first()
    if account is None:
        return None
    return _check_limits(account, job, extra, running=True)


def ended_unstarted(job: Job) -> None:
    """Inference's ``ended_unstarted`` hook: a job cancelled in the queue gives its hold back."""
    holds.release(account=locked_account(job.organization_id), job_id=job.pk)


def job_usage(job: Job) -> dict[str, Any] | None:
    """Inference's ``usage`` hook: the ``usage`` object of a finished request's status and result."""
    if not job.is_final:
        return None
    records = list(UsageRecord.objects.filter(job=job, billable=True).order_by("attempt_number"))
    if records:
        last = records[-1]
        unit, unit_price = last.unit, last.unit_price_micros
    else:
        quote = pricing.price_for(job.endpoint, job.started_at or job.created_at)
        unit, unit_price = quote.unit, quote.unit_price_micros
    return {
        "gpu_class": job.gpu_class,
        "gpu_ms": sum(record.gpu_ms for record in records),
        "billable_units": float(sum(record.billable_units for record in records)),
        "unit": unit,
        "unit_price_micros": unit_price,
        "cost_micros": sum(record.cost_micros for record in records),
    }


def endpoint_price(endpoint: Endpoint) -> dict[str, Any] | None:
    """Inference's ``price`` hook: the price in force now, as /v1/models shows it."""
    return pricing.price_for(endpoint, timezone.now()).as_json()
