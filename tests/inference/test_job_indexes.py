"""What a job's row costs its table's indexes on PostgreSQL: a heartbeat and a message sent again change only columns
no index reads, so each is a HOT update (the row's new version on its page, no index entry written), where each
wrote an entry in every index of the jobs table while ``lease_expires_at`` and ``sent_at`` were indexed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

from inference import attempts, dispatch
from inference.models import Job, JobStatus
from tests.lifecycle import on_postgresql_in_transactions

pytestmark = on_postgresql_in_transactions("HOT updates are PostgreSQL's")


def job_updates() -> tuple[int, int]:
    """The jobs table's rows updated by this connection and not yet in the cumulative statistics (PostgreSQL 15
    keeps a backend's counts pending until it is idle), and how many of them were HOT: read twice in one transaction,
    the difference is what ran between."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables WHERE relid = %s::regclass",
            [Job._meta.db_table],
        )
        updated, hot = cursor.fetchone()
    return int(updated), int(hot)


def difference(after: tuple[int, int], before: tuple[int, int]) -> tuple[int, int]:
    return after[0] - before[0], after[1] - before[1]


def test_a_heartbeat_writes_no_index_entry(dispatched: Any) -> None:
    job = dispatched()
    assert attempts.claim_job(job_id=str(job.pk), attempt=1, worker="gpu-1") is not None
    with transaction.atomic():
        before = job_updates()
        answer = attempts.heartbeat(job_id=str(job.pk), attempt=1, step=1, total=2, gpu_ms=50)
        assert answer.keep_going
        assert difference(job_updates(), before) == (1, 1)  # the job's one update, HOT
    job.refresh_from_db()
    assert (job.status, job.progress_step, job.progress_total) == (JobStatus.RUNNING, 1, 2)


def test_a_message_sent_again_writes_no_index_entry(
    dispatched: Any, sent: list[tuple[str, int, str]], settings: Any
) -> None:
    job = dispatched()
    long_ago = timezone.now() - timedelta(seconds=settings.JOB_REDISPATCH_AFTER_SECONDS * 2)
    Job.objects.filter(pk=job.pk).update(dispatched_at=long_ago, sent_at=long_ago)
    with transaction.atomic():
        before = job_updates()
        assert dispatch.redispatch_stale() == 1
        assert difference(job_updates(), before) == (1, 1)
    assert sent == [(str(job.pk), 1, "cpu")]


def job_indexes() -> dict[str, list[str]]:
    """The jobs table's plain indexes (not its primary key, unique or foreign key constraints) and their columns."""
    with connection.cursor() as cursor:
        found = connection.introspection.get_constraints(cursor, Job._meta.db_table)
    return {
        name: info["columns"]
        for name, info in found.items()
        if info["index"] and not info["unique"] and not info["primary_key"]
    }


def test_the_migration_drops_the_three_indexes_concurrently_and_builds_them_again_backwards() -> None:
    executor = MigrationExecutor(connection)
    latest = executor.loader.graph.leaf_nodes("inference")
    try:
        executor.migrate([("inference", "0012_attempt_wasted_ms")])
        before = job_indexes()
        assert {"job_status_lease", "job_status_sent"} <= set(before)
        assert ["organization_id"] in before.values()
        executor = MigrationExecutor(connection)
        executor.migrate(latest)
    finally:
        MigrationExecutor(connection).migrate(latest)  # the schema the other tests run on, whatever happened
    after = job_indexes()
    assert set(before) - set(after) == {"job_status_lease", "job_status_sent", *(
        name for name, columns in before.items() if columns == ["organization_id"]
    )}  # fmt: skip
    assert ["organization_id"] not in after.values()
