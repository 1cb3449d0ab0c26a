"""Every API error is JSON ``{detail, error_type}``; every 422 has a ``detail`` list of ``{loc, msg, type}``
whose ``loc`` starts with where the value came from: ``body``, ``query``, ``path`` or ``header``."""

from __future__ import annotations

import logging
from typing import Any, cast

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler

logger = logging.getLogger(__name__)

# DRF's codes renamed where a client-facing name reads better.
ERROR_TYPES = {
    "parse_error": "invalid_json",
    "not_authenticated": "unauthorized",
    "authentication_failed": "unauthorized",
    "permission_denied": "forbidden",
    "throttled": "rate_limited",
}


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body is too large."
    default_code = "payload_too_large"


class InvalidInput(exceptions.APIException):
    """A 422 whose ``detail`` is already located: ``[{loc, msg, type}]``, each ``loc`` starting with where the
    value came from. ``error_type`` names the rule that refused it where one word says more than
    ``validation_error`` (``too_many_keys``)."""

    status_code = 422
    default_code = "validation_error"

    def __init__(self, problems: list[dict[str, Any]], *, error_type: str = "validation_error") -> None:
        super().__init__(detail="; ".join(str(item["msg"]) for item in problems), code=error_type)
        self.problems = problems
        self.error_type = error_type

    @classmethod
    def from_errors(cls, errors: Any, *, location: str) -> InvalidInput:
        """A serializer's errors about input read from ``location`` (``query``, ``header``...)."""
        full = exceptions.ValidationError(errors).get_full_details()
        return cls(validation_detail(_full_details(full), (location,)))


def problem(loc: list[str | int], msg: str, problem_type: str) -> dict[str, Any]:
    """One item of a 422's ``detail``."""
    return {"loc": loc, "msg": msg, "type": problem_type}


def validation_detail(detail: Any, loc: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    """DRF's nested error dict, flattened to FastAPI's ``[{loc, msg, type}]`` (what fal answers)."""
    if isinstance(detail, dict):
        return [
            item
            for key, value in detail.items()
            # Errors about the body as a whole sit at the body's own location, as FastAPI puts them.
            for item in validation_detail(value, loc if key == api_settings.NON_FIELD_ERRORS_KEY else (*loc, key))
        ]
    if isinstance(detail, list):
        if all(isinstance(item, dict) and "message" in item for item in detail):
            return [{"loc": list(loc), "msg": str(item["message"]), "type": item["code"]} for item in detail]
        items = []
        for index, item in enumerate(detail):
            items.extend(validation_detail(item, (*loc, index) if isinstance(item, dict | list) else loc))
        return items
    if isinstance(detail, exceptions.ErrorDetail):
        return [{"loc": list(loc), "msg": str(detail), "type": detail.code}]
    return [{"loc": list(loc), "msg": str(detail), "type": "invalid"}]


def _full_details(detail: Any) -> Any:
    if isinstance(detail, dict) and set(detail) == {"message", "code"}:
        return [detail]
    return detail


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    if isinstance(exc, InvalidInput):
        return Response({"detail": exc.problems, "error_type": exc.error_type}, status=422)
    if isinstance(exc, exceptions.ValidationError):
        # Raised from a view's body serializer: a query, path or header is parsed through InvalidInput.
        detail = validation_detail(_full_details(exc.get_full_details()))
        return Response({"detail": detail, "error_type": "validation_error"}, status=422)

    response = exception_handler(exc, context)
    if response is None:
        logger.exception("Unhandled error in %s", context.get("view"), exc_info=exc)
        return Response(
            {"detail": "Internal server error.", "error_type": "internal_error"},
            status=status.HTTP_500_INTERNAL_SERVER_ERROR,
        )
    api_exc = cast(exceptions.APIException, exc)  # DRF answers only its own exceptions
    codes = api_exc.get_codes()
    code = codes if isinstance(codes, str) else api_exc.default_code
    error_type = ERROR_TYPES.get(code, code)
    message = str(api_exc.detail)
    # A 422 raised as a plain APIException still answers the list every client parses.
    located = [problem(["body"], message, error_type)] if response.status_code == 422 else None
    response.data = {"detail": located or message, "error_type": error_type}
    return response
