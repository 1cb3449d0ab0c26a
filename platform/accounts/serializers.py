from __future__ import annotations

from typing import Any

from django.utils import timezone
from rest_framework import serializers

from accounts.models import ApiKey, Organization, Scope, User


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
    name = serializers.CharField(max_length=100)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=Scope.choices),
        default=lambda: [Scope.INFERENCE],
        min_length=1,
        max_length=len(Scope.values),
    )
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)
    requests_per_minute = serializers.IntegerField(required=False, allow_null=True, default=None, min_value=1)

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
