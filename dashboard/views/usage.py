"""Overview and usage: GPU time and cost per day, by endpoint and by key, from the rollups."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from billing import selectors
from billing.api import usage_csv
from billing.ledger import account_of
from dashboard.access import Context, dashboard_view
from dashboard.forms import DateRangeForm
from inference.models import Job


def date_range(request: HttpRequest) -> tuple[DateRangeForm, date, date]:
    form = DateRangeForm(request.GET or None)
    today = timezone.now().date()
    start, end = today - timedelta(days=29), today
    if form.is_bound and form.is_valid():
        end = form.cleaned_data.get("end") or today
        start = form.cleaned_data.get("start") or end - timedelta(days=29)
    return form, start, end


def chart_series(report: dict[str, Any], start: date, end: date) -> dict[str, Any]:
    """Cost and GPU seconds per day, one series per endpoint, every day of the range present."""
    days = [(start + timedelta(days=n)).isoformat() for n in range((end - start).days + 1)]
    position = {day: n for n, day in enumerate(days)}
    series: dict[str, dict[str, list[int] | list[float]]] = {}
    for row in report["data"]:
        line = series.setdefault(row["endpoint"], {"cost_micros": [0] * len(days), "gpu_seconds": [0.0] * len(days)})
        line["cost_micros"][position[row["day"]]] += row["cost_micros"]
        line["gpu_seconds"][position[row["day"]]] += row["gpu_seconds"]
    return {"days": days, "series": [{"endpoint": name, **values} for name, values in sorted(series.items())]}


def output_delivered(row: dict[str, Any]) -> str:
    """Seconds of video and of audio an endpoint delivered (what a price per second of output bills), for people."""
    parts = [
        f"{row[key]:g} s of {what}"
        for key, what in (("video_seconds", "video"), ("audio_seconds", "audio"))
        if row[key]
    ]
    return ", ".join(parts) or "—"


@dashboard_view("read_usage")
def usage(request: HttpRequest, context: Context) -> HttpResponse:
    form, start, end = date_range(request)
    organization_id = context.organization.pk
    if request.GET.get("format") == "csv" and request.GET.get("by") == "end_user":
        tagged = selectors.end_user_usage(
            organization_id=organization_id, start=start, end=end, group_by=("day", "end_user", "endpoint")
        )
        return usage_csv(tagged, filename=f"usage-by-end-user-{context.organization.slug}-{start}-{end}.csv")
    by_day = selectors.usage(organization_id=organization_id, start=start, end=end, group_by=("day", "endpoint"))
    if request.GET.get("format") == "csv":
        return usage_csv(by_day, filename=f"usage-{context.organization.slug}-{start}-{end}.csv")
    by_endpoint = selectors.usage(organization_id=organization_id, start=start, end=end, group_by=("endpoint",))
    by_key = selectors.usage(organization_id=organization_id, start=start, end=end, group_by=("key",))
    per_day = selectors.usage(organization_id=organization_id, start=start, end=end, group_by=("day",))
    by_end_user = selectors.end_user_usage(organization_id=organization_id, start=start, end=end)
    return render(
        request,
        "dashboard/usage.html",
        {
            **context.as_template(),
            "form": form,
            "start": start,
            "end": end,
            "totals": by_day["totals"],
            "per_day": per_day["data"],
            "by_endpoint": [{**row, "output": output_delivered(row)} for row in by_endpoint["data"]],
            "by_key": by_key["data"],
            "by_end_user": by_end_user["data"],
            "chart": chart_series(by_day, start, end),
            "csv_query": f"start={start}&end={end}&format=csv",
        },
    )


@dashboard_view()
def home(request: HttpRequest, context: Context) -> HttpResponse:
    today = timezone.now().date()
    organization = context.organization
    week = selectors.usage(organization_id=organization.pk, start=today - timedelta(days=6), end=today)
    recent = Job.objects.filter(organization=organization).select_related("endpoint").order_by("-created_at")[:5]
    return render(
        request,
        "dashboard/home.html",
        {**context.as_template(), "account": account_of(organization), "week": week["totals"], "recent": recent},
    )
