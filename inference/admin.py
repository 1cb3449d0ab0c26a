"""The operators' console for inference: the model registry, requests and their attempts, webhooks, tenant settings.

The registry is edited here (adding a model is a row, not code). Requests are history: nothing about them is
edited or deleted from the console; an operator can only cancel or requeue them, through the job lifecycle's
services, and each of those is written to the accounts audit log. Webhook secrets never appear in full.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.db import transaction
from django.db.models import Q, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from accounts.admin_base import OperableAdmin, request_actor
from accounts.models import AuditAction
from accounts.services import Actor, record_audit
from inference.closing import cancel_job
from inference.engine.profile import DESCRIPTIONS as PROFILE_DESCRIPTIONS
from inference.models import (
    Endpoint,
    Job,
    JobAttempt,
    JobLog,
    JobStatus,
    TenantSettings,
    WebhookAttempt,
    WebhookDelivery,
    WebhookStatus,
)
from inference.requeue import RequeueRefused, requeue_job
from inference.webhooks import enqueue_delivery, new_webhook_secret

if TYPE_CHECKING:
    _EndpointAdminBase = admin.ModelAdmin[Endpoint]
    _EndpointFormBase = forms.ModelForm[Endpoint]
    _AttemptOfJobInlineBase = admin.TabularInline[JobAttempt, Job]
    _LogOfJobInlineBase = admin.TabularInline[JobLog, Job]
    _AttemptOfDeliveryInlineBase = admin.TabularInline[WebhookAttempt, WebhookDelivery]
    _TenantSettingsAdminBase = admin.ModelAdmin[TenantSettings]
else:
    # The stubs make these generic; Django's classes take no type arguments at runtime.
    _EndpointAdminBase = _TenantSettingsAdminBase = admin.ModelAdmin
    _EndpointFormBase = forms.ModelForm
    _AttemptOfJobInlineBase = _LogOfJobInlineBase = _AttemptOfDeliveryInlineBase = admin.TabularInline


# How many log lines a request's page shows: the most recent ones, a long run can write thousands.
JOB_LOG_LINES_SHOWN = 200


def as_uuid(term: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(term.strip())
    except ValueError:
        return None


def pretty_json(value: Any) -> SafeString:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False))


# --- Model registry -----------------------------------------------------------------------------------------

BUILTIN_PREFIX = "builtin:"
# `s3://...`, `hf:...`, `https://...`: sources that would need a download, which no machine here can do.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


@functools.cache
def builtin_model_names() -> frozenset[str]:
    # Imported on first use: the engine brings torch and diffusers, which the web process otherwise never loads.
    from inference.engine import BUILTIN_MODELS

    return frozenset(BUILTIN_MODELS)


def validate_weights(value: str) -> str:
    """``builtin:<name>`` of a known built-in, or a plausible diffusers folder path (absolute, or under MODELS_DIR).

    Whether the folder exists is not checked here: the worker's machine, not this one, loads it.
    """
    value = value.strip()
    if value.startswith(BUILTIN_PREFIX):
        name = value.removeprefix(BUILTIN_PREFIX)
        known = builtin_model_names()
        if name not in known:
            raise forms.ValidationError(
                f"Unknown built-in model {name!r}; known: {', '.join(sorted(known))}.", code="unknown_builtin"
            )
        return value
    if _SCHEME.match(value):
        raise forms.ValidationError(
            "Weights are never downloaded: give builtin:<name>, or the path of a diffusers folder on the workers "
            "(absolute, or relative to MODELS_DIR).",
            code="not_a_path",
        )
    if any(ord(character) < 32 or character == "\x7f" for character in value):
        raise forms.ValidationError("A path cannot contain control characters.", code="not_a_path")
    if value.startswith("~"):
        raise forms.ValidationError("Give an absolute path: the worker does not expand ~.", code="not_a_path")
    path = PurePosixPath(value)
    if not path.is_absolute():
        if not path.parts:
            raise forms.ValidationError("Name a model folder, not MODELS_DIR itself.", code="not_a_path")
        if ".." in path.parts:
            raise forms.ValidationError(
                "A relative path stays inside MODELS_DIR; give an absolute path instead.", code="not_a_path"
            )
    return value


def weights_folder(weights: str) -> Path | None:
    """Where a worker on this machine would look for the weights (as the worker resolves them); None for built-ins."""
    if weights.startswith(BUILTIN_PREFIX):
        return None
    path = Path(weights)
    return path if path.is_absolute() else Path(settings.MODELS_DIR) / path


class EndpointForm(_EndpointFormBase):
    class Meta:
        model = Endpoint
        fields = "__all__"

    def clean_weights(self) -> str:
        return validate_weights(self.cleaned_data["weights"])


@admin.register(Endpoint)
class EndpointAdmin(_EndpointAdminBase):
    form = EndpointForm
    list_display = ("endpoint_id", "title", "kind", "weights", "gpu_class", "is_active", "limits")
    list_filter = ("kind", "gpu_class", "is_active", "owner")
    search_fields = ("owner", "name", "title", "weights")
    readonly_fields = ("created_at",)
    fieldsets = (
        ("Identity", {"fields": ("owner", "name", "path", "title", "description", "kind", "is_active", "created_at")}),
        (
            "Weights and hardware",
            {
                "fields": ("weights", "gpu_class"),
                "description": "Weights: builtin:<name>, or a diffusers folder on the workers (absolute, or "
                "relative to MODELS_DIR).",
            },
        ),
        (
            "Limits",
            {
                "fields": (
                    ("max_width", "max_height"),
                    "max_steps",
                    "max_images",
                    "max_prompt_chars",
                    "max_input_image_bytes",
                    ("max_frames", "max_fps"),
                    "max_audio_seconds",
                ),
                "description": "Requests beyond these are refused at submission (422). Frames and fps: video "
                "endpoints; seconds: audio endpoints.",
            },
        ),
        (
            "Defaults",
            {
                "fields": (
                    ("default_width", "default_height"),
                    "default_steps",
                    "default_guidance_scale",
                    "default_strength",
                    ("default_num_frames", "default_fps"),
                    "default_audio_seconds",
                )
            },
        ),
        (
            "Optimization profile",
            {
                "fields": ("optimization_profile",),
                "description": format_html(
                    "A JSON object; keys left out take the worker's device defaults. {}",
                    format_html_join("", "<br><code>{}</code>: {}", sorted(PROFILE_DESCRIPTIONS.items())),
                ),
            },
        ),
    )
    actions = ("activate_selected", "deactivate_selected")

    @admin.display(description="endpoint", ordering="owner")
    def endpoint_id(self, endpoint: Endpoint) -> str:
        return endpoint.endpoint_id

    @admin.display(description="limits")
    def limits(self, endpoint: Endpoint) -> str:
        if endpoint.makes == "audio":
            return (
                f"{endpoint.max_audio_seconds} s, {endpoint.max_steps} steps, {endpoint.max_prompt_chars} prompt chars"
            )
        size = f"{endpoint.max_width}x{endpoint.max_height}, {endpoint.max_steps} steps"
        if endpoint.makes == "video":
            return f"{size}, {endpoint.max_frames} frames at up to {endpoint.max_fps} fps"
        return f"{size}, {endpoint.max_images} images, {endpoint.max_prompt_chars} prompt chars"

    def save_model(self, request: HttpRequest, obj: Endpoint, form: Any, change: Any) -> None:
        super().save_model(request, obj, form, change)
        folder = weights_folder(obj.weights)
        if folder is None:
            return
        # Saved all the same: the workers' machines may hold folders this one does not.
        if not folder.is_dir():
            messages.warning(
                request,
                f"{obj.endpoint_id}: the folder {folder} does not exist on this machine; requests will fail on "
                "any worker that lacks it too.",
            )
        elif not (folder / "model_index.json").is_file():
            messages.warning(
                request, f"{obj.endpoint_id}: {folder} has no model_index.json; it is not a diffusers folder."
            )

    @admin.action(description="Activate selected endpoints", permissions=["change"])
    def activate_selected(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        self._set_active(request, queryset, active=True)

    @admin.action(description="Deactivate selected endpoints", permissions=["change"])
    def deactivate_selected(self, request: HttpRequest, queryset: QuerySet[Endpoint]) -> None:
        self._set_active(request, queryset, active=False)

    def _set_active(self, request: HttpRequest, queryset: QuerySet[Endpoint], *, active: bool) -> None:
        to_change = list(queryset.filter(is_active=not active))
        Endpoint.objects.filter(pk__in=[endpoint.pk for endpoint in to_change]).update(is_active=active)
        for endpoint in to_change:
            self.log_change(request, endpoint, [{"changed": {"fields": ["is_active"]}}])
        verb = "Activated" if active else "Deactivated"
        unchanged = queryset.count() - len(to_change)
        note = f" ({unchanged} already {'active' if active else 'inactive'})" if unchanged else ""
        self.message_user(request, f"{verb} {len(to_change)} endpoint(s){note}.", messages.SUCCESS)


# --- Requests -----------------------------------------------------------------------------------------------

REQUEUEABLE_STATUSES = (JobStatus.FAILED, JobStatus.CANCELLED)


ATTEMPT_FIELDS = (
    "number",
    "outcome",
    "worker",
    "gpu_ms",
    "cold_start_ms",
    "wasted_ms",
    "billable",
    "started_at",
    "heartbeat_at",
    "finished_at",
    "error",
)


class AttemptColumns:
    """What both views of an attempt (inline on its job, and its own page) show."""

    @admin.display(description="billable", boolean=True)
    def billable(self, attempt: JobAttempt) -> bool:
        return attempt.billable


class AttemptOfJobInline(AttemptColumns, _AttemptOfJobInlineBase):
    model = JobAttempt
    fields = ATTEMPT_FIELDS
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Job | None) -> bool:  # type: ignore[override]
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False


class LogOfJobInline(_LogOfJobInlineBase):
    """The request's log; only the last lines (see JobAdmin.get_formset_kwargs)."""

    model = JobLog
    fields = ("created_at", "level", "source", "message")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = f"log (the last {JOB_LOG_LINES_SHOWN} lines)"

    def has_add_permission(self, request: HttpRequest, obj: Job | None) -> bool:  # type: ignore[override]
        return False

    def has_change_permission(self, request: HttpRequest, obj: Job | None = None) -> bool:
        return False


@admin.register(Job)
class JobAdmin(OperableAdmin):
    class Media:
        css = {"all": ["dashboard/admin.css"]}

    """Requests are history: viewed, cancelled or requeued here, never edited, added or deleted."""

    list_display = (
        "id",
        "organization",
        "endpoint",
        "status_badge",
        "attempts",
        "gpu_ms",
        "created_at",
        "finished_at",
        "error_type",
    )
    list_filter = ("status", "gpu_class", "endpoint", "error_type")
    date_hierarchy = "created_at"
    search_fields = ("organization__name", "organization__slug")
    search_help_text = "A request id, API key id or organization id (whole), or part of an organization's name or slug."
    list_select_related = ("organization", "endpoint")
    # The table only grows: skip the second COUNT(*) over all of it on every filtered page.
    show_full_result_count = False
    fieldsets = (
        (None, {"fields": ("id", "organization", "api_key", "endpoint", "gpu_class", "status_badge", "created_at")}),
        ("Input", {"fields": ("input_json", "webhook_url", "idempotency_key")}),
        (
            "Execution",
            {
                "fields": (
                    "attempts",
                    "worker",
                    "progress",
                    "lease_expires_at",
                    "cancel_requested_at",
                    "dispatched_at",
                    "started_at",
                    "finished_at",
                )
            },
        ),
        ("Outcome", {"fields": ("error_type", "error", "gpu_ms", "cold_start_ms", "result_json", "outputs_expire_at")}),
    )
    readonly_fields = tuple(name for _, options in fieldsets for name in options["fields"] if isinstance(name, str))
    inlines = (AttemptOfJobInline, LogOfJobInline)
    actions = ("cancel_selected", "requeue_selected")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Job], search_term: str
    ) -> tuple[QuerySet[Job], bool]:
        # Ids are matched whole, through their indexes; a LIKE over the text of every id would scan the table.
        wanted = as_uuid(search_term)
        if wanted is not None:
            return queryset.filter(Q(pk=wanted) | Q(api_key_id=wanted) | Q(organization_id=wanted)), False
        return super().get_search_results(request, queryset, search_term)

    @admin.display(description="status", ordering="status")
    def status_badge(self, job: Job) -> SafeString:
        # Coloured by dashboard/admin.css (the admin's Content-Security-Policy refuses inline styles).
        return format_html('<span class="status-badge status-{}">{}</span>', job.status.lower(), job.status)

    @admin.display(description="attempt", ordering="attempt")
    def attempts(self, job: Job) -> str:
        return f"{job.attempt}/{job.max_attempts}"

    @admin.display(description="progress")
    def progress(self, job: Job) -> str:
        return f"step {job.progress_step} of {job.progress_total}" if job.progress_total else "-"

    @admin.display(description="input")
    def input_json(self, job: Job) -> SafeString:
        return pretty_json(job.input)

    @admin.display(description="result")
    def result_json(self, job: Job) -> SafeString | str:
        return "-" if job.result is None else pretty_json(job.result)

    def get_formset_kwargs(self, request: HttpRequest, obj: Job, inline: Any, prefix: str) -> dict[str, Any]:
        kwargs: dict[str, Any] = super().get_formset_kwargs(request, obj, inline, prefix)
        if isinstance(inline, LogOfJobInline):
            # The formset filters its queryset by job, which a sliced queryset refuses: slice in a subquery.
            last_lines = JobLog.objects.filter(job=obj).order_by("-id").values("pk")[:JOB_LOG_LINES_SHOWN]
            kwargs["queryset"] = JobLog.objects.filter(pk__in=Subquery(last_lines)).order_by("id")
        return kwargs

    @admin.action(description="Cancel selected requests", permissions=["operate"])
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        actor = request_actor(request)
        outcomes = {"CANCELLATION_REQUESTED": 0, "ALREADY_COMPLETED": 0}
        for job in queryset.select_related("organization", "endpoint"):
            with transaction.atomic():
                outcome = cancel_job(job=job)
                # A job cancelled before answers CANCELLATION_REQUESTED again: only this action's own cancel is audited.
                if outcome == "CANCELLATION_REQUESTED" and job.cancel_requested_at is None:
                    record_audit(
                        action=AuditAction.JOB_CANCELLED_BY_OPERATOR,
                        actor=actor,
                        organization=job.organization,
                        target=job,
                        metadata={"status_before": job.status, "endpoint": job.endpoint.endpoint_id},
                    )
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
        self.message_user(
            request,
            f"Cancellation requested for {outcomes['CANCELLATION_REQUESTED']} request(s); "
            f"{outcomes['ALREADY_COMPLETED']} had already completed.",
            messages.SUCCESS,
        )

    @admin.action(description="Requeue selected failed requests", permissions=["operate"])
    def requeue_selected(self, request: HttpRequest, queryset: QuerySet[Job]) -> None:
        actor = request_actor(request)
        operator = actor.user.email if actor.user is not None else "unknown"
        requeued = 0
        skipped: list[str] = []
        refused: list[str] = []
        for job in queryset.select_related("organization"):
            if job.status not in REQUEUEABLE_STATUSES:
                skipped.append(f"{job.pk} ({job.status})")
                continue
            try:
                requeued_now = self._requeue(job, actor=actor, operator=operator)
            except RequeueRefused as refusal:
                refused.append(f"{job.pk}: {refusal.detail} ({refusal.error_type})")
                continue
            if not requeued_now:
                skipped.append(f"{job.pk} (no longer failed or cancelled)")
                continue
            requeued += 1
        self.message_user(request, f"Requeued {requeued} request(s).", messages.SUCCESS)
        if skipped:
            self.message_user(
                request,
                f"Skipped {len(skipped)} request(s) that are not failed or cancelled: {', '.join(skipped)}.",
                messages.WARNING,
            )
        for reason in refused:
            self.message_user(request, f"Not requeued, refused by admission: {reason}", messages.ERROR)

    @staticmethod
    def _requeue(job: Job, *, actor: Actor, operator: str) -> bool:
        """Requeues one job and audits it, in one transaction; raises ``RequeueRefused`` with nothing changed."""
        with transaction.atomic():
            if not requeue_job(job=job, log_line=f"Requeued by operator {operator}."):
                return False
            record_audit(
                action=AuditAction.JOB_REQUEUED_BY_OPERATOR,
                actor=actor,
                organization=job.organization,
                target=job,
                metadata={
                    "status_before": job.status,
                    "error_type_before": job.error_type,
                    "attempt": job.attempt,
                    "max_attempts_before": job.max_attempts,
                },
            )
        return True


@admin.register(JobAttempt)
class JobAttemptAdmin(AttemptColumns, OperableAdmin):
    list_display = (
        "job",
        "number",
        "outcome",
        "worker",
        "gpu_ms",
        "cold_start_ms",
        "billable",
        "started_at",
        "finished_at",
    )
    list_filter = ("outcome",)
    search_fields = ("worker",)
    search_help_text = "A request id (whole), or part of a worker's name."
    list_select_related = ("job",)
    show_full_result_count = False
    fields = ("job", *ATTEMPT_FIELDS)
    readonly_fields = fields

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[JobAttempt], search_term: str
    ) -> tuple[QuerySet[JobAttempt], bool]:
        wanted = as_uuid(search_term)
        if wanted is not None:
            return queryset.filter(job_id=wanted), False
        return super().get_search_results(request, queryset, search_term)


# --- Webhooks -----------------------------------------------------------------------------------------------


class AttemptOfDeliveryInline(_AttemptOfDeliveryInlineBase):
    model = WebhookAttempt
    fields = ("number", "created_at", "status_code", "duration_ms", "error", "response_excerpt")
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "delivery attempts"

    def has_add_permission(self, request: HttpRequest, obj: WebhookDelivery | None) -> bool:  # type: ignore[override]
        return False

    def has_change_permission(self, request: HttpRequest, obj: WebhookDelivery | None = None) -> bool:
        return False


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(OperableAdmin):
    list_display = ("job", "event_type", "url", "status", "attempts", "next_attempt_at", "delivered_at", "created_at")
    list_filter = ("status", "event_type")
    search_fields = ("url",)
    search_help_text = "A request id (whole), or part of the URL."
    list_select_related = ("job",)
    show_full_result_count = False
    fields = (
        "job",
        "organization",
        "event_type",
        "payload",
        "url",
        "status",
        "message_id",
        "attempts",
        "next_attempt_at",
        "created_at",
        "delivered_at",
    )
    readonly_fields = fields
    inlines = (AttemptOfDeliveryInline,)
    actions = ("retry_now",)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[WebhookDelivery], search_term: str
    ) -> tuple[QuerySet[WebhookDelivery], bool]:
        wanted = as_uuid(search_term)
        if wanted is not None:
            return queryset.filter(job_id=wanted), False
        return super().get_search_results(request, queryset, search_term)

    @admin.action(description="Retry now", permissions=["operate"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[WebhookDelivery]) -> None:
        due = list(
            queryset.filter(status__in=(WebhookStatus.PENDING, WebhookStatus.FAILED)).values_list("pk", flat=True)
        )
        # Due now, so the periodic sweep sends them even if the broker loses the messages queued below. A failed
        # one whose retry window is over gets this one try: if it fails again, it is failed again.
        retrying = WebhookDelivery.objects.filter(
            pk__in=due, status__in=(WebhookStatus.PENDING, WebhookStatus.FAILED)
        ).update(status=WebhookStatus.PENDING, next_attempt_at=timezone.now())
        transaction.on_commit(lambda: [enqueue_delivery(delivery_id) for delivery_id in due])
        skipped = queryset.count() - retrying
        note = f" ({skipped} already delivered)" if skipped else ""
        self.message_user(request, f"{retrying} webhook(s) will be retried now{note}.", messages.SUCCESS)


# --- Tenant settings ----------------------------------------------------------------------------------------


def masked_secret(secret: str) -> str:
    """Only the last four characters, enough to tell two secrets apart."""
    if len(secret) <= 4:
        return "•" * len(secret)
    return "•" * 8 + secret[-4:]


@admin.register(TenantSettings)
class TenantSettingsAdmin(_TenantSettingsAdminBase):
    """Retention is edited here; the webhook secret is only hinted at (made here or by the webhook services)."""

    list_display = ("organization", "output_retention_seconds", "secret", "created_at")
    search_fields = ("organization__name", "organization__slug")
    list_select_related = ("organization",)
    autocomplete_fields = ("organization",)
    # Listed explicitly so that the secret itself can never appear, whatever is added to the model later.
    fields = ("organization", "output_retention_seconds", "secret", "created_at")

    def get_readonly_fields(self, request: HttpRequest, obj: TenantSettings | None = None) -> tuple[str, ...]:
        # Settings stay with their organization: moving them would hand one tenant's signing secret to another.
        return ("secret", "created_at") if obj is None else ("organization", "secret", "created_at")

    @admin.display(description="webhook secret")
    def secret(self, tenant_settings: TenantSettings) -> str:
        return masked_secret(tenant_settings.webhook_secret) if tenant_settings.pk else "(made when saved)"

    def has_delete_permission(self, request: HttpRequest, obj: TenantSettings | None = None) -> bool:
        # Deleting would silently replace the secret that the tenant's receivers verify signatures with.
        return False

    def save_model(self, request: HttpRequest, obj: TenantSettings, form: Any, change: Any) -> None:
        if not change:
            obj.webhook_secret = new_webhook_secret()
            obj.save()
            return
        # Only the edited column: a full save would write back a secret read before a concurrent rotation.
        if form.changed_data:
            obj.save(update_fields=form.changed_data)
