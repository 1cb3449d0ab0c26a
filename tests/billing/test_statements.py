"""Monthly statements: one for each month since the organization was created, issued and numbered once a month with
activity is closed, and a PDF whose totals (read back with pypdf) are the credit ledger's; reconciliation keeps
comparing issued statements with the ledger."""

from __future__ import annotations

import io
import re
import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum
from django.test import Client
from django.utils import timezone
from pypdf import PdfReader

from accounts import key_cache
from accounts.models import Organization
from accounts.sweeps import SweepIncomplete
from billing import reconciliation, statements
from billing.ledger import grant_credits, post_entry, refund_job
from billing.locks import locked_account
from billing.models import CreditEntry, EntryKind, Payment, PaymentKind, PaymentStatus, Statement
from billing.money import MICROS_PER_DOLLAR
from billing.receipts import issue_receipt
from inference.models import Endpoint
from tests import lifecycle
from tests.billing.test_receipts import buy, save_card
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs a database where transactions run at once"
)

# Labels of the statement PDF's summary, as printed, and the movement each stands for.
SUMMARY = {
    "Credits purchased": "purchases_micros",
    "Auto top-ups": "auto_top_ups_micros",
    "Free credits granted": "grants_micros",
    "Usage": "usage_micros",
    "Refunds of requests": "request_refunds_micros",
    "Refunds to the card": "card_refunds_micros",
    "Disputed payments": "disputes_micros",
    "Adjustments": "adjustments_micros",
}
AMOUNT = r"(-?\$[\d,]+\.\d+)"


def pdf_text(content: bytes) -> str:
    return "\n".join(page.extract_text() for page in PdfReader(io.BytesIO(content)).pages)


def micros(printed: str) -> int:
    """``-$1,234.500001`` as micro-dollars, exactly."""
    negative = printed.startswith("-")
    dollars = Decimal(printed.lstrip("-").lstrip("$").replace(",", ""))
    value = int(dollars * MICROS_PER_DOLLAR)
    return -value if negative else value


def printed(text: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}\s*{AMOUNT}$", text, re.MULTILINE)
    assert match, f"no line {label!r} in:\n{text}"
    return micros(match.group(1))


def month_start(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def last_month() -> date:
    return previous(month_start(timezone.now()).date())


def closed_month() -> date:
    """Two months ago: closed whenever the test runs (last month is not, in the first hour of a month)."""
    return previous(last_month())


def just_after(month: date) -> datetime:
    """Two hours into the month after ``month``: when the nightly task issues ``month``'s statements."""
    return datetime(month.year + month.month // 12, month.month % 12 + 1, 1, 2, tzinfo=UTC)


def created_months_ago(organization: Organization, months: int) -> None:
    moment = month_start(timezone.now())
    for _ in range(months):
        moment = month_start(moment - timedelta(days=1))
    created_at(organization, moment + timedelta(hours=5))


def created_at(organization: Organization, moment: datetime) -> None:
    Organization.objects.filter(pk=organization.pk).update(created_at=moment)
    key_cache.forget_all()  # a kept key carries its organization as it was read
    organization.refresh_from_db()


def move_into(month: date, entries: Any, *, day: int = 10) -> None:
    """Restamps ``entries`` inside ``month``, a minute apart in id order (so their running balances stay in order)."""
    start = datetime(month.year, month.month, day, 9, tzinfo=UTC)
    for offset, entry in enumerate(entries.order_by("id")):
        CreditEntry.objects.filter(pk=entry.pk).update(created_at=start + timedelta(minutes=offset))


@pytest.fixture
def second_endpoint(builtin_endpoint: Endpoint) -> Endpoint:
    twin = Endpoint.objects.get(pk=builtin_endpoint.pk)
    twin.pk = None
    twin.name = "tiny-sd-twin"
    twin.save()
    return twin


def busy_month(tenant: dict[str, Any], builtin_endpoint: Endpoint, second_endpoint: Endpoint) -> date:
    """A closed month with a grant, a purchase and its card refund, usage on two endpoints, a request refunded and an
    adjustment; the organization created the month before, with its signup grant then."""
    organization = tenant["organization"]
    month = closed_month()
    created_months_ago(organization, 3)
    move_into(previous(month), CreditEntry.objects.filter(organization=organization))  # the signup grant
    before = set(CreditEntry.objects.filter(organization=organization).values_list("pk", flat=True))
    grant_credits(organization=organization, amount_micros=3_000_000, reason="Welcome")
    payment = Payment.objects.create(
        organization=organization,
        kind=PaymentKind.PURCHASE,
        status=PaymentStatus.SUCCEEDED,
        amount_cents=2_000,
        amount_refunded_cents=150,
        succeeded_at=datetime(month.year, month.month, 10, 8, tzinfo=UTC),
    )
    account = locked_account(organization.pk)
    post_entry(
        account=account, kind=EntryKind.PURCHASE, amount_micros=20_000_000, idempotency_key="buy", payment=payment
    )
    issue_receipt(payment, test_mode=True)
    post_entry(account=account, kind=EntryKind.REFUND, amount_micros=-1_500_000, idempotency_key="re", payment=payment)
    jobs = [lifecycle.run_as(tenant, builtin_endpoint, gpu_ms=1_234 + n) for n in range(3)]
    jobs += [lifecycle.run_as(tenant, second_endpoint, gpu_ms=777)]
    refund_job(job=jobs[0], reason="It came out blank")
    grant_credits(organization=organization, amount_micros=-250_001, reason="Fix", kind=EntryKind.ADJUSTMENT)
    move_into(month, CreditEntry.objects.filter(organization=organization).exclude(pk__in=before))
    return month


def previous(month: date) -> date:
    return (month - timedelta(days=1)).replace(day=1)


def ledger_figures(organization: Organization, month: date) -> dict[str, Any]:
    """The month straight from the ledger, without the statements module: balances before each end, sums by kind,
    and usage debits per endpoint."""
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime(month.year + month.month // 12, month.month % 12 + 1, 1, tzinfo=UTC)
    entries = CreditEntry.objects.filter(organization=organization)

    def balance_before(moment: datetime) -> int:
        last = entries.filter(created_at__lt=moment).order_by("-created_at", "-id").first()
        return last.balance_after_micros if last else 0

    in_month = entries.filter(created_at__gte=start, created_at__lt=end)

    def total(**where: Any) -> int:
        return int(in_month.filter(**where).aggregate(total=Sum("amount_micros"))["total"] or 0)

    usage = {
        row["usage_record__endpoint__name"]: -int(row["total"])
        for row in in_month.filter(kind=EntryKind.USAGE)
        .values("usage_record__endpoint__name")
        .annotate(total=Sum("amount_micros"))
    }
    return {
        "opening": balance_before(start),
        "closing": balance_before(end),
        "Credits purchased": total(kind=EntryKind.PURCHASE),
        "Auto top-ups": total(kind=EntryKind.AUTO_TOP_UP),
        "Free credits granted": total(kind=EntryKind.GRANT),
        "Usage": total(kind=EntryKind.USAGE),
        "Refunds of requests": total(kind=EntryKind.REFUND, payment__isnull=True),
        "Refunds to the card": total(kind=EntryKind.REFUND, payment__isnull=False),
        "Disputed payments": total(kind=EntryKind.DISPUTE),
        "Adjustments": total(kind=EntryKind.ADJUSTMENT),
        "usage": usage,
    }


def test_the_statement_pdf_totals_are_the_ledgers(
    priced_without_broker: None, tenant: dict[str, Any], builtin_endpoint: Endpoint, second_endpoint: Endpoint
) -> None:
    month = busy_month(tenant, builtin_endpoint, second_endpoint)
    ledger = ledger_figures(tenant["organization"], month)
    assert all(ledger[label] != 0 for label in SUMMARY if label not in ("Auto top-ups", "Disputed payments"))

    response = tenant["client"].get(f"/v1/billing/statements/{month:%Y-%m}?format=pdf")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    statement = Statement.objects.get(organization=tenant["organization"], month=month)
    assert response["Content-Disposition"] == f'attachment; filename="{statement.number}.pdf"'
    text = pdf_text(response.content)

    assert statement.number in text
    assert f"Period: {month:%Y-%m}-01 to " in text
    assert printed(text, "Opening balance") == ledger["opening"]
    assert printed(text, "Closing balance") == ledger["closing"]
    for label in SUMMARY:
        assert printed(text, label) == ledger[label], label
    assert ledger["opening"] + sum(ledger[label] for label in SUMMARY) == ledger["closing"]
    # Usage by endpoint: each endpoint's debits, and their total the ledger's usage movement.
    for endpoint, name in ((builtin_endpoint, "tiny-sd"), (second_endpoint, "tiny-sd-twin")):
        match = re.search(rf"^{re.escape(endpoint.endpoint_id)} ([\d,]+) [\d,.]+ s {AMOUNT}$", text, re.MULTILINE)
        assert match, text
        assert micros(match.group(2)) == ledger["usage"][name]
    assert printed(text, "Total usage") == -ledger["Usage"]
    assert "Receipt" in text  # the month's payment, by its receipt's number
    receipt_number = Payment.objects.get(organization=tenant["organization"]).receipt.number
    assert receipt_number in text

    # The same figures as JSON and CSV, from the statement as issued.
    answer = tenant["client"].get(f"/v1/billing/statements/{month:%Y-%m}").json()
    assert (answer["status"], answer["number"]) == ("issued", statement.number)
    assert (answer["opening_balance_micros"], answer["closing_balance_micros"]) == (
        ledger["opening"],
        ledger["closing"],
    )
    assert answer["usage_debited_micros"] == -ledger["Usage"]
    assert answer["balanced"] is True
    assert reconciliation.check_statements().drift == []


def test_statements_start_with_the_organization(tenant: dict[str, Any], clock_held_in_the_hour: datetime) -> None:
    """An organization made today has this month's statement only (the billing page used to list six months)."""
    client = tenant["client"]
    # Made in the hour Django's clock is held in: this month is its month even when the test crosses a month's end.
    created_at(tenant["organization"], clock_held_in_the_hour)
    this_month = f"{clock_held_in_the_hour:%Y-%m}"
    assert client.get("/v1/billing/statements").json()["data"] == [
        {"month": this_month, "status": "open", "number": None, "issued_at": None}
    ]
    before = f"{last_month():%Y-%m}"
    refused = client.get(f"/v1/billing/statements/{before}")
    assert (refused.status_code, refused.json()["error_type"]) == (404, "not_found")
    owner = Client()
    owner.force_login(tenant["user"])
    page = owner.get("/dashboard/billing").content.decode()
    assert f"/dashboard/billing/statements/{this_month}" in page
    assert f"/dashboard/billing/statements/{before}" not in page
    assert owner.get(f"/dashboard/billing/statements/{before}").status_code == 404
    pdf = owner.get(f"/dashboard/billing/statements/{this_month}?format=pdf")
    assert pdf["Content-Type"] == "application/pdf"
    assert "Provisional statement" in pdf_text(pdf.content)

    # Made three months ago: those months and this one, newest first.
    created_months_ago(tenant["organization"], 3)
    months = [row["month"] for row in client.get("/v1/billing/statements").json()["data"]]
    assert len(months) == 4
    assert months[0] == this_month
    assert months == sorted(months, reverse=True)


def test_the_current_month_is_provisional_and_unnumbered(tenant: dict[str, Any]) -> None:
    # The month of the signup grant: still provisional just after it ends (closed an hour later), when the test
    # crosses a month's end.
    month = f"{CreditEntry.objects.get(organization=tenant['organization']).created_at:%Y-%m}"
    answer = tenant["client"].get(f"/v1/billing/statements/{month}").json()
    assert (answer["status"], answer["number"], answer["issued_at"]) == ("provisional", None, None)
    assert answer["opening_balance_micros"] == 0
    assert answer["closing_balance_micros"] == 1_000_000  # the signup grant
    text = pdf_text(tenant["client"].get(f"/v1/billing/statements/{month}?format=pdf").content)
    assert "Provisional statement" in text
    assert "provisional and has no number" in text
    assert not Statement.objects.exists()


def test_a_closed_month_is_issued_once_and_a_quiet_one_not_at_all(
    priced_without_broker: None, tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    created_months_ago(tenant["organization"], 3)
    created_months_ago(other_tenant["organization"], 3)
    month = closed_month()
    move_into(month, CreditEntry.objects.filter(organization=tenant["organization"]))
    move_into(month, CreditEntry.objects.filter(organization=other_tenant["organization"]))

    # Not in the hour after the month ends (a debit stamped before midnight may still commit), then the nightly task
    # issues the month's statements for both, in one series; asking again answers the same.
    assert statements.issue_due_statements(now=just_after(month) - timedelta(hours=1, minutes=30)) == 0
    assert statements.issue_due_statements(now=just_after(month)) == 2
    assert statements.issue_due_statements(now=just_after(month)) == 0
    numbers = sorted(Statement.objects.values_list("sequence_number", flat=True))
    assert numbers == [1, 2]
    first = tenant["client"].get(f"/v1/billing/statements/{month:%Y-%m}").json()
    assert tenant["client"].get(f"/v1/billing/statements/{month:%Y-%m}").json() == first
    assert first["number"] == Statement.objects.get(organization=tenant["organization"]).number
    assert first["number"].startswith("GM-S-")  # payments are off here: not test mode

    # The month before had nothing: a statement with the balances, but none issued.
    quiet = tenant["client"].get(f"/v1/billing/statements/{previous(month):%Y-%m}").json()
    assert (quiet["status"], quiet["number"]) == ("no_activity", None)
    assert Statement.objects.count() == 2
    index = {row["month"]: row for row in tenant["client"].get("/v1/billing/statements").json()["data"]}
    assert index[f"{month:%Y-%m}"]["status"] == "issued"
    assert index[f"{previous(month):%Y-%m}"]["status"] == "closed"

    # An issued statement keeps the billing details it was issued with.
    tenant["client"].put(
        "/v1/billing/details", {"legal_name": "Later Name", "address": "", "tax_id": ""}, format="json"
    )
    assert tenant["client"].get(f"/v1/billing/statements/{month:%Y-%m}").json()["billed_to"] == first["billed_to"]


def test_an_organization_whose_statement_fails_leaves_the_others_issued_and_the_task_failed(
    priced_without_broker: None,
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for organization in (tenant["organization"], other_tenant["organization"]):
        created_months_ago(organization, 3)
        move_into(closed_month(), CreditEntry.objects.filter(organization=organization))
    month = closed_month()
    issue = statements.issue_statement
    failing = tenant["organization"].pk

    def failing_for_one(*, organization: Organization, **kwargs: Any) -> Statement | None:
        if organization.pk == failing:
            raise ValueError("a row no one foresaw")
        return issue(organization=organization, **kwargs)

    monkeypatch.setattr(statements, "issue_statement", failing_for_one)
    with pytest.raises(SweepIncomplete, match=tenant["organization"].slug):
        statements.issue_due_statements(now=just_after(month))
    assert list(Statement.objects.values_list("organization_id", flat=True)) == [other_tenant["organization"].pk]
    assert "a row no one foresaw" in caplog.text  # logged with its traceback where it failed

    # The fault gone, the next night issues the one left.
    monkeypatch.setattr(statements, "issue_statement", issue)
    assert statements.issue_due_statements(now=just_after(month)) == 1
    assert Statement.objects.count() == 2


def test_the_nightly_task_issues_the_receipts_when_the_statements_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    from billing import receipts, tasks

    def failing(**kwargs: Any) -> int:
        raise SweepIncomplete(["the statement of acme for 2026-11"])

    monkeypatch.setattr(statements, "issue_due_statements", failing)
    monkeypatch.setattr(receipts, "issue_missing_receipts", lambda **kwargs: 3)
    with pytest.raises(SweepIncomplete, match="statements"):
        tasks.issue_statements()
    monkeypatch.setattr(statements, "issue_due_statements", lambda **kwargs: 2)
    assert tasks.issue_statements() == {"statements": 2, "receipts": 3}


def test_a_test_mode_statement_says_so_and_is_made_out_to_the_billing_details(
    fake_stripe: FakeStripe, settings: Any, tenant: dict[str, Any]
) -> None:
    """The fake Stripe of ``make run`` without a key: credits bought on it, a statement in the test series, its PDF
    labelled test mode and made out to the organization's legal name, address and tax id."""
    settings.STRIPE_FAKE = True
    organization, client = tenant["organization"], tenant["client"]
    details = {"legal_name": "Pixel Forge Ltd", "address": "1 High Street\nLondon EC1A 1AA\nUnited Kingdom"}
    changed = client.put("/v1/billing/details", {**details, "tax_id": "GB 123 4567 89"}, format="json")
    assert changed.status_code == 200, changed.json()
    save_card(client)
    payment = buy(client, 2_000)
    receipt_number = Payment.objects.get(pk=payment["id"]).receipt.number
    assert receipt_number == "GM-TEST-R-000001"
    # The signup grant and the purchase, moved into a closed month.
    month = closed_month()
    created_months_ago(organization, 3)
    move_into(month, CreditEntry.objects.filter(organization=organization))
    Payment.objects.filter(pk=payment["id"]).update(
        succeeded_at=datetime(month.year, month.month, 10, 9, 30, tzinfo=UTC)
    )

    response = client.get(f"/v1/billing/statements/{month:%Y-%m}?format=pdf")
    assert response.status_code == 200
    statement = Statement.objects.get(organization=organization, month=month)
    assert (statement.number, statement.test_mode) == ("GM-TEST-S-000001", True)
    assert response["Content-Disposition"] == 'attachment; filename="GM-TEST-S-000001.pdf"'
    text = pdf_text(response.content)
    for expected in (
        "TEST MODE - no real money moved. This document is not valid for accounting.",
        "Statement number: GM-TEST-S-000001",
        "Pixel Forge Ltd",
        "1 High Street",
        "London EC1A 1AA",
        "United Kingdom",
        "Tax ID: GB 123 4567 89",
        receipt_number,  # the month's payment, by its test receipt's number
    ):
        assert expected in text, (expected, text)
    assert printed(text, "Credits purchased") == 20_000_000
    assert printed(text, "Closing balance") == 21_000_000  # with the signup grant

    # The statement as JSON says the same.
    answer = client.get(f"/v1/billing/statements/{month:%Y-%m}").json()
    assert (answer["number"], answer["test_mode"]) == ("GM-TEST-S-000001", True)
    assert answer["billed_to"] == {"name": "Pixel Forge Ltd", "address": details["address"], "tax_id": "GB 123 4567 89"}


def test_reconciliation_finds_a_statement_that_no_longer_matches_the_ledger(
    priced_without_broker: None, tenant: dict[str, Any], builtin_endpoint: Endpoint, second_endpoint: Endpoint
) -> None:
    month = busy_month(tenant, builtin_endpoint, second_endpoint)
    assert statements.issue_due_statements(now=just_after(month)) == 1
    run = reconciliation.run_reconciliation(full=True)
    assert run.ok, run.drift
    assert run.checked["statements"] == {"checked": 1, "drift": 0}

    # A debit stamped inside the closed month after its statement was issued.
    lifecycle.run_as(tenant, second_endpoint, gpu_ms=5_000)
    late = CreditEntry.objects.filter(organization=tenant["organization"]).latest("id")
    CreditEntry.objects.filter(pk=late.pk).update(created_at=datetime(month.year, month.month, 20, tzinfo=UTC))
    check = reconciliation.check_statements()
    assert {item["kind"] for item in check.drift} == {
        "balances_differ_from_ledger",
        "movements_differ_from_ledger",
        "usage_differs_from_ledger",
    }
    [example] = next(item for item in check.drift if item["kind"] == "movements_differ_from_ledger")["examples"]
    assert example["ledger"]["usage_micros"] == example["issued"]["usage_micros"] + late.amount_micros


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_statements_issued_at_once_take_every_number_once(make_user: Any) -> None:
    from tests.conftest import personal_organization

    organizations = [personal_organization(make_user()) for _ in range(6)]
    month = closed_month()
    for organization in organizations:
        created_months_ago(organization, 3)
        move_into(month, CreditEntry.objects.filter(organization=organization))
    # Each organization's statement asked for three times at once.
    callers = [organization for organization in organizations for _ in range(3)]
    start = threading.Barrier(len(callers), timeout=30)
    issued: list[str] = []
    errors: list[BaseException] = []

    def issue(organization: Organization) -> None:
        try:
            start.wait()
            statement = statements.issue_statement(organization=organization, month=month)
            assert statement is not None
            issued.append(statement.number)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=issue, args=(organization,)) for organization in callers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert Statement.objects.count() == len(organizations)
    assert sorted(Statement.objects.values_list("sequence_number", flat=True)) == list(range(1, 7))
    assert len(set(issued)) == len(organizations)  # each caller got its organization's one statement
