"""The calendar of the books: the UTC day and the UTC month a moment belongs to.

Every budget, limit, alert period, rollup bucket, statement and partition is cut on UTC days and months, and each
cut is made here, from the moment converted to UTC first. An aware datetime in another zone, truncated as it is
(``moment.replace(day=1, hour=0, ...)``), names its own zone's month: ``2026-03-31T20:00-05:00`` is April in UTC.
A naive datetime is refused: which month it belongs to cannot be known.
"""

from __future__ import annotations

from datetime import UTC, datetime

from django.utils import timezone


def _in_utc(moment: datetime | None) -> datetime:
    moment = timezone.now() if moment is None else moment
    if timezone.is_naive(moment):
        raise ValueError(f"{moment!r} has no time zone: its UTC day and month cannot be known.")
    return moment.astimezone(UTC)


def hour_start(moment: datetime | None = None) -> datetime:
    """The first instant of the UTC hour of ``moment`` (now by default)."""
    return _in_utc(moment).replace(minute=0, second=0, microsecond=0)


def day_start(moment: datetime | None = None) -> datetime:
    """The first instant of the UTC day of ``moment`` (now by default)."""
    return _in_utc(moment).replace(hour=0, minute=0, second=0, microsecond=0)


def month_start(moment: datetime | None = None) -> datetime:
    """The first instant of the UTC month of ``moment`` (now by default)."""
    utc = _in_utc(moment)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def next_month(moment: datetime | None = None) -> datetime:
    """The first instant of the UTC month after that of ``moment`` (now by default)."""
    start = month_start(moment)
    return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)


def month_bounds(moment: datetime | None = None) -> tuple[datetime, datetime]:
    """The UTC month of ``moment`` (now by default) as a half-open range: its first instant, and the next month's,
    which is not in it. A month read with only its start would also count whatever is stamped after it ends."""
    start = month_start(moment)
    return start, next_month(start)
