"""CSV that spreadsheets open safely: every CSV export of billing (usage, statements) is written through here.

A cell a spreadsheet would read as a formula (OWASP "CSV Injection") is written as text: a key's name, an end user's
tag or an endpoint's name is whatever someone typed. Lines end in CRLF (RFC 4180), so a cell holding a CR or LF is
quoted: with "\\n" the csv module leaves a lone CR bare, and spreadsheets start a new row there, whose first cell is
whatever text followed it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
LINE_END = "\r\n"


def spreadsheet_text(value: Any) -> Any:
    """A text cell that starts like a formula, prefixed with ``'`` so spreadsheets show it as text; numbers (a
    negative amount included) and other text as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return f"'{value}"
    return value


def csv_rows(rows: Iterable[Sequence[Any]]) -> str:
    """Rows of cells (the header first) as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=LINE_END)
    writer.writerows([spreadsheet_text(cell) for cell in row] for row in rows)
    return buffer.getvalue()


def csv_records(columns: Sequence[str], records: Iterable[Mapping[str, Any]]) -> str:
    """A header of ``columns``, then each record's values in those columns (others left out) as CSV text."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator=LINE_END)
    writer.writeheader()
    writer.writerows({column: spreadsheet_text(value) for column, value in record.items()} for record in records)
    return buffer.getvalue()
