"""Receipts and statements as issued documents: their numbers, who they are made out to, and their PDF.

**Billing details.** An organization's legal name, address and tax id (``set_billing_details``, audited) are
copied onto each document when it is issued, so an issued document never changes.

**Numbers.** Each issuer (``BILLING_ISSUER_CODE``) numbers each series of documents (receipts, statements, and the
test-mode ones of each apart, so a demo never takes a real document's number) from 1 with no gaps: the number is
taken from the series' ``DocumentSequence`` row, locked and incremented in the transaction that creates the
document. A transaction that rolls back gives its number back with it, so the numbers that exist are 1..n. The
sequence row is the last lock of the platform's lock order (``accounts.locking``: after the account and the
payment) and is held until the document's transaction commits, so each issuer's documents are created one at a
time: issue them in short transactions.

**PDF.** Drawn with fpdf2: DejaVu Sans where the machine has it (Latin, Greek, Cyrillic, Arabic, Hebrew...; not
Chinese, Japanese or Korean, whose characters it leaves out), else the PDF core font Helvetica, which prints Latin-1
only (other letters without their accents, anything else as ``?``).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from accounts.locking import locked
from accounts.models import AuditAction, Organization
from accounts.services import SYSTEM, Actor, record_audit
from billing.ledger import BillingError
from billing.models import BillingDetails, DocumentSequence, DocumentSeries

# DejaVu Sans, regular and bold, where Debian and most Linux images put it (fonts-dejavu-core).
UNICODE_FONTS = (
    (
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    ),
    (Path("/usr/share/fonts/TTF/DejaVuSans.ttf"), Path("/usr/share/fonts/TTF/DejaVuSans-Bold.ttf")),
)
TEST_MODE_NOTICE = "TEST MODE - no real money moved. This document is not valid for accounting."

_LETTERS: dict[str, str] = {
    DocumentSeries.RECEIPT: "R",
    DocumentSeries.STATEMENT: "S",
    DocumentSeries.TEST_RECEIPT: "TEST-R",
    DocumentSeries.TEST_STATEMENT: "TEST-S",
}


def series_for(kind: str, *, test_mode: bool) -> str:
    """The series of a ``receipt`` or ``statement``, live or test."""
    if kind == "receipt":
        return DocumentSeries.TEST_RECEIPT if test_mode else DocumentSeries.RECEIPT
    if kind == "statement":
        return DocumentSeries.TEST_STATEMENT if test_mode else DocumentSeries.STATEMENT
    raise ValueError(f"no series of {kind!r} documents")


@dataclass(frozen=True)
class Number:
    """A document's number: its issuer, series and place in it, and how it is printed (``GM-R-000042``)."""

    issuer: str
    series: str
    sequence_number: int

    @property
    def text(self) -> str:
        return f"{self.issuer}-{_LETTERS[self.series]}-{self.sequence_number:06d}"

    def fields(self) -> dict[str, Any]:
        """The columns of ``IssuedDocument`` that hold it."""
        return {
            "issuer": self.issuer,
            "series": self.series,
            "sequence_number": self.sequence_number,
            "number": self.text,
        }


def _locked_sequence(issuer: str, series: str) -> DocumentSequence:
    """The series' counter, locked for this transaction (created at 0 on first use)."""
    rows = DocumentSequence.objects.filter(issuer=issuer, series=series)
    sequence = locked(rows).first()
    if sequence is None:
        try:
            with transaction.atomic():
                DocumentSequence.objects.create(issuer=issuer, series=series)
        except IntegrityError:
            pass  # a concurrent first document made it: lock that one
        sequence = locked(rows).get()
    return sequence


def allocate_number(series: str, *, issuer: str | None = None) -> Number:
    """The next number of the issuer's series, taken in the caller's transaction (which must create the document
    that carries it before it commits, and rolls the number back with it)."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("A document number is taken inside the transaction that creates the document.")
    issuer = issuer or settings.BILLING_ISSUER_CODE
    sequence = _locked_sequence(issuer, series)
    sequence.last_number += 1
    sequence.save(update_fields=["last_number"])
    return Number(issuer=issuer, series=series, sequence_number=sequence.last_number)


# Who a document is made out to.


@dataclass(frozen=True)
class BilledTo:
    name: str
    address: str
    tax_id: str

    def fields(self) -> dict[str, str]:
        return {"billed_to_name": self.name, "billed_to_address": self.address, "billed_to_tax_id": self.tax_id}


def billed_to(organization: Organization) -> BilledTo:
    """The organization's billing details now (its name when it has given no legal name)."""
    details = BillingDetails.objects.filter(organization=organization).first()
    if details is None:
        return BilledTo(name=organization.name, address="", tax_id="")
    return BilledTo(name=details.legal_name or organization.name, address=details.address, tax_id=details.tax_id)


MAX_ADDRESS_LINES = 6
MAX_LENGTHS = {"legal_name": 200, "address": 500, "tax_id": 64}


def billing_details_of(organization: Organization) -> BillingDetails:
    """The organization's billing details for reading (blank ones when it has given none)."""
    found = BillingDetails.objects.filter(organization=organization).first()
    return found if found is not None else BillingDetails(organization=organization)


@transaction.atomic
def set_billing_details(
    *, organization: Organization, legal_name: str, address: str, tax_id: str, actor: Actor = SYSTEM
) -> BillingDetails:
    """Changes what the organization's next receipts and statements are made out to (those issued keep theirs);
    audited with the fields that changed, before and after."""
    wanted = {
        "legal_name": " ".join(legal_name.split()),
        "address": "\n".join(line.strip() for line in address.strip().splitlines() if line.strip()),
        "tax_id": " ".join(tax_id.split()),
    }
    if len(wanted["address"].splitlines()) > MAX_ADDRESS_LINES:
        raise BillingError(f"An address has at most {MAX_ADDRESS_LINES} lines.")
    for name, value in wanted.items():
        if len(value) > MAX_LENGTHS[name]:
            raise BillingError(f"The {name.replace('_', ' ')} has at most {MAX_LENGTHS[name]} characters.")
    details = locked(BillingDetails.objects.filter(organization=organization)).first()
    if details is None:
        details = BillingDetails(organization=organization)
    changed = {
        name: {"from": getattr(details, name), "to": value}
        for name, value in wanted.items()
        if getattr(details, name) != value
    }
    if not changed:
        return details
    for name, value in wanted.items():
        setattr(details, name, value)
    details.updated_at = timezone.now()
    details.save()
    record_audit(
        action=AuditAction.BILLING_DETAILS_CHANGED,
        actor=actor,
        organization=organization,
        target=details,
        metadata={"changed": changed},
    )
    return details


def issuer_lines() -> list[str]:
    lines = [settings.BILLING_ISSUER_NAME, *settings.BILLING_ISSUER_ADDRESS.splitlines()]
    if settings.BILLING_ISSUER_TAX_ID:
        lines.append(f"Tax ID: {settings.BILLING_ISSUER_TAX_ID}")
    return [line for line in lines if line.strip()]


def billed_to_lines(document: Any) -> list[str]:
    """The "billed to" block of an issued receipt or statement, as it was when issued."""
    lines = [document.billed_to_name, *document.billed_to_address.splitlines()]
    if document.billed_to_tax_id:
        lines.append(f"Tax ID: {document.billed_to_tax_id}")
    return [line for line in lines if line.strip()]


def utc_day(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d}"


def utc_minute(moment: datetime) -> str:
    return f"{moment.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


# The PDF.


def _unicode_font() -> tuple[Path, Path] | None:
    return next(((regular, bold) for regular, bold in UNICODE_FONTS if regular.is_file() and bold.is_file()), None)


class DocumentPdf:
    """One A4 page (more if the rows need them) in the platform's layout: issuer, title, number and dates, the
    billed-to block, then labelled rows and tables. ``render()`` answers the PDF's bytes."""

    MARGIN = 18
    LINE = 6

    def __init__(self, *, title: str, number: str | None, test_mode: bool, created: datetime) -> None:
        self.pdf = FPDF(format="A4", unit="mm")
        self.pdf.set_margins(self.MARGIN, self.MARGIN, self.MARGIN)
        self.pdf.set_auto_page_break(auto=True, margin=self.MARGIN)
        self.pdf.set_creation_date(created.astimezone(UTC))
        self.pdf.set_title(f"{title} {number}" if number else title)
        self.pdf.set_author(settings.BILLING_ISSUER_NAME)
        self.pdf.set_creator("billing.documents")
        fonts = _unicode_font()
        if fonts is None:
            self.family, self.unicode = "Helvetica", False
        else:
            self.pdf.add_font("DejaVu", "", str(fonts[0]))
            self.pdf.add_font("DejaVu", "B", str(fonts[1]))
            self.family, self.unicode = "DejaVu", True
        self.width = self.pdf.w - 2 * self.MARGIN
        self.pdf.add_page()
        if test_mode:
            self._test_mode_banner()
        self.title = title

    def text(self, value: str) -> str:
        """``value`` as the font can print it: any text with DejaVu; Latin-1 with Helvetica (accents kept where
        Latin-1 has them, other letters without theirs, anything else as ``?``)."""
        if self.unicode:
            return value
        printable = []
        for character in value:
            try:
                character.encode("latin-1")
            except UnicodeEncodeError:
                stripped = unicodedata.normalize("NFKD", character).encode("ascii", "ignore").decode()
                printable.append(stripped or "?")
            else:
                printable.append(character)
        return "".join(printable)

    def font(self, size: float, *, bold: bool = False) -> None:
        self.pdf.set_font(self.family, "B" if bold else "", size)

    def _test_mode_banner(self) -> None:
        self.pdf.set_fill_color(255, 236, 179)
        self.pdf.set_text_color(120, 60, 0)
        self.font(11, bold=True)
        self.pdf.cell(
            self.width, 10, self.text(TEST_MODE_NOTICE), border=1, align="C", fill=True,
            new_x=XPos.LMARGIN, new_y=YPos.NEXT,
        )  # fmt: skip
        self.pdf.set_text_color(0, 0, 0)
        self.pdf.ln(4)

    def heading(self, *, issuer: Sequence[str], facts: Sequence[tuple[str, str]]) -> None:
        """The issuer's block on the left, the title and its facts (number, dates) on the right."""
        top = self.pdf.get_y()
        self.font(12, bold=True)
        self.pdf.cell(self.width / 2, self.LINE, self.text(issuer[0]), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.font(9)
        for line in issuer[1:]:
            self.pdf.cell(self.width / 2, 5, self.text(line), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        left_bottom = self.pdf.get_y()
        self.pdf.set_xy(self.MARGIN + self.width / 2, top)
        self.font(18, bold=True)
        self.pdf.cell(self.width / 2, 9, self.text(self.title), align="R", new_x=XPos.LEFT, new_y=YPos.NEXT)
        self.font(9)
        for label, value in facts:
            fact = self.text(f"{label}: {value}")
            self.pdf.cell(self.width / 2, 5, fact, align="R", new_x=XPos.LEFT, new_y=YPos.NEXT)
        self.pdf.set_xy(self.MARGIN, max(left_bottom, self.pdf.get_y()) + 6)

    def block(self, label: str, lines: Sequence[str]) -> None:
        self.font(8, bold=True)
        self.pdf.cell(self.width, 5, self.text(label.upper()), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.font(10)
        for line in lines:
            self.pdf.cell(self.width, 5, self.text(line), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.pdf.ln(4)

    def section(self, title: str) -> None:
        self.pdf.ln(2)
        self.font(11, bold=True)
        self.pdf.cell(self.width, 7, self.text(title), border="B", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.pdf.ln(1)

    def row(self, label: str, value: str, *, bold: bool = False) -> None:
        """A line of the form ``label ........ value`` (the value right-aligned)."""
        self.font(10, bold=bold)
        self.pdf.cell(self.width * 0.7, self.LINE, self.text(label))
        self.pdf.cell(self.width * 0.3, self.LINE, self.text(value), align="R", new_x=XPos.LMARGIN, new_y=YPos.NEXT)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]], *, widths: Sequence[float]) -> None:
        """Columns in fractions of the width; the first left-aligned, the others right-aligned."""
        columns = [self.width * share for share in widths]
        self.font(9, bold=True)
        for index, (title, width) in enumerate(zip(header, columns, strict=True)):
            self.pdf.cell(width, self.LINE, self.text(title), border="B", align="L" if index == 0 else "R")
        self.pdf.ln(self.LINE)
        self.font(9)
        for cells in rows:
            for index, (value, width) in enumerate(zip(cells, columns, strict=True)):
                self.pdf.cell(width, self.LINE, self.text(value), align="L" if index == 0 else "R")
            self.pdf.ln(self.LINE)

    def note(self, text: str) -> None:
        self.pdf.ln(3)
        self.font(8)
        self.pdf.set_text_color(90, 90, 90)
        self.pdf.multi_cell(self.width, 4, self.text(text), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
        self.pdf.set_text_color(0, 0, 0)

    def render(self) -> bytes:
        return bytes(self.pdf.output())
