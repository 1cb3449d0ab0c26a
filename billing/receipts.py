"""Receipts: one for every payment for credits that succeeded (a purchase or an auto top-up), and its PDF.

A receipt is issued in the transaction that marks its payment succeeded (``stripe_state``), under the account's
and the payment's locks, with the next number of the issuer's receipt series (``billing.documents``). It copies
the organization's billing details as they are then: a receipt never changes once issued.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.sweeps import each_apart
from billing.documents import (
    DocumentPdf,
    allocate_number,
    billed_to,
    billed_to_lines,
    issuer_lines,
    series_for,
    utc_day,
    utc_minute,
)
from billing.ledger import BillingError
from billing.locks import locked_payment
from billing.models import Payment, PaymentKind, PaymentStatus, Receipt
from billing.money import cents_to_micros, format_micros
from billing.stripe_client import is_test_mode

DESCRIPTIONS: dict[str, str] = {
    PaymentKind.PURCHASE: "Prepaid credits",
    PaymentKind.AUTO_TOP_UP: "Prepaid credits (auto top-up)",
}


def issue_receipt(payment: Payment, *, test_mode: bool) -> Receipt:
    """The receipt of a succeeded ``payment``, issued now if it has none. Runs in the transaction that holds the
    payment's lock (``locks.locked_payment``), so a payment gets one receipt and one number."""
    if payment.status != PaymentStatus.SUCCEEDED or payment.succeeded_at is None:
        raise BillingError(f"payment-{payment.pk} has not succeeded: it has no receipt.")
    existing = Receipt.objects.filter(payment=payment).first()
    if existing is not None:
        return existing
    number = allocate_number(series_for("receipt", test_mode=test_mode))
    return Receipt.objects.create(
        organization_id=payment.organization_id,
        payment=payment,
        kind=payment.kind,
        amount_cents=payment.amount_cents,
        currency=payment.currency,
        paid_at=payment.succeeded_at,
        stripe_payment_intent_id=payment.stripe_payment_intent_id or "",
        test_mode=test_mode,
        issued_at=timezone.now(),
        **number.fields(),
        **billed_to(payment.organization).fields(),
    )


def receipt_of(payment: Payment) -> Receipt:
    """The receipt of a succeeded payment; one that succeeded before receipts existed gets its own now (in the
    payment mode of this deployment)."""
    receipt = Receipt.objects.filter(payment=payment).first()
    if receipt is not None:
        return receipt
    with transaction.atomic():
        _, locked = locked_payment(payment)
        return issue_receipt(locked, test_mode=is_test_mode())


def issue_missing_receipts(*, limit: int = 1000) -> int:
    """Receipts for succeeded payments that have none (those paid before receipts existed); answers how many."""
    missing = Payment.objects.filter(status=PaymentStatus.SUCCEEDED, receipt__isnull=True).order_by(
        "succeeded_at", "pk"
    )
    # Each apart: a payment whose receipt fails (logged) leaves the others issued, and the task failed.
    return each_apart(missing[:limit], receipt_of, name=lambda payment: f"the receipt of payment-{payment.pk}")


def receipt_payload(receipt: Receipt) -> dict[str, Any]:
    return {
        "id": receipt.pk,
        "number": receipt.number,
        "payment_id": receipt.payment_id,
        "kind": receipt.kind,
        "description": DESCRIPTIONS.get(receipt.kind, "Prepaid credits"),
        "amount_cents": receipt.amount_cents,
        "currency": receipt.currency,
        "paid_at": receipt.paid_at.isoformat(),
        "issued_at": receipt.issued_at.isoformat(),
        "test_mode": receipt.test_mode,
        "billed_to": {
            "name": receipt.billed_to_name,
            "address": receipt.billed_to_address,
            "tax_id": receipt.billed_to_tax_id,
        },
    }


def receipt_pdf(receipt: Receipt) -> bytes:
    amount = format_micros(cents_to_micros(receipt.amount_cents))
    document = DocumentPdf(
        title="Receipt", number=receipt.number, test_mode=receipt.test_mode, created=receipt.issued_at
    )
    document.heading(
        issuer=issuer_lines(),
        facts=[
            ("Receipt number", receipt.number),
            ("Date paid", utc_day(receipt.paid_at)),
            ("Issued", utc_day(receipt.issued_at)),
        ],
    )
    document.block("Billed to", billed_to_lines(receipt))
    document.section("Payment")
    document.table(
        ["Description", "Quantity", "Amount"],
        [[DESCRIPTIONS.get(receipt.kind, "Prepaid credits"), "1", amount]],
        widths=[0.6, 0.15, 0.25],
    )
    document.pdf.ln(2)
    document.row(f"Total paid ({receipt.currency.upper()})", amount, bold=True)
    document.row("Paid", utc_minute(receipt.paid_at))
    document.row("Payment method", "Card, through Stripe")
    if receipt.stripe_payment_intent_id:
        document.row("Payment reference", receipt.stripe_payment_intent_id)
    document.note(
        "The amount paid was added to the prepaid credit balance of the account billed above, where requests are "
        "charged at the prices in force when they run. Refunds, if any, appear on the monthly statement."
    )
    return document.render()
