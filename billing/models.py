"""Money: rate cards, the usage ledger, prepaid credits, holds, payments, the Stripe inbox.

Amounts are integers in micro-dollars (1 USD = 1,000,000 micros), cents only at the Stripe
boundary (``billing.money``). Ledgers are append-only: a mistake is corrected by a new entry.
"""

from __future__ import annotations

import uuid
from datetime import UTC
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import F, Q, Sum
from django.utils import timezone

from accounts import key_cache
from accounts.models import ApiKey, Organization
from inference.models import END_USER_MAX_LENGTH, Endpoint, GpuClass, Job

NO_KEY = uuid.UUID(int=0)  # usage without an API key (dashboard runs) rolls up under this id


class PriceUnit(models.TextChoices):
    GPU_SECOND = "gpu_second", "GPU second"
    IMAGE = "image", "Image"
    MEGAPIXEL = "megapixel", "Megapixel"
    VIDEO = "video", "Video"
    VIDEO_SECOND = "video_second", "Second of video"
    AUDIO_SECOND = "audio_second", "Second of audio"


# Per-output units: billed on what was delivered, held whole at admission (no per-step reservation).
OUTPUT_UNITS = (PriceUnit.IMAGE, PriceUnit.MEGAPIXEL, PriceUnit.VIDEO, PriceUnit.VIDEO_SECOND, PriceUnit.AUDIO_SECOND)
# Units a resolution tier can price: outputs with a width and a height.
TIERED_UNITS = (PriceUnit.IMAGE, PriceUnit.MEGAPIXEL, PriceUnit.VIDEO, PriceUnit.VIDEO_SECOND)
MAX_TIERS = 16


def tiers_problem(tiers: Any, unit: str) -> str | None:
    """Why ``tiers`` is not a valid ``Price.resolution_tiers`` for ``unit`` (None: it is)."""
    if tiers in (None, []):
        return None
    if unit not in TIERED_UNITS:
        return f"Resolution tiers price outputs with a size: {', '.join(TIERED_UNITS)}, not {unit}."
    if not isinstance(tiers, list) or len(tiers) > MAX_TIERS:
        return f"Give a list of at most {MAX_TIERS} tiers."
    sides = []
    for tier in tiers:
        if not isinstance(tier, dict) or set(tier) != {"max_short_side", "unit_price_micros"}:
            return 'Each tier is {"max_short_side": pixels, "unit_price_micros": price}.'
        values = (tier["max_short_side"], tier["unit_price_micros"])
        if any(isinstance(value, bool) or not isinstance(value, int) or value < 0 for value in values):
            return "A tier's side and price are whole numbers, not negative."
        if not 1 <= tier["max_short_side"] <= 100_000 or tier["unit_price_micros"] > 10**15:
            return "A tier's side is 1 to 100,000 pixels and its price at most 10^15 micro-dollars."
        sides.append(tier["max_short_side"])
    if sides != sorted(set(sides)):
        return "Tiers go from the smallest side up, each side once."
    return None


class PriceQuerySet(models.QuerySet["Price"]):
    def update(self, **kwargs: Any) -> int:
        """A bulk change sends no ``post_save``: it announces itself to the processes that keep prices."""
        changed = super().update(**kwargs)
        if changed:
            key_cache.forget_all()
        return changed

    def in_force(self, at: Any) -> PriceQuerySet:
        return self.filter(effective_from__lte=at)


class Price(models.Model):
    """One version of a rate card line. Rows are never edited once in force: a new price is a new row.

    A line applies to every endpoint of a GPU class, or to one endpoint (an override, which wins over its class), or
    to one endpoint for one organization (a negotiated price, which wins over both for that organization and is
    shown to no other). The price of a job is the newest line in force, of the most specific kind, when it started.
    """

    gpu_class = models.CharField(max_length=16, choices=GpuClass.choices, blank=True)
    endpoint = models.ForeignKey(Endpoint, null=True, blank=True, on_delete=models.PROTECT, related_name="prices")
    organization = models.ForeignKey(
        Organization,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="A negotiated price: applies to this organization's requests of the endpoint only.",
    )
    unit = models.CharField(max_length=16, choices=PriceUnit.choices, default=PriceUnit.GPU_SECOND)
    unit_price_micros = models.PositiveBigIntegerField(
        help_text="Micro-dollars per GPU-second, per image, per megapixel, per video or per second of video or audio "
        "(1,000,000 = $1); outputs larger than every resolution tier pay this."
    )
    resolution_tiers = models.JSONField(
        default=list,
        blank=True,
        help_text='Per-output prices by resolution: [{"max_short_side": 480, "unit_price_micros": 20000}, ...], '
        "smallest first; an output whose shorter side is at most a tier's pays the first such tier's price.",
    )
    effective_from = models.DateTimeField(default=timezone.now, db_index=True)
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    objects = PriceQuerySet.as_manager()

    class Meta:
        ordering = ("-effective_from", "-id")
        constraints = [
            models.CheckConstraint(
                condition=(Q(endpoint__isnull=True) & ~Q(gpu_class="")) | (Q(endpoint__isnull=False) & Q(gpu_class="")),
                name="price_for_class_or_endpoint",
            ),
            models.CheckConstraint(
                condition=Q(endpoint__isnull=False) | Q(unit="gpu_second"),
                name="price_class_lines_per_second",
            ),
            models.CheckConstraint(
                condition=Q(organization__isnull=True) | Q(endpoint__isnull=False),
                name="price_negotiated_per_endpoint",
            ),
        ]
        indexes = [
            models.Index(fields=["gpu_class", "effective_from"]),
            models.Index(fields=["endpoint", "effective_from"]),
        ]

    def __str__(self) -> str:
        target = self.endpoint.endpoint_id if self.endpoint_id and self.endpoint else self.gpu_class
        if self.organization_id:
            target = f"{target} for {self.organization_id}"
        return f"{target}: {self.unit_price_micros} µ$/{self.unit} from {self.effective_from:%Y-%m-%d %H:%M}"

    def clean(self) -> None:
        if bool(self.endpoint_id) == bool(self.gpu_class):
            raise ValidationError("A price applies either to a GPU class or to one endpoint, not both.")
        if not self.endpoint_id and self.unit != PriceUnit.GPU_SECOND:
            raise ValidationError({"unit": "A GPU class is priced per GPU-second; bill by output per endpoint."})
        if self.organization_id and not self.endpoint_id:
            raise ValidationError({"organization": "A negotiated price names the endpoint it applies to."})
        if (problem := tiers_problem(self.resolution_tiers, self.unit)) is not None:
            raise ValidationError({"resolution_tiers": problem})

    def unit_price_for(self, short_side: int) -> int:
        """The price of one unit of an output whose shorter side is ``short_side`` pixels (0: no size, the line's)."""
        if short_side:
            for tier in self.resolution_tiers or ():
                if short_side <= tier["max_short_side"]:
                    return int(tier["unit_price_micros"])
        return self.unit_price_micros


class Account(models.Model):
    """The organization's billing side: its cached balance and holds, limits, Stripe ids, top-up settings.

    ``balance_micros`` is the sum of the organization's credit entries and ``held_micros`` the sum of
    its open holds, both written in the same transaction as the rows they summarise, under this row's lock.
    """

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="billing_account"
    )
    balance_micros = models.BigIntegerField(default=0)
    held_micros = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3, default="usd")
    monthly_budget_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Spend allowed per calendar month (UTC); empty for no budget."
    )
    stripe_customer_id = models.CharField(max_length=255, blank=True, db_index=True)
    default_payment_method_id = models.CharField(max_length=255, blank=True)
    stripe_customers_deleted = models.PositiveIntegerField(
        default=0,
        help_text="How many of the organization's Stripe customers were deleted at Stripe (billing.cards): the next "
        "one is made under an idempotency key of its own, not the deleted one's.",
    )
    auto_top_up_enabled = models.BooleanField(default=False)
    auto_top_up_threshold_micros = models.PositiveBigIntegerField(
        default=5_000_000, help_text="Top up when the available balance falls below this."
    )
    auto_top_up_amount_cents = models.PositiveIntegerField(
        default=2_000, validators=[MinValueValidator(500)], help_text="How much each top-up buys, in cents."
    )
    alerts_armed = models.BooleanField(
        default=False,
        help_text="A budget, a key's limit or a credit floor was set once: settlements look for spend alerts "
        "(billing.alerts). Read back by the settlement's debit, so an organization with nothing to watch pays "
        "nothing for them.",
    )
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("organization__name",)

    def __str__(self) -> str:
        return f"Billing account of {self.organization}"

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.held_micros


class KeySpendLimit(models.Model):
    """A monthly spending cap on one API key (UTC calendar month)."""

    api_key = models.OneToOneField(ApiKey, primary_key=True, on_delete=models.CASCADE, related_name="spend_limit")
    monthly_limit_micros = models.PositiveBigIntegerField()
    updated_at = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.api_key_id}: {self.monthly_limit_micros} µ$/month"


class MemberSpendLimit(models.Model):
    """A monthly spending cap on one member of an organization (UTC calendar month), shared by every API key the member
    made there (``ApiKey.created_by``; a key made through the API by a key is its maker's), keys made later included.

    Set by a member who may manage billing (``billing.controls.set_member_limit``), so a developer limited here cannot
    escape it by making a new key. The member's spend is that of their keys, from the rollups, which keep spend per
    key: a deleted key's rollups keep its id but no key row says whose it was, so its spend leaves the member's (it
    stays in the organization's, which its budget counts). Kept when the member leaves the organization (their keys
    stop authenticating then; should they come back, so does the limit); deleted with the person.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    monthly_limit_micros = models.PositiveBigIntegerField()
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("organization", "user")
        constraints = [models.UniqueConstraint(fields=["organization", "user"], name="member_limit_unique")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.organization_id}: {self.monthly_limit_micros} µ$/month"


class EndUserLimit(models.Model):
    """A monthly spending cap on one end user tag of an organization (UTC calendar month), like a key's."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    end_user = models.CharField(max_length=END_USER_MAX_LENGTH)
    monthly_limit_micros = models.PositiveBigIntegerField()
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ("organization", "end_user")
        constraints = [models.UniqueConstraint(fields=["organization", "end_user"], name="end_user_limit_unique")]

    def __str__(self) -> str:
        return f"{self.end_user}: {self.monthly_limit_micros} µ$/month"


class UsageRecord(models.Model):
    """What one closed attempt of a job used: exactly one row per attempt, billable or not.

    Unbilled attempts (the platform's fault), cold starts and the attempt's part of its batch's wasted time
    (``JobAttempt.wasted_ms``) are kept as ``unbilled_gpu_ms`` at zero cost, so the margin is honest. Written in
    the transaction that closes the attempt.
    """

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    job = models.ForeignKey(Job, on_delete=models.PROTECT, related_name="usage_records")
    attempt_number = models.PositiveIntegerField()
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="+")
    end_user = models.CharField(max_length=END_USER_MAX_LENGTH, blank=True, default="", help_text="The job's tag.")
    gpu_class = models.CharField(max_length=16, choices=GpuClass.choices)
    outcome = models.CharField(max_length=16)
    billable = models.BooleanField()
    gpu_ms = models.PositiveBigIntegerField(help_text="Billed GPU time (0 when the attempt is not billable).")
    unbilled_gpu_ms = models.PositiveBigIntegerField(
        help_text="GPU time not billed: the cold start, the attempt's part of its batch's waste (JobAttempt.wasted_ms: "
        "rows of a request that left, a decode cut short and done again), all GPU time of an unbilled attempt, and "
        "what the job's hold or the balance did not cover."
    )
    price = models.ForeignKey(Price, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    unit = models.CharField(max_length=16, choices=PriceUnit.choices)
    billable_units = models.DecimalField(max_digits=20, decimal_places=6)
    unit_price_micros = models.PositiveBigIntegerField(help_text="The price billed: the line's, or its tier's.")
    cost_micros = models.PositiveBigIntegerField()
    work_units = models.PositiveBigIntegerField(default=0, help_text="Steps x outputs x size: the basis of estimates.")
    # Seconds of video and of audio delivered, to the millisecond: what a price per second of output bills (cut to
    # what the hold covered, if a measurement ever outran it); recorded whatever the price's unit.
    video_ms = models.PositiveBigIntegerField(default=0, help_text="Seconds of video delivered and billed, in ms.")
    audio_ms = models.PositiveBigIntegerField(default=0, help_text="Seconds of audio delivered and billed, in ms.")
    started_at = models.DateTimeField()
    recorded_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ("-recorded_at", "-id")
        constraints = [
            # On PostgreSQL this constraint lives on UsageRecordKey's table (migration 0013, billing/partitions.py):
            # a partitioned table cannot hold it. Django's state keeps it here, so SQLite's plain table has it; a
            # migration that alters it must do so by hand on PostgreSQL.
            models.UniqueConstraint(fields=["job", "attempt_number"], name="usage_one_record_per_attempt"),
            models.CheckConstraint(condition=Q(billable=True) | Q(cost_micros=0), name="usage_unbilled_costs_nothing"),
        ]
        indexes = [models.Index(fields=["organization", "recorded_at"])]

    def __str__(self) -> str:
        return f"{self.job_id} #{self.attempt_number}: {self.cost_micros} µ$"


class UsageRecordKey(models.Model):
    """The identity of a usage record where its table is partitioned by month (PostgreSQL): one row per record.

    PostgreSQL enforces a partitioned table's unique constraints only when they include the partition key, so the
    guarantees that span months live on this narrow, unpartitioned table: its primary key is the record's id (which
    a debit's ``CreditEntry.usage_record`` references) and the database's unique constraint
    ``usage_one_record_per_attempt`` is on ``(job_id, attempt_number)`` here. A trigger on the usage records writes
    the row in the record's own INSERT and removes it with the record; nothing in Python writes it. On SQLite the
    usage records are one plain table with those constraints, and this table is not created (``billing.partitions``).
    """

    id = models.BigIntegerField(primary_key=True, help_text="The usage record's id.")
    job_id = models.UUIDField()
    attempt_number = models.PositiveIntegerField()

    class Meta:
        db_table = "billing_usagerecordkey"

    def __str__(self) -> str:
        return f"{self.job_id} #{self.attempt_number}"


class Granularity(models.TextChoices):
    HOUR = "hour", "Hour"
    DAY = "day", "Day"


REFUNDED_HELP = "What was given back of this row's cost by refunds of the requests (billing.ledger.refund_job)."


def net_spend() -> Sum:
    """The spend that budgets, keys' and end users' limits and their alerts count of rollup rows: what they cost less
    what was refunded of it (``refunded_micros``, never more than ``cost_micros`` on a row)."""
    return Sum(F("cost_micros") - F("refunded_micros"), output_field=models.BigIntegerField())


class UsageRollup(models.Model):
    """Usage summed per hour and per day (UTC), organization, endpoint, key and GPU class.

    Maintained by an upsert in the transaction that writes each usage record, so pages and
    admission read these instead of scanning raw usage. ``cost_micros`` is what the usage cost, as its records say;
    ``refunded_micros`` what refunds of those records gave back, added by the refund to the rows the records were
    added to (``billing.metering.count_as_refunded``), so a limit counts ``net_spend()`` in the month the usage was
    recorded in.
    """

    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    bucket_start = models.DateTimeField()
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="+")
    key_id = models.UUIDField(default=NO_KEY, help_text="The API key, or all zeros for usage without a key.")
    gpu_class = models.CharField(max_length=16, choices=GpuClass.choices)
    attempts = models.PositiveBigIntegerField(default=0)
    billable_attempts = models.PositiveBigIntegerField(default=0)
    gpu_ms = models.PositiveBigIntegerField(default=0)
    unbilled_gpu_ms = models.PositiveBigIntegerField(default=0)
    cost_micros = models.PositiveBigIntegerField(default=0)
    # A default in the database too: the settlements' upserts (billing.metering) name only the columns they add to.
    # Signed, with no CHECK: added to a large table with a constant default, the column is then written into the
    # catalogue alone on PostgreSQL, where a CHECK would be validated by a scan under the table's exclusive lock
    # (every settlement upserts these rows). Only refunds add to it, and only what a row's cost holds.
    refunded_micros = models.BigIntegerField(default=0, db_default=0, help_text=REFUNDED_HELP)
    work_units = models.PositiveBigIntegerField(default=0)
    video_ms = models.PositiveBigIntegerField(default=0)
    audio_ms = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ("-bucket_start",)
        # The operators' run-rate page (``dashboard.operator``), drawn from these rows: the platform's revenue and
        # each organization's. Its own permission, not staff status, which an operator who may change people can
        # give anyone.
        permissions = [("view_revenue", "Can see the revenue run-rate page")]
        constraints = [
            models.UniqueConstraint(
                fields=["granularity", "bucket_start", "organization", "endpoint", "key_id", "gpu_class"],
                name="rollup_one_row_per_bucket",
            )
        ]
        indexes = [
            models.Index(fields=["organization", "granularity", "bucket_start"]),
            models.Index(fields=["granularity", "bucket_start"]),
            models.Index(fields=["key_id", "granularity", "bucket_start"]),
        ]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket_start:%Y-%m-%d %H:00} {self.organization_id}"


class EndUserRollup(models.Model):
    """Usage of tagged requests summed per UTC day, organization, end user tag and endpoint.

    Apart from ``UsageRollup``, so a reseller's many tags never multiply the rows a budget check sums. Upserted with
    the usage rollups by the settlement of each tagged attempt; an end user's limit reads its month from here
    (``net_spend()``: a refund gives back to the tag's day row as to the usage rollups).
    """

    bucket_start = models.DateTimeField(help_text="The UTC day.")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    end_user = models.CharField(max_length=END_USER_MAX_LENGTH)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="+")
    attempts = models.PositiveBigIntegerField(default=0)
    billable_attempts = models.PositiveBigIntegerField(default=0)
    gpu_ms = models.PositiveBigIntegerField(default=0)
    unbilled_gpu_ms = models.PositiveBigIntegerField(default=0)
    cost_micros = models.PositiveBigIntegerField(default=0)
    refunded_micros = models.BigIntegerField(default=0, db_default=0, help_text=REFUNDED_HELP)  # as UsageRollup's
    work_units = models.PositiveBigIntegerField(default=0)
    video_ms = models.PositiveBigIntegerField(default=0, help_text="Seconds of video delivered, in ms.")
    audio_ms = models.PositiveBigIntegerField(default=0, help_text="Seconds of audio delivered, in ms.")

    class Meta:
        ordering = ("-bucket_start",)
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "end_user", "bucket_start", "endpoint"], name="end_user_rollup_one_row"
            )
        ]
        indexes = [models.Index(fields=["organization", "bucket_start"], name="end_user_rollup_org_day")]

    def __str__(self) -> str:
        return f"{self.bucket_start:%Y-%m-%d} {self.organization_id} {self.end_user}"


class Hold(models.Model):
    """Credits set aside for a job from admission until it finishes (then released; usage is debited)."""

    job = models.OneToOneField(Job, primary_key=True, on_delete=models.CASCADE, related_name="credit_hold")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    end_user = models.CharField(max_length=END_USER_MAX_LENGTH, blank=True, default="", help_text="The job's tag.")
    amount_micros = models.PositiveBigIntegerField()
    unit_price_micros = models.PositiveBigIntegerField(help_text="The price at admission, for heartbeat checks.")
    unit = models.CharField(max_length=16, choices=PriceUnit.choices)
    created_at = models.DateTimeField(default=timezone.now)
    released_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization"], condition=Q(released_at__isnull=True), name="hold_open"),
            # What an end user's running requests hold, against the tag's monthly limit.
            models.Index(
                fields=["organization", "end_user"],
                condition=Q(released_at__isnull=True) & ~Q(end_user=""),
                name="hold_open_end_user",
            ),
            # Holds placed (or placed again, on a requeue) since the last proven reconciliation: one per job.
            models.Index(fields=["created_at"], name="hold_created"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id}: {self.amount_micros} µ$"


class PaymentKind(models.TextChoices):
    PURCHASE = "purchase", "Purchase"
    AUTO_TOP_UP = "auto_top_up", "Auto top-up"


class PaymentStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELED = "canceled", "Canceled"


class Payment(models.Model):
    """Money a customer paid (or is paying) us through Stripe for credits.

    Created before Stripe is called, so the Stripe idempotency key (``payment-<id>``) is ours.
    """

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(max_length=16, choices=PaymentKind.choices)
    status = models.CharField(max_length=16, choices=PaymentStatus.choices, default=PaymentStatus.PENDING)
    amount_cents = models.PositiveIntegerField()
    currency = models.CharField(max_length=3, default="usd")
    amount_refunded_cents = models.PositiveIntegerField(default=0)
    amount_disputed_cents = models.PositiveIntegerField(default=0)
    stripe_payment_intent_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    stripe_checkout_session_id = models.CharField(max_length=255, null=True, blank=True, unique=True)
    failure_message = models.CharField(max_length=500, blank=True)
    # What the first request to Stripe named, so that a re-send is the identical request (Stripe answers a reused
    # idempotency key with other parameters by refusing it): the customer, and the card (empty for Checkout).
    stripe_customer_id = models.CharField(max_length=255, blank=True)
    stripe_payment_method_id = models.CharField(max_length=255, blank=True)
    # A purchase's Idempotency-Key from the client, and a digest of what that request asked for. NULL, not "":
    # purchases without a key must not collide in the unique constraint.
    client_idempotency_key = models.CharField(max_length=255, null=True, blank=True)  # noqa: DJ001
    request_fingerprint = models.CharField(max_length=64, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    succeeded_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            # Auto top-ups are created under the account's lock; this makes a second pending one impossible.
            models.UniqueConstraint(
                fields=["organization"],
                condition=Q(kind="auto_top_up", status="pending"),
                name="payment_one_pending_top_up",
            ),
            # A client's retry of a purchase finds the payment its first try made, never a second one.
            models.UniqueConstraint(
                fields=["organization", "client_idempotency_key"],
                condition=Q(client_idempotency_key__isnull=False),
                name="payment_client_idempotency_key_unique",
            ),
        ]
        indexes = [
            models.Index(fields=["created_at"], condition=Q(status="pending"), name="payment_pending"),
            # Payments made or paid since the last proven reconciliation; created_at also serves the Stripe comparison.
            models.Index(fields=["created_at"], name="payment_created"),
            models.Index(fields=["succeeded_at"], name="payment_succeeded"),
        ]

    def __str__(self) -> str:
        return f"payment-{self.pk} {self.amount_cents}¢ {self.status}"

    @property
    def idempotency_key(self) -> str:
        return f"payment-{self.pk}"


class EntryKind(models.TextChoices):
    PURCHASE = "purchase", "Purchase"
    AUTO_TOP_UP = "auto_top_up", "Auto top-up"
    GRANT = "grant", "Grant"
    USAGE = "usage", "Usage"
    REFUND = "refund", "Refund"
    DISPUTE = "dispute", "Dispute"
    ADJUSTMENT = "adjustment", "Adjustment"


class CreditEntry(models.Model):
    """One movement of prepaid credit. Append-only; the balance is the sum of an organization's entries.

    ``idempotency_key`` is derived from our own rows (``usage-<record id>``, ``payment-<id>``,
    ``refund-<stripe id>``, ...), so the same movement can never be posted twice.
    """

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(max_length=16, choices=EntryKind.choices)
    amount_micros = models.BigIntegerField(help_text="Positive adds credit, negative spends it.")
    balance_after_micros = models.BigIntegerField()
    idempotency_key = models.CharField(max_length=200, unique=True)
    usage_record = models.OneToOneField(
        UsageRecord, null=True, blank=True, on_delete=models.PROTECT, related_name="credit_entry"
    )
    payment = models.ForeignKey(Payment, null=True, blank=True, on_delete=models.PROTECT, related_name="entries")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    description = models.CharField(max_length=300, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ("-id",)
        verbose_name_plural = "credit entries"
        indexes = [
            models.Index(fields=["organization", "-id"]),
            # A balance before a moment (statements, their reconciliation): the entries stamped around it, one range.
            models.Index(fields=["organization", "created_at"], name="credit_entry_stamped"),
            # The entries that added credit, newest first: the period of a low-credit alert is the last that left the
            # balance at or above the floor (billing.alerts.credit_period), one index range.
            models.Index(fields=["organization", "-id"], condition=Q(amount_micros__gt=0), name="credit_entry_added"),
            # Request refunds by day, which the revenue metrics net against usage; a few rows among millions.
            models.Index(
                fields=["created_at"], condition=Q(kind="refund", job__isnull=False), name="credit_entry_job_refunds"
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=~Q(amount_micros=0), name="credit_entry_moves_something"),
            models.CheckConstraint(
                condition=~Q(kind="usage") | Q(usage_record__isnull=False), name="credit_usage_has_record"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount_micros:+} µ$"


class StripeEventStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PROCESSED = "processed", "Processed"
    IGNORED = "ignored", "Ignored"
    FAILED = "failed", "Failed"


class StripeEvent(models.Model):
    """Every webhook event Stripe sent us, stored once (its id is unique) and processed off the request."""

    id = models.CharField(max_length=255, primary_key=True)
    type = models.CharField(max_length=100, db_index=True)
    payload = models.JSONField()
    livemode = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=StripeEventStatus.choices, default=StripeEventStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    error = models.TextField(blank=True)
    received_at = models.DateTimeField(default=timezone.now, db_index=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-received_at",)
        indexes = [
            # The inbox's backlog (pending, or failed and retried), a few rows among every event ever received: the
            # sweep's and /metrics' reads.
            models.Index(
                fields=["received_at"],
                condition=Q(status__in=["pending", "failed"]),
                name="stripe_event_unprocessed",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} {self.type} {self.status}"


class ReconciliationScope(models.TextChoices):
    FULL = "full", "Full"
    INCREMENTAL = "incremental", "Incremental"


class ReconciliationRunQuerySet(models.QuerySet["ReconciliationRun"]):
    def proven(self) -> ReconciliationRunQuerySet:
        """Runs whose database checks all ran and found nothing, newest watermark first."""
        return self.filter(watermark__isnull=False).order_by("-watermark")


class ReconciliationRun(models.Model):
    """One proof of the books: what was checked and every drift found (expected: none).

    A full run checks every row; an incremental one the rows written from ``since`` on (``billing.reconciliation``).
    """

    started_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)
    ok = models.BooleanField(default=False)
    scope = models.CharField(max_length=16, choices=ReconciliationScope.choices, default=ReconciliationScope.FULL)
    since = models.DateTimeField(
        null=True, blank=True, help_text="Incremental: the rows written from this moment on were checked."
    )
    watermark = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set when every database check ran and found no drift: the books are proven up to this moment, "
        "and the next incremental run checks from here (less an overlap).",
    )
    checked = models.JSONField(default=dict, help_text="How many rows each check looked at.")
    drift = models.JSONField(default=list, help_text="Each discrepancy found.")

    objects = ReconciliationRunQuerySet.as_manager()

    class Meta:
        ordering = ("-started_at",)

    def __str__(self) -> str:
        return f"reconciliation {self.started_at:%Y-%m-%d %H:%M} {self.scope} {'ok' if self.ok else 'DRIFT'}"

    @property
    def coverage(self) -> str:
        """What the run looked at, in words (the admin and the run-rate page show it)."""
        if self.scope == ReconciliationScope.INCREMENTAL and self.since is not None:
            return f"incremental: rows written since {self.since.astimezone(UTC):%Y-%m-%d %H:%M} UTC"
        return "full: every row"


class BillingDetails(models.Model):
    """Who the organization's receipts and statements are made out to. Each document copies them when issued."""

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="billing_details"
    )
    legal_name = models.CharField(max_length=200, blank=True, help_text="Empty: the organization's name.")
    address = models.TextField(max_length=500, blank=True, help_text="As printed: street, city, postcode, country.")
    tax_id = models.CharField(max_length=64, blank=True, help_text="VAT number, EIN, ABN...: printed as written.")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "billing details"

    def __str__(self) -> str:
        return f"Billing details of {self.organization_id}"


class DocumentSeries(models.TextChoices):
    RECEIPT = "receipt", "Receipt"
    STATEMENT = "statement", "Statement"
    TEST_RECEIPT = "test_receipt", "Test-mode receipt"
    TEST_STATEMENT = "test_statement", "Test-mode statement"


class DocumentSequence(models.Model):
    """The last number an issuer gave in one series of documents (``billing.documents.allocate_number``).

    Incremented under this row's lock in the transaction that creates the document, so a number is used once
    a transaction commits and given again if it rolls back: the numbers of a series have no gaps.
    """

    issuer = models.CharField(max_length=32)
    series = models.CharField(max_length=16, choices=DocumentSeries.choices)
    last_number = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["issuer", "series"], name="document_sequence_unique")]

    def __str__(self) -> str:
        return f"{self.issuer} {self.series}: {self.last_number}"


class IssuedDocument(models.Model):
    """What receipts and statements share: a number of their issuer's series, and the billing details printed."""

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    issuer = models.CharField(max_length=32)
    series = models.CharField(max_length=16, choices=DocumentSeries.choices)
    sequence_number = models.PositiveBigIntegerField()
    number = models.CharField(max_length=64, unique=True, help_text="As printed, e.g. GM-R-000042.")
    test_mode = models.BooleanField(help_text="Made with Stripe's test mode or the fake Stripe: no real money.")
    billed_to_name = models.CharField(max_length=200)
    billed_to_address = models.TextField(blank=True)
    billed_to_tax_id = models.CharField(max_length=64, blank=True)
    issued_at = models.DateTimeField(default=timezone.now)

    class Meta:
        abstract = True


class Receipt(IssuedDocument):
    """Proof of one succeeded payment for credits (a purchase or an auto top-up); issued when it succeeds."""

    payment = models.OneToOneField(Payment, on_delete=models.PROTECT, related_name="receipt")
    kind = models.CharField(max_length=16, choices=PaymentKind.choices)
    amount_cents = models.PositiveIntegerField()
    currency = models.CharField(max_length=3)
    paid_at = models.DateTimeField()
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True)

    class Meta:
        ordering = ("-issued_at", "-id")
        constraints = [
            models.UniqueConstraint(fields=["issuer", "series", "sequence_number"], name="receipt_number_unique")
        ]
        indexes = [
            models.Index(fields=["organization", "-issued_at"], name="receipt_org_issued"),
            models.Index(fields=["issued_at"], name="receipt_issued"),  # reconciliation's window
        ]

    def __str__(self) -> str:
        return self.number


class Statement(IssuedDocument):
    """The statement of a closed UTC month with activity, with its figures as issued (``content``).

    ``opening_balance_micros`` and ``closing_balance_micros`` are the ledger's balances at the month's two ends and
    ``content["movements"]`` its entries summed by kind; reconciliation checks they still are.
    """

    month = models.DateField(help_text="The month's first day.")
    period_start = models.DateTimeField(help_text="The month's first instant (UTC).")
    period_end = models.DateTimeField(help_text="The next month's first instant (UTC): excluded.")
    opening_balance_micros = models.BigIntegerField()
    closing_balance_micros = models.BigIntegerField()
    content = models.JSONField(help_text="The statement as issued (billing.statements.monthly_statement).")

    class Meta:
        ordering = ("-month", "-id")
        constraints = [
            models.UniqueConstraint(fields=["organization", "month"], name="statement_one_per_month"),
            models.UniqueConstraint(fields=["issuer", "series", "sequence_number"], name="statement_number_unique"),
        ]
        indexes = [models.Index(fields=["month"], name="statement_month")]

    def __str__(self) -> str:
        return self.number


DEFAULT_THRESHOLDS = (50, 80, 100)


def default_thresholds() -> list[int]:
    return list(DEFAULT_THRESHOLDS)


class AlertSettings(models.Model):
    """When an organization is told about its spend (``billing.alerts``) and where its billing webhooks go."""

    organization = models.OneToOneField(
        Organization, primary_key=True, on_delete=models.CASCADE, related_name="alert_settings"
    )
    budget_thresholds = models.JSONField(
        default=default_thresholds, help_text="Percentages of the monthly budget that raise an alert."
    )
    key_thresholds = models.JSONField(
        default=default_thresholds,
        help_text="Percentages of each API key's and each member's monthly limit that raise an alert.",
    )
    credit_floor_micros = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="An alert when the available credit falls below this; empty: none."
    )
    webhook_url = models.URLField(max_length=2000, blank=True, help_text="Where billing.* events are POSTed.")
    updated_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "alert settings"

    def __str__(self) -> str:
        return f"Alert settings of {self.organization_id}"


class AlertScope(models.TextChoices):
    BUDGET = "budget", "Monthly budget"
    KEY = "key", "API key's monthly limit"
    MEMBER = "member", "Member's monthly limit"
    CREDITS = "credits", "Available credit"


class AlertEvent(models.TextChoices):
    THRESHOLD_REACHED = "billing.threshold_reached", "Threshold reached"
    BUDGET_EXHAUSTED = "billing.budget_exhausted", "Budget exhausted"
    CREDITS_LOW = "billing.credits_low", "Credits low"


class SpendAlert(models.Model):
    """One threshold an organization's spend reached in one period under one limit: the dashboard's notice, the email
    and the webhook.

    One row per (organization, scope, subject, threshold, period, limit_key_micros), by a unique constraint: whichever
    settlements see a threshold reached, however many at once, one inserts the row and only that one notifies.
    ``period`` is the UTC month (``2026-12``) of a budget or a key's limit, and for the credit floor the last entry
    that added credit and left the balance at or above the floor (``credit-<entry id>``,
    ``billing.alerts.credit_period``): low once each time the credit goes below the floor from the floor or above.
    ``limit_key_micros`` is the budget or the key's limit the threshold was reached under (0 for the credit floor):
    a limit changed in the month is told its own thresholds, once each, and a limit it goes back to is not told again.
    It is ``limit_micros`` made non-null, because NULLs never conflict in a unique constraint.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    scope = models.CharField(max_length=16, choices=AlertScope.choices)
    subject = models.CharField(
        max_length=64,
        blank=True,
        help_text="The API key's id for a key's limit, the member's user id for a member's; else empty.",
    )
    threshold = models.PositiveBigIntegerField(help_text="A percentage, or the credit floor in micro-dollars.")
    period = models.CharField(max_length=32)
    event_type = models.CharField(max_length=32, choices=AlertEvent.choices)
    spent_micros = models.BigIntegerField(help_text="Spent in the period when it was reached (0 for credits).")
    limit_micros = models.BigIntegerField(null=True, blank=True, help_text="The budget or the key's limit.")
    limit_key_micros = models.BigIntegerField(
        default=0, help_text="The budget or the key's limit the alert is once for; 0 for the credit floor."
    )
    available_micros = models.BigIntegerField(help_text="Available credit when it was reached.")
    created_at = models.DateTimeField(default=timezone.now)
    email_claimed_at = models.DateTimeField(null=True, blank=True)
    emailed_at = models.DateTimeField(null=True, blank=True)
    dismissed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ("-created_at", "-id")
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "scope", "subject", "threshold", "period", "limit_key_micros"],
                name="spend_alert_once_per_limit",
            )
        ]
        indexes = [
            models.Index(fields=["organization", "-created_at"], name="spend_alert_org_created"),
            models.Index(fields=["created_at"], condition=Q(emailed_at__isnull=True), name="spend_alert_unmailed"),
        ]

    def __str__(self) -> str:
        return f"{self.event_type} {self.scope} {self.threshold} {self.period}"
