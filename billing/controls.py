"""Settings a customer (or operator) changes: auto top-up, the monthly budget, per-key and per-member limits, spend
alerts. Each audited. (An end user's limit is ``billing.end_users.set_end_user_limit``.) Who may change them is the
door's to check: the dashboard's pages and the API let only members who may manage billing reach these."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from accounts.locking import lock_organization, locked
from accounts.models import ApiKey, AuditAction, Membership, Organization, User
from accounts.services import SYSTEM, Actor, record_audit
from billing import topups
from billing.ledger import BillingError
from billing.locks import lock_key, lock_member_keys, locked_account
from billing.models import Account, AlertSettings, KeySpendLimit, MemberSpendLimit
from inference.webhooks import WebhookUrlError, check_webhook_url

MAX_THRESHOLDS = 10
UNSET: Any = object()

MIN_TOP_UP_CENTS = 500
MAX_TOP_UP_CENTS = 1_000_000


@transaction.atomic
def set_auto_top_up(
    *,
    organization: Organization,
    enabled: bool,
    threshold_micros: int | None = None,
    amount_cents: int | None = None,
    actor: Actor = SYSTEM,
) -> Account:
    account = locked_account(organization.pk)
    if threshold_micros is not None:
        if threshold_micros < 0:
            raise BillingError("The threshold cannot be negative.")
        account.auto_top_up_threshold_micros = threshold_micros
    if amount_cents is not None:
        if not MIN_TOP_UP_CENTS <= amount_cents <= MAX_TOP_UP_CENTS:
            raise BillingError(f"A top-up buys between {MIN_TOP_UP_CENTS} and {MAX_TOP_UP_CENTS} cents.")
        account.auto_top_up_amount_cents = amount_cents
    if enabled and not account.default_payment_method_id:
        raise BillingError("Save a card first: auto top-up charges the default payment method.")
    account.auto_top_up_enabled = enabled
    account.updated_at = timezone.now()
    account.save()
    topups.schedule_if_low(account)  # already below the new threshold: top up now, not at the next debit
    record_audit(
        action=AuditAction.TOP_UP_CHANGED,
        actor=actor,
        organization=organization,
        target=account,
        metadata={
            "enabled": enabled,
            "threshold_micros": account.auto_top_up_threshold_micros,
            "amount_cents": account.auto_top_up_amount_cents,
        },
    )
    return account


@transaction.atomic
def set_monthly_budget(*, organization: Organization, budget_micros: int | None, actor: Actor = SYSTEM) -> Account:
    if budget_micros is not None and budget_micros < 0:
        raise BillingError("A budget cannot be negative.")
    account = locked_account(organization.pk)
    account.monthly_budget_micros = budget_micros
    account.alerts_armed |= budget_micros is not None
    account.updated_at = timezone.now()
    account.save(update_fields=["monthly_budget_micros", "alerts_armed", "updated_at"])
    record_audit(
        action=AuditAction.SPEND_LIMITS_CHANGED,
        actor=actor,
        organization=organization,
        target=account,
        metadata={"monthly_budget_micros": budget_micros},
    )
    return account


@transaction.atomic
def set_key_limit(*, api_key: ApiKey, monthly_limit_micros: int | None, actor: Actor = SYSTEM) -> None:
    lock_key(api_key.pk)  # waits for the admissions reading the key's limit; later ones read this one
    if monthly_limit_micros is None:
        KeySpendLimit.objects.filter(api_key=api_key).delete()
    elif monthly_limit_micros < 0:
        raise BillingError("A limit cannot be negative.")
    else:
        KeySpendLimit.objects.update_or_create(
            api_key=api_key, defaults={"monthly_limit_micros": monthly_limit_micros, "updated_at": timezone.now()}
        )
        # Once this commits, by a statement of its own: this transaction locks the key alone. A settlement holds the
        # account from its debit to its COMMIT, where the foreign key of its usage record share-locks the key; taking
        # the account here, after the key, would deadlock with it (``make race`` races a new key limit against one).
        organization_id = api_key.organization_id
        transaction.on_commit(lambda: _arm_alerts(organization_id))
    record_audit(
        action=AuditAction.SPEND_LIMITS_CHANGED,
        actor=actor,
        organization=api_key.organization,
        target=api_key,
        metadata={"monthly_limit_micros": monthly_limit_micros},
    )


class NotAMember(BillingError):
    """A member limit for someone who is not a member of the organization."""

    status_code = 404
    error_type = "not_found"


@transaction.atomic
def set_member_limit(
    *, organization: Organization, user: User, monthly_limit_micros: int | None, actor: Actor = SYSTEM
) -> MemberSpendLimit | None:
    """Sets (None: removes) the monthly limit of a member of the organization, which every API key they made there
    shares, keys they make later included (``MemberSpendLimit``); audited as a key's limit is. The row afterwards.

    Locks the organization, as the making of a key does, then every key of the member (``lock_member_keys``): the
    admissions that read the member's limit under one of those keys commit before this, the later ones read it.
    """
    if monthly_limit_micros is not None and monthly_limit_micros < 0:
        raise BillingError("A limit cannot be negative.")
    membership = Membership.objects.filter(organization=organization, user=user).first()
    if membership is None:
        raise NotAMember(f"{user.email} is not a member of {organization.name}.")
    lock_organization(organization.pk)
    lock_member_keys(organization.pk, user.pk)
    limit: MemberSpendLimit | None = None
    if monthly_limit_micros is None:
        MemberSpendLimit.objects.filter(organization=organization, user=user).delete()
    else:
        limit, _ = MemberSpendLimit.objects.update_or_create(
            organization=organization,
            user=user,
            defaults={"monthly_limit_micros": monthly_limit_micros, "updated_at": timezone.now()},
        )
        # Spend alerts watch the limit (``billing.alerts``): armed once this commits, by a statement of its own, as a
        # key's limit arms them (``set_key_limit``): this transaction holds the member's keys, which a settlement
        # share-locks at its COMMIT while it holds the account.
        organization_id = organization.pk
        transaction.on_commit(lambda: _arm_alerts(organization_id))
    record_audit(
        action=AuditAction.SPEND_LIMITS_CHANGED,
        actor=actor,
        organization=organization,
        target=membership,
        metadata={"member": user.email, "user_id": user.pk, "monthly_limit_micros": monthly_limit_micros},
    )
    return limit


def _arm_alerts(organization_id: Any) -> None:
    """Settlements of the organization look for spend alerts from now on (``Account.alerts_armed``): one UPDATE, the
    statement that locks the account, only when it is not armed yet."""
    Account.objects.filter(pk=organization_id, alerts_armed=False).update(alerts_armed=True)


def valid_thresholds(thresholds: Any) -> list[int]:
    """Percentages, 1 to 100, at most ``MAX_THRESHOLDS``, each once; sorted."""
    if (
        not isinstance(thresholds, list | tuple)
        or len(thresholds) > MAX_THRESHOLDS
        or any(isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100 for value in thresholds)
    ):
        raise BillingError(f"Thresholds are up to {MAX_THRESHOLDS} whole percentages from 1 to 100.")
    return sorted(set(thresholds))


@transaction.atomic
def set_alert_settings(
    *,
    organization: Organization,
    budget_thresholds: Any = UNSET,
    key_thresholds: Any = UNSET,
    credit_floor_micros: Any = UNSET,
    webhook_url: Any = UNSET,
    actor: Actor = SYSTEM,
) -> AlertSettings:
    """Changes what the organization's spend alerts watch and where its billing webhooks go (what is left out stays).

    The webhook URL is checked as a request's is (``inference.webhooks.check_webhook_url``: no private or loopback
    address unless ``OUTBOUND_ALLOW_PRIVATE``), and again when each delivery connects."""
    changes: dict[str, Any] = {}
    if budget_thresholds is not UNSET:
        changes["budget_thresholds"] = valid_thresholds(budget_thresholds)
    if key_thresholds is not UNSET:
        changes["key_thresholds"] = valid_thresholds(key_thresholds)
    if credit_floor_micros is not UNSET:
        if credit_floor_micros is not None and credit_floor_micros < 0:
            raise BillingError("The credit floor cannot be negative.")
        changes["credit_floor_micros"] = credit_floor_micros
    if webhook_url is not UNSET:
        url = (webhook_url or "").strip()
        if url:
            try:
                check_webhook_url(url)
            except WebhookUrlError as exc:
                raise BillingError(str(exc)) from None
        changes["webhook_url"] = url
    AlertSettings.objects.get_or_create(organization=organization)
    watched = locked(AlertSettings.objects.filter(pk=organization.pk)).get()  # one change at a time
    for name, value in changes.items():
        setattr(watched, name, value)
    watched.updated_at = timezone.now()
    watched.save()
    if watched.credit_floor_micros is not None:
        _arm_alerts(organization.pk)
    record_audit(
        action=AuditAction.ALERT_SETTINGS_CHANGED,
        actor=actor,
        organization=organization,
        target=watched,
        metadata=changes,
    )
    return watched
