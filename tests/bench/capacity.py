"""What one core of each process type sustains: the figures behind deploy/CAPACITY.md.

    DATABASE_URL=postgres://... python -m tests.bench.capacity [--seconds 15] [--clients 6] [--jobs 60]

The production process types, started by the image's entrypoint (deploy/entrypoint.sh) as the Kubernetes pods run
them, against a scratch PostgreSQL database (dropped at the end) and a private Redis:

1. one web pod (gunicorn with one uvicorn worker: one core's worth) under ``--clients`` keep-alive clients for
   ``--seconds`` per kind of request: ``GET /healthz`` (the framework's floor), an authenticated ``GET /v1/me``, a
   status poll, and a submission (admission, the insert, and on commit the dispatch and the broker's message);
2. then a GPU worker on the cpu queue, a housekeeping worker and beat: first idle for ``--idle`` seconds (what the
   periodic tasks cost with nothing to do), then ``--jobs`` jobs from four organizations, each with a webhook to a
   receiver on loopback, until every job is completed and every webhook delivered.

**CPU time, not wall time.** Each figure is the CPU time a process type spent, read from /proc for its processes
(the pod's process group) and for the PostgreSQL backends serving the scratch database (found in pg_stat_activity,
sampled twice a second), divided by the requests or jobs it served. On a shared machine the wall-clock rates move
with everyone else's load (they are printed, for scale); CPU per request moves much less. "Per core" is 1000 / CPU
ms: what one fully busy core would serve, before any headroom.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import psycopg

from tests.bench.queue_overhead import drop_postgres, scratch_postgres
from tests.deploy.processes import Platform, base_env, free_port
from tests.waiting import pace, wait_until

REPO = Path(__file__).resolve().parents[2]
TICKS = os.sysconf("SC_CLK_TCK")
# The benchmark's own connections (setting up rows, watching jobs end) are left out of PostgreSQL's figures.
OWN_NAME = "capacity-benchmark"
BODY = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
# Longer than PostgreSQL keeps an idle backend's counts before reporting them (PGSTAT_MIN_INTERVAL, 1 s).
STATS_SETTLE_SECONDS = 1.5


def process_cpu(pid: int) -> float:
    """CPU seconds of one process (user + system), 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def group_cpu(pgid: int) -> float:
    """CPU seconds of every live process of a process group (a pod: gunicorn and its worker, Celery and its pool)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


@dataclass
class Backends:
    """CPU seconds of the PostgreSQL backends serving one database, sampled in the background (a backend's last
    reading is kept after it exits)."""

    admin_url: str
    database: str
    seen: dict[int, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Backends:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def _run(self) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            while not self._stop.is_set():
                self.sample(connection)
                pace(0.5)

    def sample(self, connection: psycopg.Connection[Any]) -> None:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name <> %s", [self.database, OWN_NAME]
        ).fetchall()
        for (pid,) in rows:
            cpu = process_cpu(pid)
            if cpu:
                self.seen[pid] = max(self.seen.get(pid, 0.0), cpu)

    def total(self) -> float:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            self.sample(connection)
        return sum(self.seen.values())

    def stop(self) -> None:
        self._stop.set()


@dataclass
class Meter:
    """CPU seconds of the pods and of PostgreSQL between two readings."""

    pods: Platform
    backends: Backends

    def read(self) -> dict[str, float]:
        readings = {name: group_cpu(process.pid) for name, process in self.pods.processes.items()}
        readings["postgres"] = self.backends.total()
        return readings


def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}


def load(base: str, key: str, request: Callable[[httpx.Client], httpx.Response], clients: int, seconds: float) -> int:
    """``clients`` threads send ``request`` for ``seconds``; the number of 2xx answers."""
    done = [0] * clients
    failures: list[str] = []
    deadline = time.monotonic() + seconds

    def run(index: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60) as client:
            while time.monotonic() < deadline:
                answer = request(client)
                if answer.is_success:
                    done[index] += 1
                elif len(failures) < 3:
                    failures.append(f"{answer.status_code} {answer.text[:200]}")

    threads = [threading.Thread(target=run, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"requests failed: {failures}")
    return sum(done)


class Receiver(BaseHTTPRequestHandler):
    """A webhook receiver that answers 200 at once."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        return


def wait_for(condition: Callable[[], bool], timeout: float, what: str, pods: Platform) -> None:
    """Polls ``condition`` until it holds; a pod that exits (``all_running`` raises) or the deadline ends the run."""

    def met() -> bool:
        if condition():
            return True
        pods.all_running()
        return False

    wait_until(met, timeout=timeout, message=lambda: f"{what}\n{pods.all_logs()}", interval=0.5, failure=SystemExit)


def wait_for_settled_commits(admin_url: str, database: str, timeout: float = 60) -> None:
    """Polls the commits counted for ``database`` until they stop changing. A backend reports its counts when it
    idles, at most once a second (PostgreSQL's PGSTAT_MIN_INTERVAL): two readings STATS_SETTLE_SECONDS apart that
    agree mean the counts of the work just done are in. Read from the admin database, so the readings do not count
    themselves."""
    readings: list[int] = []
    with psycopg.connect(admin_url, autocommit=True) as connection:

        def unchanged() -> bool:
            row = connection.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", [database]
            ).fetchone()
            readings.append(int(row[0]) if row else 0)
            return len(readings) >= 2 and readings[-1] == readings[-2]

        wait_until(
            unchanged,
            timeout=timeout,
            interval=STATS_SETTLE_SECONDS,
            message=lambda: f"the commit count of {database} to settle (read {readings[-5:]})",
            failure=SystemExit,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15, help="seconds of load per kind of request")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--idle", type=float, default=20, help="seconds the workers idle before the jobs")
    parser.add_argument("--jobs", type=int, default=60)
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith("postgres"):
        raise SystemExit("the capacity benchmark measures PostgreSQL: set DATABASE_URL=postgres://...")

    folder = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    scratch_url, scratch = scratch_postgres(url)
    from config.embedded_redis import EmbeddedRedis

    redis = EmbeddedRedis(folder / "redis")
    redis.start()
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    env = base_env(
        SECRET_KEY="bench-capacity-" + "k" * 40,
        DATABASE_URL=scratch_url,
        REDIS_URL=redis.url,
        LOG_LEVEL="WARNING",
        DATABASE_POOL_MAX_SIZE="4",
        # Production's timers (deploy/environment.md), not the tests' fast ones: heartbeats and sweeps are work.
        JOB_LEASE_SECONDS="30",
        JOB_HEARTBEAT_MS="1000",
        JOB_SWEEP_SECONDS="5",
        JOB_REDISPATCH_AFTER_SECONDS="60",
    )
    os.environ.update(
        DJANGO_SETTINGS_MODULE="config.settings",
        SECRET_KEY=env["SECRET_KEY"],
        DATABASE_URL=scratch_url,
        PLATFORM_DATA_DIR=str(folder / "bench"),
        PGAPPNAME=OWN_NAME,  # libpq's application_name, for this process only (the pods' env is built above)
    )
    os.environ.pop("REDIS_URL", None)  # this process only sets up rows; the pods use the private Redis
    backends = Backends(url.rsplit("/", 1)[0] + "/postgres", scratch).start()
    pods = Platform(folder=folder / "pods", env=env)
    try:
        subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=env, cwd=REPO, check=True)
        import django

        django.setup()
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
        run(args, pods, backends, receiver.server_address[1])
    finally:
        pods.stop_all()
        backends.stop()
        receiver.shutdown()
        redis.stop()
        drop_postgres(url, scratch)


def tenants(count: int) -> list[tuple[Any, str]]:
    from accounts.models import Organization
    from accounts.services import create_api_key, sign_up
    from billing.ledger import grant_credits

    made = []
    for _ in range(count):
        user = sign_up(email=f"capacity-{uuid.uuid4().hex[:8]}@example.com", password=None)
        organization = Organization.objects.get(memberships__user=user)
        Organization.objects.filter(pk=organization.pk).update(concurrency_limit=10_000)
        grant_credits(organization=organization, amount_micros=10**12, reason="benchmark")
        _, key = create_api_key(
            organization=organization, name="bench", scopes=["inference"], created_by=user, requests_per_minute=10**9
        )
        made.append((organization, key))
    return made


def run(args: argparse.Namespace, pods: Platform, backends: Backends, receiver_port: int) -> None:
    from django.db import connection

    from inference.models import Job, JobStatus, WebhookDelivery, WebhookStatus

    organizations = tenants(4)
    _, key = organizations[0]
    meter = Meter(pods, backends)
    base = pods.start_web("web", free_port(), WEB_CONCURRENCY="1")
    connection.close()  # the setup's own backend is not the pods'
    with httpx.Client(base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60) as client:
        first = client.post("/queue/platform/tiny-sd", json=BODY).json()["request_id"]
    status_path = f"/queue/platform/tiny-sd/requests/{first}/status"

    kinds: list[tuple[str, Callable[[httpx.Client], httpx.Response]]] = [
        ("GET /healthz", lambda client: client.get("/healthz")),
        ("GET /v1/me (authenticated)", lambda client: client.get("/v1/me")),
        ("GET .../status (a poll)", lambda client: client.get(status_path)),
        ("POST /queue/... (submit)", lambda client: client.post("/queue/platform/tiny-sd", json=BODY)),
    ]
    load_before = os.getloadavg()[0]
    web_rows = []
    for name, request in kinds:
        load(base, key, request, args.clients, 2)  # warm-up, not counted
        before = meter.read()
        started = time.monotonic()
        served = load(base, key, request, args.clients, args.seconds)
        elapsed = time.monotonic() - started
        used = spent(before, meter.read())
        web_rows.append((name, served / elapsed, used["web"] * 1000 / served, used["postgres"] * 1000 / served))

    # The web phase's submissions are cancelled before any worker starts (a cancel while queued costs nothing), so
    # the worker finds only cancelled jobs behind their messages.
    from inference.closing import cancel_job

    for job in Job.objects.filter(status__in=(JobStatus.QUEUED, JobStatus.DISPATCHED)):
        cancel_job(job=job)
    connection.close()

    # The jobs: the web pod, a GPU worker, housekeeping and beat.
    pods.start("gpu", "worker", "cpu", "--hostname", "cpu@bench", "--loglevel", "WARNING")
    pods.start("housekeeping", "housekeeping", "--hostname", "housekeeping@bench", "--loglevel", "WARNING")
    pods.start("beat", "beat", "--loglevel", "WARNING")
    # One job first, not measured: the worker loads its model (and goes through the cancelled jobs' messages).
    with httpx.Client(base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60) as client:
        warm = client.post("/queue/platform/tiny-sd", json=BODY).json()["request_id"]
    wait_for(
        lambda: Job.objects.filter(pk=warm, status=JobStatus.COMPLETED).exists(),
        timeout=600,
        what="the worker's first job",
        pods=pods,
    )
    connection.close()
    before, idle_commits = meter.read(), commits()
    pace(args.idle)  # the idle window measured
    idle, idle_commits = spent(before, meter.read()), commits() - idle_commits

    webhook = f"http://127.0.0.1:{receiver_port}/hook"
    before, job_commits = meter.read(), commits()
    started = time.monotonic()
    submitted = []
    with httpx.Client(base_url=base, timeout=60) as client:
        for number in range(args.jobs):
            organization_key = organizations[number % len(organizations)][1]
            answer = client.post(
                f"/queue/platform/tiny-sd?fal_webhook={webhook}",
                json={**BODY, "seed": number},
                headers={"Authorization": f"Key {organization_key}"},
            )
            assert answer.status_code == 200, answer.text
            submitted.append(answer.json()["request_id"])
    wait_for(
        lambda: (
            Job.objects.filter(pk__in=submitted, status=JobStatus.COMPLETED).count() == len(submitted)
            and WebhookDelivery.objects.filter(job__in=submitted, status=WebhookStatus.DELIVERED).count()
            == len(submitted)
        ),
        timeout=1800,
        what="every job completed and its webhook delivered",
        pods=pods,
    )
    elapsed = time.monotonic() - started
    jobs = spent(before, meter.read())
    wait_for_settled_commits(backends.admin_url, backends.database)  # the pods' backends report them when they idle
    job_commits = commits() - job_commits
    transactions = (job_commits - idle_commits / args.idle * elapsed) / args.jobs
    gpu_ms = sorted(Job.objects.filter(pk__in=submitted).values_list("gpu_ms", flat=True))

    print(f"\nOn {os.cpu_count()} cores, load average {load_before:.1f} at the start ({time.strftime('%Y-%m-%d')}).")
    print("\nOne web pod (gunicorn, one uvicorn worker), CPU per request:")
    print(f"  {'request':<28} {'req/s (wall)':>12} {'web CPU ms':>11} {'per web core':>13} {'PG CPU ms':>10}")
    for name, rate, web_ms, pg_ms in web_rows:
        print(f"  {name:<28} {rate:>12.1f} {web_ms:>11.2f} {1000 / web_ms:>11.0f}/s {pg_ms:>10.2f}")
    print(f"\nIdle for {args.idle:g} s (periodic tasks only), CPU ms per second:")
    for name in ("housekeeping", "beat", "gpu", "postgres"):
        print(f"  {name:<14} {idle[name] * 1000 / args.idle:8.1f}")
    print(
        f"\n{args.jobs} jobs (64x64, 2 steps, median GPU time {statistics.median(gpu_ms)} ms) with a webhook each, "
        f"{elapsed:.1f} s: CPU ms per job, the idle cost of the same time taken out"
    )
    for name, note in (
        ("web", "the submission (and its dispatch on commit)"),
        ("housekeeping", "the webhook's delivery, and the sweeps' share"),
        ("postgres", "the whole life: submit, dispatch, claim, heartbeats, finish, settle, webhook"),
        ("gpu", "the worker, the model's own run included (on the CPU here)"),
    ):
        per_job = (jobs[name] - idle.get(name, 0.0) / args.idle * elapsed) * 1000 / args.jobs
        per_core = f"{1000 / per_job:,.0f} jobs/s per core" if per_job > 0 and name != "gpu" else ""
        print(f"  {name:<14} {per_job:8.2f}  {per_core:<22} {note}")
    print(f"  PostgreSQL transactions per job: {transactions:.1f} (pg_stat_database, the idle rate taken out)")


def commits() -> int:
    """Transactions committed in the scratch database so far (a backend reports its counts when it idles or ends)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        row = cursor.fetchone()
    return int(row[0]) if row else 0


if __name__ == "__main__":
    main()
