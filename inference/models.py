"""The model registry (endpoints) and jobs with their attempts: the heart of metering.

The database row is the source of truth for a job (docs/lifecycle.md); a Celery message carries only ids.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone

from accounts import key_cache
from accounts.models import ApiKey, Organization, TenantModel
from inference.engine.profile import ProfileError, validate_profile


class PipelineKind(models.TextChoices):
    TEXT_TO_IMAGE = "text-to-image", "Text to image"
    IMAGE_TO_IMAGE = "image-to-image", "Image to image"
    TEXT_TO_VIDEO = "text-to-video", "Text to video"
    IMAGE_TO_VIDEO = "image-to-video", "Image to video"
    TEXT_TO_AUDIO = "text-to-audio", "Text to audio"


VIDEO_KINDS = (PipelineKind.TEXT_TO_VIDEO, PipelineKind.IMAGE_TO_VIDEO)
# Kinds that start from an input image (``image_url``).
IMAGE_INPUT_KINDS = (PipelineKind.IMAGE_TO_IMAGE, PipelineKind.IMAGE_TO_VIDEO)


class GpuClass(models.TextChoices):
    """Each class has its own Celery queue, served by workers with that hardware (docs/architecture.md)."""

    H100 = "gpu-h100", "NVIDIA H100"
    A10G = "gpu-a10g", "NVIDIA A10G"
    CPU = "cpu", "CPU"


# Sub-paths the API's routes take after ``owner/name``: no endpoint can be served under them.
RESERVED_PATHS = frozenset({"stream"})


class EndpointQuerySet(models.QuerySet["Endpoint"]):
    def update(self, **kwargs: Any) -> int:
        """A bulk change sends no ``post_save``: it announces itself to the processes that keep endpoints."""
        changed = super().update(**kwargs)
        if changed:
            key_cache.forget_all()
        return changed

    def active(self) -> EndpointQuerySet:
        return self.filter(is_active=True)

    def by_path(self, owner: str, name: str, path: str = "") -> Endpoint | None:
        return self.active().filter(owner=owner, name=name, path=path).first()


class Endpoint(models.Model):
    """A model served as an API: ``owner/name`` plus an optional sub-path (``/image-to-image``).

    Adding a model is a row here, not code: ``weights`` is ``builtin:<name>`` or a local diffusers folder.
    """

    owner = models.SlugField(max_length=64)
    name = models.SlugField(max_length=64)
    path = models.SlugField(max_length=64, blank=True, help_text="Sub-path, e.g. image-to-image; empty for the root.")
    title = models.CharField(max_length=120, blank=True)
    description = models.TextField(blank=True)
    kind = models.CharField(max_length=32, choices=PipelineKind.choices)
    weights = models.CharField(
        max_length=500, help_text="builtin:tiny-sd, or the path of a diffusers folder (model_index.json)."
    )
    gpu_class = models.CharField(max_length=16, choices=GpuClass.choices, default=GpuClass.CPU)
    is_active = models.BooleanField(default=True)

    # Parameter limits, enforced at submission (422 beyond them).
    max_width = models.PositiveIntegerField(default=1024, validators=[MinValueValidator(8)])
    max_height = models.PositiveIntegerField(default=1024, validators=[MinValueValidator(8)])
    max_steps = models.PositiveIntegerField(default=50, validators=[MinValueValidator(1)])
    max_images = models.PositiveIntegerField(default=4, validators=[MinValueValidator(1)])
    max_prompt_chars = models.PositiveIntegerField(default=2000, validators=[MinValueValidator(1)])
    max_input_image_bytes = models.PositiveIntegerField(default=8 * 1024 * 1024)
    # Video and audio: how long an output may be (width and height above bound a video's frames too).
    max_frames = models.PositiveIntegerField(default=121, validators=[MinValueValidator(1)])
    max_fps = models.PositiveIntegerField(default=30, validators=[MinValueValidator(1)])
    max_audio_seconds = models.PositiveIntegerField(
        default=47, validators=[MinValueValidator(1)], help_text="Text to audio: the longest clip (seconds_total)."
    )

    # Defaults for what a request leaves out.
    default_width = models.PositiveIntegerField(default=512)
    default_height = models.PositiveIntegerField(default=512)
    default_steps = models.PositiveIntegerField(default=25)
    default_guidance_scale = models.FloatField(default=7.5)
    default_strength = models.FloatField(default=0.75)
    default_num_frames = models.PositiveIntegerField(default=121, validators=[MinValueValidator(1)])
    default_fps = models.PositiveIntegerField(default=24, validators=[MinValueValidator(1)])
    default_audio_seconds = models.PositiveIntegerField(default=30, validators=[MinValueValidator(1)])

    optimization_profile = models.JSONField(
        default=dict, blank=True, help_text="Engine optimizations switched on for this endpoint."
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = EndpointQuerySet.as_manager()

    class Meta:
        ordering = ("owner", "name", "path")
        constraints = [models.UniqueConstraint(fields=["owner", "name", "path"], name="endpoint_unique_path")]

    def __str__(self) -> str:
        return self.endpoint_id

    def clean(self) -> None:
        super().clean()
        if self.path in RESERVED_PATHS:
            raise ValidationError({"path": f"{self.path!r} is a route of the API (.../{self.path}), not a sub-path."})
        try:
            validate_profile(self.optimization_profile)
        except ProfileError as exc:
            raise ValidationError({"optimization_profile": exc.problems}) from None
        beyond = {
            "default_num_frames": (self.default_num_frames, self.max_frames, "max_frames"),
            "default_fps": (self.default_fps, self.max_fps, "max_fps"),
            "default_audio_seconds": (self.default_audio_seconds, self.max_audio_seconds, "max_audio_seconds"),
        }
        problems = {
            field: f"The default is beyond this endpoint's {limit_name} ({limit})."
            for field, (default, limit, limit_name) in beyond.items()
            if default is not None and limit is not None and default > limit
        }
        if problems:
            raise ValidationError(problems)

    @property
    def app_id(self) -> str:
        return f"{self.owner}/{self.name}"

    @property
    def endpoint_id(self) -> str:
        return f"{self.app_id}/{self.path}" if self.path else self.app_id

    @property
    def makes(self) -> str:
        """What its outputs are: ``image``, ``video`` or ``audio``."""
        if self.kind in VIDEO_KINDS:
            return "video"
        return "audio" if self.kind == PipelineKind.TEXT_TO_AUDIO else "image"


class JobStatus(models.TextChoices):
    QUEUED = "QUEUED"
    DISPATCHED = "DISPATCHED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


ACTIVE_STATUSES = (JobStatus.DISPATCHED, JobStatus.RUNNING)
END_USER_MAX_LENGTH = 64
FINAL_STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class Job(TenantModel):
    """One request to a model. Its id is the public ``request_id``."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: every index below that starts with it serves a look by organization (and a deletion's
    # cascade), and each index more is written by every insert and status change of a job.
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+", db_index=False)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="jobs")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    gpu_class = models.CharField(max_length=16, choices=GpuClass.choices)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    input = models.JSONField()
    webhook_url = models.URLField(max_length=2000, blank=True)
    # Who the request is for, as the caller tags it (``X-Fal-End-User``): an end user or project of a customer who
    # resells the platform. Opaque to inference; billing groups and limits usage by it. Empty: untagged.
    end_user = models.CharField(max_length=END_USER_MAX_LENGTH, blank=True, default="")
    # The scheme and host the request was submitted to: the base of the output URLs in its webhook, as in the API's
    # own answers. Empty for a request made outside the HTTP API (PUBLIC_BASE_URL then).
    base_url = models.CharField(max_length=300, blank=True)
    # NULL, not "": requests without a key must not collide in the unique constraint.
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    request_fingerprint = models.CharField(max_length=64, blank=True)
    start_deadline = models.DateTimeField(
        null=True, blank=True, help_text="X-Fal-Request-Timeout: not started by then, it ends unbilled (timeout)."
    )

    attempt = models.PositiveIntegerField(default=0, help_text="The attempt now dispatched or running.")
    max_attempts = models.PositiveIntegerField(default=3)
    worker = models.CharField(max_length=200, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)

    progress_step = models.PositiveIntegerField(default=0)
    progress_total = models.PositiveIntegerField(default=0)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_type = models.CharField(max_length=64, blank=True)
    gpu_ms = models.PositiveBigIntegerField(default=0, help_text="Billable GPU time of the final attempt.")
    cold_start_ms = models.PositiveBigIntegerField(default=0)

    created_at = models.DateTimeField(default=timezone.now)
    dispatched_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True, help_text="When its message last went to the broker.")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    outputs_expire_at = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Past JOB_RETENTION_DAYS its input was cut to its settings (inference/archive.py).",
    )

    # Not stored: its queue position as its submission's own query read it, once dispatched (``inference.submission``),
    # for the submission's answer; None where the submission did not read it.
    position_when_submitted: int | None = None

    class Meta:
        ordering = ("-created_at",)
        indexes = [
            models.Index(fields=["organization", "status", "created_at"], name="job_org_status_created"),
            # By status first: the dispatched jobs in line per GPU class (queue positions, KEDA's scaler), and the
            # few jobs of a status the sweep looks at (dispatched ones not claimed, running ones whose lease lapsed).
            # Not on lease_expires_at or sent_at: a job's heartbeats and a message sent again change those alone, and
            # a change that no index reads is written in place on its page (a HOT update), no index entry at all.
            models.Index(fields=["status", "gpu_class", "dispatched_at"], name="job_status_class_dispatched"),
            models.Index(fields=["organization", "-created_at"], name="job_org_created"),
            models.Index(fields=["-created_at"], name="job_created"),
            # A reseller's requests of one end user (``/v1/requests?end_user=``): tagged jobs only.
            models.Index(
                fields=["organization", "end_user", "-created_at"], condition=~Q(end_user=""), name="job_org_end_user"
            ),
            # Jobs that ended since the last proven reconciliation (billing.reconciliation's incremental run).
            models.Index(fields=["finished_at"], name="job_finished"),
            # The retention task's look for ended jobs to archive, oldest first (inference/archive.py).
            models.Index(
                fields=["finished_at", "id"],
                condition=Q(archived_at__isnull=True, finished_at__isnull=False),
                name="job_to_archive",
            ),
            # The sweep's look for requests whose start deadline passed while they waited.
            models.Index(
                fields=["start_deadline"],
                condition=Q(start_deadline__isnull=False, status__in=["QUEUED", "DISPATCHED"]),
                name="job_waiting_deadline",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="job_idempotency_key_unique",
            )
        ]

    # Set on the job a worker claimed (``inference.attempts.claim_job``): another job of its endpoint and GPU class
    # was dispatched and not yet claimed then. Not a column.
    company_waiting: bool

    def __str__(self) -> str:
        return f"{self.id} {self.status}"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class AttemptOutcome(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # the request's own fault (bad input the model refused): billed
    ERRORED = "errored"  # the platform's fault (crash, out of memory): not billed
    CANCELLED = "cancelled"  # the customer cancelled it while running: billed for the time used
    LOST = "lost"  # the worker died (lease expired): not billed


BILLABLE_OUTCOMES = (AttemptOutcome.SUCCEEDED, AttemptOutcome.FAILED, AttemptOutcome.CANCELLED)

WASTED_MS_HELP = (
    "GPU time of its batch that did no request's work, recorded with it and never billed "
    "(inference.engine.batch_shares)."
)


class JobAttempt(models.Model):
    """One try of a job on a worker. GPU time is measured per attempt; billing reads it from here."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="attempts")
    number = models.PositiveIntegerField()
    worker = models.CharField(max_length=200, blank=True)
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING)
    gpu_ms = models.PositiveBigIntegerField(default=0)
    cold_start_ms = models.PositiveBigIntegerField(default=0)
    wasted_ms = models.BigIntegerField(db_default=0, default=0, help_text=WASTED_MS_HELP)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    heartbeat_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("job", "number")
        constraints = [models.UniqueConstraint(fields=["job", "number"], name="attempt_unique_number")]
        indexes = [
            # Attempts closed since the last proven reconciliation (billing.reconciliation's incremental run).
            models.Index(fields=["finished_at"], name="attempt_finished"),
            # The attempts running now, a handful among millions: reconciliation's final jobs with an open attempt.
            models.Index(fields=["job"], condition=Q(outcome="running"), name="attempt_running"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id} #{self.number} {self.outcome}"

    @property
    def billable(self) -> bool:
        return self.outcome in BILLABLE_OUTCOMES


class JobLog(models.Model):
    """What the request's ``logs`` show: lines from the worker while the job runs."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="logs")
    level = models.CharField(max_length=8, default="INFO")
    source = models.CharField(max_length=16, default="worker")
    message = models.TextField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("job", "id")

    def __str__(self) -> str:
        return f"{self.created_at:%H:%M:%S} {self.level} {self.message}"

    def as_fal(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "level": self.level,
            "source": self.source,
            "timestamp": self.created_at.isoformat(),
        }


class TenantSettings(models.Model):
    """An organization's inference settings: output retention and the secret its webhooks are signed with."""

    organization = models.OneToOneField(
        "accounts.Organization", on_delete=models.CASCADE, related_name="inference_settings"
    )
    output_retention_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="How long outputs are kept; empty: the platform default."
    )
    webhook_secret = models.CharField(max_length=100, help_text="Standard Webhooks secret, whsec_<base64>.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "tenant settings"

    def __str__(self) -> str:
        return f"settings of {self.organization_id}"


class ActiveJobCount(models.Model):
    """An organization's jobs that count against its concurrency limit (DISPATCHED or RUNNING), kept as the sum of a
    few rows so that a dispatch reads its count without counting the jobs (``inference.dispatch``).

    Kept by PostgreSQL's triggers on the jobs table (migration 0011): a job that becomes active adds one to shard 0,
    which only a dispatch writes in practice (and it holds the organization's lock); a job that stops being active,
    whichever way (finished, cancelled, requeued, put back, deleted), takes one from shard 1 + its backend's pid mod 16,
    so concurrent finishes of one organization rarely meet on a row. Every change is in the
    transaction of the job's own, so the sum is the count of the jobs as any snapshot sees them. SQLite (one writer,
    the embedded default) counts the jobs instead, and has no rows here.

    No foreign key: a job deleted with its organization takes one from a row of an organization that is going
    (nothing else reads it)."""

    organization_id = models.UUIDField()
    shard = models.SmallIntegerField()
    jobs = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization_id", "shard"], name="active_job_count_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id}/{self.shard}: {self.jobs}"


class WebhookStatus(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # gave up after the retry window


class WebhookDelivery(models.Model):
    """One webhook to deliver: its state and the next try (retries are driven from here).

    Either the webhook of one finished request (``job``: its body is built from the job when each try is sent), or
    an event of an organization (``organization``, ``event_type`` and the body itself in ``payload``), which the
    layers above send to a URL the organization set (billing's alerts): inference signs and retries both alike.
    """

    job = models.OneToOneField(Job, null=True, blank=True, on_delete=models.CASCADE, related_name="webhook")
    organization = models.ForeignKey(
        "accounts.Organization", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    event_type = models.CharField(max_length=64, blank=True, help_text="An event's type; empty for a request's.")
    payload = models.JSONField(null=True, blank=True, help_text="An event's body, as sent; null for a request's.")
    url = models.URLField(max_length=2000)
    status = models.CharField(max_length=16, choices=WebhookStatus.choices, default=WebhookStatus.PENDING)
    message_id = models.CharField(max_length=64, help_text="The webhook-id header: the same on every retry.")
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True, db_index=True)
    created_at = models.DateTimeField(default=timezone.now)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at",)
        verbose_name_plural = "webhook deliveries"
        constraints = [
            models.CheckConstraint(
                condition=(Q(job__isnull=False) & Q(organization__isnull=True) & Q(payload__isnull=True))
                | (Q(job__isnull=True) & Q(organization__isnull=False) & Q(payload__isnull=False) & ~Q(event_type="")),
                name="webhook_of_a_request_or_an_event",
            ),
            models.UniqueConstraint(
                fields=["message_id"], condition=Q(job__isnull=True), name="webhook_event_message_unique"
            ),
        ]

    def __str__(self) -> str:
        if self.job_id is None:
            return f"{self.event_type} to {self.organization_id} ({self.status})"
        return f"webhook of {self.job_id} ({self.status})"


class WebhookAttempt(models.Model):
    """One try at delivering a webhook: the delivery log a developer reads in the API."""

    delivery = models.ForeignKey(WebhookDelivery, on_delete=models.CASCADE, related_name="log")
    number = models.PositiveIntegerField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)
    response_excerpt = models.CharField(max_length=500, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("delivery", "number")
        constraints = [models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_unique_number")]

    def __str__(self) -> str:
        return f"#{self.number} {self.status_code or self.error}"


class UploadStatus(models.TextChoices):
    PENDING = "pending"  # initiated: its upload URL waits for the bytes
    READY = "ready"  # stored and checked: its URL serves it and is usable as an input
    EXPIRED = "expired"  # past its retention: its files are deleted


class Upload(TenantModel):
    """A file a client sent through fal's storage upload protocols (inference/uploads.py).

    Its id is the public part of its URL, ``/files/uploads/<id>/<file_name>``; the bytes live in the default
    storage as ``storage_name`` (``uploads/<org>/<id>/<file_name>``) and are purged with the outputs.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=UploadStatus.choices, default=UploadStatus.PENDING)
    file_name = models.CharField(max_length=120)
    content_type = models.CharField(max_length=100, help_text="As declared until the bytes arrive, then as read.")
    storage_name = models.CharField(max_length=500, blank=True)
    size = models.PositiveBigIntegerField(default=0)
    multipart = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField()

    class Meta:
        ordering = ("-created_at",)
        indexes = [models.Index(fields=["status", "expires_at"], name="upload_status_expires")]

    def __str__(self) -> str:
        return f"{self.id} {self.file_name} {self.status}"

    @property
    def folder(self) -> str:
        return f"uploads/{self.organization_id}/{self.id}"


class UploadPart(models.Model):
    """One part of a multipart upload, stored apart until the upload is completed."""

    upload = models.ForeignKey(Upload, on_delete=models.CASCADE, related_name="parts")
    number = models.PositiveIntegerField()
    size = models.PositiveBigIntegerField()
    etag = models.CharField(max_length=64)
    storage_name = models.CharField(max_length=500)

    class Meta:
        ordering = ("upload", "number")
        constraints = [models.UniqueConstraint(fields=["upload", "number"], name="upload_part_unique_number")]

    def __str__(self) -> str:
        return f"{self.upload_id} part {self.number}"
