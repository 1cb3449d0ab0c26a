from __future__ import annotations

from django import template

from billing.money import format_micros

register = template.Library()


@register.filter
def dollars(micros: int | None) -> str:
    """Micro-dollars as people read them: $12.50, or $0.000123 below a cent."""
    return format_micros(int(micros or 0))


@register.filter
def seconds(milliseconds: int | None) -> str:
    return f"{(milliseconds or 0) / 1000:,.3f} s"
