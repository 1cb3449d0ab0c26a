"""The opening rate card: what each GPU class costs per second before an operator changes it, and what the built-in
video and audio endpoints cost per second of output (as fal bills video and audio).

Migrations 0002 and 0011 wrote these lines from copies of their own, so a change here reaches an existing database
only through a migration of its own; tests that empty the database put them back with the functions below.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

OPENING_PRICES = {"gpu-h100": 1_110, "gpu-a10g": 300, "cpu": 100}  # micro-dollars per GPU-second
OPENING_FROM = datetime(2020, 1, 1, tzinfo=UTC)


def ensure_opening_prices(price_model: Any) -> None:
    """Inserts the opening lines if missing."""
    for gpu_class, micros in OPENING_PRICES.items():
        price_model.objects.get_or_create(
            gpu_class=gpu_class,
            endpoint=None,
            effective_from=OPENING_FROM,
            defaults={"unit": "gpu_second", "unit_price_micros": micros, "note": "Opening rate card"},
        )


# Per second of output delivered, by endpoint (owner, name, path); the video lines priced by resolution tier.
MEDIA_PRICES: dict[tuple[str, str, str], dict[str, Any]] = {
    ("platform", "tiny-ltx-video", ""): {
        "unit": "video_second",
        "unit_price_micros": 20_000,
        "resolution_tiers": [{"max_short_side": 64, "unit_price_micros": 10_000}],
    },
    ("platform", "tiny-ltx-video", "image-to-video"): {
        "unit": "video_second",
        "unit_price_micros": 20_000,
        "resolution_tiers": [{"max_short_side": 64, "unit_price_micros": 10_000}],
    },
    ("platform", "tiny-stable-audio", ""): {"unit": "audio_second", "unit_price_micros": 1_000, "resolution_tiers": []},
}


def ensure_media_prices(price_model: Any, endpoint_model: Any) -> None:
    """Inserts the built-in video and audio endpoints' opening lines if missing (and if the endpoints exist)."""
    for (owner, name, path), line in MEDIA_PRICES.items():
        endpoint = endpoint_model.objects.filter(owner=owner, name=name, path=path).first()
        if endpoint is None:
            continue
        price_model.objects.get_or_create(
            endpoint=endpoint,
            organization=None,
            effective_from=OPENING_FROM,
            defaults={**line, "gpu_class": "", "note": "Opening rate card: per second of output"},
        )
