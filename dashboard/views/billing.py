"""Billing: balance, buying credits, auto top-up, payment methods, the credit ledger, statements."""

from __future__ import annotations

from decimal import Decimal

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from billing import controls
from billing.ledger import BillingError, account_of
from billing.models import CreditEntry
from billing.money import MICROS_PER_DOLLAR
from dashboard.access import Context, dashboard_view
from dashboard.forms import TopUpForm
from dashboard.views.team import actor_of


def dollars_to_micros(amount: Decimal) -> int:
    return int(amount * MICROS_PER_DOLLAR)


@dashboard_view()
def billing(request: HttpRequest, context: Context) -> HttpResponse:
    account = account_of(context.organization)
    entries = CreditEntry.objects.filter(organization=context.organization).select_related("job__endpoint")
    page = Paginator(entries.order_by("-id"), 25).get_page(request.GET.get("page"))
    top_up = TopUpForm(
        initial={
            "enabled": account.auto_top_up_enabled,
            "threshold_dollars": Decimal(account.auto_top_up_threshold_micros) / MICROS_PER_DOLLAR,
            "amount_dollars": Decimal(account.auto_top_up_amount_cents) / 100,
        }
    )
    return render(
        request,
        "dashboard/billing.html",
        {**context.as_template(), "account": account, "page": page, "top_up": top_up},
    )


@require_POST
@dashboard_view("manage_billing")
def top_up_settings(request: HttpRequest, context: Context) -> HttpResponse:
    form = TopUpForm(request.POST)
    if not form.is_valid():
        messages.error(request, "; ".join(str(error) for errors in form.errors.values() for error in errors))
        return redirect("dashboard:billing")
    try:
        controls.set_auto_top_up(
            organization=context.organization,
            enabled=form.cleaned_data["enabled"],
            threshold_micros=dollars_to_micros(form.cleaned_data["threshold_dollars"]),
            amount_cents=int(form.cleaned_data["amount_dollars"] * 100),
            actor=actor_of(request, context),
        )
    except BillingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Auto top-up settings saved.")
    return redirect("dashboard:billing")
