"""fal's pricing API: ``GET /v1/models/pricing`` (unit prices) and ``POST /v1/models/pricing/estimate`` (costs).

The shapes are fal's Platform API's, with our integers beside its decimals. Prices come from the rate card
admission uses and estimates from ``billing.estimates``. A negotiated price is shown to its own organization
only, so both routes need an API key (of any scope), as fal's do.

fal writes amounts as decimal USD (``unit_price``, ``total_cost``). Ours are computed in integer micro-dollars,
converted exactly (``money.micros_to_dollars``) and written as JSON numbers digit for digit by
``ExactDecimalRenderer``, never through a float. The micros travel beside them (``unit_price_micros``,
``total_cost_micros``).

An endpoint id this platform does not serve answers 404 with fal's error object, ``{"error": {"type": "not_found",
"message"}}``, beside our ``{detail, error_type}``. Refused input answers our located 422.
"""

from __future__ import annotations

import operator
import re
import secrets
from decimal import Decimal
from functools import reduce
from typing import Any
from urllib.parse import parse_qs, urlsplit

from django.db.models import Q
from django.utils import timezone
from drf_spectacular.utils import (
    OpenApiParameter,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.errors import AppError, InvalidInput, problem
from accounts.parsers import StrictCursorPagination
from accounts.permissions import HasScope, request_organization
from accounts.schema import ApiAutoSchema, error
from accounts.serializers import StrictIntegerField
from billing import estimates, pricing
from billing.models import PriceUnit
from billing.money import micros_to_dollars
from inference.inputs import InputError, validate_input
from inference.models import Endpoint

MAX_ENDPOINTS = 50  # endpoint ids per request, as fal's
MAX_CALLS = 10**9
MAX_UNITS = Decimal(10**12)
CURRENCY = "USD"
ECHOED_ID_CHARS = 200
SLUG = re.compile(r"[-a-zA-Z0-9_]+\Z")  # each part of an endpoint id (Endpoint's SlugFields)
HISTORICAL, UNIT_PRICE = "historical_api_price", "unit_price"


class ExactDecimalRenderer(JSONRenderer):
    """JSON in which a ``Decimal`` is written as the number it is (DRF's encoder would pass it through a float)."""

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        marker = f"decimal-{secrets.token_hex(8)}-"  # no string of the data can hold it
        numbers: list[str] = []

        def mark(value: Any) -> Any:
            if isinstance(value, Decimal):
                numbers.append(format(value, "f"))
                return f"{marker}{len(numbers) - 1}"
            if isinstance(value, dict):
                return {key: mark(item) for key, item in value.items()}
            if isinstance(value, list | tuple):
                return [mark(item) for item in value]
            return value

        rendered = super().render(mark(data), accepted_media_type, renderer_context)
        for index, number in enumerate(numbers):
            rendered = rendered.replace(f'"{marker}{index}"'.encode(), number.encode(), 1)
        return rendered


class UnknownEndpoints(AppError):
    """Endpoint ids this platform does not serve: 404 with fal's error object beside ours."""

    status_code = 404
    error_type = "not_found"

    def __init__(self, endpoint_ids: list[str]) -> None:
        named = ", ".join(endpoint_id[:ECHOED_ID_CHARS] for endpoint_id in endpoint_ids)
        super().__init__(f"No such endpoint: {named}.")

    def body(self) -> dict[str, Any]:
        return {**super().body(), "error": {"type": "not_found", "message": self.detail}}


def resolve_endpoints(endpoint_ids: list[str]) -> dict[str, Endpoint]:
    """The active endpoint of each id (``owner/name`` or ``owner/name/path``), or ``UnknownEndpoints``."""
    wanted = []
    for endpoint_id in endpoint_ids:
        parts = endpoint_id.split("/")
        if len(parts) in (2, 3) and all(SLUG.match(part) for part in parts):
            owner, name, path = (*parts, "") if len(parts) == 2 else parts
            wanted.append(Q(owner=owner, name=name, path=path))
    found = {}
    if wanted:
        found = {
            endpoint.endpoint_id: endpoint
            for endpoint in Endpoint.objects.active().filter(reduce(operator.or_, wanted))
        }
    missing = [endpoint_id for endpoint_id in endpoint_ids if endpoint_id not in found]
    if missing:
        raise UnknownEndpoints(missing)
    return found


def quote_body(quote: pricing.Quote) -> dict[str, Any]:
    """fal's price (``unit_price``, ``unit``, ``currency``) with our micros beside it, and the line's resolution
    tiers: an output whose shorter side is at most a tier's ``max_short_side`` pays that tier's price, larger ones
    ``unit_price``."""
    return {
        "unit_price": micros_to_dollars(quote.unit_price_micros),
        "unit": quote.unit,
        "currency": CURRENCY,
        "unit_price_micros": quote.unit_price_micros,
        "negotiated": quote.price is not None and quote.price.organization_id is not None,
        "resolution_tiers": [
            {
                "max_short_side": tier["max_short_side"],
                "unit_price": micros_to_dollars(tier["unit_price_micros"]),
                "unit_price_micros": tier["unit_price_micros"],
            }
            for tier in quote.resolution_tiers
        ],
    }


@extend_schema_field({"type": "number", "minimum": 0, "description": "US dollars, exact (to the micro-dollar)."})
class DollarsField(serializers.Field):  # type: ignore[type-arg]
    """A decimal of US dollars, written as a JSON number (schema only: views render ``Decimal``s)."""


class PricingView(APIView):
    permission_classes = (IsAuthenticated, HasScope)  # any key: prices are the organization's, not secret to it
    required_scope = None
    schema = ApiAutoSchema()
    renderer_classes = (ExactDecimalRenderer,)


# One error schema for the whole API (``Error``); this one's body carries fal's ``error`` object as well.
NOT_FOUND = error(
    "An endpoint id this platform does not serve (`not_found`); the body also carries fal's "
    '`error: {type: "not_found", message}`.'
)


# --- Prices ----------------------------------------------------------------------------------------------------


class ResolutionTier(serializers.Serializer[Any]):
    max_short_side = serializers.IntegerField(help_text="Outputs whose shorter side is at most this many pixels.")
    unit_price = DollarsField(help_text="Their price per unit in US dollars, exact.")
    unit_price_micros = serializers.IntegerField()


class EndpointPrice(serializers.Serializer[Any]):
    endpoint_id = serializers.CharField()
    unit_price = DollarsField(help_text="Price per unit in US dollars, exact (outputs above every tier).")
    unit = serializers.ChoiceField(choices=PriceUnit.values)
    currency = serializers.CharField(help_text="`USD`")
    unit_price_micros = serializers.IntegerField(help_text="The same price in micro-dollars.")
    negotiated = serializers.BooleanField(help_text="This organization's own price for the endpoint.")
    resolution_tiers = ResolutionTier(many=True, help_text="Per-output prices by resolution, smallest first.")
    effective_from = serializers.DateTimeField(allow_null=True, help_text="Null when no price applies (free).")


class PriceList(serializers.Serializer[Any]):
    prices = EndpointPrice(many=True)
    next_cursor = serializers.CharField(allow_null=True)
    has_more = serializers.BooleanField()


class EndpointPages(StrictCursorPagination):
    ordering = "id"
    page_size = MAX_ENDPOINTS
    max_page_size = MAX_ENDPOINTS


PRICE_PARAMETERS = [
    OpenApiParameter(
        "endpoint_id",
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_ENDPOINTS},
        OpenApiParameter.QUERY,
        explode=True,
        description=f"1 to {MAX_ENDPOINTS} endpoint ids, repeated (`?endpoint_id=a&endpoint_id=b`) or "
        "comma-separated (`?endpoint_id=a,b`). Left out: every endpoint, a page at a time.",
    ),
    OpenApiParameter(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": MAX_ENDPOINTS},
        OpenApiParameter.QUERY,
        description="Prices per page, without `endpoint_id`.",
    ),
    OpenApiParameter("cursor", str, OpenApiParameter.QUERY, description="`next_cursor` of the page before."),
]


def requested_ids(request: Request) -> list[str] | None:
    """The endpoint ids asked for, in order and once each; None when the whole list is asked for."""
    params = request.query_params
    unknown = [name for name in params if name not in ("endpoint_id", "limit", "cursor")]
    if unknown:
        raise InvalidInput(
            [problem(["query", name], "This operation takes no such parameter.", "unknown") for name in unknown]
        )
    if "endpoint_id" not in params:
        return None
    paging = [name for name in ("limit", "cursor") if name in params]
    if paging:
        message = "Pages are for the whole list: the prices of named endpoints come in one answer."
        raise InvalidInput([problem(["query", name], message, "unexpected") for name in paging])
    parts = (part.strip() for value in params.getlist("endpoint_id") for part in value.split(","))
    endpoint_ids = list(dict.fromkeys(part for part in parts if part))
    if not endpoint_ids:
        raise InvalidInput([problem(["query", "endpoint_id"], "Name at least one endpoint id.", "missing")])
    if len(endpoint_ids) > MAX_ENDPOINTS:
        message = f"At most {MAX_ENDPOINTS} endpoint ids at a time."
        raise InvalidInput([problem(["query", "endpoint_id"], message, "too_long")])
    return endpoint_ids


class ModelPricingView(PricingView):
    @extend_schema(
        parameters=PRICE_PARAMETERS,
        responses={200: PriceList, 404: NOT_FOUND},
        summary="Unit prices of endpoints for this organization (fal's pricing API)",
    )
    def get(self, request: Request) -> Response:
        organization = request_organization(request)
        endpoint_ids = requested_ids(request)
        next_cursor = None
        if endpoint_ids is None:
            paginator = EndpointPages()
            endpoints = list(paginator.paginate_queryset(Endpoint.objects.active(), request, view=self) or [])
            next_link = paginator.get_next_link()
            if next_link:
                next_cursor = parse_qs(urlsplit(next_link).query)["cursor"][0]
        else:
            found = resolve_endpoints(endpoint_ids)
            endpoints = [found[endpoint_id] for endpoint_id in endpoint_ids]
        quotes = pricing.prices_for(endpoints, timezone.now(), organization.pk)
        prices = []
        for endpoint in endpoints:
            quote = quotes[endpoint.pk]
            effective_from = quote.price.effective_from if quote.price else None
            prices.append({"endpoint_id": endpoint.endpoint_id, **quote_body(quote), "effective_from": effective_from})
        return Response({"prices": prices, "next_cursor": next_cursor, "has_more": next_cursor is not None})


# --- Estimates -------------------------------------------------------------------------------------------------


class ClosedSerializer(serializers.Serializer[Any]):
    """Refuses fields it does not declare: a misspelt quantity silently ignored would estimate something else."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [key for key in data if key not in self.fields]
            if unknown:
                message = "This estimate takes no such field."
                raise serializers.ValidationError({key: [ErrorDetail(message, code="unknown")] for key in unknown})
        return super().to_internal_value(data)


@extend_schema_field(
    {"type": "number", "minimum": 0.000001, "maximum": int(MAX_UNITS), "description": "To the millionth at most."}
)
class UnitQuantityField(serializers.DecimalField):
    """A JSON number (DRF's DecimalField also takes strings), read exactly: to the millionth."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_digits=19, decimal_places=6, min_value=Decimal("0.000001"), max_value=MAX_UNITS, **kwargs)

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class CallQuantity(ClosedSerializer):
    call_quantity = StrictIntegerField(min_value=1, max_value=MAX_CALLS, help_text="Requests to estimate.")
    input = serializers.DictField(
        required=False,
        help_text="The input each request would send (as to `/queue/{endpoint}`), validated as a submission is: "
        "each request is then priced as admission would hold it. Left out: this organization's requests of the "
        "last 30 days, on average; with none, a request with every parameter at its default.",
    )


class UnitQuantity(ClosedSerializer):
    unit_quantity = UnitQuantityField(
        help_text="Billing units: images, megapixels, videos, seconds of video or audio, or GPU-seconds (the `unit`)."
    )


@extend_schema_field({"type": "object", "minProperties": 1, "maxProperties": MAX_ENDPOINTS})
class EndpointMap(serializers.DictField):
    """Endpoint id → its quantities, 1 to ``MAX_ENDPOINTS`` of them."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        value: dict[str, Any] = super().to_internal_value(data)
        if not 1 <= len(value) <= MAX_ENDPOINTS:
            raise serializers.ValidationError(f"Name from 1 to {MAX_ENDPOINTS} endpoints.", code="size")
        return value


class HistoricalEstimate(ClosedSerializer):
    estimate_type = serializers.ChoiceField(choices=[HISTORICAL])
    endpoints = EndpointMap(child=CallQuantity())


class UnitPriceEstimate(ClosedSerializer):
    estimate_type = serializers.ChoiceField(choices=[UNIT_PRICE])
    endpoints = EndpointMap(child=UnitQuantity())


class AnyEstimate(ClosedSerializer):
    """What the body must be when its ``estimate_type`` names no estimate (to list every problem at once)."""

    estimate_type = serializers.ChoiceField(choices=[HISTORICAL, UNIT_PRICE])
    endpoints = EndpointMap()


ESTIMATE_REQUEST = PolymorphicProxySerializer(
    component_name="PricingEstimateRequest",
    serializers={HISTORICAL: HistoricalEstimate, UNIT_PRICE: UnitPriceEstimate},
    resource_type_field_name="estimate_type",
)


class EstimateLine(serializers.Serializer[Any]):
    unit = serializers.ChoiceField(choices=PriceUnit.values)
    unit_price = DollarsField()
    currency = serializers.CharField()
    unit_price_micros = serializers.IntegerField()
    negotiated = serializers.BooleanField()
    resolution_tiers = ResolutionTier(many=True)
    cost = DollarsField(help_text="This endpoint's part of the total, in US dollars.")
    cost_micros = serializers.IntegerField()
    basis = serializers.ChoiceField(
        choices=["unit_price", "input", "history", "defaults"],
        help_text="`unit_price`: units x price. `input`: what admission holds for the input given, per call. "
        "`history`: this organization's billed requests of the last 30 days, on average, at today's price. "
        "`defaults`: no such history; what admission holds for a request with every parameter at its default.",
    )
    history_requests = serializers.IntegerField(allow_null=True, help_text="Requests averaged (`history` only).")


class EstimateResult(serializers.Serializer[Any]):
    estimate_type = serializers.ChoiceField(choices=[HISTORICAL, UNIT_PRICE])
    total_cost = DollarsField(help_text="US dollars, exact.")
    currency = serializers.CharField(help_text="`USD`")
    total_cost_micros = serializers.IntegerField()
    endpoints = serializers.DictField(child=EstimateLine())


def _input_for(endpoint: Endpoint, payload: dict[str, Any], endpoint_id: str, organization_id: Any) -> dict[str, Any]:
    """The input as a submission would store it, or its problems located under the endpoint's entry."""
    try:
        generation, _ = validate_input(endpoint, payload, organization_id=organization_id)
    except InputError as error:
        where = ["body", "endpoints", endpoint_id, "input"]
        raise InvalidInput([{**item, "loc": [*where, *item["loc"][1:]]} for item in error.problems]) from None
    return generation.as_json()


class PricingEstimateView(PricingView):
    @extend_schema(
        request=ESTIMATE_REQUEST,
        responses={200: EstimateResult, 404: NOT_FOUND},
        summary="Estimate the cost of requests for this organization (fal's pricing estimate)",
    )
    def post(self, request: Request) -> Response:
        organization = request_organization(request)
        kind = request.data.get("estimate_type") if isinstance(request.data, dict) else None
        body_class = {HISTORICAL: HistoricalEstimate, UNIT_PRICE: UnitPriceEstimate}.get(str(kind), AnyEstimate)
        body = body_class(data=request.data)
        body.is_valid(raise_exception=True)
        wanted: dict[str, dict[str, Any]] = body.validated_data["endpoints"]
        found = resolve_endpoints(list(wanted))
        endpoints = list(found.values())
        quotes = pricing.prices_for(endpoints, timezone.now(), organization.pk)
        history = estimates.histories(organization.pk, endpoints) if kind == HISTORICAL else {}
        lines, problems = {}, []
        for endpoint_id, quantities in wanted.items():
            endpoint = found[endpoint_id]
            quote = quotes[endpoint.pk]
            requests = None
            if kind == UNIT_PRICE:
                basis = UNIT_PRICE
                try:
                    cost = estimates.unit_price_cost(quote, quantities["unit_quantity"])
                except estimates.NotWholeUnits as refusal:
                    problems.append(
                        problem(["body", "endpoints", endpoint_id, "unit_quantity"], str(refusal), "multiple_of")
                    )
                    continue
            elif "input" in quantities:
                basis = "input"
                try:
                    job_input = _input_for(endpoint, quantities["input"], endpoint_id, organization.pk)
                except InvalidInput as refusal:
                    problems.extend(refusal.problems)
                    continue
                cost = estimates.input_cost(endpoint, quote, job_input, quantities["call_quantity"])
            elif (past := history.get((endpoint.pk, quote.unit))) is not None:
                basis, requests = "history", past.requests
                cost = estimates.history_cost(quote, past, quantities["call_quantity"])
            else:
                basis = "defaults"
                job_input = estimates.default_input(endpoint)
                cost = estimates.input_cost(endpoint, quote, job_input, quantities["call_quantity"])
            lines[endpoint_id] = {
                **quote_body(quote),
                "cost": micros_to_dollars(cost),
                "cost_micros": cost,
                "basis": basis,
                "history_requests": requests,
            }
        if problems:
            raise InvalidInput(problems)
        total = sum(line["cost_micros"] for line in lines.values())
        return Response(
            {
                "estimate_type": kind,
                "total_cost": micros_to_dollars(total),
                "currency": CURRENCY,
                "total_cost_micros": total,
                "endpoints": lines,
            }
        )
