"""Billing: balance, buying credits, auto top-up, payment methods, the credit ledger, receipts, statements and the
billing details printed on them (receipts, statements and details are for people who may manage billing)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.db.models import F, OuterRef, Subquery
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from accounts.models import ApiKey, Membership
from billing import alerts, charges, checkout, controls, end_users, selectors, statements
from billing.api import end_user_spend_this_month, key_spend_this_month
from billing.cards import detach_payment_method, list_payment_methods, set_default_payment_method
from billing.documents import billing_details_of, set_billing_details
from billing.ledger import BillingError, account_of
from billing.models import CreditEntry, EndUserLimit, MemberSpendLimit, Payment, PaymentStatus, Receipt, SpendAlert
from billing.money import MICROS_PER_DOLLAR, dollars_to_micros
from billing.receipts import receipt_of, receipt_pdf
from billing.stripe_client import payments_enabled
from dashboard.access import Context, dashboard_view
from dashboard.forms import (
    BillingDetailsForm,
    BuyCreditsForm,
    EndUserLimitForm,
    KeyLimitForm,
    MemberLimitForm,
    SpendSettingsForm,
    TopUpForm,
)
from dashboard.views.team import actor_of

# The billing page lists this many months of statements (the organization's first month at the earliest).
STATEMENT_MONTHS = 12
RECENT_ALERTS = timedelta(days=alerts.RECENT_ALERT_DAYS)


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
        },
        auto_id="id_top_up_%s",  # its "amount_dollars" beside the buy form's on the page: ids (and labels) of its own
    )
    cards: list[dict[str, Any]] = []
    cards_error = ""
    enabled = payments_enabled()
    if enabled and context.can("manage_billing"):
        try:
            cards = list_payment_methods(context.organization)
        except BillingError as exc:
            cards_error = str(exc)
    purchases = list(Payment.objects.filter(organization=context.organization).order_by("-created_at")[:10])
    documents: dict[str, Any] = {}
    receipts: dict[int, Receipt] = {}
    if context.can("manage_billing"):
        details = billing_details_of(context.organization)
        issued = Receipt.objects.filter(payment__in=purchases).only("pk", "number", "payment_id")
        receipts = {receipt.payment_id: receipt for receipt in issued}
        documents = {
            "statements": statements.statement_index(context.organization)[:STATEMENT_MONTHS],
            "details": details,
            "details_form": BillingDetailsForm(
                initial={"legal_name": details.legal_name, "address": details.address, "tax_id": details.tax_id}
            ),
        }
    return render(
        request,
        "dashboard/billing.html",
        {
            **context.as_template(),
            **spend_controls(context, account),
            "account": account,
            "page": page,
            "top_up": top_up,
            "buy": BuyCreditsForm(),
            "payments_enabled": enabled,
            "cards": cards,
            "cards_error": cards_error,
            "purchases": [(payment, receipts.get(payment.pk)) for payment in purchases],
            "paid": request.GET.get("paid") == "1",
            **documents,
        },
    )


def as_dollars(micros: int | None) -> Decimal | None:
    return None if micros is None else Decimal(micros) / MICROS_PER_DOLLAR


def as_micros(dollars: Decimal | None) -> int | None:
    return None if dollars is None else dollars_to_micros(dollars)


def member_limits(context: Context) -> dict[str, Any]:
    """The viewer's own monthly limit as a member, with what their keys spent this month and hold now (None: no
    limit), so a refusal is explainable to them; and for those who may manage billing, every member's, with a form.
    One query."""
    limit = MemberSpendLimit.objects.filter(organization_id=OuterRef("organization_id"), user_id=OuterRef("user_id"))
    members = (
        Membership.objects.filter(organization=context.organization)
        .select_related("user")
        .annotate(limit=Subquery(limit.values("monthly_limit_micros")[:1]), **selectors.member_spending())
        .order_by("user__email")
    )
    manages = context.can("manage_billing")
    if not manages:
        members = members.filter(user=context.user, limit__isnull=False)
    rows: list[dict[str, Any]] = [
        {
            "membership": membership,
            "limit": membership.limit,
            "spent": membership.spent_this_month,  # type: ignore[attr-defined]
            "held": membership.held,  # type: ignore[attr-defined]
            "form": MemberLimitForm(
                initial={"limit_dollars": as_dollars(membership.limit)},
                prefix=f"member-{membership.user_id}",
            ),
        }
        for membership in members
    ]
    own = next((row for row in rows if row["membership"].user_id == context.user.pk and row["limit"] is not None), None)
    return {"own_member_limit": own, "member_limits": rows if manages else []}


def spend_controls(context: Context, account: Any) -> dict[str, Any]:
    """The budget, its alerts, the keys', members' and end users' limits with their spend this month, the alert
    history."""
    organization = context.organization
    watched = alerts.settings_of(organization.pk)
    keys = list(
        ApiKey.objects.filter(organization=organization, revoked_at__isnull=True)
        .annotate(monthly_limit=F("spend_limit__monthly_limit_micros"))
        .order_by("-created_at")
    )
    key_spend = key_spend_this_month(organization.pk)  # every key's, and the month's total with them
    tag_limits = list(EndUserLimit.objects.filter(organization=organization).order_by("end_user"))
    tag_spend = end_user_spend_this_month(organization.pk) if tag_limits else {}
    history = list(SpendAlert.objects.filter(organization=organization)[:20])
    names = alerts.key_names(history)
    described: list[dict[str, Any]] = [
        {"alert": alert, "message": alerts.describe(alert, key_name=names.get(alert.subject))} for alert in history
    ]
    return {
        **member_limits(context),
        "spent_this_month": sum(key_spend.values()),
        "spend_form": SpendSettingsForm(
            initial={
                "budget_dollars": as_dollars(account.monthly_budget_micros),
                "budget_thresholds": ", ".join(str(value) for value in watched.budget_thresholds),
                "key_thresholds": ", ".join(str(value) for value in watched.key_thresholds),
                "credit_floor_dollars": as_dollars(watched.credit_floor_micros),
                "webhook_url": watched.webhook_url,
            }
        ),
        "key_limits": [
            {
                "key": key,
                "spent": key_spend.get(str(key.pk), 0),
                "limit": key.monthly_limit,  # type: ignore[attr-defined]
                "form": KeyLimitForm(
                    initial={"limit_dollars": as_dollars(key.monthly_limit)},  # type: ignore[attr-defined]
                    prefix=str(key.pk),
                ),
            }
            for key in keys
        ],
        "end_user_limits": [
            {"end_user": limit.end_user, "limit": limit.monthly_limit_micros, "spent": tag_spend.get(limit.end_user, 0)}
            for limit in tag_limits
        ],
        "end_user_form": EndUserLimitForm(),
        "alert_history": described,
        # The notices on top of the page, from the history just read (alerts.recent_alerts' rule).
        "spend_alerts": [
            item
            for item in described
            if item["alert"].dismissed_at is None and item["alert"].created_at >= timezone.now() - RECENT_ALERTS
        ][: alerts.RECENT_ALERTS_SHOWN],
    }


def form_errors(form: Any) -> str:
    return "; ".join(str(error) for errors in form.errors.values() for error in errors)


@require_POST
@dashboard_view("manage_billing")
def spend_settings(request: HttpRequest, context: Context) -> HttpResponse:
    """The monthly budget and the alert settings, each change audited (billing.controls)."""
    form = SpendSettingsForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect("dashboard:billing")
    actor, data = actor_of(request, context), form.cleaned_data
    budget = as_micros(data["budget_dollars"])
    try:
        if budget != account_of(context.organization).monthly_budget_micros:
            controls.set_monthly_budget(organization=context.organization, budget_micros=budget, actor=actor)
        controls.set_alert_settings(
            organization=context.organization,
            budget_thresholds=data["budget_thresholds"],
            key_thresholds=data["key_thresholds"],
            credit_floor_micros=as_micros(data["credit_floor_dollars"]),
            webhook_url=data["webhook_url"],
            actor=actor,
        )
    except BillingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Budget and alerts saved.")
    return redirect("dashboard:billing")


@require_POST
@dashboard_view("manage_billing")
def key_limit(request: HttpRequest, context: Context, key_id: str) -> HttpResponse:
    api_key = ApiKey.objects.filter(organization=context.organization, pk=key_id).first()
    if api_key is None:
        raise Http404("No such key.")
    form = KeyLimitForm(request.POST, prefix=str(api_key.pk))
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect("dashboard:billing")
    limit = as_micros(form.cleaned_data["limit_dollars"])
    controls.set_key_limit(api_key=api_key, monthly_limit_micros=limit, actor=actor_of(request, context))
    messages.success(request, f"The monthly limit of “{api_key.name}” is {'removed' if limit is None else 'saved'}.")
    return redirect("dashboard:keys" if request.POST.get("next") == "keys" else "dashboard:billing")


@require_POST
@dashboard_view("manage_billing")
def member_limit(request: HttpRequest, context: Context, user_id: int) -> HttpResponse:
    """A member's monthly limit, shared by every key they made (billing.controls.set_member_limit); only members who
    may manage billing reach it, so a developer neither sets nor lifts their own."""
    membership = Membership.objects.filter(organization=context.organization, user_id=user_id).select_related("user")
    member = membership.first()
    if member is None:
        raise Http404("No such member.")
    form = MemberLimitForm(request.POST, prefix=f"member-{user_id}")
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect("dashboard:billing")
    limit = as_micros(form.cleaned_data["limit_dollars"])
    controls.set_member_limit(
        organization=context.organization,
        user=member.user,
        monthly_limit_micros=limit,
        actor=actor_of(request, context),
    )
    messages.success(request, f"The monthly limit of {member.user.email} is {'removed' if limit is None else 'saved'}.")
    return redirect(f"{reverse('dashboard:billing')}#member-limits")


@require_POST
@dashboard_view("manage_billing")
def end_user_limit(request: HttpRequest, context: Context) -> HttpResponse:
    form = EndUserLimitForm(request.POST)
    if not form.is_valid():
        messages.error(request, form_errors(form))
        return redirect("dashboard:billing")
    tag, limit = form.cleaned_data["end_user"], as_micros(form.cleaned_data["limit_dollars"])
    try:
        end_users.set_end_user_limit(
            organization=context.organization,
            end_user=tag,
            monthly_limit_micros=limit,
            actor=actor_of(request, context),
        )
    except BillingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(
            request, f"The monthly limit of end user “{tag}” is {'removed' if limit is None else 'saved'}."
        )
    return redirect("dashboard:billing")


@require_POST
@dashboard_view("manage_billing", while_suspended=True)  # hides a notice, nothing more
def dismiss_alert(request: HttpRequest, context: Context, alert_id: int) -> HttpResponse:
    alerts.dismiss(organization_id=context.organization.pk, alert_id=alert_id)
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/dashboard/") else reverse("dashboard:billing"))


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


@require_POST
@dashboard_view("manage_billing")
def buy_credits(request: HttpRequest, context: Context) -> HttpResponse:
    form = BuyCreditsForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose an amount between $5 and $10,000.")
        return redirect("dashboard:billing")
    amount_cents = int(form.cleaned_data["amount_dollars"] * 100)
    actor = actor_of(request, context)
    try:
        if request.POST.get("method") == "checkout":
            back = request.build_absolute_uri(reverse("dashboard:billing"))
            started = checkout.start_checkout(
                organization=context.organization,
                amount_cents=amount_cents,
                success_url=f"{back}?paid=1",
                cancel_url=back,
                actor=actor,
            )
            return HttpResponseRedirect(started.url or back)
        charged = charges.buy_credits(organization=context.organization, amount_cents=amount_cents, actor=actor)
    except BillingError as exc:
        messages.error(request, str(exc))
        return redirect("dashboard:billing")
    if charged.client_secret:
        messages.warning(request, "Your bank asks you to confirm this payment; it is credited once confirmed.")
    else:
        messages.success(request, f"Paid ${amount_cents / 100:,.2f}; the credits are in your balance.")
    return redirect("dashboard:billing")


@require_POST
@dashboard_view("manage_billing")
def card_action(request: HttpRequest, context: Context, payment_method_id: str) -> HttpResponse:
    actor = actor_of(request, context)
    try:
        if request.POST.get("action") == "remove":
            detach_payment_method(organization=context.organization, payment_method_id=payment_method_id, actor=actor)
            messages.success(request, "Card removed.")
        else:
            set_default_payment_method(
                organization=context.organization, payment_method_id=payment_method_id, actor=actor
            )
            messages.success(request, "Default card changed.")
    except BillingError as exc:
        messages.error(request, str(exc))
    return redirect("dashboard:billing")


@dashboard_view("manage_billing")
def statement(request: HttpRequest, context: Context, month: str) -> HttpResponse:
    try:
        report = statements.statement_for(organization=context.organization, month=statements.parse_month(month))
    except BillingError as exc:
        raise Http404(str(exc)) from None
    name = f"statement-{context.organization.slug}-{month}"
    if request.GET.get("format") == "pdf":
        return attachment(statements.statement_pdf(report), "application/pdf", f"{report['number'] or name}.pdf")
    if request.GET.get("format") == "csv":
        return attachment(statements.statement_csv(report).encode(), "text/csv; charset=utf-8", f"{name}.csv")
    return render(request, "dashboard/statement.html", {**context.as_template(), "statement": report})


@dashboard_view("manage_billing")
def receipt(request: HttpRequest, context: Context, receipt_id: int) -> HttpResponse:
    found = Receipt.objects.filter(organization=context.organization, pk=receipt_id).first()
    if found is None:
        raise Http404("No such receipt.")
    return attachment(receipt_pdf(found), "application/pdf", f"receipt-{found.number}.pdf")


@dashboard_view("manage_billing")
def payment_receipt(request: HttpRequest, context: Context, payment_id: int) -> HttpResponse:
    """The receipt of a paid payment (one paid before receipts existed gets its own now)."""
    payment = Payment.objects.filter(
        organization=context.organization, pk=payment_id, status=PaymentStatus.SUCCEEDED
    ).first()
    if payment is None:
        raise Http404("No such paid payment.")
    return redirect("dashboard:receipt", receipt_id=receipt_of(payment).pk)


@require_POST
@dashboard_view("manage_billing")
def billing_details(request: HttpRequest, context: Context) -> HttpResponse:
    form = BillingDetailsForm(request.POST)
    if not form.is_valid():
        messages.error(request, "; ".join(str(error) for errors in form.errors.values() for error in errors))
        return redirect("dashboard:billing")
    try:
        set_billing_details(organization=context.organization, actor=actor_of(request, context), **form.cleaned_data)
    except BillingError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, "Billing details saved: receipts and statements issued from now on carry them.")
    return redirect("dashboard:billing")


def attachment(content: bytes, content_type: str, filename: str) -> HttpResponse:
    response = HttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
