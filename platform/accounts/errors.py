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

logger = logging.getLogger(__name__)

# DRF's codes renamed where a client-facing name reads better.
ERROR_TYPES = {
    "parse_error": "invalid_json",
    "not_authenticated": "unauthorized",
    "authentication_failed": "unauthorized",
    "permission_denied": "forbidden",
    "throttled": "rate_limited",
}


class AppError(Exception):
    """A request the platform's rules refuse, raised by services and answered once: ``{detail, error_type}`` with
    ``status_code``, by the API's exception handler (``api_exception_handler``, which the async views reach through
    DRF's views too) and by the dashboard's JSON views (``body``).

    Subclasses name their ``error_type`` and ``status_code``; an instance may override either. ``detail`` is a
    message, or for a 422 the located list ``[{loc, msg, type}]``; a 422 given a message is about the body."""

    status_code: int = status.HTTP_400_BAD_REQUEST
    error_type: str = "bad_request"

    def __init__(
        self, detail: str | list[dict[str, Any]], *, error_type: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        if error_type is not None:
            self.error_type = error_type
        if status_code is not None:
            self.status_code = status_code

    def __str__(self) -> str:
        if isinstance(self.detail, list):
            return "; ".join(str(item["msg"]) for item in self.detail)
        return self.detail

    def body(self) -> dict[str, Any]:
        detail = self.detail
        if self.status_code == 422 and not isinstance(detail, list):
            detail = [problem(["body"], detail, self.error_type)]
        return {"detail": detail, "error_type": self.error_type}

    def headers(self) -> dict[str, str]:
        """Headers its answer carries besides the body (a 503's ``Retry-After``)."""
        return {}


class PayloadTooLarge(exceptions.APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "Request body is too large."
    default_code = "payload_too_large"


class InvalidInput(AppError):
    """A 422 whose ``detail`` is already located: ``[{loc, msg, type}]``, each ``loc`` starting with where the
    value came from. ``error_type`` names the rule that refused it where one word says more than
    ``validation_error`` (``too_many_keys``)."""

    status_code = 422
    error_type = "validation_error"

    def __init__(
        self, problems: list[dict[str, Any]], *, error_type: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(problems, error_type=error_type, status_code=status_code)

    @property
    def problems(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self.detail)

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
    # Imported here: rest_framework.views reads the API settings, whose parsers import this module; accounts.outages
    # imports this module.
    from rest_framework.views import exception_handler

    from accounts.outages import is_outage, unavailable

    if isinstance(exc, RequestDataTooBig):
        exc = PayloadTooLarge()
    elif isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    if is_outage(exc):
        # A database or broker out of reach (accounts.outages): 503 with Retry-After, its cause in the log only.
        exc = unavailable(exc, where=str(context.get("view")))
    if isinstance(exc, AppError):
        return Response(exc.body(), status=exc.status_code, headers=exc.headers())
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
