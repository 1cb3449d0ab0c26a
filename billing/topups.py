"""Auto top-up: when a debit leaves the available balance below the threshold, charge the saved card.

``schedule_if_low`` runs inside the transaction that moved the balance (``ledger.post_entry``), so it
only reads the locked account and queues the task on commit; the task (``auto_top_up``) decides under
the account's lock, where at most one pending top-up per organization can exist, and then charges.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import stripe
from celery import current_app
from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from accounts.models import Organization
from billing.locks import locked_account
from billing.models import Account, Payment, PaymentKind, PaymentStatus
from billing.stripe_errors import PaymentError

logger = logging.getLogger(__name__)

TASK = "billing.auto_top_up"
# One message per organization per this many seconds is plenty: the task re-checks under the lock,
# and the sweep queues any top-up a lost message missed.
QUEUE_DEDUP_SECONDS = 60


def needs_top_up(account: Account) -> bool:
    return (
        account.auto_top_up_enabled
        and bool(account.default_payment_method_id)
        and bool(account.stripe_customer_id)
        and account.available_micros < account.auto_top_up_threshold_micros
    )


def charges_now(account: Account) -> bool:
    """Whether the organization's card is charged unattended now: it needs a top-up and is not suspended (its members
    cannot turn auto top-up off while it is, and it runs nothing that needs the credit). A top-up whose first send may
    never have reached Stripe is sent again only while this holds (``stale_payments``)."""
    if not needs_top_up(account):
        return False
    return not Organization.objects.filter(pk=account.organization_id, suspended_at__isnull=False).exists()


def accounts_needing_top_up() -> QuerySet[Account]:
    """The accounts ``needs_top_up`` holds for, in one query: the sweep queues their top-ups when a message was lost."""
    return (
        Account.objects.filter(auto_top_up_enabled=True)
        .exclude(default_payment_method_id="")
        .exclude(stripe_customer_id="")
        .alias(available=F("balance_micros") - F("held_micros"))
        .filter(available__lt=F("auto_top_up_threshold_micros"))
    )


def schedule_if_low(account: Account) -> bool:
    """Queues a top-up once the surrounding transaction commits, if the account needs one."""
    if not needs_top_up(account):
        return False
    organization_id = str(account.organization_id)
    transaction.on_commit(lambda: enqueue_top_up(organization_id), robust=True)
    return True


def enqueue_top_up(organization_id: str) -> bool:
    # A duplicate message costs a locked read, never a second charge (the task decides under the lock).
    # While Redis is down the cache keeps this guard in process memory (config/cache.py): each process
    # still sends at most one message per organization a minute, neither one per debit nor none; a
    # message the broker refused frees the guard, so the next debit (or the sweep) sends it again.
    key = f"billing:top-up-queued:{organization_id}"
    if not cache.add(key, 1, timeout=QUEUE_DEDUP_SECONDS):
        return False
    try:
        current_app.send_task(TASK, args=[organization_id], retry=False)
    except Exception as exc:
        cache.delete(key)
        logger.warning("broker refused the auto top-up of %s: %s; the sweep will queue it", organization_id, exc)
        return False
    return True


def auto_top_up(*, organization_id: uuid.UUID) -> Payment | None:
    """Charges the default card off-session when the balance is below the threshold, at most one at a time.

    The payment is created under the account's lock after checking that none is pending (and a unique
    constraint backs that), and not within ``BILLING_AUTO_TOP_UP_RETRY_SECONDS`` of a declined one. A suspended
    organization's card is never charged unattended: its members cannot turn auto top-up off while it is suspended
    (the dashboard is read-only for it), and it runs nothing that needs the credit.
    """
    from billing.charges import charge  # imported here: charging imports ``controls``, which imports this module

    with transaction.atomic(durable=True):
        account = locked_account(organization_id)
        if not charges_now(account):
            return None
        mine = Payment.objects.filter(organization_id=organization_id, kind=PaymentKind.AUTO_TOP_UP)
        if mine.filter(status=PaymentStatus.PENDING).exists():
            return None
        retry_after = timezone.now() - timedelta(seconds=settings.BILLING_AUTO_TOP_UP_RETRY_SECONDS)
        if mine.filter(status=PaymentStatus.FAILED, created_at__gte=retry_after).exists():
            return None
        payment = Payment.objects.create(
            organization_id=organization_id,
            kind=PaymentKind.AUTO_TOP_UP,
            amount_cents=account.auto_top_up_amount_cents,
            currency=account.currency,
            stripe_customer_id=account.stripe_customer_id,
            stripe_payment_method_id=account.default_payment_method_id,
        )
    try:
        return charge(payment).payment
    except PaymentError as exc:
        logger.warning("auto top-up payment-%s of %s: %s", payment.pk, organization_id, exc)
        if exc.refused and exc.error_type != "card_declined":
            _forget_customer_if_deleted(payment.stripe_customer_id)
        return payment  # as the failed charge left it (refreshed)


def _forget_customer_if_deleted(customer_id: str) -> None:
    """After Stripe refused a top-up for another reason than the card: a customer deleted at Stripe is forgotten
    (``cards.forget_deleted_customer``, which turns auto top-up off), so it is not charged again and again."""
    from billing import cards  # imported here: cards imports ``controls``, which imports this module

    try:
        if customer_id and cards.deleted_at_stripe(customer_id):
            cards.forget_deleted_customer(customer_id=customer_id)
    except stripe.StripeError as exc:
        logger.warning("could not ask Stripe about customer %s: %s", customer_id, exc)
