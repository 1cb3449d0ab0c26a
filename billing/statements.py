"""The monthly statement of an organization: usage by endpoint, credits bought and granted, refunds, balances.

Balances come from the credit ledger: the opening and closing balances are the running balances
(``balance_after_micros``) of the last entries before each end of the month, and the movements are
the month's entries summed by kind, so ``opening + movements == closing`` checks the ledger's own
arithmetic (``balanced``). Usage by endpoint reads the daily rollups.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import UTC, date, datetime
from typing import Any

from django.db.models import Max, Q, QuerySet, Sum

from billing.ledger import BillingError
from billing.models import CreditEntry, EntryKind, Granularity, Payment, PaymentStatus, UsageRollup
from inference.models import Endpoint

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")

# Movements of credit, by what moved them. A refund with a payment went back to the card; one
# without gave a request's cost back as credit.
MOVEMENTS: dict[str, Q] = {
    "purchases_micros": Q(kind=EntryKind.PURCHASE),
    "auto_top_ups_micros": Q(kind=EntryKind.AUTO_TOP_UP),
    "grants_micros": Q(kind=EntryKind.GRANT),
    "usage_micros": Q(kind=EntryKind.USAGE),
    "request_refunds_micros": Q(kind=EntryKind.REFUND, payment__isnull=True),
    "card_refunds_micros": Q(kind=EntryKind.REFUND, payment__isnull=False),
    "disputes_micros": Q(kind=EntryKind.DISPUTE),
    "adjustments_micros": Q(kind=EntryKind.ADJUSTMENT),
}


def parse_month(text: str) -> date:
    """``YYYY-MM`` to the month's first day (``BillingError`` if malformed)."""
    match = _MONTH.match(text)
    if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 2000:
        raise BillingError("A month is written YYYY-MM, e.g. 2025-01.")
    return date(int(match.group(1)), int(match.group(2)), 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def _balance_before(entries: QuerySet[CreditEntry], moment: datetime) -> int:
    last = entries.filter(created_at__lt=moment).order_by("-created_at", "-id").first()
    return last.balance_after_micros if last is not None else 0


def monthly_statement(*, organization_id: uuid.UUID, month: date) -> dict[str, Any]:
    start, end = month_bounds(month)
    entries = CreditEntry.objects.filter(organization_id=organization_id)
    # Entries appended while the statement is read (the current month) are left out of every figure.
    newest = entries.aggregate(newest=Max("id"))["newest"] or 0
    entries = entries.filter(id__lte=newest)
    opening = _balance_before(entries, start)
    closing = _balance_before(entries, end)
    sums = entries.filter(created_at__gte=start, created_at__lt=end).aggregate(
        **{name: Sum("amount_micros", filter=condition) for name, condition in MOVEMENTS.items()}
    )
    movements = {name: int(sums[name] or 0) for name in MOVEMENTS}
    total = sum(movements.values())
    payments = Payment.objects.filter(
        organization_id=organization_id, status=PaymentStatus.SUCCEEDED, succeeded_at__gte=start, succeeded_at__lt=end
    ).order_by("succeeded_at", "id")
    usage = _usage_by_endpoint(organization_id, start, end)
    return {
        "organization_id": str(organization_id),
        "month": f"{month:%Y-%m}",
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "currency": "usd",
        "opening_balance_micros": opening,
        "closing_balance_micros": closing,
        "movements": movements,
        "total_movements_micros": total,
        "credits_bought_micros": movements["purchases_micros"] + movements["auto_top_ups_micros"],
        "balanced": opening + total == closing,
        "payments": [
            {
                "id": payment.pk,
                "kind": payment.kind,
                "amount_cents": payment.amount_cents,
                "amount_refunded_cents": payment.amount_refunded_cents,
                "succeeded_at": payment.succeeded_at.isoformat() if payment.succeeded_at else None,
            }
            for payment in payments
        ],
        "usage": usage,
        "usage_cost_micros": sum(row["cost_micros"] for row in usage),
    }


def _usage_by_endpoint(organization_id: uuid.UUID, start: datetime, end: datetime) -> list[dict[str, Any]]:
    rows = list(
        UsageRollup.objects.filter(
            organization_id=organization_id,
            granularity=Granularity.DAY,
            bucket_start__gte=start,
            bucket_start__lt=end,
        )
        .values("endpoint_id")
        .annotate(
            attempts=Sum("attempts"),
            billable_attempts=Sum("billable_attempts"),
            gpu_ms=Sum("gpu_ms"),
            unbilled_gpu_ms=Sum("unbilled_gpu_ms"),
            cost_micros=Sum("cost_micros"),
        )
        .order_by("endpoint_id")
    )
    names = {
        endpoint.pk: endpoint.endpoint_id
        for endpoint in Endpoint.objects.filter(pk__in=[r["endpoint_id"] for r in rows])
    }
    return [
        {
            "endpoint": names.get(row["endpoint_id"], str(row["endpoint_id"])),
            **{
                column: int(row[column] or 0)
                for column in ("attempts", "billable_attempts", "gpu_ms", "unbilled_gpu_ms", "cost_micros")
            },
        }
        for row in sorted(rows, key=lambda row: names.get(row["endpoint_id"], ""))
    ]


def statement_csv(statement: dict[str, Any]) -> str:
    """One row per line of the statement: ``section, item, attempts, gpu_ms, amount_micros``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["section", "item", "attempts", "gpu_ms", "amount_micros"])
    writer.writerow(["balance", "opening", "", "", statement["opening_balance_micros"]])
    for name, amount in statement["movements"].items():
        writer.writerow(["movement", name.removesuffix("_micros"), "", "", amount])
    for row in statement["usage"]:
        writer.writerow(["usage", row["endpoint"], row["attempts"], row["gpu_ms"], row["cost_micros"]])
    writer.writerow(["balance", "closing", "", "", statement["closing_balance_micros"]])
    return buffer.getvalue()
