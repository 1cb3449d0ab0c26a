"""Platform API of payments (saved cards, buying credits) and the Stripe webhook endpoint."""

from __future__ import annotations

import logging
from typing import Any

import stripe
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import APIException
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response

from accounts.api import request_actor
from accounts.errors import InvalidInput, problem
from accounts.models import Scope
from accounts.outages import ServiceUnavailable, is_outage
from accounts.parsers import StrictCursorPagination
from accounts.permissions import request_organization
from accounts.schema import error
from accounts.serializers import StrictBooleanField, StrictCharField, StrictIntegerField
from billing import cards, charges, checkout, stripe_events
from billing.api import MoneyView
from billing.ledger import account_of
from billing.models import Payment
from billing.stripe_client import payments_enabled

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    str,
    OpenApiParameter.HEADER,
    description=(
        "Makes retries of one purchase safe (at most 255 characters, unique per organization): a retry with the same "
        "key and body answers the payment the first try made, with `Idempotent-Replayed: true`, and never charges "
        "twice (a payment whose outcome is still unknown is asked of Stripe again under its own key); a failed one "
        "answers 402 `payment_failed`. The same key with another body answers 422 `idempotency_key_reused`."
    ),
)


class PaymentsUnavailable(APIException):
    status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    default_detail = "Payments are not configured on this server."
    default_code = "payments_unavailable"


# What a Stripe-backed operation may answer besides its success and the API's own errors.
PAYMENT_ERRORS = {
    400: error("The payment provider refused the request (`payment_refused`)."),
    402: error("The card was declined (`card_declined`) or the payment failed (`payment_failed`)."),
    404: error("No such saved card (`not_found`)."),
    409: error("Not allowed by the rules of money now, or a payment still settling (`payment_in_progress`)."),
    503: error("Payments are not configured on this server, or the payment provider could not be reached."),
}


class StripeMoneyView(MoneyView):
    """A money view backed by Stripe: refused with 503 while payments are not configured."""

    reads_stripe = True  # GET asks Stripe too (saved cards live there)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if (request.method != "GET" or self.reads_stripe) and not payments_enabled():
            raise PaymentsUnavailable()


class AttachPaymentMethod(serializers.Serializer[Any]):
    payment_method = StrictCharField(max_length=255, help_text="A PaymentMethod id, e.g. from Stripe.js.")
    set_default = StrictBooleanField(default=False)


class PaymentMethodsView(StripeMoneyView):
    """The organization's saved cards: listing them, like saving one, needs the ``admin`` scope, the one scope that
    manages billing (accounts.policy), as the dashboard shows cards only to the members who manage billing. A
    ``usage:read`` key is answered 403 ``insufficient_scope``: it reads usage, the balance and payments, not what pays.
    """

    def get_permissions(self) -> Any:
        permissions = super().get_permissions()
        self.required_scope = Scope.ADMIN  # reading too (MoneyView lets usage:read read)
        return permissions

    @extend_schema(
        responses={
            200: OpenApiTypes.OBJECT,
            403: error("The key lacks the `admin` scope (`insufficient_scope`), or its organization is suspended."),
            **PAYMENT_ERRORS,
        },
        summary="Saved cards, the default one, and the publishable key for Stripe.js (admin scope)",
        description=(
            "Each saved card's brand, last four digits and expiry, which is the default, and the publishable key for "
            "Stripe.js. Needs the `admin` scope, as saving or removing a card does: a `usage:read` key is answered "
            "403 `insufficient_scope`."
        ),
    )
    def get(self, request: Request) -> Response:
        organization = request_organization(request)
        methods = cards.list_payment_methods(organization)
        return Response(
            {
                "data": methods,
                "default_payment_method": account_of(organization).default_payment_method_id or None,
                "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
            }
        )

    @extend_schema(
        request=AttachPaymentMethod,
        responses={201: OpenApiTypes.OBJECT, **PAYMENT_ERRORS},
        summary="Save a card (admin scope); the first becomes the default",
    )
    def post(self, request: Request) -> Response:
        body = AttachPaymentMethod(data=request.data)
        body.is_valid(raise_exception=True)
        method = cards.attach_payment_method(
            organization=request_organization(request),
            payment_method_id=body.validated_data["payment_method"],
            make_default=body.validated_data["set_default"],
            actor=request_actor(request),
        )
        return Response(method, status=status.HTTP_201_CREATED)


class PaymentMethodView(StripeMoneyView):
    @extend_schema(
        responses={204: None, **PAYMENT_ERRORS},
        summary="Remove a saved card (admin scope); removing the default turns auto top-up off",
    )
    def delete(self, request: Request, payment_method_id: str) -> Response:
        cards.detach_payment_method(
            organization=request_organization(request),
            payment_method_id=payment_method_id,
            actor=request_actor(request),
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class DefaultPaymentMethodView(StripeMoneyView):
    @extend_schema(
        request=None,
        responses={200: OpenApiTypes.OBJECT, **PAYMENT_ERRORS},
        summary="Make a saved card the default (admin scope): auto top-ups charge it",
    )
    def post(self, request: Request, payment_method_id: str) -> Response:
        method = cards.set_default_payment_method(
            organization=request_organization(request),
            payment_method_id=payment_method_id,
            actor=request_actor(request),
        )
        return Response(method)


class PaymentSerializer(serializers.ModelSerializer[Payment]):
    class Meta:
        model = Payment
        fields = (
            "id",
            "kind",
            "status",
            "amount_cents",
            "currency",
            "amount_refunded_cents",
            "amount_disputed_cents",
            "failure_message",
            "created_at",
            "succeeded_at",
        )


class PurchaseRequest(serializers.Serializer[Any]):
    amount_cents = StrictIntegerField(
        min_value=settings.BILLING_MIN_PURCHASE_CENTS, max_value=settings.BILLING_MAX_PURCHASE_CENTS
    )
    mode = serializers.ChoiceField(choices=["card", "checkout"], default="card")
    payment_method = StrictCharField(
        max_length=255, required=False, help_text="A saved card; the default one if absent."
    )
    success_url = serializers.URLField(required=False, help_text="Checkout: where Stripe sends the payer after.")
    cancel_url = serializers.URLField(required=False, help_text="Checkout: where Stripe sends a payer who gives up.")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["mode"] == "checkout":
            missing = {name: "Checkout needs this." for name in ("success_url", "cancel_url") if not attrs.get(name)}
            if missing:
                raise serializers.ValidationError(missing)
            if attrs.get("payment_method"):
                raise serializers.ValidationError({"payment_method": "Checkout asks for the card itself."})
        return attrs


class PurchasePages(StrictCursorPagination):
    ordering = "-created_at"
    page_size = 50


class PurchasesView(ListAPIView[Payment], StripeMoneyView):
    serializer_class = PaymentSerializer
    pagination_class = PurchasePages
    reads_stripe = False

    def get_queryset(self) -> Any:
        return Payment.objects.filter(organization=request_organization(self.request))

    @extend_schema(summary="Payments for credits, newest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=PurchaseRequest,
        parameters=[IDEMPOTENCY_KEY],
        responses={201: OpenApiTypes.OBJECT, **PAYMENT_ERRORS},
        summary="Buy credits (admin scope): charge a saved card now, or get a Stripe Checkout URL",
    )
    def post(self, request: Request) -> Response:
        body = PurchaseRequest(data=request.data)
        body.is_valid(raise_exception=True)
        params = body.validated_data
        idempotency_key = request.headers.get("Idempotency-Key") or None
        if idempotency_key and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            message = f"At most {MAX_IDEMPOTENCY_KEY} characters."
            raise InvalidInput([problem(["header", "Idempotency-Key"], message, "string_too_long")])
        organization, actor = request_organization(request), request_actor(request)
        if params["mode"] == "checkout":
            started = checkout.start_checkout(
                organization=organization,
                amount_cents=params["amount_cents"],
                success_url=params["success_url"],
                cancel_url=params["cancel_url"],
                actor=actor,
                idempotency_key=idempotency_key,
            )
            answer = {**PaymentSerializer(started.payment).data, "checkout_url": started.url}
            return _created(answer, replayed=started.replayed)
        charged = charges.buy_credits(
            organization=organization,
            amount_cents=params["amount_cents"],
            payment_method_id=params.get("payment_method"),
            actor=actor,
            idempotency_key=idempotency_key,
        )
        answer = {**PaymentSerializer(charged.payment).data, "client_secret": charged.client_secret}
        return _created(answer, replayed=charged.replayed)


def _created(answer: dict[str, Any], *, replayed: bool) -> Response:
    """201 for a purchase, the first answer or a retry's (which says so, as the queue API does)."""
    return Response(answer, status=201, headers={"Idempotent-Replayed": "true"} if replayed else None)


@csrf_exempt
@require_POST
def stripe_webhook(request: HttpRequest) -> HttpResponse:
    """Stripe's deliveries: 400 for anything not signed with our secret, 200 once stored (new or not)."""
    try:
        event, created = stripe_events.receive_event(request.body, request.headers.get("Stripe-Signature", ""))
    except (stripe.SignatureVerificationError, ValueError):
        return JsonResponse(
            {"detail": "Invalid Stripe signature or payload.", "error_type": "invalid_signature"}, status=400
        )
    except DatabaseError as error:
        # Any non-2xx makes Stripe deliver it again; an outage says so, as every answer to one does.
        logger.exception("could not store a Stripe event")
        if is_outage(error):
            unavailable = ServiceUnavailable("Could not store the event: the database could not be reached.")
            return JsonResponse(unavailable.body(), status=503, headers=unavailable.headers())
        return JsonResponse({"detail": "Could not store the event.", "error_type": "internal_error"}, status=500)
    return JsonResponse({"id": event.id, "duplicate": not created})
