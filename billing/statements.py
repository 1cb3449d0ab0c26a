"""The monthly statement of an organization: its balances, its credit movements by kind, usage by endpoint.

Balances come from the credit ledger: the balance before a moment is the sum of the entries stamped before it
(``balance_before``, read off the running balances), and the movements are the month's entries summed by kind, so
``opening + movements == closing`` holds where the running balances are the sums of the amounts (``balanced``;
reconciliation proves the chain entry by entry). Usage by endpoint reads the daily rollups for requests and GPU time,
and the ledger's usage entries for what each endpoint debited, so its total is the ledger's usage movement.

Statements exist for the months since the organization was created. The current month's is provisional. A month
is closed ``CLOSING_GRACE`` after it ends (a debit stamped just before midnight may commit just after); then its
statement is issued, once, if the month had any activity: numbered in the issuer's statement series
(``billing.documents``) and stored with its figures (``Statement``), which reconciliation keeps comparing with the
ledger. The beat schedule issues last month's every night (``issue_due_statements``); asking for one issues it too.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import BigIntegerField, DurationField, Max, OuterRef, Q, QuerySet, Subquery, Sum, Value
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import Organization
from accounts.sweeps import each_apart
from billing import periods
from billing.documents import DocumentPdf, allocate_number, billed_to, issuer_lines, series_for, utc_day
from billing.ledger import BillingError
from billing.models import CreditEntry, EntryKind, Granularity, Payment, PaymentStatus, Receipt, Statement, UsageRollup
from billing.money import format_micros
from billing.spreadsheets import csv_rows
from billing.stripe_client import is_test_mode
from inference.models import Endpoint

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")

# A month's statement is issued this long after the month ends: an entry is stamped before its transaction commits.
CLOSING_GRACE = timedelta(hours=1)

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
# How the statement names each movement, in the order it lists them.
MOVEMENT_LABELS: dict[str, str] = {
    "purchases_micros": "Credits purchased",
    "auto_top_ups_micros": "Auto top-ups",
    "grants_micros": "Free credits granted",
    "usage_micros": "Usage",
    "request_refunds_micros": "Refunds of requests",
    "card_refunds_micros": "Refunds to the card",
    "disputes_micros": "Disputed payments",
    "adjustments_micros": "Adjustments",
}


class NoSuchStatement(BillingError):
    """A month with no statement: malformed, not begun, or before the organization existed."""

    status_code = 404
    error_type = "not_found"


def parse_month(text: str) -> date:
    """``YYYY-MM`` to the month's first day (``BillingError`` if malformed)."""
    match = _MONTH.match(text)
    if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 2000:
        raise BillingError("A month is written YYYY-MM, e.g. 2025-01.")
    return date(int(match.group(1)), int(match.group(2)), 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """The UTC month whose first day is ``month``: its first instant, and the next month's (excluded)."""
    return periods.month_bounds(datetime(month.year, month.month, 1, tzinfo=UTC))


def month_of(moment: datetime) -> date:
    """The first day of the UTC month of ``moment``."""
    return periods.month_start(moment).date()


def previous_month(month: date) -> date:
    return (month - timedelta(days=1)).replace(day=1)


def statement_months(organization: Organization, *, now: datetime | None = None) -> list[date]:
    """The months that have a statement: the organization's first (UTC) to the current one, newest first."""
    current = month_of(now or timezone.now())
    first = min(month_of(organization.created_at), current)
    months = [current]
    while months[-1] > first:
        months.append(previous_month(months[-1]))
    return months


def is_closed(month: date, *, now: datetime | None = None) -> bool:
    return month_bounds(month)[1] + CLOSING_GRACE <= (now or timezone.now())


def check_month(organization: Organization, month: date, *, now: datetime | None = None) -> None:
    """Raises ``NoSuchStatement`` unless ``month`` has a statement (begun, and not before the organization)."""
    current = month_of(now or timezone.now())
    if month > current:
        raise NoSuchStatement("That month has not begun.")
    if month < month_of(organization.created_at):
        created = f"{organization.created_at.astimezone(UTC):%B %Y}"
        raise NoSuchStatement(f"The organization was created in {created}: it has no statement before.")


def balance_before(organization_id: Any, moment: Any, *, newest: Any = None) -> CombinedExpression:
    """The organization's balance before ``moment``, by definition the sum of its entries stamped before it (of those
    up to entry ``newest``); an expression, each argument a value or an ``OuterRef`` to the row it annotates.

    Read off the running balances, which follow the ids (the order entries took the account's lock), not the stamps:
    a debit carries its attempt's close, read before its transaction waited for the lock, so it may follow an entry
    stamped after it. A stamp is out of that order by at most a settling transaction, far less than ``CLOSING_GRACE``.
    So the newest entry (by id) stamped before ``moment`` is stamped within the grace of the latest stamp before it,
    and of the entries stamped from ``moment`` on, its running balance counts only older ones stamped within the grace
    after it: those are taken off. Bounded range reads on the stamps, however long the ledger.
    """
    newest_id = _newest_stamped_before(_deeper(organization_id), _deeper(moment), "id", _deeper(newest))
    stamped_after = _entries(organization_id, newest).filter(
        created_at__gte=moment, created_at__lt=moment + CLOSING_GRACE, id__lt=newest_id
    )
    counted_after = stamped_after.order_by().values("organization_id").annotate(total=Sum("amount_micros"))
    running = _newest_stamped_before(organization_id, moment, "balance_after_micros", newest)
    return Coalesce(running, 0, output_field=BigIntegerField()) - Coalesce(
        Subquery(counted_after.values("total")), 0, output_field=BigIntegerField()
    )


def _newest_stamped_before(organization_id: Any, moment: Any, column: str, newest: Any) -> Subquery:
    """``column`` of the newest entry (by id) stamped before ``moment``: among those stamped at most ``CLOSING_GRACE``
    before the latest stamp before it (NULL without any)."""
    stamped_before = _entries(_deeper(organization_id), _deeper(newest)).filter(created_at__lt=_deeper(moment))
    latest = stamped_before.order_by("-created_at", "-id").values("created_at")[:1]
    since = Subquery(latest) - Value(CLOSING_GRACE, output_field=DurationField())
    close_to_it = _entries(organization_id, newest).filter(created_at__gte=since, created_at__lt=moment)
    return Subquery(close_to_it.order_by("-id").values(column)[:1], output_field=BigIntegerField())


def _entries(organization_id: Any, newest: Any) -> QuerySet[CreditEntry]:
    entries = CreditEntry.objects.filter(organization_id=organization_id)
    return entries if newest is None else entries.filter(id__lte=newest)


def _deeper(value: Any) -> Any:
    """``value`` as a subquery one level further down sees it: an outer reference reaches one level further out."""
    return OuterRef(value) if isinstance(value, OuterRef) else value


def monthly_statement(*, organization_id: uuid.UUID, month: date) -> dict[str, Any]:
    """The month's figures, computed from the ledger and the rollups now."""
    start, end = month_bounds(month)
    entries = CreditEntry.objects.filter(organization_id=organization_id)
    # Entries appended while the statement is read (the current month) are left out of every figure.
    newest = entries.aggregate(newest=Max("id"))["newest"] or 0
    entries = entries.filter(id__lte=newest)
    opening, closing = (
        Organization.objects.filter(pk=organization_id)
        .annotate(
            opening=balance_before(organization_id, start, newest=newest),
            closing=balance_before(organization_id, end, newest=newest),
        )
        .values_list("opening", "closing")
        .get()
    )
    in_month = entries.filter(created_at__gte=start, created_at__lt=end)
    sums = in_month.aggregate(**{name: Sum("amount_micros", filter=condition) for name, condition in MOVEMENTS.items()})
    movements = {name: int(sums[name] or 0) for name in MOVEMENTS}
    total = sum(movements.values())
    payments = Payment.objects.filter(
        organization_id=organization_id, status=PaymentStatus.SUCCEEDED, succeeded_at__gte=start, succeeded_at__lt=end
    ).order_by("succeeded_at", "id")
    receipts = dict(Receipt.objects.filter(payment__in=payments).values_list("payment_id", "number"))
    usage = _usage_by_endpoint(organization_id, start, end, in_month)
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
                "receipt_number": receipts.get(payment.pk),
            }
            for payment in payments
        ],
        "usage": usage,
        "usage_cost_micros": sum(row["cost_micros"] for row in usage),
        "usage_debited_micros": sum(row["debited_micros"] for row in usage),
    }


_USAGE_COLUMNS = ("attempts", "billable_attempts", "gpu_ms", "unbilled_gpu_ms", "cost_micros")


def _usage_by_endpoint(
    organization_id: uuid.UUID, start: datetime, end: datetime, entries: QuerySet[CreditEntry]
) -> list[dict[str, Any]]:
    """Per endpoint: requests, GPU time and cost at price from the day rollups; ``debited_micros`` from the ledger's
    usage entries (less than the cost where a debit was capped at the hold or the balance)."""
    rollups: Any = (
        UsageRollup.objects.filter(
            organization_id=organization_id,
            granularity=Granularity.DAY,
            bucket_start__gte=start,
            bucket_start__lt=end,
        )
        .values("endpoint_id")
        .annotate(**{column: Sum(column) for column in _USAGE_COLUMNS})
        .order_by("endpoint_id")
    )
    by_endpoint: dict[int, dict[str, int]] = {
        row["endpoint_id"]: {column: int(row[column] or 0) for column in _USAGE_COLUMNS} for row in rollups
    }
    debits: Any = (
        entries.filter(kind=EntryKind.USAGE)
        .values("usage_record__endpoint_id")
        .annotate(debited=Sum("amount_micros"))
        .order_by("usage_record__endpoint_id")
    )
    for figures in by_endpoint.values():
        figures["debited_micros"] = 0
    for row in debits:
        figures = by_endpoint.setdefault(
            row["usage_record__endpoint_id"], {**dict.fromkeys(_USAGE_COLUMNS, 0), "debited_micros": 0}
        )
        figures["debited_micros"] = -int(row["debited"] or 0)
    names = {endpoint.pk: endpoint.endpoint_id for endpoint in Endpoint.objects.filter(pk__in=list(by_endpoint))}
    usage: list[dict[str, Any]] = [
        {"endpoint": names.get(key, str(key)), **figures} for key, figures in by_endpoint.items()
    ]
    return sorted(usage, key=lambda row: row["endpoint"])


def had_activity(organization_id: uuid.UUID, month: date) -> bool:
    """Credit moved, or a request ran, in the month."""
    start, end = month_bounds(month)
    moved = CreditEntry.objects.filter(organization_id=organization_id, created_at__gte=start, created_at__lt=end)
    ran = UsageRollup.objects.filter(
        organization_id=organization_id, granularity=Granularity.DAY, bucket_start__gte=start, bucket_start__lt=end
    )
    return moved.exists() or ran.exists()


# Issued statements.


def issue_statement(*, organization: Organization, month: date, now: datetime | None = None) -> Statement | None:
    """The issued statement of a closed month with activity (issued now if not yet); ``None`` for a month still open
    or without activity. Its figures are computed before the number is taken, so the series is locked briefly."""
    existing = Statement.objects.filter(organization=organization, month=month).first()
    if existing is not None:
        return existing
    check_month(organization, month, now=now)
    if not is_closed(month, now=now) or not had_activity(organization.pk, month):
        return None
    content = monthly_statement(organization_id=organization.pk, month=month)
    test_mode = is_test_mode()
    with transaction.atomic():
        number = allocate_number(series_for("statement", test_mode=test_mode))
        # Another issuer of this statement held the series' lock until it committed: its row is visible now.
        existing = Statement.objects.filter(organization=organization, month=month).first()
        if existing is not None:
            transaction.set_rollback(True)  # gives the number back
            return existing
        return Statement.objects.create(
            organization=organization,
            month=month,
            period_start=month_bounds(month)[0],
            period_end=month_bounds(month)[1],
            opening_balance_micros=content["opening_balance_micros"],
            closing_balance_micros=content["closing_balance_micros"],
            content=content,
            test_mode=test_mode,
            issued_at=timezone.now(),
            **number.fields(),
            **billed_to(organization).fields(),
        )


def issue_due_statements(*, now: datetime | None = None) -> int:
    """Issues the statements of last month (once it is closed) for every organization with activity in it that has
    none yet; answers how many were issued."""
    now = now or timezone.now()
    month = previous_month(month_of(now))
    if not is_closed(month, now=now):
        return 0
    start, end = month_bounds(month)
    active = set(
        CreditEntry.objects.filter(created_at__gte=start, created_at__lt=end).values_list("organization_id", flat=True)
    ) | set(
        UsageRollup.objects.filter(
            granularity=Granularity.DAY, bucket_start__gte=start, bucket_start__lt=end
        ).values_list("organization_id", flat=True)
    )
    active -= set(Statement.objects.filter(month=month).values_list("organization_id", flat=True))
    # Each apart: an organization whose statement fails (logged) leaves the others issued, and the task failed.
    return each_apart(
        Organization.objects.filter(pk__in=active, created_at__lt=end).order_by("created_at"),
        lambda organization: issue_statement(organization=organization, month=month, now=now) is not None,
        name=lambda organization: f"the statement of {organization.slug} for {month:%Y-%m}",
    )


def statement_for(*, organization: Organization, month: date, now: datetime | None = None) -> dict[str, Any]:
    """The statement of ``month`` as the API and pages show it: the issued one (its figures as issued, its number),
    or the month's figures now, marked ``provisional`` (month still open) or ``no_activity`` (nothing happened)."""
    check_month(organization, month, now=now)
    issued = issue_statement(organization=organization, month=month, now=now)
    if issued is not None:
        return statement_payload(issued)
    figures = monthly_statement(organization_id=organization.pk, month=month)
    details = billed_to(organization)
    return {
        **figures,
        "status": "provisional" if not is_closed(month, now=now) else "no_activity",
        "number": None,
        "issued_at": None,
        "test_mode": is_test_mode(),
        "billed_to": {"name": details.name, "address": details.address, "tax_id": details.tax_id},
    }


def statement_payload(statement: Statement) -> dict[str, Any]:
    return {
        **statement.content,
        "status": "issued",
        "number": statement.number,
        "issued_at": statement.issued_at.isoformat(),
        "test_mode": statement.test_mode,
        "billed_to": {
            "name": statement.billed_to_name,
            "address": statement.billed_to_address,
            "tax_id": statement.billed_to_tax_id,
        },
    }


def statement_index(organization: Organization, *, now: datetime | None = None) -> list[dict[str, Any]]:
    """Each month that has a statement, newest first: ``issued`` (with its number), ``open`` (not closed yet) or
    ``closed`` (none issued: asking for it issues it if the month had any activity). Two queries."""
    issued = {statement.month: statement for statement in Statement.objects.filter(organization=organization)}
    index = []
    for month in statement_months(organization, now=now):
        statement = issued.get(month)
        if statement is not None:
            status, number, issued_at = "issued", statement.number, statement.issued_at.isoformat()
        else:
            status, number, issued_at = ("closed" if is_closed(month, now=now) else "open"), None, None
        index.append({"month": f"{month:%Y-%m}", "status": status, "number": number, "issued_at": issued_at})
    return index


# Exports.


def statement_csv(statement: dict[str, Any]) -> str:
    """One row per line of the statement: ``section, item, attempts, gpu_ms, amount_micros, debited_micros``; a usage
    row's amount is its cost at price and ``debited_micros`` what the ledger took for it. Written as every billing CSV
    is (``billing.spreadsheets``): an endpoint's name that starts like a formula is text to a spreadsheet."""
    rows: list[list[Any]] = [["section", "item", "attempts", "gpu_ms", "amount_micros", "debited_micros"]]
    rows.append(["balance", "opening", "", "", statement["opening_balance_micros"], ""])
    rows += [
        ["movement", name.removesuffix("_micros"), "", "", amount, ""]
        for name, amount in statement["movements"].items()
    ]
    rows += [
        ["usage", row["endpoint"], row["attempts"], row["gpu_ms"], row["cost_micros"], row["debited_micros"]]
        for row in statement["usage"]
    ]
    rows.append(["balance", "closing", "", "", statement["closing_balance_micros"], ""])
    return csv_rows(rows)


def statement_pdf(statement: dict[str, Any]) -> bytes:
    """The PDF of a statement as ``statement_for`` answers it."""
    start = datetime.fromisoformat(statement["period_start"])
    end = datetime.fromisoformat(statement["period_end"])
    issued = datetime.fromisoformat(statement["issued_at"]) if statement["issued_at"] else timezone.now()
    title = "Statement" if statement["status"] == "issued" else "Provisional statement"
    document = DocumentPdf(title=title, number=statement["number"], test_mode=statement["test_mode"], created=issued)
    facts = [("Statement number", statement["number"])] if statement["number"] else []
    facts += [
        ("Period", f"{utc_day(start)} to {utc_day(end - timedelta(days=1))} (UTC)"),
        ("Issued" if statement["number"] else "As of", utc_day(issued)),
    ]
    document.heading(issuer=issuer_lines(), facts=facts)
    billed = statement["billed_to"]
    document.block("Account", billed_to_lines_of(billed))
    document.section("Summary")
    document.row("Opening balance", format_micros(statement["opening_balance_micros"]))
    for name, label in MOVEMENT_LABELS.items():
        document.row(label, format_micros(statement["movements"][name]))
    document.row("Closing balance", format_micros(statement["closing_balance_micros"]), bold=True)
    document.section("Usage by endpoint")
    rows = [
        [
            row["endpoint"],
            f"{row['billable_attempts']:,}",
            f"{row['gpu_ms'] / 1000:,.3f} s",
            format_micros(row["debited_micros"]),
        ]
        for row in statement["usage"]
    ]
    rows.append(["Total usage", "", "", format_micros(statement["usage_debited_micros"])])
    document.table(["Endpoint", "Requests", "GPU time", "Debited"], rows, widths=[0.46, 0.16, 0.18, 0.2])
    if statement["payments"]:
        document.section("Payments")
        document.table(
            ["Receipt", "Paid", "Amount"],
            [
                [
                    payment["receipt_number"] or f"payment {payment['id']}",
                    payment["succeeded_at"][:10] if payment["succeeded_at"] else "",
                    format_micros(payment["amount_cents"] * 10_000),
                ]
                for payment in statement["payments"]
            ],
            widths=[0.5, 0.25, 0.25],
        )
    note = (
        "Amounts in US dollars of prepaid credit. The opening balance plus the movements above is the closing balance."
    )
    if statement["status"] == "provisional":
        note += " The month is not over: this statement is provisional and has no number."
    document.note(note)
    return document.render()


def billed_to_lines_of(billed: dict[str, str]) -> list[str]:
    lines = [billed["name"], *billed["address"].splitlines()]
    if billed["tax_id"]:
        lines.append(f"Tax ID: {billed['tax_id']}")
    return [line for line in lines if line.strip()]
