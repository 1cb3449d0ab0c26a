"""How the API picks the answer's format: DRF's content negotiation, without parsing the commonest ``Accept``."""

from __future__ import annotations

from collections.abc import Iterable

from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request

# What API clients send: nothing, or anything (fal's clients, httpx, requests and curl send ``*/*``).
ANYTHING = (None, "*/*")


class FirstRendererForAnything(DefaultContentNegotiation):
    """DRF's negotiation, answering at once when the client accepts anything, or exactly the first renderer's type:
    the first renderer, as DRF would choose after parsing the header into media types and ranking them (a tenth of an
    authenticated request's time, measured under load). Any other ``Accept``, a format suffix, or a format override
    in the query string goes through DRF's negotiation as before."""

    def select_renderer(
        self, request: Request, renderers: Iterable[BaseRenderer], format_suffix: str | None = None
    ) -> tuple[BaseRenderer, str]:
        renderers = list(renderers)
        if renderers and not format_suffix and self.settings.URL_FORMAT_OVERRIDE is None:
            first = renderers[0]
            accept = request.META.get("HTTP_ACCEPT")
            if accept in ANYTHING or accept == first.media_type:
                return first, first.media_type
        return super().select_renderer(request, renderers, format_suffix)
