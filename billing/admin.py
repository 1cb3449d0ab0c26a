"""The operators' console for money: prices, accounts, the usage and credit ledgers, holds, payments, Stripe
events and reconciliation runs.

Ledgers are history: usage records, rollups, credit entries and holds are never added, edited or deleted here.
Money moves only through ``billing.ledger`` (grants, adjustments, refunds), each audited by the service. Prices are
read-only too: a new version (a new row) is how a price changes, added on a form view through
``billing.price_changes``, which also corrects a version not yet in force and audits both (``PRICE_CHANGED``).
An account's balance and holds are read-only; its
monthly budget is set on a form view through ``billing.controls``, which audits it. An organization's page shows its
credit through the section billing adds to it (``add_organization_section``).
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from accounts.admin import OrganizationSection, add_organization_section
from accounts.admin_base import OperableAdmin, Tool, form_data, request_actor
from accounts.models import Organization
from billing.controls import set_monthly_budget
from billing.ledger import BillingError, grant_credits, refund_job
from billing.models import (
    Account,
    AlertScope,
    CreditEntry,
    EndUserLimit,
    EntryKind,
    Hold,
    KeySpendLimit,
    MemberSpendLimit,
    Payment,
    Price,
    ReconciliationRun,
    ReconciliationScope,
    SpendAlert,
    StripeEvent,
    UsageRecord,
    UsageRollup,
)
from billing.money import dollars_to_micros, format_micros
from billing.price_changes import PriceTerms, add_price, change_scheduled_price
from billing.reconciliation import run_reconciliation
from inference.admin import as_uuid, pretty_json
from inference.models import Job

if TYPE_CHECKING:
    _PriceFormBase = forms.ModelForm[Price]
    _AccountFormBase = forms.ModelForm[Account]
else:
    # The stubs make these generic; Django's classes take no type arguments at runtime.
    _PriceFormBase = _AccountFormBase = forms.ModelForm


def _money(micros: int | None) -> str:
    return "-" if micros is None else format_micros(micros)


class _HistoryAdmin(OperableAdmin):
    """Rows that only the platform writes: listed and viewed, never added, edited or deleted here; operators act
    on them only through actions."""

    show_full_result_count = False  # these tables only grow: no second COUNT(*) over them per page


# --- Prices -------------------------------------------------------------------------------------------------


def _in_force(price: Price) -> bool:
    return price.effective_from <= timezone.now()


class PriceForm(_PriceFormBase):
    """A price line's terms, as the operator gives them; ``billing.price_changes`` decides whether they may be."""

    class Meta:
        model = Price
        fields = (
            "gpu_class",
            "endpoint",
            "organization",
            "unit",
            "unit_price_micros",
            "resolution_tiers",
            "effective_from",
            "note",
        )

    def terms(self) -> PriceTerms:
        cleaned = self.cleaned_data
        return PriceTerms(
            gpu_class=cleaned["gpu_class"],
            endpoint=cleaned["endpoint"],
            organization=cleaned["organization"],
            unit=cleaned["unit"],
            unit_price_micros=cleaned["unit_price_micros"],
            resolution_tiers=cleaned["resolution_tiers"] or [],
            effective_from=cleaned["effective_from"],
            note=cleaned["note"],
        )


PRICE_HELP = (
    "A line applies to a whole GPU class (per GPU-second) or to one endpoint (per GPU-second, image, megapixel, video, "
    "or second of video or audio), from its start; naming an organization as well makes it that organization's "
    "negotiated price of the endpoint. Per-output lines may price by resolution tier (the output's shorter side). "
    "To change a price in force, add a new version."
)


@admin.register(Price)
class PriceAdmin(OperableAdmin):
    """Versions of the rate card, read-only here: a new version is added, and one not yet in force corrected, on form
    views calling ``billing.price_changes`` (which audits each)."""

    form = PriceForm
    list_display = ("target", "unit", "price", "effective_from", "state", "note", "created_by")
    list_filter = ("unit", "gpu_class", "endpoint")
    list_select_related = ("endpoint", "organization", "created_by")
    raw_id_fields = ("organization",)
    search_fields = ("note", "endpoint__owner", "endpoint__name")
    fieldsets = (
        (None, {"fields": PriceForm.Meta.fields, "description": PRICE_HELP}),
        ("Record", {"fields": ("created_by", "created_at")}),
    )

    def get_urls(self) -> list[URLPattern]:
        return [
            self.form_view_path("create/", self.create_view, "create"),
            self.form_view_path("<path:object_id>/edit/", self.edit_view, "edit"),
            *super().get_urls(),
        ]

    def get_list_tools(self, request: HttpRequest) -> list[Tool]:
        if not self.has_create_permission(request):
            return []
        return [Tool("Add a price version", self.form_view_url("create"))]

    def get_object_tools(self, request: HttpRequest, obj: Price) -> list[Tool]:
        if not self.has_operate_permission(request) or _in_force(obj):
            return []
        return [Tool("Edit this scheduled price", self.form_view_url("edit", obj.pk))]

    @admin.display(description="applies to")
    def target(self, price: Price) -> str:
        if not (price.endpoint_id and price.endpoint):
            return f"class {price.gpu_class}"
        if price.organization_id and price.organization:
            return f"{price.endpoint.endpoint_id} for {price.organization.name}"
        return price.endpoint.endpoint_id

    @admin.display(description="price", ordering="unit_price_micros")
    def price(self, price: Price) -> str:
        per = price.get_unit_display().lower()
        tiers = [
            f"{format_micros(tier['unit_price_micros'])} up to {tier['max_short_side']}p"
            for tier in price.resolution_tiers or ()
        ]
        return f"{format_micros(price.unit_price_micros)} per {per}" + (
            f" ({', '.join(tiers)}; above)" if tiers else ""
        )

    @admin.display(description="state")
    def state(self, price: Price) -> str:
        return "in force (read-only)" if _in_force(price) else "scheduled"

    def _price_form(self, request: HttpRequest) -> type[PriceForm]:
        """``PriceForm`` with the admin's widgets (split date and time, the organization by id)."""
        return cast(type[PriceForm], self.get_form(request, fields=PriceForm.Meta.fields))

    def create_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_create_permission(request):
            raise PermissionDenied
        form = self._price_form(request)(form_data(request))
        if form.is_valid():
            try:
                price = add_price(terms=form.terms(), actor=request_actor(request))
            except ValidationError as refused:
                form.add_error(None, refused)
            else:
                self.log_addition(request, price, [{"added": {}}])
                self.message_user(request, f"Added the price {price}.", messages.SUCCESS)
                return self.change_page(price)
        return self.render_form_view(
            request, title="Add a price version", form=form, intro=PRICE_HELP, submit_label="Add price"
        )

    def edit_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        price: Price = self.object_to_operate(request, object_id)
        in_force = _in_force(price)  # before the form is bound: binding sets its fields on ``price``
        form = self._price_form(request)(form_data(request), instance=price)
        if form.is_valid() and not form.has_changed():
            return self.change_page(price)  # nothing to change, nothing to audit
        if form.is_valid():
            try:
                changed = change_scheduled_price(price=price, terms=form.terms(), actor=request_actor(request))
            except ValidationError as refused:
                form.add_error(None, refused)
            except BillingError as refused:
                form.add_error(None, str(refused))
            else:
                self.log_form_change(request, changed, form)
                self.message_user(request, f"The scheduled price is now {changed}.", messages.SUCCESS)
                return self.change_page(changed)
        return self.render_form_view(
            request,
            title="Edit a scheduled price",
            form=form,
            obj=price,
            intro="A price not in force yet may be corrected until it starts.",
            refusal="This price is in force and is never edited: add a new version to change it." if in_force else "",
        )


# --- Accounts -----------------------------------------------------------------------------------------------


class BudgetForm(_AccountFormBase):
    class Meta:
        model = Account
        fields = ("monthly_budget_micros",)


class GrantCreditsForm(forms.Form):
    kind = forms.ChoiceField(
        choices=[
            (EntryKind.GRANT, "Grant (free credits, positive)"),
            (EntryKind.ADJUSTMENT, "Adjustment (either sign)"),
        ]
    )
    amount_usd = forms.DecimalField(
        label="Amount (USD)", max_digits=14, decimal_places=6, help_text="E.g. 25 or 0.50; negative only to adjust."
    )
    reason = forms.CharField(max_length=300, help_text="Shown to the customer in their ledger.")
    # Made when the form is first shown: posting the same form twice grants once (the ledger's idempotency key).
    request_id = forms.UUIDField(widget=forms.HiddenInput)

    def clean_amount_usd(self) -> Decimal:
        amount: Decimal = self.cleaned_data["amount_usd"]
        if amount == 0:
            raise forms.ValidationError("The amount cannot be zero.")
        return amount

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        amount = cleaned.get("amount_usd")
        if cleaned.get("kind") == EntryKind.GRANT and amount is not None and amount < 0:
            self.add_error("amount_usd", "A grant adds credit; use an adjustment to take some away.")
        return cleaned

    @property
    def amount_micros(self) -> int:
        return dollars_to_micros(self.cleaned_data["amount_usd"])  # exact: at most 6 decimal places


@admin.register(Account)
class AccountAdmin(OperableAdmin):
    """Balances and holds are the ledgers' (read-only); the budget is set on a form view, credit granted from the
    list's action."""

    list_display = ("organization", "balance", "held", "available", "budget", "auto_top_up_enabled", "updated_at")
    list_filter = ("auto_top_up_enabled",)
    search_fields = ("organization__name", "organization__slug", "stripe_customer_id")
    list_select_related = ("organization",)
    show_full_result_count = False
    fieldsets = (
        (None, {"fields": ("organization", "balance", "held", "available", "ledger", "currency")}),
        ("Spend control", {"fields": ("monthly_budget_micros",)}),
        (
            "Stripe and auto top-up (set by the customer)",
            {
                "fields": (
                    "stripe_customer_id",
                    "default_payment_method_id",
                    "auto_top_up_enabled",
                    "auto_top_up_threshold_micros",
                    "auto_top_up_amount_cents",
                    "updated_at",
                )
            },
        ),
    )
    actions = ("grant_credits_action",)

    def get_urls(self) -> list[URLPattern]:
        return [self.form_view_path("<path:object_id>/budget/", self.budget_view, "budget"), *super().get_urls()]

    def get_object_tools(self, request: HttpRequest, obj: Account) -> list[Tool]:
        if not self.has_operate_permission(request):
            return []
        return [Tool("Set the monthly budget", self.form_view_url("budget", obj.pk))]

    @admin.display(description="balance", ordering="balance_micros")
    def balance(self, account: Account) -> str:
        return format_micros(account.balance_micros)

    @admin.display(description="held", ordering="held_micros")
    def held(self, account: Account) -> str:
        return format_micros(account.held_micros)

    @admin.display(description="available")
    def available(self, account: Account) -> str:
        return format_micros(account.available_micros)

    @admin.display(description="monthly budget", ordering="monthly_budget_micros")
    def budget(self, account: Account) -> str:
        return _money(account.monthly_budget_micros)

    @admin.display(description="credit ledger")
    def ledger(self, account: Account) -> SafeString:
        url = reverse("admin:billing_creditentry_changelist") + f"?organization__id__exact={account.pk}"
        return format_html('<a href="{}">Entries of this organization</a>', url)

    def budget_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        account: Account = self.object_to_operate(request, object_id)
        form = BudgetForm(form_data(request), instance=account)
        if form.is_valid() and not form.has_changed():
            return self.change_page(account)  # nothing to set, nothing to audit
        if form.is_valid():
            budget_micros = form.cleaned_data["monthly_budget_micros"]
            try:
                # Only the budget, through its service, which writes that column alone under the account's lock.
                set_monthly_budget(
                    organization=account.organization, budget_micros=budget_micros, actor=request_actor(request)
                )
            except BillingError as refused:
                form.add_error("monthly_budget_micros", str(refused))
            else:
                self.log_form_change(request, account, form)
                self.message_user(
                    request,
                    f"The monthly budget of {account.organization} is {_money(budget_micros)}.",
                    messages.SUCCESS,
                )
                return self.change_page(account)
        return self.render_form_view(
            request,
            title="Set the monthly budget",
            form=form,
            obj=account,
            intro=f"Available credit {format_micros(account.available_micros)}. Requests are refused once the calendar "
            "month's spend (UTC) reaches the budget; empty for no budget.",
        )

    @admin.action(description="Grant or adjust credits…", permissions=["operate"])
    def grant_credits_action(self, request: HttpRequest, queryset: QuerySet[Account]) -> HttpResponse | None:
        accounts = list(queryset.select_related("organization"))
        if "apply" in request.POST:
            form = GrantCreditsForm(request.POST)
            if form.is_valid():
                self._grant(request, accounts, form)
                return None  # back to the list, with the messages
        else:
            form = GrantCreditsForm(initial={"kind": EntryKind.GRANT, "request_id": uuid.uuid4()})
        context = {
            **self.admin_site.each_context(request),
            "title": "Grant or adjust credits",
            "opts": self.opts,
            "form": form,
            "rows": [(account, format_micros(account.balance_micros)) for account in accounts],
            "action": "grant_credits_action",
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
        }
        return TemplateResponse(request, "admin/billing/account/grant_credits.html", context)

    def _grant(self, request: HttpRequest, accounts: list[Account], form: GrantCreditsForm) -> None:
        kind, reason, request_id = (
            form.cleaned_data["kind"],
            form.cleaned_data["reason"],
            form.cleaned_data["request_id"],
        )
        done = 0
        for account in accounts:
            try:
                grant_credits(
                    organization=account.organization,
                    amount_micros=form.amount_micros,
                    reason=reason,
                    actor=request_actor(request),
                    idempotency_key=f"{kind}-admin-{request_id}-{account.pk}",
                    kind=kind,
                )
            except BillingError as refused:
                self.message_user(request, f"{account.organization}: {refused}", messages.ERROR)
                continue
            done += 1
        verb = "Granted" if kind == EntryKind.GRANT else "Adjusted by"
        self.message_user(
            request, f"{verb} {format_micros(form.amount_micros)} on {done} account(s).", messages.SUCCESS
        )


@admin.register(KeySpendLimit)
class KeySpendLimitAdmin(_HistoryAdmin):
    """Set by the organization's admins in the dashboard or the API (audited there)."""

    list_display = ("api_key", "limit", "updated_at")
    list_select_related = ("api_key",)

    @admin.display(description="monthly limit", ordering="monthly_limit_micros")
    def limit(self, spend_limit: KeySpendLimit) -> str:
        return format_micros(spend_limit.monthly_limit_micros)


@admin.register(MemberSpendLimit)
class MemberSpendLimitAdmin(_HistoryAdmin):
    """Set by the organization's owners, admins and billing members in the dashboard or the API (audited there):
    shared by every key the member made there."""

    list_display = ("organization", "user", "limit", "updated_at")
    list_select_related = ("organization", "user")
    search_fields = ("user__email", "organization__name", "organization__slug")

    @admin.display(description="monthly limit", ordering="monthly_limit_micros")
    def limit(self, spend_limit: MemberSpendLimit) -> str:
        return format_micros(spend_limit.monthly_limit_micros)


@admin.register(EndUserLimit)
class EndUserLimitAdmin(_HistoryAdmin):
    """Set by the organization's owners, admins and billing members in the dashboard or the API (audited there)."""

    list_display = ("organization", "end_user", "limit", "updated_at")
    list_select_related = ("organization",)
    search_fields = ("end_user",)

    @admin.display(description="monthly limit", ordering="monthly_limit_micros")
    def limit(self, spend_limit: EndUserLimit) -> str:
        return format_micros(spend_limit.monthly_limit_micros)


@admin.register(SpendAlert)
class SpendAlertAdmin(_HistoryAdmin):
    """Recorded once per threshold, period and limit by the settlements that reached them (billing.alerts)."""

    list_display = (
        "created_at", "organization", "event_type", "scope", "threshold_told", "limit", "period", "emailed_at",
    )  # fmt: skip
    list_filter = ("event_type", "scope")
    list_select_related = ("organization",)

    @admin.display(description="threshold", ordering="threshold")
    def threshold_told(self, alert: SpendAlert) -> str:
        """A percentage of the limit, or for the credit floor the floor itself, in dollars."""
        return format_micros(alert.threshold) if alert.scope == AlertScope.CREDITS else f"{alert.threshold}%"

    @admin.display(description="limit", ordering="limit_key_micros")
    def limit(self, alert: SpendAlert) -> str:
        """The budget or the key's limit the alert was told for ($0.00 for a budget of $0); none for the credit floor,
        whose threshold is the floor itself."""
        return "—" if alert.scope == AlertScope.CREDITS else format_micros(alert.limit_key_micros)


# --- The usage ledger ---------------------------------------------------------------------------------------


@admin.register(UsageRecord)
class UsageRecordAdmin(_HistoryAdmin):
    list_display = (
        "recorded_at", "organization", "job", "attempt_number", "endpoint", "gpu_class", "outcome", "billable",
        "gpu_ms", "unbilled_gpu_ms", "cost",
    )  # fmt: skip
    list_filter = ("billable", "outcome", "gpu_class", "unit")
    list_select_related = ("organization", "endpoint", "job")
    search_fields = ("organization__name", "organization__slug")
    search_help_text = "A request id or organization id (whole), or part of an organization's name or slug."
    actions = ("refund_requests",)

    @admin.display(description="cost", ordering="cost_micros")
    def cost(self, record: UsageRecord) -> str:
        return format_micros(record.cost_micros)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[UsageRecord], search_term: str
    ) -> tuple[QuerySet[UsageRecord], bool]:
        wanted = as_uuid(search_term)
        if wanted is not None:
            return queryset.filter(Q(job_id=wanted) | Q(organization_id=wanted)), False
        return super().get_search_results(request, queryset, search_term)

    @admin.action(description="Refund the requests of the selected records", permissions=["operate"])
    def refund_requests(self, request: HttpRequest, queryset: QuerySet[UsageRecord]) -> None:
        actor = request_actor(request)
        operator = actor.user.email if actor.user is not None else "an operator"
        refunded, total, refused = 0, 0, []
        # Each request once, however many of its attempts were selected.
        for job in Job.objects.filter(pk__in=queryset.values("job_id")).select_related("organization").order_by("pk"):
            try:
                entry = refund_job(job=job, actor=actor, reason=f"Refunded by {operator}")
            except BillingError as reason:
                refused.append(f"{job.pk}: {reason}")
                continue
            refunded += 1
            total += entry.amount_micros
        self.message_user(request, f"Refunded {refunded} request(s), {format_micros(total)} in all.", messages.SUCCESS)
        if refused:
            self.message_user(request, "Not refunded: " + " ".join(refused), messages.WARNING)


@admin.register(UsageRollup)
class UsageRollupAdmin(_HistoryAdmin):
    list_display = (
        "bucket_start", "granularity", "organization", "endpoint", "gpu_class", "attempts", "billable_attempts",
        "gpu_ms", "unbilled_gpu_ms", "cost", "refunded",
    )  # fmt: skip
    list_filter = ("granularity", "gpu_class")
    list_select_related = ("organization", "endpoint")

    @admin.display(description="cost", ordering="cost_micros")
    def cost(self, rollup: UsageRollup) -> str:
        return format_micros(rollup.cost_micros)

    # What refunds of its requests gave back of the cost: budgets and limits count the cost less it (net_spend).
    @admin.display(description="refunded", ordering="refunded_micros")
    def refunded(self, rollup: UsageRollup) -> str:
        return format_micros(rollup.refunded_micros)


# --- The credit ledger and holds ----------------------------------------------------------------------------


@admin.register(CreditEntry)
class CreditEntryAdmin(_HistoryAdmin):
    list_display = ("created_at", "organization", "kind", "amount", "balance_after", "description", "idempotency_key")
    list_filter = ("kind",)
    list_select_related = ("organization",)
    search_fields = ("organization__name", "organization__slug", "=idempotency_key")

    @admin.display(description="amount", ordering="amount_micros")
    def amount(self, entry: CreditEntry) -> str:
        return format_micros(entry.amount_micros)

    @admin.display(description="balance after")
    def balance_after(self, entry: CreditEntry) -> str:
        return format_micros(entry.balance_after_micros)


class HoldStateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("open", "Open"), ("released", "Released")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() in ("open", "released"):
            return queryset.filter(released_at__isnull=self.value() == "open")
        return queryset


@admin.register(Hold)
class HoldAdmin(_HistoryAdmin):
    list_display = ("job", "organization", "amount", "unit", "created_at", "released_at")
    list_filter = (HoldStateFilter, "unit")
    list_select_related = ("organization", "job")

    @admin.display(description="held", ordering="amount_micros")
    def amount(self, hold: Hold) -> str:
        return format_micros(hold.amount_micros)


# --- Payments and Stripe ------------------------------------------------------------------------------------


@admin.register(Payment)
class PaymentAdmin(_HistoryAdmin):
    list_display = (
        "id", "organization", "kind", "status", "amount_cents", "amount_refunded_cents", "amount_disputed_cents",
        "created_at", "succeeded_at",
    )  # fmt: skip
    list_filter = ("status", "kind")
    list_select_related = ("organization",)
    search_fields = ("organization__name", "organization__slug", "=stripe_payment_intent_id")


@admin.register(StripeEvent)
class StripeEventAdmin(_HistoryAdmin):
    """Stripe's webhook inbox, as received. Replaying an event (billing's Stripe work) is an action added here."""

    list_display = ("id", "type", "status", "attempts", "received_at", "processed_at")
    list_filter = ("status", "type", "livemode")
    search_fields = ("=id",)
    fields = ("id", "type", "status", "livemode", "attempts", "error", "received_at", "processed_at", "payload_json")
    readonly_fields = fields
    actions = ("replay",)

    @admin.display(description="payload")
    def payload_json(self, event: StripeEvent) -> SafeString:
        return pretty_json(event.payload)

    @admin.action(description="Replay the selected events (from Stripe's current state)", permissions=["operate"])
    def replay(self, request: HttpRequest, queryset: QuerySet[StripeEvent]) -> None:
        from billing.stripe_events import replay_event

        actor = request_actor(request)
        outcomes = [replay_event(event_id=event.pk, actor=actor) for event in queryset.order_by("received_at")]
        failed = [event.pk for event in outcomes if event.status == "failed"]
        self.message_user(request, f"Replayed {len(outcomes)} event(s).", messages.SUCCESS)
        if failed:
            self.message_user(request, "Still failing: " + ", ".join(failed), messages.WARNING)


# --- Reconciliation -----------------------------------------------------------------------------------------


@admin.register(ReconciliationRun)
class ReconciliationRunAdmin(_HistoryAdmin):
    class Media:
        css = {"all": ["dashboard/admin.css"]}

    """Every proof of the books, newest first; "Run reconciliation now" runs one at once (incremental, or full)."""

    list_display = ("started_at", "result", "scope", "discrepancies", "checks_run", "skipped", "duration")
    list_filter = ("ok", "scope")
    ordering = ("-started_at",)
    fields = (
        "started_at",
        "finished_at",
        "duration",
        "result",
        "coverage",
        "watermark",
        "checks_table",
        "drift_json",
    )
    readonly_fields = fields
    change_list_template = "admin/billing/reconciliationrun/change_list.html"

    @admin.display(description="result", ordering="ok")
    def result(self, run: ReconciliationRun) -> SafeString:
        # Coloured by dashboard/admin.css (the admin's Content-Security-Policy refuses inline styles).
        state, text = ("clean", "no drift") if run.ok else ("drift", "DRIFT")
        return format_html('<strong class="reconciliation-{}">{}</strong>', state, text)

    @admin.display(description="drift")
    def discrepancies(self, run: ReconciliationRun) -> int:
        return sum(int(item.get("count", 1)) for item in run.drift)

    @admin.display(description="checks")
    def checks_run(self, run: ReconciliationRun) -> int:
        return sum(1 for summary in run.checked.values() if not summary.get("skipped"))

    @admin.display(description="skipped")
    def skipped(self, run: ReconciliationRun) -> str:
        return ", ".join(name for name, summary in run.checked.items() if summary.get("skipped")) or "-"

    @admin.display(description="duration")
    def duration(self, run: ReconciliationRun) -> str:
        if run.finished_at is None:
            return "-"
        return f"{(run.finished_at - run.started_at).total_seconds():.1f} s"

    @admin.display(description="checks")
    def checks_table(self, run: ReconciliationRun) -> SafeString:
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    name,
                    "-" if summary.get("skipped") else f"{summary.get('checked', 0):,}",
                    "-" if summary.get("skipped") else summary.get("drift", 0),
                    summary.get("skipped")
                    or ", ".join(
                        f"{key}: {value}" for key, value in summary.items() if key not in ("checked", "drift")
                    ),
                )
                for name, summary in run.checked.items()
            ),
        )
        return format_html(
            "<table><thead><tr><th>check</th><th>rows checked</th><th>drift</th><th>notes</th></tr></thead>"
            "<tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="drift found")
    def drift_json(self, run: ReconciliationRun) -> SafeString | str:
        return pretty_json(run.drift) if run.drift else "None."

    def get_urls(self) -> list[URLPattern]:
        run_now = path("run/", self.admin_site.admin_view(self.run_now_view), name="billing_reconciliationrun_run")
        return [run_now, *super().get_urls()]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        extra_context = {**(extra_context or {}), "can_run_now": self.has_operate_permission(request)}
        return super().changelist_view(request, extra_context)

    def run_now_view(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        run = run_reconciliation(full=request.POST.get("scope") == ReconciliationScope.FULL)
        self.log_addition(request, run, [{"added": {}}])
        if run.ok:
            self.message_user(request, f"Reconciliation ran ({run.coverage}): no drift.", messages.SUCCESS)
        else:
            self.message_user(
                request,
                f"Reconciliation ({run.coverage}) found {self.discrepancies(run)} discrepancies.",
                messages.ERROR,
            )
        return HttpResponseRedirect(reverse("admin:billing_reconciliationrun_change", args=[run.pk]))


# --- Organizations, with their money ----------------------------------------------------------------------


@admin.display(description="credit")
def _credit_summary(organization: Organization) -> SafeString:
    account = getattr(organization, "billing_account", None)
    if account is None:
        return format_html("{}", "No billing account yet.")
    return format_html(
        'Balance {}, held {}, available {}; monthly budget {}. <a href="{}">Budget, grants and the ledger →</a>',
        _money(account.balance_micros),
        _money(account.held_micros),
        _money(account.available_micros),
        _money(account.monthly_budget_micros),
        reverse("admin:billing_account_change", args=[account.pk]),
    )


@admin.display(description="available credit")
def _available_credit(organization: Organization) -> str:
    account = getattr(organization, "billing_account", None)
    return _money(account.available_micros) if account is not None else "—"


add_organization_section(
    OrganizationSection(
        title="Billing", fields=(_credit_summary,), columns=(_available_credit,), related=("billing_account",)
    )
)
