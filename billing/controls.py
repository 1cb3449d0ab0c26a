"""Settings a customer (or operator) changes: auto top-up, the monthly budget, per-key limits. Each audited."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from accounts.models import ApiKey, AuditAction, Organization
from accounts.services import SYSTEM, Actor, record_audit
from billing import topups
from billing.ledger import BillingError
from billing.locks import lock_key, locked_account
from billing.models import Account, KeySpendLimit

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
    account.updated_at = timezone.now()
    account.save(update_fields=["monthly_budget_micros", "updated_at"])
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
    record_audit(
        action=AuditAction.SPEND_LIMITS_CHANGED,
        actor=actor,
        organization=api_key.organization,
        target=api_key,
        metadata={"monthly_limit_micros": monthly_limit_micros},
    )
