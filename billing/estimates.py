"""What requests to an endpoint will cost an organization, before it sends them: the pricing API's estimates.

Every estimate prices with the rate card admission uses (``pricing.price_for``, the organization's negotiated price
where it has one) and meets price and quantity only in ``money.cost_micros``, so its rounding is the bill's.

- ``unit_price_cost``: a number of billing units (images, megapixels, videos, seconds of video or audio,
  GPU-seconds) at the unit price (a line with resolution tiers: its own price, for outputs above every tier).
- ``input_cost``: calls with a given input, each costing what admission holds for it (``pricing.hold_micros``):
  exact for a price per image or megapixel; for a price per GPU-second, the endpoint's measured GPU time per work
  unit (or its class's bound) plus the hold margin, an upper estimate.
- ``history_cost``: calls like the organization's own billed requests of the endpoint over the last
  ``HISTORY_DAYS`` days (their mean GPU time, images or megapixels per request), at today's price. With no such
  history it is ``input_cost`` of a request that leaves every parameter at the endpoint's default.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.db.models import Count, Sum
from django.utils import timezone

from billing import pricing
from billing.models import PriceUnit, UsageRecord
from billing.money import cost_micros, divide_half_up
from inference.models import Endpoint

HISTORY_DAYS = 30
PIXELS_PER_MEGAPIXEL = 1_000_000


class NotWholeUnits(ValueError):
    """A quantity finer than the unit is billed in (a part of an image, a fraction of a millisecond)."""


@dataclass(frozen=True)
class History:
    """An organization's billed requests of one endpoint under one price unit, summed."""

    requests: int
    gpu_ms: int
    billable_units: Decimal


def unit_price_cost(quote: pricing.Quote, units: Decimal) -> int:
    """``units`` of the quote's unit at its price: whole images and videos, megapixels to the pixel, GPU-seconds
    and seconds of video or audio to the millisecond."""
    return cost_micros(unit=quote.unit, unit_price_micros=quote.unit_price_micros, **_quantities(quote.unit, units))[1]


def _quantities(unit: str, units: Decimal) -> dict[str, int]:
    """``cost_micros``' quantities for ``units`` of ``unit``, refused (``NotWholeUnits``) finer than a bill counts."""
    quantities = {"gpu_ms": 0, "images": 0, "pixels": 0, "videos": 0, "video_ms": 0, "audio_ms": 0}
    if unit == PriceUnit.IMAGE:
        quantities["images"] = _whole(units, "An image is billed whole: give a whole number of images.")
    elif unit == PriceUnit.VIDEO:
        quantities["videos"] = _whole(units, "A video is billed whole: give a whole number of videos.")
    elif unit == PriceUnit.MEGAPIXEL:
        quantities["pixels"] = _whole(
            units * PIXELS_PER_MEGAPIXEL, "Megapixels are billed to the pixel: at most 6 decimals."
        )
    elif unit in (PriceUnit.VIDEO_SECOND, PriceUnit.AUDIO_SECOND):
        key = "video_ms" if unit == PriceUnit.VIDEO_SECOND else "audio_ms"
        quantities[key] = _whole(units * 1000, "Seconds of output are billed to the millisecond: at most 3 decimals.")
    else:
        quantities["gpu_ms"] = _whole(units * 1000, "GPU time is billed to the millisecond: at most 3 decimals.")
    return quantities


def _whole(quantity: Decimal, message: str) -> int:
    if quantity != quantity.to_integral_value():
        raise NotWholeUnits(message)
    return int(quantity)


def default_input(endpoint: Endpoint) -> dict[str, Any]:
    """What a request that leaves every parameter out runs with, as far as its cost goes (``pricing.work_units``,
    ``inference.deliveries.asked``)."""
    defaults: dict[str, Any] = {"num_inference_steps": endpoint.default_steps, "num_images": 1}
    if endpoint.makes == "audio":
        return {**defaults, "seconds_total": endpoint.default_audio_seconds}
    defaults.update(width=endpoint.default_width, height=endpoint.default_height)
    if endpoint.makes == "video":
        defaults.update(num_frames=endpoint.default_num_frames, fps=endpoint.default_fps)
    return defaults


def input_cost(endpoint: Endpoint, quote: pricing.Quote, job_input: dict[str, Any], calls: int) -> int:
    """``calls`` requests with ``job_input`` (validated, defaults applied), each what admission would hold."""
    return pricing.hold_micros(endpoint, job_input, quote) * calls


def histories(organization_id: Any, endpoints: list[Endpoint]) -> dict[tuple[Any, str], History]:
    """The organization's billed requests per endpoint and price unit over the last ``HISTORY_DAYS`` (one query)."""
    since = timezone.now() - timedelta(days=HISTORY_DAYS)
    rows = (
        UsageRecord.objects.filter(
            organization_id=organization_id,
            endpoint_id__in=[endpoint.pk for endpoint in endpoints],
            billable=True,
            recorded_at__gte=since,
        )
        .order_by()  # no default ordering in the GROUP BY
        .values("endpoint_id", "unit")
        .annotate(requests=Count("job_id", distinct=True), gpu_ms=Sum("gpu_ms"), units=Sum("billable_units"))
    )
    return {
        (row["endpoint_id"], row["unit"]): History(
            requests=row["requests"], gpu_ms=int(row["gpu_ms"] or 0), billable_units=Decimal(row["units"] or 0)
        )
        for row in rows
    }


def history_cost(quote: pricing.Quote, history: History, calls: int) -> int:
    """``calls`` requests using what ``history``'s requests used on average, at the quote's price.

    The total quantity is rounded half up to the unit's grain (a millisecond, an image or video, a pixel), then priced
    once. (A line with resolution tiers: at its own price, the largest outputs'.)
    """
    quantities = {"gpu_ms": 0, "images": 0, "pixels": 0, "videos": 0, "video_ms": 0, "audio_ms": 0}
    if quote.unit in (PriceUnit.IMAGE, PriceUnit.VIDEO):
        key = "images" if quote.unit == PriceUnit.IMAGE else "videos"
        quantities[key] = divide_half_up(int(history.billable_units) * calls, history.requests)
    elif quote.unit == PriceUnit.MEGAPIXEL:
        total_pixels = int(history.billable_units * PIXELS_PER_MEGAPIXEL)
        quantities["pixels"] = divide_half_up(total_pixels * calls, history.requests)
    elif quote.unit in (PriceUnit.VIDEO_SECOND, PriceUnit.AUDIO_SECOND):
        key = "video_ms" if quote.unit == PriceUnit.VIDEO_SECOND else "audio_ms"
        quantities[key] = divide_half_up(int(history.billable_units * 1000) * calls, history.requests)
    else:
        quantities["gpu_ms"] = divide_half_up(history.gpu_ms * calls, history.requests)
    return cost_micros(unit=quote.unit, unit_price_micros=quote.unit_price_micros, **quantities)[1]
