"""What a job's row costs the database over its life, with the jobs table's indexes as migrated against the same
table with the three indexes inference migration 0013 dropped (the organization's own, (status, lease_expires_at),
(status, sent_at)).

    DATABASE_URL=postgres://... python -m tests.bench.job_writes [--rows 200000] [--jobs 3000] [--rounds 4]
        [--heartbeats 2]

PostgreSQL only, in a scratch database of its own (dropped at the end), migrated. Two copies of the jobs table
(``CREATE TABLE ... (LIKE inference_job INCLUDING ALL)``: columns, defaults, checks and indexes), ``before`` given
the three indexes back, each loaded with ``--rows`` ended jobs of 20 organizations. Then, in turn on each table, for
``--rounds`` rounds: ``--jobs`` lives of a job as the platform writes them, one statement each, on one connection
with autocommit: its insert, its dispatch, its claim, ``--heartbeats`` heartbeats (the lease and progress), its
finish. The commits do not wait for the disk (``synchronous_commit = off``), so the figure is the database's work,
not the disk's. Printed: each table's median time per life, their ratio, and how many of the updates were HOT (the
row's new version on its page, no index entry written).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any

import psycopg

from tests.bench.queue_overhead import drop_postgres, scratch_postgres

TABLES = ("before", "now")
DROPPED = (
    "CREATE INDEX ON before (organization_id)",
    "CREATE INDEX ON before (status, lease_expires_at)",
    "CREATE INDEX ON before (status, sent_at)",
)
COLUMNS = (
    "id, organization_id, endpoint_id, api_key_id, gpu_class, status, input, webhook_url, end_user, base_url, "
    "request_fingerprint, attempt, max_attempts, worker, progress_step, progress_total, error, error_type, gpu_ms, "
    "cold_start_ms, created_at"
)
LOAD = (
    "INSERT INTO {table} ({columns}, finished_at) SELECT gen_random_uuid(), (%(organizations)s::uuid[])[1 + g %% 20], "
    "1, NULL, 'cpu', 'COMPLETED', '{{\"prompt\": \"a lighthouse\"}}', '', '', '', '', 1, 3, 'gpu-1', 2, 2, '', '', "
    "100, 0, now() - g * interval '1 second', now() - g * interval '1 second' + interval '1 second' "
    "FROM generate_series(1, %(rows)s) g"
)
LIFE = (
    "INSERT INTO {table} ({columns}) VALUES (%(id)s, %(organization)s, 1, NULL, 'cpu', 'QUEUED', "
    "'{{\"prompt\": \"a lighthouse\"}}', '', '', '', '', 0, 3, '', 0, 0, '', '', 0, 0, now())",
    "UPDATE {table} SET status = 'DISPATCHED', attempt = attempt + 1, dispatched_at = now(), sent_at = now() "
    "WHERE id = %(id)s AND status = 'QUEUED'",
    "UPDATE {table} SET status = 'RUNNING', worker = 'gpu-1', started_at = now(), "
    "lease_expires_at = now() + interval '30 seconds' WHERE id = %(id)s AND status = 'DISPATCHED'",
    "UPDATE {table} SET progress_step = progress_step + 1, progress_total = 2, "
    "lease_expires_at = now() + interval '30 seconds' WHERE id = %(id)s AND status = 'RUNNING'",
    "UPDATE {table} SET status = 'COMPLETED', finished_at = now(), result = '{{}}', gpu_ms = 100, "
    "lease_expires_at = NULL WHERE id = %(id)s AND status = 'RUNNING'",
)


def lives(cursor: Any, table: str, jobs: int, heartbeats: int, organizations: list[uuid.UUID]) -> float:
    """Milliseconds per life of ``jobs`` jobs written into ``table``."""
    insert, dispatch, claim, heartbeat, finish = (sql.format(table=table, columns=COLUMNS) for sql in LIFE)
    started = time.perf_counter()
    for number in range(jobs):
        values = {"id": uuid.uuid4(), "organization": organizations[number % len(organizations)]}
        for sql in (insert, dispatch, claim, *[heartbeat] * heartbeats, finish):
            cursor.execute(sql, values, prepare=True)
    return (time.perf_counter() - started) * 1000 / jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="ended jobs in each table before the lives")
    parser.add_argument("--jobs", type=int, default=3000, help="lives written per table and round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds, the tables taking turns")
    parser.add_argument("--heartbeats", type=int, default=2, help="heartbeats per life")
    args = parser.parse_args()
    if not os.environ.get("DATABASE_URL", "").startswith("postgres"):
        raise SystemExit("DATABASE_URL must name a PostgreSQL server")
    url, scratch = scratch_postgres(os.environ["DATABASE_URL"])
    try:
        run(url, args)
    finally:
        drop_postgres(os.environ["DATABASE_URL"], scratch)


def run(url: str, args: argparse.Namespace) -> None:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "DATABASE_URL": url, "SECRET_KEY": "bench-only", "DJANGO_SETTINGS_MODULE": "config.settings"}
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=env, cwd=repo, check=True)
    organizations = [uuid.uuid4() for _ in range(20)]
    with psycopg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        for table in TABLES:
            cursor.execute(f"CREATE TABLE {table} (LIKE inference_job INCLUDING ALL)")
        for sql in DROPPED:
            cursor.execute(sql)
        for table in TABLES:
            cursor.execute(
                LOAD.format(table=table, columns=COLUMNS), {"organizations": organizations, "rows": args.rows}
            )
            cursor.execute(f"VACUUM ANALYZE {table}")
        indexes = {}
        for table in TABLES:
            cursor.execute("SELECT count(*) FROM pg_indexes WHERE tablename = %s", [table])
            indexes[table] = cursor.fetchone()[0]
        lives(cursor, "now", 200, args.heartbeats, organizations)  # warm-up: plans, caches
        lives(cursor, "before", 200, args.heartbeats, organizations)
        timings: dict[str, list[float]] = {table: [] for table in TABLES}
        for round_number in range(args.rounds):
            order = TABLES if round_number % 2 == 0 else TABLES[::-1]
            for table in order:
                timings[table].append(lives(cursor, table, args.jobs, args.heartbeats, organizations))
        cursor.execute("SELECT pg_stat_force_next_flush()")
    with psycopg.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        hot = {}
        for table in TABLES:
            cursor.execute("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = %s", [table])
            hot[table] = cursor.fetchone()
    print(
        f"jobs table lives: insert, dispatch, claim, {args.heartbeats} heartbeats, finish; {args.rows} ended jobs "
        f"loaded; {args.jobs} lives a round, {args.rounds} rounds taking turns; commits not waiting for the disk"
    )
    medians = {table: statistics.median(timings[table]) for table in TABLES}
    for table in TABLES:
        updated, hot_updated = hot[table]
        rounds = "  ".join(f"{value:5.3f}" for value in timings[table])
        print(
            f"  {table:6}  {indexes[table]:2} indexes   ms a life: {rounds}   median {medians[table]:5.3f}   "
            f"HOT updates {hot_updated}/{updated} ({100 * hot_updated / max(updated, 1):.0f}%)"
        )
    print(f"  now / before: {medians['now'] / medians['before']:.2f}x the time a life")


if __name__ == "__main__":
    main()
