from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import connection, transaction

from inference import active_jobs


class Command(BaseCommand):
    help = (
        "Put right the active jobs each organization's dispatch reads (PostgreSQL) where they disagree with its jobs "
        "counted, as reconciliation's active_jobs check reports: all such organizations, or those named."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--organization", action="append", default=None, help="an organization's id (repeatable)")

    def handle(self, *args: Any, **options: Any) -> None:
        if not active_jobs.kept():
            self.stdout.write("Nothing to recount: this database's dispatch counts the jobs.")
            return
        named = options["organization"]
        organization_ids = named or self._disagreeing()
        for organization_id in organization_ids:
            summed, counted = active_jobs.recount(organization_id)
            self.stdout.write(f"{organization_id}: the dispatch read {summed} active jobs, {counted} are")
        if not organization_ids:
            self.stdout.write("Every organization's active jobs agree with its jobs.")

    @staticmethod
    def _disagreeing() -> list[Any]:
        """The organizations whose rows disagree with their jobs, both read in one snapshot (the caller's, inside a
        transaction already open)."""
        if connection.in_atomic_block:
            return [row["organization_id"] for row in active_jobs.disagreements()]
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return [row["organization_id"] for row in active_jobs.disagreements()]
