"""Platform API of billing: usage, balance, the credit ledger, auto top-up and spend limits."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db.models import F, OuterRef, Subquery
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
from accounts.models import ApiKey, Membership, Scope, User
from accounts.parsers import StrictCursorPagination, query_params
from accounts.permissions import HasScope, request_api_key, request_organization
from accounts.schema import ApiAutoSchema, error
from accounts.serializers import BoundedDateField, StrictBooleanField, StrictCharField, StrictIntegerField
from billing import alerts, controls, end_users, selectors
from billing.admission import spent_this_month
from billing.ledger import account_of
from billing.models import (
    AlertScope,
    AlertSettings,
    CreditEntry,
    EndUserLimit,
    EndUserRollup,
    Granularity,
    KeySpendLimit,
    MemberSpendLimit,
    SpendAlert,
    UsageRollup,
    net_spend,
)
from billing.periods import month_bounds
from billing.spreadsheets import csv_records
from inference.models import END_USER_MAX_LENGTH, Endpoint
from inference.submission import END_USER_RULE, valid_end_user
from inference.webhooks import WebhookUrlError, check_webhook_url, where_it_goes

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
        required=False,
        default="day",
        help_text="Comma-separated: day or hour, endpoint, key, gpu_class, end_user (the X-Fal-End-User tag: "
        "with day and endpoint only; tagged requests only).",
    )
    endpoint = serializers.CharField(required=False, help_text="Only this endpoint, e.g. platform/tiny-sd.")
    key_id = serializers.UUIDField(required=False, help_text="Only this API key.")
    end_user = serializers.CharField(
        required=False, max_length=END_USER_MAX_LENGTH, help_text="Only this end user tag (tagged requests only)."
    )
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
        if ("end_user" in group_by or attrs.get("end_user")) and not set(group_by) <= set(
            selectors.END_USER_DIMENSIONS
        ):
            message = f"Usage by end user is grouped by {', '.join(selectors.END_USER_DIMENSIONS)} only."
            raise serializers.ValidationError({"group_by": message})
        if attrs.get("end_user") and attrs.get("key_id"):
            raise serializers.ValidationError({"key_id": "Usage by end user is not split by key."})
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
        if "end_user" in params["group_by"] or params.get("end_user"):
            report = selectors.end_user_usage(
                organization_id=organization.pk,
                start=params["start"],
                end=params["end"],
                group_by=params["group_by"],
                endpoint_id=endpoint_id,
                end_user=params.get("end_user"),
            )
        else:
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
    """The usage report as CSV: the one place its rows are written, for ``/v1/usage`` and the dashboard alike."""
    columns: list[str] = []
    for dimension in report["group_by"]:
        columns += {"key": ["key_id", "key_name"]}.get(dimension, [dimension])
    columns += ["requests", "attempts", "gpu_ms", "gpu_seconds", "unbilled_gpu_ms", "cost_micros"]
    columns += ["video_seconds", "audio_seconds"]
    # A key's name and an end user's tag are whatever someone typed: written so no spreadsheet runs them.
    response = HttpResponse(csv_records(columns, report["data"]), content_type="text/csv; charset=utf-8")
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


class EndUserLimitChange(serializers.Serializer[Any]):
    end_user = StrictCharField(max_length=END_USER_MAX_LENGTH, help_text=f"The tag: {END_USER_RULE}")
    monthly_limit_micros = StrictIntegerField(min_value=0, max_value=MAX_MICROS, allow_null=True)

    def validate_end_user(self, value: str) -> str:
        if not valid_end_user(value):
            raise serializers.ValidationError(f"Should be {END_USER_RULE}", code="invalid_end_user")
        return value


class MemberLimitChange(serializers.Serializer[Any]):
    user_id = StrictIntegerField(
        min_value=1, required=False, help_text="The member's user id (``user.id`` of ``GET /v1/me``); or their email."
    )
    email = serializers.EmailField(required=False, help_text="The member's email address; or their user id.")
    monthly_limit_micros = StrictIntegerField(min_value=0, max_value=MAX_MICROS, allow_null=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("user_id" in attrs) == ("email" in attrs):
            raise serializers.ValidationError(
                {"user_id": "Name the member by exactly one of user_id and email."}, code="one_of"
            )
        return attrs


class LimitsSettings(serializers.Serializer[Any]):
    monthly_budget_micros = StrictIntegerField(min_value=0, max_value=MAX_MICROS, allow_null=True, required=False)
    keys = serializers.ListField(child=KeyLimit(), required=False, max_length=1000)
    members = serializers.ListField(
        child=MemberLimitChange(),
        required=False,
        max_length=1000,
        help_text=(
            "Monthly limits of members, each shared by every API key the member made, keys made later included; "
            "null removes one."
        ),
    )
    end_users = serializers.ListField(
        child=EndUserLimitChange(),
        required=False,
        max_length=1000,
        help_text="Monthly limits of end user tags (X-Fal-End-User); null removes one.",
    )


class KeyLimitStatus(serializers.Serializer[Any]):
    key_id = serializers.UUIDField()
    monthly_limit_micros = serializers.IntegerField()
    spent_this_month_micros = serializers.IntegerField()


class MemberLimitStatus(serializers.Serializer[Any]):
    user_id = serializers.IntegerField()
    email = serializers.EmailField()
    monthly_limit_micros = serializers.IntegerField(allow_null=True)
    spent_this_month_micros = serializers.IntegerField(help_text="What the keys the member made spent this month.")
    held_micros = serializers.IntegerField(help_text="Held by the running requests under the member's keys.")


class EndUserLimitStatus(serializers.Serializer[Any]):
    end_user = serializers.CharField()
    monthly_limit_micros = serializers.IntegerField()
    spent_this_month_micros = serializers.IntegerField()


class LimitsStatus(serializers.Serializer[Any]):
    monthly_budget_micros = serializers.IntegerField(allow_null=True)
    spent_this_month_micros = serializers.IntegerField()
    keys = KeyLimitStatus(many=True)
    members = MemberLimitStatus(many=True)
    member = MemberLimitStatus(
        allow_null=True,
        help_text=(
            "The member who made the key asking (null for a key made by no one): their limit (null: none), what "
            "their keys spent and hold now."
        ),
    )
    end_users = EndUserLimitStatus(many=True)


def key_spend_this_month(organization_id: Any) -> dict[str, int]:
    """Each key's cost this month (keys with usage only), from the daily rollups in one grouped query."""
    start, end = month_bounds()
    rows = UsageRollup.objects.filter(
        organization_id=organization_id, granularity=Granularity.DAY, bucket_start__gte=start, bucket_start__lt=end
    )
    grouped = rows.values("key_id").annotate(total=net_spend()).order_by()
    return {str(row["key_id"]): int(row["total"] or 0) for row in grouped}


def end_user_spend_this_month(organization_id: Any) -> dict[str, int]:
    """Each end user tag's cost this month, from the tags' day rows in one grouped query."""
    start, end = month_bounds()
    rows = EndUserRollup.objects.filter(organization_id=organization_id, bucket_start__gte=start, bucket_start__lt=end)
    grouped = rows.values("end_user").annotate(total=net_spend()).order_by()
    return {row["end_user"]: int(row["total"] or 0) for row in grouped}


def member_limit_payload(user_id: Any, email: str, row: Any) -> dict[str, Any]:
    """A member's limit as ``MemberLimitStatus`` describes it; ``row`` has the limit as ``monthly_limit`` and the
    annotations of ``selectors.member_spending``."""
    return {
        "user_id": user_id,
        "email": email,
        "monthly_limit_micros": row.monthly_limit,
        "spent_this_month_micros": row.spent_this_month,
        "held_micros": row.held,
    }


class LimitsView(MoneyView):
    def payload(self, request: Request) -> dict[str, Any]:
        organization = request_organization(request)
        account = account_of(organization)
        limits = KeySpendLimit.objects.filter(api_key__organization=organization).order_by("api_key__created_at")
        key_spend = key_spend_this_month(organization.pk) if limits else {}
        # Every member's limit, then the asking key's maker's (a member or not, with a limit or not): one query each.
        member_limits = (
            MemberSpendLimit.objects.filter(organization=organization)
            .select_related("user")
            .annotate(monthly_limit=F("monthly_limit_micros"), **selectors.member_spending())
            .order_by("user__email")
        )
        maker_id = request_api_key(request).created_by_id
        limit = MemberSpendLimit.objects.filter(organization=organization, user_id=OuterRef("pk"))
        maker = (
            User.objects.filter(pk=maker_id)
            .annotate(
                monthly_limit=Subquery(limit.values("monthly_limit_micros")[:1]),
                **selectors.member_spending(organization=organization.pk, user="pk"),
            )
            .first()
            if maker_id is not None
            else None
        )
        tag_limits = EndUserLimit.objects.filter(organization=organization).order_by("end_user")
        tag_spend = end_user_spend_this_month(organization.pk) if tag_limits else {}
        return {
            "monthly_budget_micros": account.monthly_budget_micros,
            "spent_this_month_micros": spent_this_month(organization_id=organization.pk),
            "keys": [
                {
                    "key_id": str(limit.api_key_id),
                    "monthly_limit_micros": limit.monthly_limit_micros,
                    "spent_this_month_micros": key_spend.get(str(limit.api_key_id), 0),
                }
                for limit in limits
            ],
            "members": [member_limit_payload(row.user_id, row.user.email, row) for row in member_limits],
            "member": member_limit_payload(maker.pk, maker.email, maker) if maker is not None else None,
            "end_users": [
                {
                    "end_user": limit.end_user,
                    "monthly_limit_micros": limit.monthly_limit_micros,
                    "spent_this_month_micros": tag_spend.get(limit.end_user, 0),
                }
                for limit in tag_limits
            ],
        }

    @extend_schema(
        responses=LimitsStatus,
        summary="The monthly budget and the monthly limits of keys, members (the asking key's maker too) and end users",
    )
    def get(self, request: Request) -> Response:
        return Response(self.payload(request))

    @extend_schema(
        request=LimitsSettings,
        responses={200: LimitsStatus, 404: error("A key or member named is not one of this organization's.")},
        summary=(
            "Change the monthly budget, key, member or end user limits (admin scope, which only owners and admins "
            "may give a key); each change is audited"
        ),
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
        member_changes = body.validated_data.get("members", [])
        members = members_named(organization, member_changes)
        if "monthly_budget_micros" in body.validated_data:
            controls.set_monthly_budget(
                organization=organization, budget_micros=body.validated_data["monthly_budget_micros"], actor=actor
            )
        for change in changes:
            controls.set_key_limit(
                api_key=keys[change["key_id"]], monthly_limit_micros=change["monthly_limit_micros"], actor=actor
            )
        for change, member in zip(member_changes, members, strict=True):
            controls.set_member_limit(
                organization=organization,
                user=member,
                monthly_limit_micros=change["monthly_limit_micros"],
                actor=actor,
            )
        for change in body.validated_data.get("end_users", []):
            end_users.set_end_user_limit(
                organization=organization,
                end_user=change["end_user"],
                monthly_limit_micros=change["monthly_limit_micros"],
                actor=actor,
            )
        return Response(self.payload(request))


def members_named(organization: Any, changes: list[dict[str, Any]]) -> list[Any]:
    """The members the changes name, in their order (one query); ``NotFound`` naming those who are not members, before
    anything is changed."""
    memberships = Membership.objects.filter(organization=organization).select_related("user")
    by_id = {membership.user_id: membership.user for membership in memberships} if changes else {}
    by_email = {user.email.lower(): user for user in by_id.values()}
    found = [
        by_id.get(change["user_id"]) if "user_id" in change else by_email.get(change["email"].lower())
        for change in changes
    ]
    missing = [
        str(change.get("user_id", change.get("email"))) for change, user in zip(changes, found, strict=True) if not user
    ]
    if missing:
        raise NotFound(f"No member {', '.join(missing)} in this organization.")
    return found


# Spend alerts (billing.alerts).


class AlertSettingsChange(serializers.Serializer[Any]):
    budget_thresholds = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=100),
        required=False,
        max_length=controls.MAX_THRESHOLDS,
        help_text="Percentages of the monthly budget that raise an alert (default 50, 80, 100).",
    )
    key_thresholds = serializers.ListField(
        child=StrictIntegerField(min_value=1, max_value=100),
        required=False,
        max_length=controls.MAX_THRESHOLDS,
        help_text="Percentages of each API key's monthly limit that raise an alert (default 50, 80, 100).",
    )
    credit_floor_micros = StrictIntegerField(
        min_value=0,
        max_value=MAX_MICROS,
        allow_null=True,
        required=False,
        help_text="An alert when the available credit falls below this, once per refill; null: none.",
    )
    webhook_url = StrictCharField(
        max_length=2000,
        allow_blank=True,
        required=False,
        help_text="Where billing.threshold_reached, billing.budget_exhausted and billing.credits_low are POSTed, "
        "signed as request webhooks are; empty: none. No private or loopback address.",
    )

    def validate_webhook_url(self, value: str) -> str:
        url = value.strip()
        if url:
            try:
                check_webhook_url(url)
            except WebhookUrlError as exc:
                raise serializers.ValidationError(str(exc), code="invalid_webhook_url") from None
        return url


class AlertSettingsStatus(serializers.Serializer[Any]):
    budget_thresholds = serializers.ListField(child=serializers.IntegerField())
    key_thresholds = serializers.ListField(child=serializers.IntegerField())
    credit_floor_micros = serializers.IntegerField(allow_null=True)
    webhook_url = serializers.CharField(
        allow_blank=True,
        help_text="In full for a key with the admin scope; for any other, its scheme and host followed by `/…` (its "
        "path and query may hold a secret, as a chat service's incoming-webhook URL does). Empty: none set.",
    )


def alert_settings_payload(watched: AlertSettings, *, in_full: bool) -> dict[str, Any]:
    return {
        "budget_thresholds": list(watched.budget_thresholds),
        "key_thresholds": list(watched.key_thresholds),
        "credit_floor_micros": watched.credit_floor_micros,
        "webhook_url": watched.webhook_url if in_full else where_it_goes(watched.webhook_url),
    }


class AlertSettingsView(MoneyView):
    @extend_schema(responses=AlertSettingsStatus, summary="What spend alerts watch, and the billing webhook URL")
    def get(self, request: Request) -> Response:
        watched = alerts.settings_of(request_organization(request).pk)
        return Response(alert_settings_payload(watched, in_full=request_api_key(request).has_scope(Scope.ADMIN)))

    @extend_schema(
        request=AlertSettingsChange,
        responses={200: AlertSettingsStatus},
        summary="Change the alert thresholds, the credit floor or the billing webhook URL (admin scope; audited)",
    )
    def put(self, request: Request) -> Response:
        body = AlertSettingsChange(data=request.data)
        body.is_valid(raise_exception=True)
        watched = controls.set_alert_settings(
            organization=request_organization(request), actor=request_actor(request), **body.validated_data
        )
        return Response(alert_settings_payload(watched, in_full=True))  # changing it takes the admin scope


class SpendAlertSerializer(serializers.Serializer[Any]):
    id = serializers.IntegerField()
    type = serializers.CharField(source="event_type", help_text="The webhook's event type.")
    scope = serializers.ChoiceField(choices=AlertScope.values)
    api_key_id = serializers.CharField(allow_null=True)
    member_user_id = serializers.IntegerField(
        allow_null=True, help_text="The limited member's user id, for a member's limit (scope member); else null."
    )
    member_email = serializers.CharField(
        allow_null=True, help_text="The limited member's email, for a member's limit (scope member); else null."
    )
    threshold_percent = serializers.IntegerField(allow_null=True)
    credit_floor_micros = serializers.IntegerField(allow_null=True)
    period = serializers.CharField(help_text="The UTC month (YYYY-MM), or credit-<entry id> for the credit floor.")
    spent_micros = serializers.IntegerField()
    limit_micros = serializers.IntegerField(allow_null=True)
    available_micros = serializers.IntegerField()
    message = serializers.CharField()
    created_at = serializers.DateTimeField()
    emailed_at = serializers.DateTimeField(allow_null=True)
    dismissed_at = serializers.DateTimeField(allow_null=True)


class AlertPages(StrictCursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50


class AlertsView(ListAPIView[SpendAlert]):
    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.USAGE_READ
    schema = ApiAutoSchema()
    serializer_class = SpendAlertSerializer
    pagination_class = AlertPages

    @extend_schema(summary="Spend alerts raised, newest first (each threshold once per period and limit)")
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> Any:
        return SpendAlert.objects.filter(organization=request_organization(self.request))

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.get_queryset()) or []
        names = alerts.key_names(page)
        return self.get_paginated_response([alert_payload(alert, names) for alert in page])


def alert_payload(alert: SpendAlert, key_names: dict[str, str]) -> dict[str, Any]:
    floor, member = alert.scope == AlertScope.CREDITS, alert.scope == AlertScope.MEMBER
    return {
        "id": alert.pk,
        "type": alert.event_type,
        "scope": alert.scope,
        "api_key_id": alert.subject if alert.scope == AlertScope.KEY else None,
        "member_user_id": int(alert.subject) if member and alert.subject.isdigit() else None,
        "member_email": key_names.get(alert.subject) if member else None,
        "threshold_percent": None if floor else alert.threshold,
        "credit_floor_micros": alert.threshold if floor else None,
        "period": alert.period,
        "spent_micros": alert.spent_micros,
        "limit_micros": alert.limit_micros,
        "available_micros": alert.available_micros,
        "message": alerts.describe(alert, key_name=key_names.get(alert.subject)),
        "created_at": alert.created_at,
        "emailed_at": alert.emailed_at,
        "dismissed_at": alert.dismissed_at,
    }
