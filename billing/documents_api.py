"""Platform API of billing documents: the billing details printed on them, receipts and monthly statements.

They are for the people who handle the organization's money: a key acts here only for an owner, admin or billing
member (``accounts.policy``, ``manage_billing``), whatever its scopes; a key made by no person needs ``admin``.
Reading needs ``usage:read``, changing the billing details ``admin``.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.generics import ListAPIView
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response

from accounts import policy
from accounts.api import request_actor
from accounts.models import ApiKey, Scope
from accounts.parsers import StrictCursorPagination, query_params
from accounts.permissions import HasScope, request_organization
from accounts.schema import error
from accounts.serializers import StrictCharField
from billing import statements
from billing.api import MoneyView
from billing.documents import MAX_LENGTHS, billing_details_of, set_billing_details
from billing.ledger import BillingError
from billing.models import BillingDetails, Payment, PaymentStatus, Receipt
from billing.receipts import receipt_of, receipt_payload, receipt_pdf

NOT_A_BILLING_MEMBER = error("The key does not act for an owner, admin or billing member (`insufficient_role`).")


class ActsForBillingMember(BasePermission):
    """The key's maker may manage the organization's billing now (owner, admin, billing); a key made by no person
    must carry the ``admin`` scope."""

    message = "Billing documents are for owners, admins and billing members: this key does not act for one."
    code = "insufficient_role"

    def has_permission(self, request: Request, view: Any) -> bool:
        api_key = request.auth
        if not isinstance(api_key, ApiKey):
            return False
        if api_key.created_by_id is None:
            return Scope.ADMIN in api_key.scopes
        return policy.role_can(policy.maker_role(api_key), policy.MANAGE_BILLING)


class DocumentsView(MoneyView):
    permission_classes: tuple[type[BasePermission], ...] = (IsAuthenticated, HasScope, ActsForBillingMember)  # type: ignore[assignment]


def pdf_response(content: bytes, filename: str) -> HttpResponse:
    response = HttpResponse(content, content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


# Billing details.


class BillingDetailsSerializer(serializers.ModelSerializer[BillingDetails]):
    class Meta:
        model = BillingDetails
        fields = ("legal_name", "address", "tax_id", "updated_at")


class BillingDetailsChange(serializers.Serializer[Any]):
    legal_name = StrictCharField(
        max_length=MAX_LENGTHS["legal_name"], allow_blank=True, help_text="Empty: the organization's name is printed."
    )
    address = StrictCharField(
        max_length=MAX_LENGTHS["address"], allow_blank=True, help_text="As printed, lines separated by newlines."
    )
    tax_id = StrictCharField(max_length=MAX_LENGTHS["tax_id"], allow_blank=True)


class BillingDetailsView(DocumentsView):
    @extend_schema(
        responses={200: BillingDetailsSerializer, 403: NOT_A_BILLING_MEMBER},
        summary="What receipts and statements are made out to: legal name, address, tax id",
    )
    def get(self, request: Request) -> Response:
        return Response(BillingDetailsSerializer(billing_details_of(request_organization(request))).data)

    @extend_schema(
        request=BillingDetailsChange,
        responses={200: BillingDetailsSerializer, 403: NOT_A_BILLING_MEMBER, 409: error("Too many address lines.")},
        summary="Change the billing details (admin scope): documents issued from now on carry them",
    )
    def put(self, request: Request) -> Response:
        body = BillingDetailsChange(data=request.data)
        body.is_valid(raise_exception=True)
        details = set_billing_details(
            organization=request_organization(request), actor=request_actor(request), **body.validated_data
        )
        return Response(BillingDetailsSerializer(details).data)


# Receipts.


class ReceiptSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    number = serializers.CharField(help_text="Sequential per issuer and series, never reused, e.g. GM-R-000042.")
    payment_id = serializers.IntegerField()
    kind = serializers.CharField(help_text="`purchase` or `auto_top_up`.")
    description = serializers.CharField()
    amount_cents = serializers.IntegerField()
    currency = serializers.CharField()
    paid_at = serializers.DateTimeField()
    issued_at = serializers.DateTimeField()
    test_mode = serializers.BooleanField(help_text="Paid in Stripe's test mode or the fake Stripe: no real money.")
    billed_to = serializers.DictField(child=serializers.CharField(allow_blank=True))

    def to_representation(self, instance: Any) -> dict[str, Any]:
        return receipt_payload(instance)


class ReceiptPages(StrictCursorPagination):
    ordering = "-id"
    page_size = 50


class ReceiptsView(ListAPIView[Receipt], DocumentsView):
    serializer_class = ReceiptSerializer
    pagination_class = ReceiptPages

    def get_queryset(self) -> Any:
        return Receipt.objects.filter(organization=request_organization(self.request))

    @extend_schema(
        responses={200: ReceiptSerializer(many=True), 403: NOT_A_BILLING_MEMBER},
        summary="Receipts of payments for credits (purchases and auto top-ups), newest first",
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)


class DocumentQuery(serializers.Serializer[Any]):
    format = serializers.ChoiceField(choices=["json", "pdf"], required=False, default="json")


def receipt_answer(receipt: Receipt, document_format: str) -> HttpResponse:
    """A receipt as its PDF (``pdf``) or as JSON, however it was found."""
    if document_format == "pdf":
        return pdf_response(receipt_pdf(receipt), f"receipt-{receipt.number}.pdf")
    return Response(receipt_payload(receipt))


class ReceiptView(DocumentsView):
    @extend_schema(
        parameters=[DocumentQuery],
        responses={
            (200, "application/json"): ReceiptSerializer,
            (200, "application/pdf"): OpenApiTypes.BINARY,
            403: NOT_A_BILLING_MEMBER,
            404: error("No such receipt in this organization."),
        },
        summary="One receipt, as JSON or as a PDF (`format=pdf`)",
    )
    def get(self, request: Request, receipt_id: int) -> HttpResponse:
        query = query_params(request, DocumentQuery)
        receipt = Receipt.objects.filter(organization=request_organization(request), pk=receipt_id).first()
        if receipt is None:
            raise NotFound(f"No receipt {receipt_id}.")
        return receipt_answer(receipt, query["format"])


class PaymentReceiptView(DocumentsView):
    @extend_schema(
        parameters=[DocumentQuery],
        responses={
            (200, "application/json"): ReceiptSerializer,
            (200, "application/pdf"): OpenApiTypes.BINARY,
            403: NOT_A_BILLING_MEMBER,
            404: error("No such payment in this organization, or one that has not succeeded (no receipt)."),
        },
        summary="The receipt of a payment (`POST /v1/billing/purchases` answers its id), JSON or PDF",
    )
    def get(self, request: Request, payment_id: int) -> HttpResponse:
        query = query_params(request, DocumentQuery)
        payment = Payment.objects.filter(
            organization=request_organization(request), pk=payment_id, status=PaymentStatus.SUCCEEDED
        ).first()
        if payment is None:
            raise NotFound(f"No paid payment {payment_id}.")
        return receipt_answer(receipt_of(payment), query["format"])


# Statements.


class StatementListEntry(serializers.Serializer[Any]):
    month = serializers.CharField(help_text="YYYY-MM")
    status = serializers.CharField(
        help_text="`issued`; `open`: the month is not closed yet (its statement is provisional); `closed`: no "
        "statement issued (asking for it issues it if the month had any activity)."
    )
    number = serializers.CharField(allow_null=True)
    issued_at = serializers.DateTimeField(allow_null=True)


# ``{"data": [...]}``: a field named ``data`` would hide a declared serializer's own ``data``, so it is built here.
STATEMENT_INDEX = inline_serializer("StatementIndex", fields={"data": StatementListEntry(many=True)})


class StatementsView(DocumentsView):
    @extend_schema(
        responses={200: STATEMENT_INDEX, 403: NOT_A_BILLING_MEMBER},
        summary="The months that have a statement: from the organization's creation to this one, newest first",
    )
    def get(self, request: Request) -> Response:
        organization = request_organization(request)
        return Response({"data": statements.statement_index(organization)})


class StatementQuery(serializers.Serializer[Any]):
    format = serializers.ChoiceField(choices=["json", "csv", "pdf"], required=False, default="json")


class StatementView(DocumentsView):
    @extend_schema(
        parameters=[StatementQuery],
        responses={
            (200, "application/json"): OpenApiTypes.OBJECT,
            (200, "text/csv"): OpenApiTypes.STR,
            (200, "application/pdf"): OpenApiTypes.BINARY,
            403: NOT_A_BILLING_MEMBER,
            404: error("Not a month (YYYY-MM), one that has not begun, or one before the organization existed."),
        },
        summary="The statement of a UTC month (YYYY-MM): issued once the month is closed, provisional before",
    )
    def get(self, request: Request, month: str) -> HttpResponse:
        query = query_params(request, StatementQuery)
        organization = request_organization(request)
        try:
            first_day = statements.parse_month(month)
            statement = statements.statement_for(organization=organization, month=first_day)
        except BillingError as exc:
            raise NotFound(str(exc)) from None
        name = f"statement-{organization.slug}-{month}"
        if query["format"] == "pdf":
            return pdf_response(statements.statement_pdf(statement), f"{statement['number'] or name}.pdf")
        if query["format"] == "csv":
            response = HttpResponse(statements.statement_csv(statement), content_type="text/csv; charset=utf-8")
            response["Content-Disposition"] = f'attachment; filename="{name}.csv"'
            return response
        return Response(statement)
