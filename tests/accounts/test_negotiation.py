"""The API's content negotiation chooses what DRF's would, for every ``Accept`` a client may send."""

from __future__ import annotations

import pytest
from rest_framework.exceptions import NotAcceptable
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.test import APIRequestFactory

from accounts.negotiation import FirstRendererForAnything


class CsvRenderer(BaseRenderer):
    media_type = "text/csv"
    format = "csv"


ACCEPTS = [
    None,
    "*/*",
    "application/json",
    "application/json; indent=4",
    "application/*",
    "text/csv",
    "text/csv, application/json",
    "application/json;q=0.5, text/csv",
    "text/html",
    "text/event-stream",
    "",
    "*/*; q=0.1, text/csv",
]
RENDERER_LISTS = [[JSONRenderer()], [JSONRenderer(), CsvRenderer()], [CsvRenderer(), JSONRenderer()]]


def choose(negotiation: DefaultContentNegotiation, accept: str | None, renderers: list[BaseRenderer]) -> object:
    headers = {} if accept is None else {"HTTP_ACCEPT": accept}
    request = Request(APIRequestFactory().get("/v1/me", **headers))
    try:
        renderer, media_type = negotiation.select_renderer(request, renderers)
    except NotAcceptable:
        return "406"
    return type(renderer), media_type


@pytest.mark.parametrize("renderers", RENDERER_LISTS, ids=lambda each: "+".join(r.format for r in each))
@pytest.mark.parametrize("accept", ACCEPTS)
def test_chooses_what_drf_chooses(accept: str | None, renderers: list[BaseRenderer]) -> None:
    ours = choose(FirstRendererForAnything(), accept, renderers)
    assert ours == choose(DefaultContentNegotiation(), accept, renderers)


def test_an_api_answer_is_json_for_anything_and_406_for_what_it_cannot_serve(tenant: dict[str, object]) -> None:
    client = tenant["client"]
    for accept in (None, "*/*", "application/json"):
        headers = {} if accept is None else {"HTTP_ACCEPT": accept}
        answer = client.get("/v1/me", **headers)  # type: ignore[attr-defined]
        assert answer.status_code == 200
        assert answer["Content-Type"] == "application/json"
    assert client.get("/v1/me", HTTP_ACCEPT="text/html").status_code == 406  # type: ignore[attr-defined]
