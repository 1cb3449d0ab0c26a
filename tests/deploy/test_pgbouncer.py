"""The platform behind PgBouncer in transaction mode (deploy/k8s/components/pgbouncer).

In transaction mode each transaction may run on another server connection, so nothing may outlive one: no
prepared statement, no server-side (WITH HOLD) cursor, no session-level SET, no session advisory lock. The test
starts its own PgBouncer from the component's pgbouncer.ini, with a pool of two server connections so the processes'
clients keep landing on each other's connections, and runs the production process types through it (started by the
image's entrypoint, DATABASE_TRANSACTION_POOLING=1): jobs from two tenants are submitted over HTTP, dispatched,
claimed and run by a GPU worker, finished and settled, and the books reconciled, every statement through PgBouncer.

Needs PostgreSQL and Debian's pgbouncer (`.ci/run` installs it); skipped, saying so, without either.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.db import connection
from django.db.models import Sum

from tests.deploy.processes import (
    ENTRYPOINT,
    base_env,
    database_url,
    free_port,
    pgbouncer_executable,
    platform,
    running_pgbouncer,
)
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(pgbouncer_executable() is None, reason="pgbouncer is not installed (apt-get install pgbouncer)"),
]

BODY = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
JOBS_PER_TENANT = 6


@pytest.fixture
def postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PgBouncer stands in front of PostgreSQL: run with DATABASE_URL=postgres://...")


def new_tenant() -> dict[str, Any]:
    import uuid

    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up
    from billing.ledger import grant_credits

    user = sign_up(email=f"pgbouncer-{uuid.uuid4().hex[:8]}@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)
    grant_credits(organization=organization, amount_micros=10_000_000, reason="test")
    _, key = create_api_key(organization=organization, name="pgbouncer", scopes=[Scope.INFERENCE], created_by=user)
    return {"organization": organization, "key": key}


def test_the_job_lifecycle_and_the_books_through_pgbouncer(postgresql: None, tmp_path: Path) -> None:
    from billing.models import Account, CreditEntry, EntryKind, Price, ReconciliationRun, UsageRecord
    from billing.rates import ensure_opening_prices
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint, Job, JobStatus

    ensure_builtin_endpoints(Endpoint)
    ensure_opening_prices(Price)
    tenants = [new_tenant(), new_tenant()]
    upstream_port = int(connection.settings_dict.get("PORT") or 5432)

    from config.embedded_redis import EmbeddedRedis

    with (
        EmbeddedRedis(tmp_path / "redis") as redis,
        running_pgbouncer(tmp_path / "pgbouncer", upstream_port=upstream_port, pool_size=2) as bouncer,
    ):
        through_bouncer = database_url(host="127.0.0.1", port=bouncer.port, password=bouncer.password)
        env = base_env(
            SECRET_KEY="pgbouncer-test-" + "x" * 40,
            DATABASE_URL=through_bouncer,
            DATABASE_TRANSACTION_POOLING="1",
            DATABASE_POOL_MAX_SIZE="2",
            REDIS_URL=redis.url,
        )
        with platform(tmp_path / "pods", env) as pods:
            web = pods.start_web("web", free_port())
            pods.start("gpu", "worker", "cpu", "--hostname", "gpu@pgbouncer-test")
            pods.start("housekeeping", "housekeeping", "--hostname", "housekeeping@pgbouncer-test")
            pods.start("beat", "beat")
            wait_until(
                lambda: pods.worker_ready("gpu") and pods.worker_ready("housekeeping") and pods.running("beat"),
                timeout=120,
                message=lambda: f"the workers to be ready\n{pods.all_logs()}",
                interval=0.2,
            )

            submitted: list[tuple[str, str]] = []
            with httpx.Client(base_url=web, timeout=30) as client:
                for round_ in range(JOBS_PER_TENANT):
                    for tenant in tenants:
                        answer = client.post(
                            "/queue/platform/tiny-sd",
                            json={**BODY, "seed": round_},
                            headers={"Authorization": f"Key {tenant['key']}"},
                        )
                        assert answer.status_code == 200, answer.text
                        submitted.append((answer.json()["request_id"], tenant["key"]))

                def all_finished() -> bool:
                    pods.all_running()
                    ids = [request_id for request_id, _ in submitted]
                    return Job.objects.filter(pk__in=ids, status=JobStatus.COMPLETED).count() == len(ids)

                wait_until(
                    all_finished,
                    timeout=300,
                    message=lambda: (
                        f"every job to complete: {list(Job.objects.values_list('status', flat=True))}\n"
                        f"{pods.all_logs()}"
                    ),
                    interval=0.5,
                )
                for request_id, key in submitted:
                    result = client.get(
                        f"/queue/platform/tiny-sd/requests/{request_id}", headers={"Authorization": f"Key {key}"}
                    )
                    assert result.status_code == 200, result.text
                    assert result.json()["images"]

            # The books: one billed usage record and one debit per job, balances equal to their ledgers; then the
            # reconciliation itself, run through PgBouncer as an operator would (a repeatable-read snapshot and
            # SET LOCAL inside one transaction).
            for tenant in tenants:
                organization = tenant["organization"]
                assert UsageRecord.objects.filter(organization=organization, billable=True).count() == JOBS_PER_TENANT
                debits = CreditEntry.objects.filter(organization=organization, kind=EntryKind.USAGE)
                assert debits.count() == JOBS_PER_TENANT
                total = CreditEntry.objects.filter(organization=organization).aggregate(total=Sum("amount_micros"))
                assert Account.objects.get(pk=organization.pk).balance_micros == total["total"]
            reconcile = subprocess.run(
                [str(ENTRYPOINT), "manage", "reconcile", "--full"],
                env={**env, "PLATFORM_DATA_DIR": str(tmp_path / "pods" / "web")},
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr
            run = ReconciliationRun.objects.latest("finished_at")
            assert run.ok, run.drift
            assert run.drift == []

            # Queries from several processes shared the two server connections, all in transaction mode.
            pools = [
                pool for pool in bouncer.admin("SHOW POOLS") if pool["database"] == connection.settings_dict["NAME"]
            ]
            assert {pool["pool_mode"] for pool in pools} == {"transaction"}
            stats = [row for row in bouncer.admin("SHOW STATS") if row["database"] == connection.settings_dict["NAME"]]
            # At least a job's submission, dispatch, claim, heartbeat and finish each (more round trips than that: its
            # reads, reservations and the workers' own).
            assert sum(int(row["total_xact_count"]) for row in stats) > 5 * len(submitted)
            assert not any(pods.log_tail(name).count("does not exist") for name in pods.logs)


def test_no_server_side_cursor_in_transaction_pooling(postgresql: None, tmp_path: Path) -> None:
    """With DATABASE_TRANSACTION_POOLING=1, QuerySet.iterator() reads through a plain cursor: a named (server-side)
    cursor's later fetches could land on another server connection, where it does not exist."""
    # Half-way through an iterator, inside one transaction (so one server connection): does the session hold a
    # cursor (pg_cursors lists the session's declared cursors)?
    show = "\n".join(
        [
            "import json",
            "from django.db import connection, transaction",
            "from inference.models import Endpoint",
            "with transaction.atomic():",
            "    rows = Endpoint.objects.iterator(chunk_size=1)",
            "    next(rows)",
            "    with connection.cursor() as cursor:",
            "        cursor.execute('SELECT count(*) FROM pg_cursors')",
            "        declared = cursor.fetchone()[0]",
            "    read = 1 + sum(1 for _ in rows)",
            "print(json.dumps([declared, read]))",
        ]
    )
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint

    ensure_builtin_endpoints(Endpoint)
    upstream_port = int(connection.settings_dict.get("PORT") or 5432)
    with running_pgbouncer(tmp_path / "pgbouncer", upstream_port=upstream_port, pool_size=2) as bouncer:
        through_bouncer = database_url(host="127.0.0.1", port=bouncer.port, password=bouncer.password)
        answers = {}
        for pooling in ("1", "0"):
            env = base_env(
                SECRET_KEY="pgbouncer-test-" + "x" * 40,
                DATABASE_URL=through_bouncer,
                DATABASE_TRANSACTION_POOLING=pooling,
                PLATFORM_DATA_DIR=str(tmp_path / "data"),
            )
            result = subprocess.run(
                [str(ENTRYPOINT), "manage", "shell", "-c", show],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, result.stderr
            answers[pooling] = json.loads(result.stdout.strip().splitlines()[-1])
    assert answers["1"] == [0, Endpoint.objects.count()]
    assert answers["0"] == [1, Endpoint.objects.count()]  # what the setting prevents: a named cursor
