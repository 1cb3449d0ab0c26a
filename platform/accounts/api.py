"""Platform API of the core: who am I, and the organization's API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.errors import InvalidInput, problem
from accounts.models import ApiKey, Scope, User
from accounts.parsers import StrictCursorPagination
from accounts.permissions import HasScope, request_api_key, request_organization
from accounts.schema import ApiAutoSchema, error, validation_error
from accounts.serializers import ApiKeyCreatedSerializer, ApiKeyCreateSerializer, ApiKeySerializer, MeSerializer
from accounts.services import Actor, create_api_key, revoke_api_key


def request_actor(request: Request) -> Actor:
    api_key = request.auth if isinstance(request.auth, ApiKey) else None
    return Actor(api_key=api_key, ip_address=request.META.get("REMOTE_ADDR"))


def api_key_creator(request: Request) -> User | None:
    # A key made through the API is attributed to the person behind the key that made it.
    return request.auth.created_by if isinstance(request.auth, ApiKey) else None


class NewestFirst(StrictCursorPagination):
    ordering = "-created_at"
    page_size = 50


def me_payload(api_key: ApiKey) -> dict[str, Any]:
    """What MeSerializer describes, built directly: ModelSerializer rebuilds its fields on every
    request, which cost more than the rest of this hot endpoint together."""
    organization, user = api_key.organization, api_key.created_by
    return {
        "organization": {
            "id": str(organization.id),
            "name": organization.name,
            "slug": organization.slug,
            "is_personal": organization.is_personal,
            "concurrency_limit": organization.concurrency_limit,
            "created_at": organization.created_at,
        },
        "api_key": {
            "id": str(api_key.id),
            "name": api_key.name,
            "scopes": api_key.scopes,
            "status": api_key.status,
            "secret_hint": api_key.secret_hint,
            "rate_limit_per_minute": api_key.rate_limit_per_minute,
            "expires_at": api_key.expires_at,
            "revoked_at": api_key.revoked_at,
            "last_used_at": api_key.last_used_at,
            "created_at": api_key.created_at,
            "created_by": user.email if user else None,
        },
        "user": {"id": user.pk, "email": user.email, "name": user.name} if user else None,
    }


def expiry_within(maker: ApiKey, serializer: ApiKeyCreateSerializer) -> datetime | None:
    """The expiry of a key made through the API by ``maker``: no later than ``maker``'s own (by default the same), so
    a key given for a day cannot make itself a successor that outlives the day; a later one is refused (422)."""
    asked: datetime | None = serializer.validated_data["expires_at"]
    if maker.expires_at is None:
        return asked
    if asked is None:
        return maker.expires_at
    if asked > maker.expires_at:
        message = f"At most the expiry of the key making it ({maker.expires_at.isoformat()})."
        raise InvalidInput([problem(["body", "expires_at"], message, "after_maker_expiry")])
    return asked


class MeView(APIView):
    permission_classes = (IsAuthenticated, HasScope)
    schema = ApiAutoSchema()

    @extend_schema(responses=MeSerializer, summary="The key, organization and user this request acts as")
    def get(self, request: Request) -> Response:
        return Response(me_payload(request_api_key(request)))


class ApiKeyViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[ApiKey]
):
    """The organization's API keys. Needs the ``admin`` scope."""

    permission_classes = (IsAuthenticated, HasScope)
    required_scope = Scope.ADMIN
    schema = ApiAutoSchema()
    serializer_class = ApiKeySerializer
    pagination_class = NewestFirst
    lookup_value_regex = "[^/]+"

    def get_queryset(self) -> QuerySet[ApiKey]:
        return ApiKey.objects.filter(organization=request_organization(self.request)).select_related("created_by")

    def get_object(self) -> ApiKey:
        try:
            uuid.UUID(str(self.kwargs["pk"]))
        except ValueError:
            raise NotFound() from None  # a malformed id is unknown like any other
        return super().get_object()

    @extend_schema(
        request=ApiKeyCreateSerializer,
        responses={
            201: ApiKeyCreatedSerializer,
            403: error("`insufficient_role`: a scope the key's maker's role may not grant (or `insufficient_scope`)."),
            422: validation_error(
                "Refused input (an `expires_at` later than the key making it expires), or `too_many_keys`: the "
                "organization has its most active keys."
            ),
        },
        summary="Create a key",
    )
    def create(self, request: Request) -> Response:
        serializer = ApiKeyCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        wanted = {**serializer.validated_data, "expires_at": expiry_within(request_api_key(request), serializer)}
        api_key, token = create_api_key(
            organization=request_organization(request),
            created_by=api_key_creator(request),
            actor=request_actor(request),
            **wanted,
        )
        payload: dict[str, Any] = dict(ApiKeyCreatedSerializer(api_key).data)
        payload["key"] = token
        return Response(payload, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: ApiKeySerializer}, summary="Revoke a key (effective on its next request)")
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        api_key = revoke_api_key(api_key=self.get_object(), actor=request_actor(request))
        return Response(ApiKeySerializer(api_key).data, status=status.HTTP_200_OK)
