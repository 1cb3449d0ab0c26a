"""Billing per output, as fal bills video and audio: per video, per second of video or of audio delivered, by
resolution tier.

The invariant, for any price, tier, length asked and length delivered: a request is billed exactly the seconds it
delivered (whole frames over the frame rate, whole samples over the sample rate, to the millisecond) times its tier's
unit price, rounded half up to the micro-dollar; never more than its hold (what the asked length costs); nothing when
it delivered nothing (failed, cancelled); and its GPU time recorded all the same. The books reconcile after it.
"""

from __future__ import annotations

from datetime import UTC
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import Organization
from billing import estimates, pricing, selectors
from billing.ledger import grant_credits
from billing.models import OUTPUT_UNITS, CreditEntry, EntryKind, Hold, Price, PriceUnit, UsageRecord
from billing.money import cost_micros, cost_within, divide_half_up, seconds_to_ms
from billing.rates import MEDIA_PRICES, OPENING_FROM, ensure_media_prices
from billing.reconciliation import run_reconciliation
from inference.catalog import ensure_builtin_endpoints
from inference.deliveries import asked, delivered
from inference.models import AttemptOutcome, Endpoint, Job
from tests import lifecycle

pytestmark = pytest.mark.django_db

PER_SECOND = {"video_second": "video_ms", "audio_second": "audio_ms"}


# --- Money: a quantity of output at a unit price ------------------------------------------------------------


@given(
    unit=st.sampled_from(["video_second", "audio_second", "video"]),
    price=st.integers(0, 5_000_000),
    quantity=st.integers(0, 10_000_000),
    gpu_ms=st.integers(0, 10_000_000),
    ceiling=st.integers(0, 10**9),  # a hold, or the least of a hold and a balance not below zero
)
def test_output_is_billed_whole_within_its_ceiling_at_exactly_its_price(
    unit: str, price: int, quantity: int, gpu_ms: int, ceiling: int
) -> None:
    """Whole milliseconds (whole videos) that fit under the ceiling, at exactly the unit price; the GPU time billed
    shrinks with them."""
    key = PER_SECOND.get(unit, "videos")
    units, cost, billed_ms = cost_within(
        unit=unit, unit_price_micros=price, gpu_ms=gpu_ms, images=0, pixels=0, ceiling_micros=ceiling, **{key: quantity}
    )
    billed = int(units * 1000) if unit in PER_SECOND else int(units)
    assert units == (Decimal(billed) / 1000 if unit in PER_SECOND else Decimal(billed))
    assert cost == (divide_half_up(billed * price, 1000) if unit in PER_SECOND else billed * price)
    assert 0 <= billed <= quantity
    assert cost <= ceiling
    assert 0 <= billed_ms <= gpu_ms
    if billed < quantity:  # cut by the ceiling: one more would not fit
        one_more = cost_micros(unit=unit, unit_price_micros=price, gpu_ms=0, images=0, pixels=0, **{key: billed + 1})
        assert one_more[1] > ceiling
    else:
        assert billed_ms == gpu_ms


@given(frames=st.integers(0, 10_000), fps=st.integers(1, 240))
def test_seconds_of_output_are_rounded_half_up_to_the_millisecond(frames: int, fps: int) -> None:
    ms = seconds_to_ms(Fraction(frames, fps))
    assert abs(Fraction(ms, 1000) - Fraction(frames, fps)) <= Fraction(1, 2000)
    assert ms == divide_half_up(frames * 1000, fps)


def test_cost_micros_of_the_new_units() -> None:
    assert cost_micros(unit="video_second", unit_price_micros=20_000, gpu_ms=9, images=0, pixels=0, video_ms=2_125) == (
        Decimal("2.125"),
        42_500,
    )
    assert cost_micros(unit="audio_second", unit_price_micros=333, gpu_ms=9, images=0, pixels=0, audio_ms=1_501) == (
        Decimal("1.501"),
        500,  # 499.833 rounded half up
    )
    assert cost_micros(unit="video", unit_price_micros=70_000, gpu_ms=9, images=3, pixels=0, videos=2) == (
        Decimal(2),
        140_000,
    )


# --- Prices: resolution tiers -------------------------------------------------------------------------------


def test_a_tiered_line_prices_each_output_by_its_shorter_side(db: None) -> None:
    ensure_builtin_endpoints(Endpoint)
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-ltx-video", path="")
    line = Price(
        endpoint=endpoint,
        unit=PriceUnit.VIDEO_SECOND,
        unit_price_micros=80_000,
        resolution_tiers=[
            {"max_short_side": 480, "unit_price_micros": 20_000},
            {"max_short_side": 720, "unit_price_micros": 40_000},
        ],
    )
    line.full_clean()
    assert [line.unit_price_for(side) for side in (0, 64, 480, 481, 720, 1080)] == [
        80_000, 20_000, 20_000, 40_000, 40_000, 80_000
    ]  # fmt: skip
    quote = pricing.Quote(price=line, unit=line.unit, unit_price_micros=line.unit_price_micros)
    video = asked({"num_frames": 48, "fps": 24, "width": 1280, "height": 720})
    assert quote.for_outputs(video).unit_price_micros == 40_000
    assert pricing.price_outputs(quote.for_outputs(video), video) == (Decimal(2), 80_000)


@pytest.mark.parametrize(
    ("unit", "tiers", "problem"),
    [
        ("gpu_second", [{"max_short_side": 480, "unit_price_micros": 1}], "outputs with a size"),
        ("audio_second", [{"max_short_side": 480, "unit_price_micros": 1}], "outputs with a size"),
        (
            "video",
            [{"max_short_side": 720, "unit_price_micros": 1}, {"max_short_side": 480, "unit_price_micros": 2}],
            "smallest side up",
        ),
        ("video", [{"max_short_side": 480}], "Each tier is"),
        ("video", [{"max_short_side": 480, "unit_price_micros": -1}], "not negative"),
        ("video", {"480": 1}, "a list"),
    ],
)
def test_malformed_tiers_are_refused(db: None, unit: str, tiers: Any, problem: str) -> None:
    ensure_builtin_endpoints(Endpoint)
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-ltx-video", path="")
    line = Price(endpoint=endpoint, unit=unit, unit_price_micros=1, resolution_tiers=tiers)
    with pytest.raises(Exception, match=problem):
        line.full_clean()


# --- The invariant, through admission, the worker's finish and settlement -----------------------------------

DATABASE_EXAMPLES = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture
def media(tenant: dict[str, Any], quiet_books: None) -> dict[str, Any]:
    ensure_builtin_endpoints(Endpoint)
    from billing.models import Price as PriceModel

    ensure_media_prices(PriceModel, Endpoint)
    organization = tenant["organization"]
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=1_000)
    grant_credits(organization=organization, amount_micros=10**10, reason="tests", kind=EntryKind.ADJUSTMENT)
    endpoints = {
        "video": Endpoint.objects.get(owner="platform", name="tiny-ltx-video", path=""),
        "audio": Endpoint.objects.get(owner="platform", name="tiny-stable-audio", path=""),
    }
    return {**tenant, "endpoints": endpoints}


def video_result(frames: int, fps: int, width: int, height: int) -> dict[str, Any]:
    """A worker's stored result for a video of ``frames`` frames (what its file holds)."""
    video = {"path": "x", "content_type": "video/mp4", "width": width, "height": height, "fps": fps,
             "num_frames": frames, "duration": frames / fps}  # fmt: skip
    return {"video": video, "seed": 1}


def audio_result(samples: int, rate: int) -> dict[str, Any]:
    clip = {"path": "x", "content_type": "audio/wav", "sample_rate": rate, "num_samples": samples, "channels": 2}
    return {"audio_file": clip, "seed": 1}


@st.composite
def media_requests(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["video", "audio"]))
    outcome = draw(st.sampled_from([AttemptOutcome.SUCCEEDED] * 3 + [AttemptOutcome.FAILED, AttemptOutcome.CANCELLED,
                                                                      AttemptOutcome.ERRORED]))  # fmt: skip
    if kind == "video":
        fps = draw(st.integers(1, 24))
        frames = draw(st.integers(1, 33))
        payload = {"num_frames": frames, "fps": fps, "resolution": draw(st.sampled_from(["32p", "64p", "96p", "128p"])),
                   "aspect_ratio": "1:1"}  # fmt: skip
        # A video may be cut short: its file holds fewer frames than asked (never more).
        made = draw(st.integers(0, frames))
    else:
        millis = draw(st.integers(1, 8_000))
        payload = {"seconds_total": millis / 1000}
        made = draw(st.integers(0, millis * 16))  # samples at 16 kHz, at most the clip asked for
    return {"kind": kind, "payload": payload, "made": made, "outcome": outcome, "gpu_ms": draw(st.integers(0, 90_000))}


@DATABASE_EXAMPLES
@given(request=media_requests())
def test_a_request_is_billed_exactly_the_seconds_it_delivered_at_its_tiers_price(
    media: dict[str, Any], request: dict[str, Any]
) -> None:
    organization = media["organization"]
    endpoint = media["endpoints"][request["kind"]]
    with transaction.atomic():
        job = lifecycle.start(
            lifecycle.submit(organization, endpoint, api_key=media["api_key"], prompt="x", **request["payload"])
        )
        hold = Hold.objects.get(job=job).amount_micros
        line = pricing.price_for(endpoint, job.started_at, organization.pk)
        outputs_asked = asked(job.input)
        tier_price = line.for_outputs(outputs_asked).unit_price_micros
        # The hold is exactly what the asked length costs at its tier's price.
        asked_ms = seconds_to_ms(outputs_asked.video_seconds + outputs_asked.audio_seconds)
        assert hold == max(divide_half_up(asked_ms * tier_price, 1000), 1)
        if request["kind"] == "video":
            result = video_result(request["made"], job.input["fps"], job.input["width"], job.input["height"])
        else:
            result = audio_result(request["made"], 16_000)
        succeeded = request["outcome"] == AttemptOutcome.SUCCEEDED
        if succeeded:
            job = lifecycle.finish(job, request["outcome"], gpu_ms=request["gpu_ms"], reserve=False, result=result)
        else:
            job = lifecycle.finish(job, request["outcome"], gpu_ms=request["gpu_ms"], reserve=False)
        record = UsageRecord.objects.get(job=job)
        delivered_seconds = delivered(job).video_seconds + delivered(job).audio_seconds
        billed_ms = seconds_to_ms(delivered_seconds) if succeeded else 0
        assert record.unit == ("video_second" if request["kind"] == "video" else "audio_second")
        assert record.unit_price_micros == tier_price
        assert record.billable_units == Decimal(billed_ms) / 1000
        assert record.cost_micros == divide_half_up(billed_ms * tier_price, 1000)
        assert record.cost_micros <= hold
        # GPU time is recorded for every attempt: billed (with the output) or not (the platform's failure).
        assert record.gpu_ms + record.unbilled_gpu_ms == request["gpu_ms"]
        assert record.billable == (request["outcome"] != AttemptOutcome.ERRORED)
        debits = list(CreditEntry.objects.filter(usage_record=record).values_list("amount_micros", flat=True))
        assert debits == ([-record.cost_micros] if record.cost_micros else [])
        # The usage object (status, result, x-fal-billable-units): the billed quantity, not the asked one.
        from billing.admission import job_usage

        usage = job_usage(Job.objects.get(pk=job.pk))
        assert usage is not None
        assert (usage["billable_units"], usage["cost_micros"]) == (billed_ms / 1000, record.cost_micros)
        assert not Hold.objects.filter(job=job, released_at=None).exists()


def test_the_books_reconcile_after_media_billing(media: dict[str, Any]) -> None:
    organization = media["organization"]
    video, audio = media["endpoints"]["video"], media["endpoints"]["audio"]
    cases = [
        (video, {"num_frames": 17, "fps": 8}, video_result(17, 8, 64, 64)),
        (video, {"num_frames": 17, "fps": 8, "resolution": "96p", "aspect_ratio": "1:1"}, video_result(11, 8, 96, 96)),
        (audio, {"seconds_total": 2.5}, audio_result(40_000, 16_000)),
    ]
    for endpoint, payload, result in cases:
        job = lifecycle.start(lifecycle.submit(organization, endpoint, prompt="x", **payload))
        lifecycle.finish(job, gpu_ms=1_234, reserve=False, result=result)
    costs = list(
        UsageRecord.objects.filter(organization=organization).order_by("id").values_list("cost_micros", flat=True)
    )
    # 17/8 s at the 64p tier (10,000 µ$/s); 11/8 s above it (20,000 µ$/s); 2.5 s of audio at 1,000 µ$/s.
    assert costs == [21_250, 27_500, 2_500]
    # Usage by endpoint counts the seconds delivered (the rollups, which reconciliation checks against the records),
    # over the days the records were written on: one, or two when the run crossed midnight.
    days = [
        record.recorded_at.astimezone(UTC).date() for record in UsageRecord.objects.filter(organization=organization)
    ]
    report = selectors.usage(organization_id=organization.pk, start=min(days), end=max(days), group_by=("endpoint",))
    by_endpoint = {row["endpoint"]: (row["video_seconds"], row["audio_seconds"]) for row in report["data"]}
    assert by_endpoint == {"platform/tiny-ltx-video": (3.5, 0.0), "platform/tiny-stable-audio": (0.0, 2.5)}
    run = run_reconciliation(full=True)
    assert run.drift == [], run.drift


def test_the_opening_media_prices(db: None) -> None:
    ensure_builtin_endpoints(Endpoint)
    ensure_media_prices(Price, Endpoint)
    for (owner, name, path), line in MEDIA_PRICES.items():
        price = Price.objects.get(endpoint__owner=owner, endpoint__name=name, endpoint__path=path)
        assert (price.unit, price.unit_price_micros, price.resolution_tiers) == (
            line["unit"], line["unit_price_micros"], line["resolution_tiers"]
        )  # fmt: skip
        assert price.effective_from == OPENING_FROM
        assert price.unit in OUTPUT_UNITS


# --- Estimates and the pricing API --------------------------------------------------------------------------


def test_pricing_api_lists_tiers_and_estimates_seconds(media: dict[str, Any]) -> None:
    client = media["client"]
    listed = client.get("/v1/models/pricing?endpoint_id=platform/tiny-ltx-video,platform/tiny-stable-audio").json()
    video, audio = listed["prices"]
    assert (video["unit"], video["unit_price_micros"]) == ("video_second", 20_000)
    assert video["resolution_tiers"] == [{"max_short_side": 64, "unit_price": 0.01, "unit_price_micros": 10_000}]
    assert (audio["unit"], audio["unit_price"], audio["resolution_tiers"]) == ("audio_second", 0.001, [])
    body = {
        "estimate_type": "unit_price",
        "endpoints": {
            "platform/tiny-ltx-video": {"unit_quantity": 2.125},
            "platform/tiny-stable-audio": {"unit_quantity": 30},
        },
    }
    answer = client.post("/v1/models/pricing/estimate", body, format="json")
    assert answer.status_code == 200, answer.content
    lines = answer.json()["endpoints"]
    assert lines["platform/tiny-ltx-video"]["cost_micros"] == 42_500  # the line's own price: above every tier
    assert lines["platform/tiny-stable-audio"]["cost_micros"] == 30_000
    finer = {"estimate_type": "unit_price", "endpoints": {"platform/tiny-stable-audio": {"unit_quantity": 1.0005}}}
    refused = client.post("/v1/models/pricing/estimate", finer, format="json")
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"][-1] == "unit_quantity"
    # An input: what admission holds for it (its tier: 64p), exact for a price per output second.
    by_input = {
        "estimate_type": "historical_api_price",
        "endpoints": {
            "platform/tiny-ltx-video": {"call_quantity": 3, "input": {"prompt": "x", "num_frames": 16, "fps": 8}}
        },
    }
    line = client.post("/v1/models/pricing/estimate", by_input, format="json").json()["endpoints"][
        "platform/tiny-ltx-video"
    ]
    assert (line["basis"], line["cost_micros"]) == ("input", 3 * 20_000)  # 2 s at 10,000 µ$/s, three calls


def test_history_estimates_average_the_seconds_billed(media: dict[str, Any]) -> None:
    organization = media["organization"]
    audio = media["endpoints"]["audio"]
    for samples in (16_000, 48_000):  # 1 s and 3 s delivered
        job = lifecycle.start(lifecycle.submit(organization, audio, prompt="x", seconds_total=3))
        lifecycle.finish(job, gpu_ms=100, reserve=False, result=audio_result(samples, 16_000))
    quote = pricing.price_for(audio, job.started_at, organization.pk)
    [history] = estimates.histories(organization.pk, [audio]).values()
    assert (history.requests, history.billable_units) == (2, Decimal(4))
    assert estimates.history_cost(quote, history, 10) == 20_000  # 2 s a call on average, ten calls
    assert estimates.default_input(audio) == {"num_inference_steps": 8, "num_images": 1, "seconds_total": 2}
