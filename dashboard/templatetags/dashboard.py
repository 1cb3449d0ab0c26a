from __future__ import annotations

from django import template

from billing.money import cents_to_micros, format_micros

register = template.Library()


@register.filter
def dollars(micros: int | None) -> str:
    """Micro-dollars as people read them: $12.50, or $0.000123 below a cent."""
    return format_micros(int(micros or 0))


@register.filter
def seconds(milliseconds: int | None) -> str:
    return f"{(milliseconds or 0) / 1000:,.3f} s"


@register.filter
def percent_bps(basis_points: int | None) -> str:
    """Basis points as a percentage with two decimals: 1234 → 12.34 %."""
    if basis_points is None:
        return "—"
    sign = "-" if basis_points < 0 else ""
    whole, fraction = divmod(abs(basis_points), 100)
    return f"{sign}{whole}.{fraction:02d} %"


@register.filter
def cents(amount: int | None) -> str:
    return format_micros(cents_to_micros(int(amount or 0)))
