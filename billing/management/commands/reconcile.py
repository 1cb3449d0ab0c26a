"""``manage.py reconcile [--full]``: run the books' checks now, print what each looked at and found; exit 1 on drift.

Without ``--full`` it checks what was written since the last proven run (the first run ever is full anyway).
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from billing.reconciliation import run_reconciliation


class Command(BaseCommand):
    help = "Reconcile usage, the credit ledger, holds, rollups and payments (and Stripe when configured)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--full",
            action="store_true",
            help="Check every row, not only what was written since the last proven run (as the weekly run does).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        run = run_reconciliation(full=options["full"])
        self.stdout.write(f"scope: {run.coverage}")
        self.stdout.write(f"{'check':<16} {'checked':>12} {'drift':>7}")
        for name, summary in run.checked.items():
            extra = {key: value for key, value in summary.items() if key not in ("checked", "drift", "skipped")}
            note = "  " + ", ".join(f"{key}: {value}" for key, value in extra.items()) if extra else ""
            if summary.get("skipped"):
                self.stdout.write(f"{name:<16} {'-':>12} {'-':>7}  skipped: {summary['skipped']}")
            else:
                self.stdout.write(f"{name:<16} {summary['checked']:>12,} {summary['drift']:>7,}{note}")
        seconds = (run.finished_at - run.started_at).total_seconds() if run.finished_at else 0.0
        for item in run.drift:
            self.stderr.write(f"DRIFT {item['check']}.{item['kind']}: {item['count']}")
            for example in item["examples"]:
                self.stderr.write(f"    {json.dumps(example, sort_keys=True)}")
        if not run.ok:
            total = sum(item["count"] for item in run.drift)
            raise CommandError(f"reconciliation run {run.pk}: {total} discrepancies ({seconds:.1f} s)", returncode=1)
        self.stdout.write(self.style.SUCCESS(f"reconciliation run {run.pk}: no drift ({seconds:.1f} s)"))
