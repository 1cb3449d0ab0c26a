from __future__ import annotations

from datetime import date, datetime
from typing import Any

from django.utils import timezone
from rest_framework import serializers

from accounts.models import ApiKey, Organization, Scope, User

# What the API accepts, whatever the database could hold: past these, dates overflow Python's and money
# or rates overflow 64-bit columns, and no real request needs more.
EARLIEST_DATE = date(2000, 1, 1)
LATEST_DATE = date(2100, 12, 31)
MAX_REQUESTS_PER_MINUTE = 1_000_000


class StrictCharField(serializers.CharField):
    """A JSON string and nothing else (DRF's CharField turns ``5`` into ``"5"``)."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON number that is an integer (DRF's IntegerField also takes ``"5"``); bounds as IntegerField's."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int | float):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    """``true`` or ``false`` (DRF's BooleanField also takes ``"yes"``, ``1``, ``"off"``...)."""

    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class BoundedDateField(serializers.DateField):
    """A day from ``EARLIEST_DATE`` to ``LATEST_DATE``: arithmetic on it (a range of days) cannot overflow."""

    def to_internal_value(self, value: Any) -> date:
        parsed = super().to_internal_value(value)
        if not EARLIEST_DATE <= parsed <= LATEST_DATE:
            raise serializers.ValidationError(f"Should be from {EARLIEST_DATE} to {LATEST_DATE}.", code="out_of_range")
        return parsed


class BoundedDateTimeField(serializers.DateTimeField):
    """A moment from ``EARLIEST_DATE`` to ``LATEST_DATE``."""

    def to_internal_value(self, value: Any) -> datetime:
        parsed = super().to_internal_value(value)
        if not EARLIEST_DATE <= parsed.date() <= LATEST_DATE:
            raise serializers.ValidationError(f"Should be from {EARLIEST_DATE} to {LATEST_DATE}.", code="out_of_range")
        return parsed


class OrganizationSerializer(serializers.ModelSerializer[Organization]):
    class Meta:
        model = Organization
        fields = ("id", "name", "slug", "is_personal", "concurrency_limit", "created_at")


class UserSerializer(serializers.ModelSerializer[User]):
    class Meta:
        model = User
        fields = ("id", "email", "name")


class ApiKeySerializer(serializers.ModelSerializer[ApiKey]):
    status = serializers.CharField(read_only=True)
    rate_limit_per_minute = serializers.IntegerField(read_only=True)
    created_by = serializers.EmailField(source="created_by.email", read_only=True, default=None)

    class Meta:
        model = ApiKey
        fields: tuple[str, ...] = (
            "id",
            "name",
            "scopes",
            "status",
            "secret_hint",
            "rate_limit_per_minute",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "created_at",
            "created_by",
        )
        read_only_fields: tuple[str, ...] = fields


class ApiKeyCreateSerializer(serializers.Serializer[dict[str, Any]]):
    name = StrictCharField(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=Scope.choices),
        default=lambda: [Scope.INFERENCE],
        min_length=1,
        max_length=len(Scope.values),
    )
    expires_at = BoundedDateTimeField(required=False, allow_null=True, default=None)
    requests_per_minute = StrictIntegerField(
        required=False, allow_null=True, default=None, min_value=1, max_value=MAX_REQUESTS_PER_MINUTE
    )

    def validate_expires_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("Must be in the future.")
        return value


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = serializers.CharField(read_only=True, help_text="The full key `<id>:<secret>`; shown only once.")

    class Meta(ApiKeySerializer.Meta):
        fields = (*ApiKeySerializer.Meta.fields, "key")
        read_only_fields = fields


class MeSerializer(serializers.Serializer[dict[str, Any]]):
    organization = OrganizationSerializer()
    api_key = ApiKeySerializer()
    user = UserSerializer(allow_null=True)
