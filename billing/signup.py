"""Every new organization gets its billing account, with the configured free credits."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import transaction

from accounts.models import Organization
from billing.ledger import post_entry
from billing.locks import locked_account
from billing.models import EntryKind


def open_account(
    sender: type[Organization], instance: Organization, created: bool, raw: bool = False, **_: Any
) -> None:
    if not created or raw:
        return
    with transaction.atomic():
        account = locked_account(instance.pk)
        free = settings.BILLING_SIGNUP_CREDITS_MICROS
        if free > 0:
            post_entry(
                account=account,
                kind=EntryKind.GRANT,
                amount_micros=free,
                idempotency_key=f"signup-{instance.pk}",
                description="Free credits to get started",
            )
