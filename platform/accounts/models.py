"""Users, organizations (tenants), memberships, API keys and the audit log."""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING, Any, ClassVar

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser, BaseUserManager
from django.contrib.auth.models import PermissionsMixin
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import OuterRef, Q, Subquery
from django.db.models.functions import Lower
from django.utils import timezone

if TYPE_CHECKING:
    from django.db.models.fields.related_descriptors import RelatedManager


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def get_by_natural_key(self, username: str | None) -> User:
        # Addresses are stored lowercased; a person may type theirs with any capitals at login.
        return self.get(email__iexact=username)

    def _create(self, email: str, password: str | None, **fields: Any) -> User:
        if not email:
            raise ValueError("An email address is required.")
        user = self.model(email=self.normalize_email(email).lower(), **fields)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **fields: Any) -> User:
        fields.setdefault("is_staff", False)
        fields.setdefault("is_superuser", False)
        return self._create(email, password, **fields)

    def create_superuser(self, email: str, password: str | None = None, **fields: Any) -> User:
        fields.update(is_staff=True, is_superuser=True)
        return self._create(email, password, **fields)


class User(AbstractBaseUser, PermissionsMixin):
    """A person. Logs in with an email address; belongs to organizations through memberships."""

    # unique=True as well as the case-insensitive constraint: Django's auth check (auth.E003) wants the
    # USERNAME_FIELD itself unique, and an expression constraint does not count for it.
    email = models.EmailField(unique=True)
    name = models.CharField(max_length=150, blank=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False, help_text="Can log in to the admin console.")
    date_joined = models.DateTimeField(default=timezone.now)

    objects: ClassVar[UserManager] = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"
    REQUIRED_FIELDS: ClassVar[list[str]] = []

    if TYPE_CHECKING:
        memberships: RelatedManager[Membership]

    class Meta:
        ordering = ("email",)
        constraints = [
            # Addresses are stored lower-cased (the manager, sign_up), but anything that writes the column
            # directly must not be able to add a case variant of an existing one.
            models.UniqueConstraint(
                Lower("email"),
                name="user_email_ci_unique",
                violation_error_message="An account with this email address already exists.",
            )
        ]

    def __str__(self) -> str:
        return self.email


def default_concurrency_limit() -> int:
    return int(settings.ORGANIZATION_DEFAULT_CONCURRENCY)


class Organization(models.Model):
    """A tenant: it owns keys, jobs, usage and credits. Every person has a personal one."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=120)
    slug = models.SlugField(max_length=64, unique=True)
    is_personal = models.BooleanField(default=False)
    concurrency_limit = models.PositiveIntegerField(
        default=default_concurrency_limit,
        validators=[MinValueValidator(1)],
        help_text="Jobs of this organization that may run at once; the rest wait in the queue.",
    )
    suspended_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    if TYPE_CHECKING:
        memberships: RelatedManager[Membership]
        api_keys: RelatedManager[ApiKey]

    class Meta:
        ordering = ("name",)

    def __str__(self) -> str:
        return self.name

    @property
    def is_suspended(self) -> bool:
        return self.suspended_at is not None


class TenantQuerySet(models.QuerySet[Any]):
    def for_organization(self, organization: Organization) -> TenantQuerySet:
        return self.filter(organization=organization)


class TenantModel(models.Model):
    """Base of every tenant-owned row: reads for tenant data go through ``for_organization``."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")

    objects = TenantQuerySet.as_manager()

    class Meta:
        abstract = True


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    DEVELOPER = "developer", "Developer"
    BILLING = "billing", "Billing"


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.DEVELOPER)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "organization"], name="membership_unique")]
        ordering = ("organization__name", "user__email")

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"


class Invitation(models.Model):
    """An invitation to join an organization, waiting for the invited person to accept it.

    Nobody becomes a member of an organization without saying so: an invitation names an email address and a role,
    and only the person who signs in with that address (or makes the account from the emailed link, which proves
    it) turns it into a membership (``accounts.services.accept_invitation``). Until then the organization sees
    nothing of them and they nothing of it. The link carries a random secret; only its SHA-256 is kept, as for
    API keys. One waiting invitation per organization and address: inviting again replaces its secret and expiry.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField(max_length=254)
    role = models.CharField(max_length=16, choices=Role.choices)
    invited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    secret_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(Lower("email"), "organization", name="invitation_unique_address"),
        ]
        ordering = ("organization", "email")

    def __str__(self) -> str:
        return f"{self.email} to {self.organization} ({self.role})"

    @property
    def expired(self) -> bool:
        return self.expires_at <= timezone.now()


class Scope(models.TextChoices):
    INFERENCE = "inference", "Run models"
    USAGE_READ = "usage:read", "Read usage and billing"
    ADMIN = "admin", "Manage keys and the organization"


def hash_secret(secret: str) -> str:
    """Secrets are 256 random bits, so one SHA-256 is enough: there is nothing to brute-force."""
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def usable(self) -> ApiKeyQuerySet:
        return self.filter(revoked_at__isnull=True).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now())
        )

    def with_maker_role(self) -> ApiKeyQuerySet:
        """Annotates ``maker_role``: the maker's role in the key's organization, in the same query as the key.

        None when the maker has left the organization or is deactivated (see accounts.policy).
        """
        role = Membership.objects.filter(
            user_id=OuterRef("created_by_id"), organization_id=OuterRef("organization_id"), user__is_active=True
        ).values("role")[:1]
        return self.annotate(maker_role=Subquery(role))


class ApiKey(models.Model):
    """``<id>:<secret>`` as fal shapes it. Only a hash of the secret is stored; the secret is shown once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    name = models.CharField(max_length=100)
    secret_hash = models.CharField(max_length=64, editable=False)
    secret_hint = models.CharField(max_length=8, editable=False, help_text="Last characters of the secret.")
    scopes = models.JSONField(default=list)
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Empty: the platform default."
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    objects = ApiKeyQuerySet.as_manager()

    class Meta:
        ordering = ("-created_at",)
        indexes = [models.Index(fields=["organization", "-created_at"], name="apikey_org_created")]

    def __str__(self) -> str:
        return f"{self.name} (…{self.secret_hint})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    @property
    def is_expired(self) -> bool:
        return self.expires_at is not None and self.expires_at <= timezone.now()

    @property
    def status(self) -> str:
        if self.is_revoked:
            return "revoked"
        if self.is_expired:
            return "expired"
        return "active"

    def has_scope(self, scope: str) -> bool:
        """Whether the key may act with ``scope`` now: its scopes that its maker's current role still grants."""
        from accounts.policy import effective_scopes  # the policy is built on this module's Role and Scope

        granted = effective_scopes(self)
        return scope in granted or Scope.ADMIN in granted

    @property
    def rate_limit_per_minute(self) -> int:
        return self.requests_per_minute or settings.API_KEY_DEFAULT_REQUESTS_PER_MINUTE


class AuditAction(models.TextChoices):
    USER_SIGNED_UP = "user.signed_up", "User signed up"
    USER_DEACTIVATED = "user.deactivated", "User deactivated"
    LOGIN_FAILED = "login.failed", "Login failed"
    KEY_CREATED = "api_key.created", "API key created"
    KEY_REVOKED = "api_key.revoked", "API key revoked"
    ROLE_CHANGED = "membership.role_changed", "Role changed"
    MEMBER_ADDED = "membership.added", "Member added"
    MEMBER_REMOVED = "membership.removed", "Member removed"
    MEMBER_INVITED = "membership.invited", "Member invited"
    INVITATION_REVOKED = "membership.invitation_revoked", "Invitation revoked"
    ORG_SUSPENDED = "organization.suspended", "Organization suspended"
    ORG_UNSUSPENDED = "organization.unsuspended", "Organization unsuspended"
    LIMITS_CHANGED = "organization.limits_changed", "Limits changed"
    JOB_CANCELLED_BY_OPERATOR = "job.cancelled_by_operator", "Request cancelled by an operator"
    JOB_REQUEUED_BY_OPERATOR = "job.requeued_by_operator", "Request requeued by an operator"
    JOB_REFUNDED = "job.refunded", "Request refunded"
    CREDITS_GRANTED = "credits.granted", "Credits granted"
    CREDITS_ADJUSTED = "credits.adjusted", "Credits adjusted"
    PRICE_CHANGED = "billing.price_changed", "Price changed"
    SPEND_LIMITS_CHANGED = "billing.limits_changed", "Spend limits changed"
    TOP_UP_CHANGED = "billing.top_up_changed", "Auto top-up settings changed"
    STRIPE_EVENT_REPLAYED = "billing.stripe_event_replayed", "Stripe event replayed"
    PAYMENT_METHOD_ADDED = "billing.payment_method_added", "Payment method added"
    PAYMENT_METHOD_DEFAULT_CHANGED = "billing.payment_method_default", "Default payment method changed"
    PAYMENT_METHOD_REMOVED = "billing.payment_method_removed", "Payment method removed"
    BILLING_DETAILS_CHANGED = "billing.details_changed", "Billing details changed"
    ALERT_SETTINGS_CHANGED = "billing.alerts_changed", "Spend alert settings changed"


class AuditEvent(models.Model):
    """Append-only record of security-relevant actions; who did what to which row, from where."""

    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.SET_NULL, related_name="audit_events"
    )
    actor_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_api_key = models.ForeignKey(ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    action = models.CharField(max_length=48, choices=AuditAction.choices)
    target_type = models.CharField(max_length=48, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ("-created_at", "-id")
        indexes = [models.Index(fields=["organization", "-created_at"], name="audit_org_created")]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.action}"


class ScheduledTask(models.Model):
    """When each task of beat's schedule last ran to the end, one row per task name: whether the safety nets run.

    Written by the processes that run them, not by the tasks (``config.scheduled_runs``): beat, as it starts, records
    since when it schedules each task; a worker, as one ends, when it succeeded or failed. ``/metrics`` reads them
    (``platform_scheduled_task_last_success_timestamp_seconds``), and an alert fires on a task that has not succeeded
    for a few of its intervals: beat down, no worker on its queue, or the task failing every time."""

    name = models.CharField(max_length=200, primary_key=True)
    # When a beat first scheduled it against this database: a task that never ran counts as late from here.
    scheduled_since = models.DateTimeField(null=True, blank=True)
    last_succeeded_at = models.DateTimeField(null=True, blank=True)
    last_failed_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    def __str__(self) -> str:
        return self.name
