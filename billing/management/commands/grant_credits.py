"""Grant prepaid credits to an organization from the command line (audited like the admin's grant)."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import Organization
from billing.ledger import BillingError, grant_credits
from billing.money import dollars_to_micros, format_micros


class Command(BaseCommand):
    help = "Grant free credits to an organization (once per --idempotency-key)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("organization", help="The organization's slug.")
        parser.add_argument("amount", help="Dollars, e.g. 25 or 2.50.")
        parser.add_argument("--reason", default="Credits granted by an operator")
        parser.add_argument("--idempotency-key", default=None, help="Grant at most once under this key.")

    def handle(self, *args: Any, **options: Any) -> None:
        organization = Organization.objects.filter(slug=options["organization"]).first()
        if organization is None:
            raise CommandError(f"No organization {options['organization']!r}.")
        try:
            micros = dollars_to_micros(Decimal(options["amount"]))
        except InvalidOperation:
            raise CommandError("The amount is a number of dollars, e.g. 25 or 2.50.") from None
        key = options["idempotency_key"]
        try:
            entry = grant_credits(
                organization=organization,
                amount_micros=micros,
                reason=options["reason"],
                idempotency_key=f"grant-{key}" if key else None,
            )
        except BillingError as exc:
            raise CommandError(str(exc)) from None
        if options["verbosity"] > 0:
            added, balance = format_micros(entry.amount_micros), format_micros(entry.balance_after_micros)
            self.stdout.write(f"{organization.slug}: +{added}, balance after {balance}")
