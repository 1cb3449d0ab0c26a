"""The one rounding rule (half up, halves away from zero) at its edges, in every conversion that uses it."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.money import (
    MICROS_PER_CENT,
    cents_to_micros,
    cost_micros,
    divide_half_up,
    format_micros,
    micros_to_cents,
)


@pytest.mark.parametrize(
    ("micros", "cents"),
    [
        (0, 0),
        (1, 0),
        (4_999, 0),
        (5_000, 1),
        (9_999, 1),
        (10_000, 1),
        (14_999, 1),
        (15_000, 2),
        (25_000, 3),
        (1_000_000, 100),
        (12_345_678, 1_235),
    ],
)
def test_micros_to_cents_rounds_half_up_and_negatives_mirror(micros: int, cents: int) -> None:
    assert micros_to_cents(micros) == cents
    assert micros_to_cents(-micros) == -cents


@settings(database=None)  # no example database written into the checkout
@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_micros_to_cents_is_the_nearest_cent(micros: int) -> None:
    cents = micros_to_cents(micros)
    error = abs(micros - cents_to_micros(cents))
    assert error <= MICROS_PER_CENT // 2
    if error == MICROS_PER_CENT // 2:
        assert abs(cents_to_micros(cents)) > abs(micros)  # a half goes away from zero


@settings(database=None)
@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_cents_survive_the_round_trip(cents: int) -> None:
    assert micros_to_cents(cents_to_micros(cents)) == cents


def test_divide_half_up() -> None:
    assert [divide_half_up(n, 4) for n in (1, 2, 3, 5, 6, -1, -2, -3, -6)] == [0, 1, 1, 1, 2, 0, -1, -1, -2]
    with pytest.raises(ValueError, match="positive"):
        divide_half_up(1, 0)
    with pytest.raises(ValueError, match="positive"):
        divide_half_up(1, -3)


@pytest.mark.parametrize(
    ("gpu_ms", "unit_price", "units", "cost"),
    [
        (0, 100, Decimal(0), 0),
        (1, 100, Decimal("0.001"), 0),  # 0.1 µ$
        (5, 100, Decimal("0.005"), 1),  # 0.5 µ$: half up
        (1_234, 100, Decimal("1.234"), 123),  # 123.4
        (1_235, 100, Decimal("1.235"), 124),  # 123.5
        (1_000, 1_110, Decimal(1), 1_110),
        (3_600_000, 1_110, Decimal(3_600), 3_996_000),  # an H100 hour at the opening price
        (999, 1, Decimal("0.999"), 1),
        (499, 1, Decimal("0.499"), 0),
        (500, 1, Decimal("0.5"), 1),
    ],
)
def test_cost_per_gpu_second(gpu_ms: int, unit_price: int, units: Decimal, cost: int) -> None:
    assert cost_micros(unit="gpu_second", unit_price_micros=unit_price, gpu_ms=gpu_ms, images=9, pixels=9) == (
        units,
        cost,
    )


def test_cost_per_image_is_exact() -> None:
    assert cost_micros(unit="image", unit_price_micros=3_333, gpu_ms=99_999, images=3, pixels=1) == (Decimal(3), 9_999)
    assert cost_micros(unit="image", unit_price_micros=3_333, gpu_ms=5, images=0, pixels=0) == (Decimal(0), 0)


@pytest.mark.parametrize(
    ("pixels", "unit_price", "units", "cost"),
    [
        (512 * 512, 10_000, Decimal("0.262144"), 2_621),  # 2,621.44
        (1_000_000, 10_000, Decimal(1), 10_000),
        (50, 10_000, Decimal("0.00005"), 1),  # 0.5 µ$: half up
        (49, 10_000, Decimal("0.000049"), 0),  # 0.49
        (1024 * 1024 * 4, 7, Decimal("4.194304"), 29),  # 29.36
        (150_000, 3, Decimal("0.15"), 0),  # 0.45
        (500_000, 3, Decimal("0.5"), 2),  # 1.5
    ],
)
def test_cost_per_megapixel(pixels: int, unit_price: int, units: Decimal, cost: int) -> None:
    assert cost_micros(unit="megapixel", unit_price_micros=unit_price, gpu_ms=7, images=1, pixels=pixels) == (
        units,
        cost,
    )


def test_an_unknown_unit_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown price unit"):
        cost_micros(unit="token", unit_price_micros=1, gpu_ms=1, images=1, pixels=1)


@settings(database=None)
@given(st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=10**6))
def test_cost_per_second_is_within_half_a_micro_of_the_exact_product(gpu_ms: int, unit_price: int) -> None:
    units, cost = cost_micros(unit="gpu_second", unit_price_micros=unit_price, gpu_ms=gpu_ms, images=0, pixels=0)
    exact = units * unit_price
    assert abs(Decimal(cost) - exact) <= Decimal("0.5")
    assert units == Decimal(gpu_ms) / 1000


@pytest.mark.parametrize(
    ("micros", "shown"),
    [
        (0, "$0.00"),
        (12_500_000, "$12.50"),
        (123, "$0.000123"),
        (-5_000, "-$0.005"),
        (1_234_567_890_000, "$1,234,567.89"),
    ],
)
def test_format_micros(micros: int, shown: str) -> None:
    assert format_micros(micros) == shown
