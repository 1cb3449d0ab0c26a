"""The opening rate card: what each GPU class costs per second before an operator changes it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

OPENING_PRICES = {"gpu-h100": 1_110, "gpu-a10g": 300, "cpu": 100}  # micro-dollars per GPU-second
OPENING_FROM = datetime(2020, 1, 1, tzinfo=UTC)


def ensure_opening_prices(price_model: Any) -> None:
    """Inserts the opening lines if missing (the migration passes its historical model)."""
    for gpu_class, micros in OPENING_PRICES.items():
        price_model.objects.get_or_create(
            gpu_class=gpu_class,
            endpoint=None,
            effective_from=OPENING_FROM,
            defaults={"unit": "gpu_second", "unit_price_micros": micros, "note": "Opening rate card"},
        )
