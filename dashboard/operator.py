"""The operators' revenue run-rate page (inside the admin console, for operators with ``billing.view_revenue``)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib.admin import AdminSite
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone

from billing import metrics
from billing.models import ReconciliationRun, ReconciliationScope

REVENUE_PERMISSION = "billing.view_revenue"


def run_rate(request: HttpRequest, site: AdminSite) -> HttpResponse:
    if not request.user.has_perm(REVENUE_PERMISSION):
        # Staff status alone is not enough: an operator who may change people can make anyone staff, and this page
        # is every organization's revenue.
        raise PermissionDenied("Seeing the revenue run-rate takes the permission “Can see the revenue run-rate page”.")
    today = timezone.now().date()
    start = today - timedelta(days=metrics.TRAILING_DAYS - 1)
    trend = metrics.run_rate_trend(today, points=12, step_days=7)
    current = trend[-1]  # the trend ends on today
    revenue = metrics.recognized_revenue(start, today)
    margin = metrics.gross_margin(start, today)
    cash = metrics.cash_collected(start, today)
    previous = trend[-2] if len(trend) > 1 else None
    charts: dict[str, Any] = {
        "trend": {
            "labels": [point.as_of.isoformat() for point in trend],
            "unit": "USD per year",
            "series": [{"label": "Run-rate", "values": [point.annualized_micros / 1e6 for point in trend]}],
        },
        "revenue": {
            "labels": [day.day.isoformat() for day in revenue],
            "unit": "USD",
            "series": [{"label": "Recognized revenue", "values": [day.micros / 1e6 for day in revenue]}],
        },
    }
    context = {
        **site.each_context(request),
        "title": "Revenue run-rate",
        "today": today,
        "start": start,
        "current": current,
        "previous": previous,
        "change_micros": current.annualized_micros - previous.annualized_micros if previous else None,
        "trend": trend,
        "revenue": revenue,
        "by_endpoint": metrics.revenue_by_endpoint(start, today),
        "top_organizations": metrics.top_organizations(start, today, limit=10),
        "margin": margin,
        "cash": cash,
        "charts": charts,
        "reconciliation": ReconciliationRun.objects.order_by("-started_at").first(),
        # Old rows are proven by the weekly full run only: its result stays in view after nightly incremental ones.
        "full_reconciliation": ReconciliationRun.objects.filter(scope=ReconciliationScope.FULL)
        .order_by("-started_at")
        .first(),
    }
    return render(request, "admin/run_rate.html", context)
