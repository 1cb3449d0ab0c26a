"""How the API reads a request: JSON bodies, query strings and page parameters, each refused with its location."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers
from rest_framework.exceptions import NotFound, ParseError
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import JSONParser
from rest_framework.request import Request

from accounts.errors import InvalidInput, problem


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, but JSON nested deeper than Python's recursion limit is a 400, not a 500."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply.") from None


def refuse_repeated(request: Request, names: Iterable[str]) -> None:
    """``?limit=1&limit=2`` is ambiguous (Django keeps the last): a 422 naming the parameter, not a guess."""
    repeated = [name for name in names if len(request.query_params.getlist(name)) > 1]
    if repeated:
        raise InvalidInput([problem(["query", name], "Give this parameter once.", "duplicate") for name in repeated])


PAGE_PARAMETERS = ("cursor", "limit")


def query_params(
    request: Request, serializer_class: type[serializers.Serializer[Any]], *, paginated: bool = False
) -> dict[str, Any]:
    """The query string validated by ``serializer_class``: each parameter at most once; errors located in ``query``.

    A parameter the operation does not take is refused (422 ``unknown``), as Stripe refuses one: a misspelt filter
    silently ignored would answer a question nobody asked. ``paginated``: ``cursor`` and ``limit`` are taken too.
    """
    names = list(serializer_class().fields.keys())
    known = {*names, *(PAGE_PARAMETERS if paginated else ())}
    unknown = [name for name in request.query_params if name not in known]
    if unknown:
        raise InvalidInput(
            [problem(["query", name], "This operation takes no such parameter.", "unknown") for name in unknown]
        )
    refuse_repeated(request, names)
    # A plain dict, not the QueryDict: DRF reads ``?start=`` from a QueryDict as a missing value (HTML forms
    # send empty fields), where an API client who writes it means something and is told it is blank.
    query = serializer_class(data={name: request.query_params[name] for name in names if name in request.query_params})
    if not query.is_valid():
        raise InvalidInput.from_errors(query.errors, location="query")
    return dict(query.validated_data)


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, binascii.Error):  # UnicodeEncodeError is a ValueError
        return False
    return True


class StrictCursorPagination(CursorPagination):
    """DRF's cursor pages, where a malformed ``limit`` or ``cursor`` is a 422 instead of a silent default
    (``limit``) or a 404 (``cursor``), and the documented ``limit`` carries its bounds."""

    page_size_query_param = "limit"
    max_page_size = 200

    def paginate_queryset(self, queryset: Any, request: Request, view: Any = None) -> list[Any] | None:
        refuse_repeated(request, (self.cursor_query_param, self.page_size_query_param))
        limit = request.query_params.get(self.page_size_query_param)
        if limit is not None:
            is_integer = limit.isascii() and limit.isdigit()
            if not (is_integer and len(limit) <= 6 and 1 <= int(limit) <= self.max_page_size):
                message = f"Should be an integer from 1 to {self.max_page_size}."
                problem_type = "out_of_range" if is_integer else "int_parsing"
                raise InvalidInput([problem(["query", self.page_size_query_param], message, problem_type)])
        cursor = request.query_params.get(self.cursor_query_param)
        if cursor is None:
            return super().paginate_queryset(queryset, request, view)
        if not _is_base64(cursor):  # DRF's decoder would skip what is not base64
            raise InvalidInput([problem(["query", self.cursor_query_param], "Invalid cursor.", "invalid")])
        try:
            # The cursor's position is compared with the ordering column when the page is read, so a forged
            # position (a date that is no date) fails only then.
            return super().paginate_queryset(queryset, request, view)
        except (NotFound, DjangoValidationError, ValueError, TypeError, OverflowError):
            raise InvalidInput([problem(["query", self.cursor_query_param], "Invalid cursor.", "invalid")]) from None

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
        return parameters
