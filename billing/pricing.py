"""Which price applies, and what a job will probably cost before it runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from time import monotonic
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db.models import F, Min, OuterRef, Q, QuerySet, Subquery, Sum
from django.utils import timezone

from accounts.memo import GenerationMemo
from billing.models import Granularity, Price, PriceUnit, UsageRollup
from billing.money import cost_micros, seconds_to_ms
from billing.periods import day_start
from inference.deliveries import Outputs, asked
from inference.hooks import ListedPrice
from inference.models import Endpoint

# A class missing from BILLING_UNMEASURED_MS_PER_WORK_UNIT: as slow as the slowest class there.
UNMEASURED_FALLBACK_MS = 5_000
MEASURED_CACHE_SECONDS = 60


@dataclass(frozen=True)
class Quote:
    """A price line resolved for one endpoint at one moment (``price`` None: nothing configured, free).

    ``unit_price_micros`` is the line's own price; a line with resolution tiers prices each output by its size
    (``for_outputs``): that is the quote a job is held, billed and estimated at.
    """

    price: Price | None
    unit: str
    unit_price_micros: int

    @property
    def resolution_tiers(self) -> list[dict[str, int]]:
        return list(self.price.resolution_tiers or []) if self.price is not None else []

    def for_outputs(self, outputs: Outputs) -> Quote:
        """The quote for outputs of this size: the price of the first tier that holds their shorter side."""
        if self.price is None or not self.price.resolution_tiers:
            return self
        return Quote(price=self.price, unit=self.unit, unit_price_micros=self.price.unit_price_for(outputs.short_side))

    def as_json(self) -> ListedPrice:
        return {
            "unit": self.unit,
            "unit_price_micros": self.unit_price_micros,
            "currency": "usd",
            "effective_from": self.price.effective_from.isoformat() if self.price else None,
            "resolution_tiers": self.resolution_tiers,
        }


FREE = Quote(price=None, unit=PriceUnit.GPU_SECOND, unit_price_micros=0)


def _scope(*, endpoint: Any, gpu_class: Any, organization_id: Any) -> Q:
    """Every line that could price ``endpoint``, at any moment: its own, its class's, the organization's."""
    scope = Q(endpoint=endpoint, organization=None) | Q(endpoint=None, gpu_class=gpu_class)
    if organization_id is not None:
        scope |= Q(endpoint=endpoint, organization_id=organization_id)
    return scope


def _lines(at: datetime, *, endpoint: Any, gpu_class: Any, organization_id: Any) -> QuerySet[Price]:
    """The lines that could price ``endpoint`` at ``at``, the one that applies first.

    The most specific kind wins, then the newest: the organization's negotiated line for the endpoint, the
    endpoint's own line, its GPU class's line. ``endpoint`` and ``gpu_class`` may be ``OuterRef``s.
    """
    return (
        Price.objects.in_force(at)
        .filter(_scope(endpoint=endpoint, gpu_class=gpu_class, organization_id=organization_id))
        .order_by(
            F("organization").desc(nulls_last=True), F("endpoint").desc(nulls_last=True), "-effective_from", "-id"
        )
    )


def _quote(price: Price | None) -> Quote:
    if price is None:
        return FREE
    return Quote(price=price, unit=price.unit, unit_price_micros=price.unit_price_micros)


@dataclass(frozen=True)
class _Period:
    """The line that prices an endpoint at every moment from ``start`` to ``end``: no line in scope begins between.

    ``start``: the latest beginning of a line in scope at or before the moment asked (None: no line began yet);
    ``end``: the first beginning after it (None: none is scheduled).
    """

    price: Price | None
    start: datetime | None
    end: datetime | None

    def covers(self, at: datetime) -> bool:
        return (self.start is None or self.start <= at) and (self.end is None or at < self.end)


# Every submission and every settlement prices its job; rate cards change a few times a month. A period is kept in
# process memory until a price line or an endpoint changes anywhere (billing/signals.py, accounts/memo.py).
_periods: GenerationMemo[_Period] = GenerationMemo("price periods")


def _period(endpoint: Endpoint, at: datetime, organization_id: Any, kept: bool) -> _Period:
    """The line that prices ``endpoint`` at ``at`` and, when it is to be kept, its period: in the same statement."""
    lines = _lines(at, endpoint=endpoint, gpu_class=endpoint.gpu_class, organization_id=organization_id)
    if not kept:
        return _Period(price=lines.first(), start=None, end=None)
    in_scope = _scope(endpoint=endpoint, gpu_class=endpoint.gpu_class, organization_id=organization_id)
    scope = Price.objects.filter(in_scope)
    price = lines.annotate(
        period_start=Subquery(
            scope.filter(effective_from__lte=at).order_by("-effective_from").values("effective_from")[:1]
        ),
        period_end=Subquery(
            scope.filter(effective_from__gt=at).order_by("effective_from").values("effective_from")[:1]
        ),
    ).first()
    if price is None:  # no line has begun: the period ends where the first one begins
        return _Period(price=None, start=None, end=scope.aggregate(end=Min("effective_from"))["end"])
    return _Period(price=price, start=price.period_start, end=price.period_end)


def price_for(endpoint: Endpoint, at: datetime, organization_id: Any = None) -> Quote:
    """The price of ``endpoint`` at ``at`` for ``organization_id`` (None: the public price).

    No query while the period that covers ``at`` is kept (accounts/memo.py), one otherwise: which line applies and
    the moments between which no other line begins, so the answer is kept for every moment in that period.
    """
    period = _periods.get(
        (endpoint.pk, endpoint.gpu_class, organization_id),
        lambda kept: _period(endpoint, at, organization_id, kept),
        valid=lambda kept: kept.covers(at),
    )
    return _quote(period.price)


def prices_for(endpoints: Sequence[Endpoint], at: datetime, organization_id: Any = None) -> dict[Any, Quote]:
    """``price_for`` of each endpoint, keyed by its pk: two queries, however many endpoints."""
    best = _lines(at, endpoint=OuterRef("pk"), gpu_class=OuterRef("gpu_class"), organization_id=organization_id)
    chosen = dict(
        Endpoint.objects.filter(pk__in=[endpoint.pk for endpoint in endpoints])
        .annotate(price_id=Subquery(best.values("pk")[:1]))
        .values_list("pk", "price_id")
    )
    lines = Price.objects.in_bulk([price_id for price_id in chosen.values() if price_id is not None])
    return {endpoint.pk: _quote(lines.get(chosen.get(endpoint.pk))) for endpoint in endpoints}


def work_units(job_input: dict[str, Any]) -> int:
    """Steps x outputs x size: what GPU time scales with, for estimates (compared within one endpoint only).

    The size of an image is its 512²-equivalents; of a video, its frames' 512²-equivalents together; of an audio
    clip, its whole seconds (its model denoises a fixed length, so this is an upper bound).
    """
    steps = int(job_input.get("num_inference_steps", 1))
    if job_input.get("seconds_total") is not None:
        return steps * max(1, -(-int(float(job_input["seconds_total"]) * 1000) // 1000))
    pixels = int(job_input.get("width", 512)) * int(job_input.get("height", 512)) * int(job_input.get("num_frames", 1))
    size = max(1, -(-pixels // (512 * 512)))
    return steps * int(job_input.get("num_images", 1)) * size


def output_pixels(job_input: dict[str, Any], images: int) -> int:
    return int(job_input.get("width", 0)) * int(job_input.get("height", 0)) * images


def price_outputs(quote: Quote, outputs: Outputs, gpu_ms: int = 0) -> tuple[Decimal, int]:
    """Billable units and cost of these outputs (and GPU time) at the quote: ``money.cost_micros`` with the seconds
    of video and audio to the millisecond."""
    return cost_micros(**billed_quantities(quote, outputs, gpu_ms))


def billed_quantities(quote: Quote, outputs: Outputs, gpu_ms: int) -> dict[str, Any]:
    """The keyword arguments of ``money.cost_micros`` and ``cost_within`` for these outputs at this quote."""
    return {
        "unit": quote.unit,
        "unit_price_micros": quote.unit_price_micros,
        "gpu_ms": gpu_ms,
        "images": outputs.images,
        "pixels": outputs.image_pixels,
        "videos": outputs.videos,
        "video_ms": seconds_to_ms(outputs.video_seconds),
        "audio_ms": seconds_to_ms(outputs.audio_seconds),
    }


def ms_per_work_unit(endpoint: Endpoint) -> float:
    """GPU ms per work unit of this endpoint: measured over the last week, else the class's conservative bound.

    A measurement is kept in the cache for a minute, and in this process's memory for a minute from when it was
    read (every admission asks: the cache's round trip was about 0.3 ms of a submission), so an admission's estimate
    may be up to two minutes old: an estimate, which the hold's margin covers and settlement corrects (a job is
    billed for what it used, within its hold, and a running job's hold grows before each step). That an endpoint has
    no measurement yet is kept in this process's memory for ``UNMEASURED_RECHECK_SECONDS`` only, and not in the
    cache: the first usage recorded replaces the bound within that second (a default cached for a minute before any
    usage existed held a fraction of what jobs then cost), and a burst of submissions to a new model does not read
    the rollups and the cache on each one (0.5 ms of the web process's CPU and two round trips per submission).
    """
    measured, _ = _measured_here.get(endpoint.pk, lambda _kept: (_measured(endpoint), monotonic()), valid=_still_valid)
    if measured is None:
        return float(settings.BILLING_UNMEASURED_MS_PER_WORK_UNIT.get(endpoint.gpu_class, UNMEASURED_FALLBACK_MS))
    return measured


# How long this process takes an endpoint to have no measurement before it reads the rollups again.
UNMEASURED_RECHECK_SECONDS = 1.0


def _still_valid(kept: tuple[float | None, float]) -> bool:
    measured, read_at = kept
    return measured is not None or monotonic() - read_at < UNMEASURED_RECHECK_SECONDS


# An endpoint's measurement (None: none yet), and when this process read it (time.monotonic).
_measured_here: GenerationMemo[tuple[float | None, float]] = GenerationMemo(
    "measured GPU ms per work unit", seconds=MEASURED_CACHE_SECONDS
)


def _measurement_key(endpoint_id: int) -> str:
    return f"billing:ms-per-work:{endpoint_id}"


def _measured(endpoint: Endpoint) -> float | None:
    cached = cache.get(_measurement_key(endpoint.pk))
    if cached is not None:
        return float(cached)
    # The day rows from the UTC day a week ago, that day's own row included.
    since = day_start(timezone.now() - timedelta(days=7))
    totals = UsageRollup.objects.filter(
        granularity=Granularity.DAY, endpoint=endpoint, bucket_start__gte=since
    ).aggregate(gpu_ms=Sum("gpu_ms"), work=Sum("work_units"))
    if not totals["work"]:
        return None
    measured = float(totals["gpu_ms"] or 0) / float(totals["work"])
    cache.set(_measurement_key(endpoint.pk), measured, MEASURED_CACHE_SECONDS)
    return measured


def forget_measurement(endpoint_id: int) -> None:
    """The endpoint's measured GPU time per work unit read afresh from its rollups at the next admission (a test that
    rewrites usage by hand): dropped from the cache and from this process's memory."""
    cache.delete(_measurement_key(endpoint_id))
    _measured_here.forget(endpoint_id)


def estimate_cost_micros(endpoint: Endpoint, job_input: dict[str, Any], quote: Quote) -> int:
    """What admission holds for a job: exact for per-output prices (what a success delivers, at its resolution
    tier's price), measured GPU time otherwise."""
    outputs = asked(job_input)
    if quote.unit != PriceUnit.GPU_SECOND:
        return price_outputs(quote.for_outputs(outputs), outputs)[1]
    gpu_ms = int(work_units(job_input) * ms_per_work_unit(endpoint) * settings.BILLING_HOLD_MARGIN_PERCENT / 100)
    return price_outputs(quote, outputs, gpu_ms)[1]


def hold_micros(endpoint: Endpoint, job_input: dict[str, Any], quote: Quote) -> int:
    """What admission holds before a job runs: its estimated cost, and at least a micro-dollar for priced work."""
    estimate = estimate_cost_micros(endpoint, job_input, quote)
    return max(estimate, 1) if quote.for_outputs(asked(job_input)).unit_price_micros else estimate
