"""Integer money. Micro-dollars inside the platform, cents at the Stripe boundary; never floats.

The one rounding rule, used for every fraction of a unit: **round half up** (to the nearest unit,
halves away from zero). ``micros_to_cents`` is the only conversion from micros to cents, and
``cost_micros`` the only place a price meets a quantity; ``divide_half_up`` applies the same rule to
any other integer ratio (run-rates, GPU cost per hour in ``billing.metrics``).
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

MICROS_PER_CENT = 10_000
MICROS_PER_DOLLAR = 1_000_000


def divide_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, halves away from zero."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    magnitude = (abs(numerator) * 2 + denominator) // (2 * denominator)
    return magnitude if numerator >= 0 else -magnitude


def micros_to_cents(micros: int) -> int:
    """The one conversion to Stripe's minor unit: 4,999 µ$ → 0¢, 5,000 µ$ → 1¢, -5,000 µ$ → -1¢."""
    return divide_half_up(micros, MICROS_PER_CENT)


def cents_to_micros(cents: int) -> int:
    return cents * MICROS_PER_CENT


def dollars_to_micros(dollars: Decimal) -> int:
    """Dollars typed by a person (a Decimal, to the micro-dollar at most) in micros; finer digits are dropped."""
    return int(dollars * MICROS_PER_DOLLAR)


def micros_to_dollars(micros: int) -> Decimal:
    """Micros as an exact decimal of dollars, without trailing zeros (for fal's amounts): 1,100 µ$ → 0.0011."""
    whole, fraction = divmod(abs(micros), MICROS_PER_DOLLAR)
    sign = "-" if micros < 0 else ""
    return Decimal(f"{sign}{whole}.{fraction:06d}".rstrip("0").rstrip("."))  # from text: exact at any size


def format_micros(micros: int) -> str:
    """Dollars for people, to the cent when whole cents, else to the micro-dollar: $12.50, $0.000123."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), MICROS_PER_DOLLAR)
    if fraction % MICROS_PER_CENT == 0:
        return f"{sign}${whole:,}.{fraction // MICROS_PER_CENT:02d}"
    return f"{sign}${whole:,}.{fraction:06d}".rstrip("0")


def gpu_cost_micros(gpu_ms: int, unit_price_micros: int) -> int:
    """What ``gpu_ms`` costs at a price per GPU-second (``cost_micros``' rule)."""
    return divide_half_up(gpu_ms * unit_price_micros, 1000)


def gpu_ms_within(amount_micros: int, unit_price_micros: int) -> int:
    """The most GPU milliseconds whose cost at this price per GPU-second is at most ``amount_micros``.

    ``gpu_cost_micros(ms) <= amount`` exactly when ``ms * price < amount * 1000 + 500`` (halves round up).
    """
    if unit_price_micros <= 0:
        raise ValueError("a free price covers any time")
    return max(0, (amount_micros * 1000 + 499) // unit_price_micros)


def seconds_to_ms(seconds: Fraction) -> int:
    """Seconds of video or audio (whole frames or samples over their rate) to the millisecond, halves up: the grain
    a price per output second bills in (1/24 s is 42 ms, 17 frames at 24 fps 708 ms)."""
    return divide_half_up(seconds.numerator * 1000, seconds.denominator)


# Units priced by seconds of output (to the millisecond): which quantity of ``cost_micros`` each counts.
PER_SECOND_OF_OUTPUT = ("video_second", "audio_second")


def cost_micros(
    *,
    unit: str,
    unit_price_micros: int,
    gpu_ms: int,
    images: int,
    pixels: int,
    videos: int = 0,
    video_ms: int = 0,
    audio_ms: int = 0,
) -> tuple[Decimal, int]:
    """Billable units and their cost for one attempt under one price line.

    ``gpu_second``: units are seconds to the millisecond; ``image``: images produced; ``megapixel``:
    width x height x images / 10⁶; ``video``: videos produced; ``video_second`` and ``audio_second``: seconds of
    video or audio produced, to the millisecond. The cost is rounded half up to the micro-dollar.
    """
    if unit == "gpu_second":
        return Decimal(gpu_ms) / 1000, divide_half_up(gpu_ms * unit_price_micros, 1000)
    if unit == "image":
        return Decimal(images), images * unit_price_micros
    if unit == "megapixel":
        return Decimal(pixels) / 1_000_000, divide_half_up(pixels * unit_price_micros, 1_000_000)
    if unit == "video":
        return Decimal(videos), videos * unit_price_micros
    if unit in PER_SECOND_OF_OUTPUT:
        output_ms = video_ms if unit == "video_second" else audio_ms
        return Decimal(output_ms) / 1000, divide_half_up(output_ms * unit_price_micros, 1000)
    raise ValueError(f"unknown price unit {unit!r}")


def cost_within(
    *,
    unit: str,
    unit_price_micros: int,
    gpu_ms: int,
    images: int,
    pixels: int,
    ceiling_micros: int,
    videos: int = 0,
    video_ms: int = 0,
    audio_ms: int = 0,
) -> tuple[Decimal, int, int]:
    """``cost_micros`` of an attempt, but never more than ``ceiling_micros``; and the GPU ms that cost pays for.

    Beyond the ceiling the attempt is billed for what fits under it: whole milliseconds for a price per GPU-second
    or per second of output, whole images or videos per image or video, whole pixels per megapixel; the GPU time
    billed shrinks in the same proportion (the rest is recorded unbilled).
    """
    outputs = {"videos": videos, "video_ms": video_ms, "audio_ms": audio_ms}
    units, cost = cost_micros(
        unit=unit, unit_price_micros=unit_price_micros, gpu_ms=gpu_ms, images=images, pixels=pixels, **outputs
    )
    if cost <= ceiling_micros:
        return units, cost, gpu_ms
    ceiling = max(ceiling_micros, 0)
    billed_ms, billed_images, billed_pixels = gpu_ms, images, pixels
    if unit == "gpu_second":
        billed_ms = min(gpu_ms, gpu_ms_within(ceiling, unit_price_micros))
    elif unit == "image":
        billed_images = min(images, ceiling // unit_price_micros)
        billed_ms = gpu_ms * billed_images // images
    elif unit == "megapixel":
        billed_pixels = min(pixels, (ceiling * 1_000_000 + 499_999) // unit_price_micros)
        billed_ms = gpu_ms * billed_pixels // pixels
    elif unit == "video":
        outputs["videos"] = min(videos, ceiling // unit_price_micros)
        billed_ms = gpu_ms * outputs["videos"] // videos
    else:  # a second of video or audio: cost_micros refused any other unit
        quantity = "video_ms" if unit == "video_second" else "audio_ms"
        # The same rule as GPU time: the most whole milliseconds whose cost fits under the ceiling.
        outputs[quantity] = min(outputs[quantity], gpu_ms_within(ceiling, unit_price_micros))
        billed_ms = gpu_ms * outputs[quantity] // (video_ms if unit == "video_second" else audio_ms)
    units, cost = cost_micros(
        unit=unit,
        unit_price_micros=unit_price_micros,
        gpu_ms=billed_ms,
        images=billed_images,
        pixels=billed_pixels,
        **outputs,
    )
    return units, cost, billed_ms
