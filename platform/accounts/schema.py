"""The OpenAPI description: API key authentication (imported by the app config so spectacular sees it), the
error bodies, and an AutoSchema that documents every error status an operation can answer."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse, extend_schema_field
from rest_framework import serializers


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "accounts.authentication.ApiKeyAuthentication"
    name = "ApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Key <key_id>:<secret>` (`Bearer <key_id>:<secret>` also works).",
        }


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error: what went wrong, and a stable word for it."""

    detail = serializers.CharField()
    error_type = serializers.CharField(help_text="e.g. `unauthorized`, `insufficient_scope`, `not_found`.")


@extend_schema_field({"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}})
class LocationField(serializers.ListField):
    """``["body", "scopes", 0]``: where the value came from (``body``, ``query``, ``path``, ``header``), then where
    in it."""


class ProblemSerializer(serializers.Serializer[Any]):
    loc = LocationField(help_text="Starts with where the value came from: `body`, `query`, `path` or `header`.")
    msg = serializers.CharField()
    type = serializers.CharField()


class ValidationErrorSerializer(serializers.Serializer[Any]):
    """A 422: every refused value, each with its location (fal's and FastAPI's shape)."""

    detail = ProblemSerializer(many=True)
    error_type = serializers.CharField(help_text="`validation_error`, or the rule that refused the input.")


def error(description: str) -> OpenApiResponse:
    """An error response for ``extend_schema(responses=...)``: ``{detail, error_type}``."""
    return OpenApiResponse(ErrorSerializer, description=description)


def validation_error(description: str) -> OpenApiResponse:
    return OpenApiResponse(ValidationErrorSerializer, description=description)


ERRORS = {
    "400": error("The body is not valid JSON (`invalid_json`)."),
    "401": error("No API key, or a malformed, unknown, revoked or expired one."),
    "403": error("The key lacks the scope this needs, or its organization is suspended."),
    "404": error("Nothing of this organization by that id or name."),
    "413": error("The body is larger than the server accepts (`payload_too_large`)."),
    "415": error("The body is not JSON (`unsupported_media_type`)."),
    "422": validation_error("Refused input: `detail` lists every problem, each located."),
    "429": error("Too many requests for this key: wait the `Retry-After` seconds."),
}
RETRY_AFTER = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait before retrying."}}


class ApiAutoSchema(AutoSchema):
    """spectacular's AutoSchema, plus the errors the API's machinery answers on every operation that uses it:
    401/403 where a key is read, 429 where requests are throttled, 404 where the path names something,
    422 wherever input is read, 400/413/415 where a JSON body is. A view documents its own others
    (402, 409, 503...) with ``extend_schema(responses=...)``."""

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        responses: dict[str, Any] = super()._get_response_bodies(direction)
        for code in self._error_statuses():
            if code not in responses:
                responses[code] = self._get_response_for_code(ERRORS[code], code, direction=direction)
                if code == "429":
                    responses[code]["headers"] = RETRY_AFTER
        return dict(sorted(responses.items()))

    def _error_statuses(self) -> list[str]:
        statuses = []
        if self.view.authentication_classes:
            statuses += ["401", "403"]
        if self.view.throttle_classes:
            statuses.append("429")
        if "{" in self.path:
            statuses.append("404")
        has_body = self._get_request_body() is not None
        if has_body:
            statuses += ["400", "413", "415"]
        if has_body or any(parameter["in"] != "path" for parameter in self._get_parameters()):
            statuses.append("422")
        return statuses
