"""Receipts: one per succeeded payment for credits, numbered without gaps per issuer, made out to the organization's
billing details as they were, downloadable as a PDF (read back here with pypdf) by owners and billing members."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone
from pypdf import PdfReader
from rest_framework.test import APIClient

from accounts.models import AuditAction, AuditEvent, Role, Scope
from accounts.services import add_member
from billing import documents, receipts, reconciliation, topups
from billing.models import (
    Account,
    DocumentSequence,
    DocumentSeries,
    Payment,
    PaymentKind,
    PaymentStatus,
    Receipt,
)
from tests.stripe_support import FakeStripe

pytestmark = pytest.mark.django_db

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs a database where transactions run at once"
)


def pdf_text(content: bytes) -> str:
    reader = PdfReader(io.BytesIO(content))
    return "\n".join(page.extract_text() for page in reader.pages)


def save_card(client: APIClient) -> str:
    response = client.post("/v1/billing/payment-methods", {"payment_method": "pm_card_visa"}, format="json")
    assert response.status_code == 201, response.json()
    return str(response.json()["id"])


def buy(client: APIClient, amount_cents: int = 2_000) -> dict[str, Any]:
    response = client.post("/v1/billing/purchases", {"amount_cents": amount_cents}, format="json")
    assert response.status_code == 201, response.json()
    return response.json()  # type: ignore[no-any-return]


def key_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return client


def member_client(tenant: dict[str, Any], make_user: Any, make_key: Any, role: str, scopes: list[str]) -> APIClient:
    person = make_user()
    add_member(organization=tenant["organization"], user=person, role=role)
    _, token = make_key(tenant["organization"], scopes=scopes, created_by=person)
    return key_client(token)


def test_a_purchase_has_a_numbered_receipt_made_out_to_the_billing_details(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    client = tenant["client"]
    details = {"legal_name": "Société Générale d'Images SARL", "address": "12 rue de la Paix\n75002 Paris\nFrance"}
    changed = client.put("/v1/billing/details", {**details, "tax_id": "FR 40 303 265 045"}, format="json")
    assert changed.status_code == 200, changed.json()
    save_card(client)
    payment = buy(client, 2_000)

    receipt = Receipt.objects.get(payment_id=payment["id"])
    # The fake Stripe's PaymentIntents are not live: a test-mode receipt, numbered in the test series.
    assert (receipt.number, receipt.test_mode, receipt.kind) == ("GM-TEST-R-000001", True, PaymentKind.PURCHASE)
    answer = client.get(f"/v1/billing/receipts/{receipt.pk}").json()
    assert answer["number"] == "GM-TEST-R-000001"
    assert (answer["amount_cents"], answer["currency"], answer["payment_id"]) == (2_000, "usd", payment["id"])
    assert answer["billed_to"] == {
        "name": details["legal_name"],
        "address": details["address"],
        "tax_id": "FR 40 303 265 045",
    }
    assert client.get(f"/v1/billing/purchases/{payment['id']}/receipt").json() == answer
    assert client.get("/v1/billing/receipts").json()["results"] == [answer]

    pdf = client.get(f"/v1/billing/receipts/{receipt.pk}?format=pdf")
    assert pdf.status_code == 200
    assert pdf["Content-Type"] == "application/pdf"
    assert pdf["Content-Disposition"] == 'attachment; filename="receipt-GM-TEST-R-000001.pdf"'
    assert pdf.content.startswith(b"%PDF-")
    text = pdf_text(pdf.content)
    for expected in (
        "Receipt",
        "GM-TEST-R-000001",
        "TEST MODE",
        "Société Générale d'Images SARL",
        "75002 Paris",
        "Tax ID: FR 40 303 265 045",
        "Prepaid credits",
        "$20.00",
        payment_intent_of(payment["id"]),
        "Generative Media Platform",
    ):
        assert expected in text, (expected, text)


def payment_intent_of(payment_id: int) -> str:
    return str(Payment.objects.get(pk=payment_id).stripe_payment_intent_id)


def test_numbers_follow_each_other_across_organizations_and_an_auto_top_up_has_its_receipt(
    fake_stripe: FakeStripe, tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    save_card(tenant["client"])
    save_card(other_tenant["client"])
    first = buy(tenant["client"])
    second = buy(other_tenant["client"], 1_000)
    account = Account.objects.get(pk=tenant["organization"].pk)
    account.auto_top_up_enabled = True
    account.auto_top_up_threshold_micros = account.balance_micros + 1
    account.auto_top_up_amount_cents = 1_500
    account.save()
    top_up = topups.auto_top_up(organization_id=tenant["organization"].pk)
    assert top_up is not None
    assert top_up.status == PaymentStatus.SUCCEEDED

    numbers = list(Receipt.objects.order_by("sequence_number").values_list("payment_id", "number", "kind"))
    assert numbers == [
        (first["id"], "GM-TEST-R-000001", PaymentKind.PURCHASE),
        (second["id"], "GM-TEST-R-000002", PaymentKind.PURCHASE),
        (top_up.pk, "GM-TEST-R-000003", PaymentKind.AUTO_TOP_UP),
    ]
    # Each organization sees its own receipts only.
    assert [r["number"] for r in other_tenant["client"].get("/v1/billing/receipts").json()["results"]] == [
        "GM-TEST-R-000002"
    ]
    theirs = Receipt.objects.get(payment_id=second["id"])
    assert tenant["client"].get(f"/v1/billing/receipts/{theirs.pk}").status_code == 404
    text = pdf_text(tenant["client"].get(f"/v1/billing/purchases/{top_up.pk}/receipt?format=pdf").content)
    assert "Prepaid credits (auto top-up)" in text
    assert "$15.00" in text


def test_a_number_taken_by_a_transaction_that_rolls_back_is_given_again(tenant: dict[str, Any]) -> None:
    class Abandoned(Exception):
        pass

    def take_one_and_fail() -> None:
        with transaction.atomic():
            assert documents.allocate_number(DocumentSeries.RECEIPT).text == "GM-R-000001"
            raise Abandoned

    with pytest.raises(Abandoned):
        take_one_and_fail()
    with transaction.atomic():
        assert documents.allocate_number(DocumentSeries.RECEIPT).text == "GM-R-000001"
        assert documents.allocate_number(DocumentSeries.RECEIPT).text == "GM-R-000002"
        # Each series counts for itself, and another issuer's from 1.
        assert documents.allocate_number(DocumentSeries.STATEMENT).text == "GM-S-000001"
        assert documents.allocate_number(DocumentSeries.RECEIPT, issuer="ACME").text == "ACME-R-000001"


def paid_without_receipt(organization: Any, amount_cents: int = 1_000) -> Payment:
    return Payment.objects.create(
        organization=organization,
        kind=PaymentKind.PURCHASE,
        status=PaymentStatus.SUCCEEDED,
        amount_cents=amount_cents,
        succeeded_at=timezone.now(),
    )


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_receipts_issued_at_once_take_every_number_once(make_user: Any) -> None:
    from tests.conftest import personal_organization

    organizations = [personal_organization(make_user()) for _ in range(4)]
    payments = [paid_without_receipt(organizations[index % 4], 500 + index) for index in range(24)]
    errors: list[BaseException] = []

    def issue(payment: Payment, *, abandon: bool) -> None:
        try:
            start.wait()
            with transaction.atomic():
                receipts.receipt_of(payment)
                if abandon:  # a transaction that takes a number and then fails gives it back
                    documents.allocate_number(DocumentSeries.RECEIPT)
                    raise RuntimeError("abandoned")
        except RuntimeError as exc:
            if str(exc) != "abandoned":
                errors.append(exc)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=issue, args=(payment,), kwargs={"abandon": False}) for payment in payments]
    threads += [threading.Thread(target=issue, args=(payments[0],), kwargs={"abandon": True}) for _ in range(3)]
    start = threading.Barrier(len(threads), timeout=30)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    numbers = sorted(Receipt.objects.values_list("sequence_number", flat=True))
    assert numbers == list(range(1, len(payments) + 1))  # every number once, none skipped
    assert Receipt.objects.values("payment").distinct().count() == len(payments)
    [sequence] = DocumentSequence.objects.all()
    assert sequence.last_number == len(payments)


def test_billing_details_are_audited_and_issued_receipts_keep_the_old_ones(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    client = tenant["client"]
    blank = client.get("/v1/billing/details").json()
    assert (blank["legal_name"], blank["address"], blank["tax_id"]) == ("", "", "")
    save_card(client)
    before = buy(client)
    changed = client.put(
        "/v1/billing/details",
        {"legal_name": "  Pixel   Forge Ltd ", "address": "1 High St\n\n  London  ", "tax_id": "GB123456789"},
        format="json",
    )
    assert changed.status_code == 200
    assert {key: changed.json()[key] for key in ("legal_name", "address", "tax_id")} == {
        "legal_name": "Pixel Forge Ltd",
        "address": "1 High St\nLondon",
        "tax_id": "GB123456789",
    }
    [event] = AuditEvent.objects.filter(action=AuditAction.BILLING_DETAILS_CHANGED)
    assert event.organization_id == tenant["organization"].pk
    assert event.actor_api_key_id == tenant["api_key"].pk
    assert event.metadata["changed"]["legal_name"] == {"from": "", "to": "Pixel Forge Ltd"}
    assert set(event.metadata["changed"]) == {"legal_name", "address", "tax_id"}
    # The same details again change nothing and audit nothing.
    client.put("/v1/billing/details", changed.json() | {"updated_at": None}, format="json")
    assert AuditEvent.objects.filter(action=AuditAction.BILLING_DETAILS_CHANGED).count() == 1

    after = buy(client)
    old, new = (Receipt.objects.get(payment_id=payment["id"]) for payment in (before, after))
    assert old.billed_to_name == tenant["organization"].name  # no legal name then: the organization's name
    assert (new.billed_to_name, new.billed_to_address, new.billed_to_tax_id) == (
        "Pixel Forge Ltd",
        "1 High St\nLondon",
        "GB123456789",
    )
    too_long = client.put("/v1/billing/details", {"legal_name": "x" * 201, "address": "", "tax_id": ""}, format="json")
    assert (too_long.status_code, too_long.json()["detail"][0]["loc"]) == (422, ["body", "legal_name"])


def test_only_owners_admins_and_billing_members_reach_the_documents(
    fake_stripe: FakeStripe, tenant: dict[str, Any], make_user: Any, make_key: Any
) -> None:
    save_card(tenant["client"])
    receipt = Receipt.objects.get(payment_id=buy(tenant["client"])["id"])
    paths = (
        f"/v1/billing/receipts/{receipt.pk}",
        "/v1/billing/receipts",
        "/v1/billing/statements",
        f"/v1/billing/statements/{timezone.now():%Y-%m}",
        "/v1/billing/details",
    )
    developer = member_client(tenant, make_user, make_key, Role.DEVELOPER, [Scope.USAGE_READ])
    for path in paths:
        refused = developer.get(path)
        assert (refused.status_code, refused.json()["error_type"]) == (403, "insufficient_role"), path
    billing = member_client(tenant, make_user, make_key, Role.BILLING, [Scope.USAGE_READ])
    for path in paths:
        assert billing.get(path).status_code == 200, path
    # Changing the details takes the admin scope, which a billing member's key cannot have.
    body = {"legal_name": "X", "address": "", "tax_id": ""}
    assert billing.put("/v1/billing/details", body, format="json").status_code == 403
    _, system_reader = make_key(tenant["organization"], scopes=[Scope.USAGE_READ])  # made by no person
    assert key_client(system_reader).get("/v1/billing/receipts").status_code == 403


def test_the_dashboard_lists_receipts_and_serves_their_pdf_to_billing_people_only(
    fake_stripe: FakeStripe, tenant: dict[str, Any], make_user: Any
) -> None:
    save_card(tenant["client"])
    receipt = Receipt.objects.get(payment_id=buy(tenant["client"])["id"])
    owner = Client()
    owner.force_login(tenant["user"])
    page = owner.get("/dashboard/billing").content.decode()
    link = f"/dashboard/billing/receipts/{receipt.pk}"
    assert link in page
    assert receipt.number in page
    assert "Test mode" in page  # the fake Stripe's key is a test key
    pdf = owner.get(link)
    assert (pdf.status_code, pdf["Content-Type"]) == (200, "application/pdf")
    assert receipt.number in pdf_text(pdf.content)
    # A payment paid before receipts existed links to its receipt, issued when first asked for.
    earlier = paid_without_receipt(tenant["organization"])
    assert f"/dashboard/billing/payments/{earlier.pk}/receipt" in owner.get("/dashboard/billing").content.decode()
    answer = owner.get(f"/dashboard/billing/payments/{earlier.pk}/receipt")
    assert answer["Location"] == f"/dashboard/billing/receipts/{Receipt.objects.get(payment=earlier).pk}"

    developer = make_user()
    add_member(organization=tenant["organization"], user=developer, role=Role.DEVELOPER)
    looking = Client()
    looking.force_login(developer)
    looking.post("/dashboard/organization", {"organization": str(tenant["organization"].pk)})
    assert looking.get(link).status_code == 403
    assert link not in looking.get("/dashboard/billing").content.decode()


def test_the_dashboard_changes_the_billing_details_with_an_audit(tenant: dict[str, Any]) -> None:
    owner = Client()
    owner.force_login(tenant["user"])
    answer = owner.post(
        "/dashboard/billing/details",
        {"legal_name": "Pixel Forge Ltd", "address": "1 High St\r\nLondon", "tax_id": "GB123456789"},
    )
    assert answer.status_code == 302
    details = documents.billing_details_of(tenant["organization"])
    expected = ("Pixel Forge Ltd", "1 High St\nLondon", "GB123456789")
    assert (details.legal_name, details.address, details.tax_id) == expected
    [event] = AuditEvent.objects.filter(action=AuditAction.BILLING_DETAILS_CHANGED)
    assert event.actor_user_id == tenant["user"].pk
    assert "Pixel Forge Ltd" in owner.get("/dashboard/billing").content.decode()


def test_reconciliation_finds_a_paid_payment_without_receipt_and_a_receipt_that_differs(
    fake_stripe: FakeStripe, tenant: dict[str, Any]
) -> None:
    save_card(tenant["client"])
    receipt = Receipt.objects.get(payment_id=buy(tenant["client"])["id"])
    assert reconciliation.check_receipts().drift == []
    Receipt.objects.filter(pk=receipt.pk).update(amount_cents=1)
    missing = paid_without_receipt(tenant["organization"])
    check = reconciliation.check_receipts()
    assert {item["kind"]: item["count"] for item in check.drift} == {
        "succeeded_payment_without_receipt": 1,
        "receipt_differs_from_payment": 1,
    }
    # The nightly task issues the receipts of payments that have none (those paid before receipts existed).
    assert receipts.issue_missing_receipts() == 1
    assert Receipt.objects.get(payment=missing).number == "GM-TEST-R-000002"  # in this deployment's mode: test
