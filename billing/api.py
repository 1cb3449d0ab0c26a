"""Platform API of billing: usage, balance, the credit ledger, auto top-up and spend limits."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api import request_actor
from accounts.models import ApiKey, Scope
from accounts.parsers import StrictCursorPagination, query_params
from accounts.permissions import HasScope, request_organization
from accounts.schema import ApiAutoSchema, error
from accounts.serializers import BoundedDateField, StrictBooleanField, StrictIntegerField
from billing import controls, selectors
from billing.admission import spent_this_month
from billing.ledger import account_of
from billing.models import CreditEntry, KeySpendLimit
from inference.models import Endpoint

# The most money one setting may name: a billion dollars, far inside a 64-bit column.
MAX_MICROS = 10**15


CONFLICT = error("Not allowed by the rules of money now (`billing_conflict`), e.g. auto top-up with no saved card.")


class BillingView(APIView):
    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.USAGE_READ
    schema = ApiAutoSchema()


class UsageQuery(serializers.Serializer[Any]):
    start = BoundedDateField(required=False, help_text="First UTC day included (default: 29 days before end).")
    end = BoundedDateField(required=False, help_text="Last UTC day included (default: today).")
    group_by = serializers.CharField(
        required=False, default="day", help_text="Comma-separated: day or hour, endpoint, key, gpu_class."
    )
    endpoint = serializers.CharField(required=False, help_text="Only this endpoint, e.g. platform/tiny-sd.")
    key_id = serializers.UUIDField(required=False, help_text="Only this API key.")
    format = serializers.ChoiceField(choices=["json", "csv"], required=False, default="json")

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        end = attrs.get("end") or timezone.now().date()
        start = attrs.get("start") or end - timedelta(days=29)
        if start > end:
            raise serializers.ValidationError({"start": "start must be on or before end."})
        group_by = [part.strip() for part in attrs["group_by"].split(",") if part.strip()]
        unknown = [part for part in group_by if part not in selectors.DIMENSIONS]
        if unknown or len(set(group_by)) != len(group_by) or {"day", "hour"} <= set(group_by):
            dimensions = ", ".join(selectors.DIMENSIONS)
            message = f"Use distinct dimensions of {dimensions}, not day and hour."
            raise serializers.ValidationError({"group_by": message})
        limit = 31 if "hour" in group_by else 366
        if (end - start).days + 1 > limit:
            raise serializers.ValidationError({"end": f"At most {limit} days at a time for this grouping."})
        return {**attrs, "start": start, "end": end, "group_by": group_by}


class UsageView(BillingView):
    @extend_schema(
        parameters=[UsageQuery],
        responses={
            (200, "application/json"): OpenApiTypes.OBJECT,
            (200, "text/csv"): OpenApiTypes.STR,
            404: error("No such endpoint (`endpoint`)."),
        },
        summary="GPU time, seconds of video and audio delivered, and cost of this organization, grouped (JSON or CSV)",
    )
    def get(self, request: Request) -> HttpResponse:
        params = query_params(request, UsageQuery)
        organization = request_organization(request)
        endpoint_id = None
        if params.get("endpoint"):
            owner, _, rest = params["endpoint"].partition("/")
            name, _, path = rest.partition("/")
            endpoint = Endpoint.objects.by_path(owner, name, path)
            if endpoint is None:
                raise NotFound(f"No endpoint {params['endpoint']}.")
            endpoint_id = endpoint.pk
        report = selectors.usage(
            organization_id=organization.pk,
            start=params["start"],
            end=params["end"],
            group_by=params["group_by"],
            endpoint_id=endpoint_id,
            key_id=params.get("key_id"),
        )
        if params["format"] == "csv":
            return usage_csv(report, filename=f"usage-{organization.slug}-{params['start']}-{params['end']}.csv")
        return Response(report)


def usage_csv(report: dict[str, Any], *, filename: str) -> HttpResponse:
    columns: list[str] = []
    for dimension in report["group_by"]:
        columns += {"key": ["key_id", "key_name"]}.get(dimension, [dimension])
    columns += ["requests", "attempts", "gpu_ms", "gpu_seconds", "unbilled_gpu_ms", "cost_micros"]
    columns += ["video_seconds", "audio_seconds"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(report["data"])
    response = HttpResponse(buffer.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


class BalanceSerializer(serializers.Serializer[Any]):
    balance_micros = serializers.IntegerField()
    held_micros = serializers.IntegerField()
    available_micros = serializers.IntegerField()
    currency = serializers.CharField()


class BalanceView(BillingView):
    @extend_schema(responses=BalanceSerializer, summary="Prepaid credit: balance, held by running requests, available")
    def get(self, request: Request) -> Response:
        account = account_of(request_organization(request))
        return Response(
            {
                "balance_micros": account.balance_micros,
                "held_micros": account.held_micros,
                "available_micros": account.available_micros,
                "currency": account.currency,
            }
        )


class CreditEntrySerializer(serializers.ModelSerializer[CreditEntry]):
    request_id = serializers.UUIDField(source="job_id", allow_null=True)

    class Meta:
        model = CreditEntry
        fields = ("id", "kind", "amount_micros", "balance_after_micros", "description", "request_id", "created_at")


class LedgerPages(StrictCursorPagination):
    ordering = "-id"
    page_size = 50


class LedgerView(ListAPIView[CreditEntry]):
    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.USAGE_READ
    schema = ApiAutoSchema()
    serializer_class = CreditEntrySerializer
    pagination_class = LedgerPages

    @extend_schema(summary="The credit ledger, newest first")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> Any:
        return CreditEntry.objects.filter(organization=request_organization(self.request))


class TopUpSettings(serializers.Serializer[Any]):
    enabled = StrictBooleanField()
    threshold_micros = StrictIntegerField(min_value=0, max_value=MAX_MICROS, required=False)
    amount_cents = StrictIntegerField(
        min_value=controls.MIN_TOP_UP_CENTS, max_value=controls.MAX_TOP_UP_CENTS, required=False
    )


class TopUpStatus(serializers.Serializer[Any]):
    enabled = serializers.BooleanField()
    threshold_micros = serializers.IntegerField()
    amount_cents = serializers.IntegerField()
    has_payment_method = serializers.BooleanField()


def top_up_payload(account: Any) -> dict[str, Any]:
    return {
        "enabled": account.auto_top_up_enabled,
        "threshold_micros": account.auto_top_up_threshold_micros,
        "amount_cents": account.auto_top_up_amount_cents,
        "has_payment_method": bool(account.default_payment_method_id),
    }


class MoneyView(BillingView):
    """Reading needs ``usage:read``; anything that moves money or changes its settings needs ``admin``."""

    def get_permissions(self) -> Any:
        self.required_scope = Scope.USAGE_READ if self.request.method == "GET" else Scope.ADMIN
        return super().get_permissions()


class TopUpView(MoneyView):
    @extend_schema(responses=TopUpStatus, summary="Auto top-up settings")
    def get(self, request: Request) -> Response:
        return Response(top_up_payload(account_of(request_organization(request))))

    @extend_schema(
        request=TopUpSettings,
        responses={200: TopUpStatus, 409: CONFLICT},
        summary="Change auto top-up (needs a saved card to enable; admin scope)",
    )
    def put(self, request: Request) -> Response:
        body = TopUpSettings(data=request.data)
        body.is_valid(raise_exception=True)
        account = controls.set_auto_top_up(
            organization=request_organization(request), actor=request_actor(request), **body.validated_data
        )
        return Response(top_up_payload(account))


class KeyLimit(serializers.Serializer[Any]):
    key_id = serializers.UUIDField()
    monthly_limit_micros = StrictIntegerField(min_value=0, max_value=MAX_MICROS, allow_null=True)


class LimitsSettings(serializers.Serializer[Any]):
    monthly_budget_micros = StrictIntegerField(min_value=0, max_value=MAX_MICROS, allow_null=True, required=False)
    keys = serializers.ListField(child=KeyLimit(), required=False, max_length=1000)


class KeyLimitStatus(serializers.Serializer[Any]):
    key_id = serializers.UUIDField()
    monthly_limit_micros = serializers.IntegerField()


class LimitsStatus(serializers.Serializer[Any]):
    monthly_budget_micros = serializers.IntegerField(allow_null=True)
    spent_this_month_micros = serializers.IntegerField()
    keys = KeyLimitStatus(many=True)


class LimitsView(MoneyView):
    def payload(self, request: Request) -> dict[str, Any]:
        organization = request_organization(request)
        account = account_of(organization)
        limits = KeySpendLimit.objects.filter(api_key__organization=organization).order_by("api_key__created_at")
        return {
            "monthly_budget_micros": account.monthly_budget_micros,
            "spent_this_month_micros": spent_this_month(organization_id=organization.pk),
            "keys": [
                {"key_id": str(limit.api_key_id), "monthly_limit_micros": limit.monthly_limit_micros}
                for limit in limits
            ],
        }

    @extend_schema(responses=LimitsStatus, summary="The monthly budget and per-key monthly limits")
    def get(self, request: Request) -> Response:
        return Response(self.payload(request))

    @extend_schema(
        request=LimitsSettings,
        responses={200: LimitsStatus, 404: error("A key named is not one of this organization's.")},
        summary="Change the monthly budget or key limits (admin scope)",
    )
    def put(self, request: Request) -> Response:
        body = LimitsSettings(data=request.data)
        body.is_valid(raise_exception=True)
        organization, actor = request_organization(request), request_actor(request)
        keys = {key.pk: key for key in ApiKey.objects.filter(organization=organization)}
        changes = body.validated_data.get("keys", [])
        missing = [str(change["key_id"]) for change in changes if change["key_id"] not in keys]
        if missing:
            raise NotFound(f"No API key {', '.join(missing)} in this organization.")
        if "monthly_budget_micros" in body.validated_data:
            controls.set_monthly_budget(
                organization=organization, budget_micros=body.validated_data["monthly_budget_micros"], actor=actor
            )
        for change in changes:
            controls.set_key_limit(
                api_key=keys[change["key_id"]], monthly_limit_micros=change["monthly_limit_micros"], actor=actor
            )
        return Response(self.payload(request))
