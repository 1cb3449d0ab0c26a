"""Re-processes stored Stripe events from Stripe's current state: the failed ones, or those named, or since a time."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.dateparse import parse_date, parse_datetime

from billing.models import StripeEventStatus
from billing.stripe_events import replay_events


def _moment(value: str) -> datetime:
    moment = parse_datetime(value)
    if moment is None:
        day = parse_date(value)
        if day is None:
            raise CommandError(f"--since {value!r} is neither a date nor a date and time (ISO 8601).")
        moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Replays stored Stripe events (the failed ones by default). Each replay is audited and changes "
        "nothing that was already applied."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--id", action="append", dest="ids", default=[], help="An event id (repeatable).")
        parser.add_argument("--since", help="Every event received since this UTC date or date and time.")

    def handle(self, *args: Any, **options: Any) -> None:
        since = _moment(options["since"]) if options["since"] else None
        events = replay_events(event_ids=options["ids"] or None, since=since)
        for event in events:
            line = f"{event.id} {event.type}: {event.status}"
            self.stdout.write(line + (f" ({event.error})" if event.error else ""))
        failed = sum(event.status == StripeEventStatus.FAILED for event in events)
        self.stdout.write(f"{len(events)} replayed, {failed} failed.")
        if failed:
            raise CommandError(f"{failed} event(s) still fail; see their errors above.")
