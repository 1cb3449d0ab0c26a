"""Reads of usage and credit that pages and the API share. Usage reads the rollups, never raw records."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.db.models import BigIntegerField, OuterRef, Subquery, Sum
from django.db.models.functions import Coalesce

from accounts.models import ApiKey
from billing.models import NO_KEY, EndUserRollup, Granularity, Hold, UsageRollup, net_spend
from billing.periods import month_bounds
from inference.models import Endpoint

DIMENSIONS = ("day", "hour", "endpoint", "key", "gpu_class", "end_user")
# Usage by end user tag comes from its own day rows (``EndUserRollup``), which know the day and the endpoint only.
END_USER_DIMENSIONS = ("day", "endpoint", "end_user")
_COLUMNS = {"endpoint": "endpoint_id", "key": "key_id", "gpu_class": "gpu_class"}
_SUMS = ("attempts", "billable_attempts", "gpu_ms", "unbilled_gpu_ms", "cost_micros", "video_ms", "audio_ms")


def day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def usage(
    *,
    organization_id: Any,
    start: date,
    end: date,
    group_by: Sequence[str] = ("day",),
    endpoint_id: int | None = None,
    key_id: Any = None,
) -> dict[str, Any]:
    """Usage of one organization from ``start`` to ``end`` (UTC days, both included), grouped.

    One aggregate query over the rollups (hourly ones only when grouped by hour), then one query
    each for the names of the endpoints and keys that appear.
    """
    granularity = Granularity.HOUR if "hour" in group_by else Granularity.DAY
    rows = UsageRollup.objects.filter(
        organization_id=organization_id,
        granularity=granularity,
        bucket_start__gte=day_start(start),
        bucket_start__lt=day_start(end + timedelta(days=1)),
    )
    if endpoint_id is not None:
        rows = rows.filter(endpoint_id=endpoint_id)
    if key_id is not None:
        rows = rows.filter(key_id=key_id)
    keys = [("bucket_start" if dimension in ("day", "hour") else _COLUMNS[dimension]) for dimension in group_by]
    grouped = rows.values(*keys).annotate(**{name: Sum(name) for name in _SUMS}).order_by(*keys)
    data = [dict(row) for row in grouped]
    totals = rows.aggregate(**{name: Sum(name) for name in _SUMS})
    endpoints = _endpoint_names({row["endpoint_id"] for row in data if "endpoint_id" in row})
    key_names = _key_names({row["key_id"] for row in data if "key_id" in row})
    for row in data:
        if "bucket_start" in row:
            moment = row.pop("bucket_start").astimezone(UTC)
            row["day" if granularity == Granularity.DAY else "hour"] = (
                moment.date().isoformat() if granularity == Granularity.DAY else moment.isoformat()
            )
        if "endpoint_id" in row:
            row["endpoint"] = endpoints.get(row.pop("endpoint_id"), "")
        if "key_id" in row:
            key = row.pop("key_id")
            row["key_id"] = None if key == NO_KEY else str(key)
            row["key_name"] = "(dashboard)" if key == NO_KEY else key_names.get(key, "(deleted key)")
        _finish(row)
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "group_by": list(group_by),
        "currency": "usd",
        "totals": _finish({name: totals[name] for name in _SUMS}),
        "data": data,
    }


def end_user_usage(
    *,
    organization_id: Any,
    start: date,
    end: date,
    group_by: Sequence[str] = ("end_user",),
    endpoint_id: int | None = None,
    end_user: str | None = None,
) -> dict[str, Any]:
    """Usage of the organization's tagged requests from ``start`` to ``end`` (UTC days, both included), grouped by
    any of ``END_USER_DIMENSIONS``: the shape of ``usage``, one aggregate query over the tags' day rows."""
    if not set(group_by) <= set(END_USER_DIMENSIONS):
        raise ValueError(f"end user usage is grouped by {', '.join(END_USER_DIMENSIONS)} only")
    rows = EndUserRollup.objects.filter(
        organization_id=organization_id,
        bucket_start__gte=day_start(start),
        bucket_start__lt=day_start(end + timedelta(days=1)),
    )
    if endpoint_id is not None:
        rows = rows.filter(endpoint_id=endpoint_id)
    if end_user is not None:
        rows = rows.filter(end_user=end_user)
    columns = {"day": "bucket_start", "endpoint": "endpoint_id", "end_user": "end_user"}
    keys = [columns[dimension] for dimension in group_by]
    if keys:
        grouped = rows.values(*keys).annotate(**{name: Sum(name) for name in _SUMS}).order_by(*keys)
        data = [dict(row) for row in grouped]
        # Every tagged row falls in one group: the totals are the groups' sums, no second query.
        totals = {name: sum(int(row[name] or 0) for row in data) for name in _SUMS}
    else:
        data, totals = [], rows.aggregate(**{name: Sum(name) for name in _SUMS})
    endpoints = _endpoint_names({row["endpoint_id"] for row in data if "endpoint_id" in row})
    for row in data:
        if "bucket_start" in row:
            row["day"] = row.pop("bucket_start").astimezone(UTC).date().isoformat()
        if "endpoint_id" in row:
            row["endpoint"] = endpoints.get(row.pop("endpoint_id"), "")
        _finish(row)
    return {
        "start": start.isoformat(),
        "end": end.isoformat(),
        "group_by": list(group_by),
        "currency": "usd",
        "totals": _finish({name: totals[name] for name in _SUMS}),
        "data": data,
    }


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    for name in _SUMS:
        row[name] = int(row.get(name) or 0)
    row["requests"] = row.pop("billable_attempts")
    row["gpu_seconds"] = round(row["gpu_ms"] / 1000, 3)
    # Seconds of video and of audio delivered: what a price per second of output bills.
    row["video_seconds"] = round(row["video_ms"] / 1000, 3)
    row["audio_seconds"] = round(row["audio_ms"] / 1000, 3)
    return row


def _endpoint_names(ids: set[int]) -> dict[int, str]:
    return {endpoint.pk: endpoint.endpoint_id for endpoint in Endpoint.objects.filter(pk__in=ids)} if ids else {}


def _key_names(ids: set[Any]) -> dict[Any, str]:
    ids.discard(NO_KEY)
    return dict(ApiKey.objects.filter(pk__in=ids).values_list("pk", "name")) if ids else {}


def member_spending(*, organization: Any = None, user: str = "user_id") -> dict[str, Coalesce]:
    """Annotations of a queryset whose rows name a member (the field ``user``) of an organization (the rows'
    ``organization_id``, or the id ``organization``): ``spent_this_month``, what the API keys the member made there
    spent this UTC month less refunds, and ``held``, what the open holds of jobs under those keys add up to; what a
    member's monthly limit counts (``billing.admission.member_spent_this_month``, ``member_held``), in the query of the
    rows. A deleted key's spend is no one's: its rollups keep its id, no key row says whose it was."""
    start, end = month_bounds()
    of_rows = organization is None
    keys = ApiKey.objects.filter(
        organization_id=OuterRef(OuterRef("organization_id")) if of_rows else organization,
        created_by_id=OuterRef(OuterRef(user)),
    ).values("pk")
    rollups = UsageRollup.objects.filter(
        organization_id=OuterRef("organization_id") if of_rows else organization,
        granularity=Granularity.DAY,
        bucket_start__gte=start,
        bucket_start__lt=end,
        key_id__in=Subquery(keys),
    )
    spent = rollups.order_by().values("organization_id").annotate(total=net_spend()).values("total")
    holds = Hold.objects.filter(
        organization_id=OuterRef("organization_id") if of_rows else organization,
        released_at=None,
        api_key__created_by_id=OuterRef(user),
    )
    held = holds.order_by().values("organization_id").annotate(total=Sum("amount_micros")).values("total")
    return {
        "spent_this_month": Coalesce(Subquery(spent), 0, output_field=BigIntegerField()),
        "held": Coalesce(Subquery(held), 0, output_field=BigIntegerField()),
    }
