"""What the platform adds on top of the model: submit latency, queue overhead, sustained submits/s.

    python -m tests.bench.queue_overhead [--jobs 30] [--submits 300] [--concurrency 8]
        [--servers uvicorn,gunicorn:1,gunicorn:2] [--rounds 3]

Starts the platform (the web process as production starts it unless ``--servers`` says otherwise, a GPU worker on
the ``cpu`` queue, the housekeeping worker with beat) against a fresh database (a SQLite file, or DATABASE_URL) and the
broker (REDIS_URL, or a private redis-server as the embedded run starts), then measures, one job at a time on the
tiny model (64x64, 2 steps):

- submit latency: the client's POST /queue/... round trip;
- submit to worker start: the job row's started_at minus created_at;
- end-to-end minus GPU time: finished_at minus created_at, less the job's measured GPU time;

next to the baseline, bare Celery (``inference.probe`` sent to the same queue on the same broker:
when it started running, and the round trip with its result read back), and the sustained rate
of submissions over keep-alive connections. Submit to worker start compares with the bare send to
task start; end-to-end minus GPU time with the bare round trip. Every figure, and every ratio,
comes from this one run.

``--servers`` names the web processes to start, all at once on their own ports: ``uvicorn`` (one process, as the
embedded run), ``gunicorn`` (deploy/gunicorn.conf.py as production starts it, its own worker count),
``gunicorn:N`` (the same with N uvicorn workers, ``WEB_CONCURRENCY=N``) and ``gthread:N:T`` (the same file with
gunicorn's threaded WSGI workers instead, N processes of T threads, for comparison). The one-at-a-time jobs go
through the first. The sustained rate is then measured on each in turn, ``--rounds`` times, the order rotating each
round, with the GPU worker's consumer paused (the model would otherwise take a core from the web process on these
shared cores, as a GPU worker never does in production) and the backlog cancelled between rounds, so every round
starts from the same database; each server's median of rounds is printed with its ratio to the first's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
JOB = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
JOB_TIMEOUT_SECONDS = 600  # one job of JOB, the model's first load included


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[max(0, int(len(ordered) * 0.99) - 1)]


def line(name: str, values_ms: list[float], baseline_ms: float | None = None) -> str:
    p50, p99 = percentiles(values_ms)
    ratio = f"  {p50 / baseline_ms:5.2f}x the bare Celery p50 above" if baseline_ms else ""
    return f"  {name:34} p50 {p50:8.1f} ms   p99 {p99:8.1f} ms{ratio}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30, help="jobs measured one at a time")
    parser.add_argument("--submits", type=int, default=300, help="submissions for the sustained rate")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--servers",
        default="gunicorn",
        help="web processes, comma-separated: uvicorn, gunicorn (deploy/gunicorn.conf.py), gunicorn:N, gthread:N:T",
    )
    parser.add_argument("--rounds", type=int, default=3, help="sustained rounds per server")
    parser.add_argument(
        "--web-cpus",
        default="",
        help="CPUs the web processes may run on (taskset's list, e.g. 0: a pod of one core); default: all",
    )
    args = parser.parse_args()
    servers = [Server.parse(spec) for spec in args.servers.split(",")]
    from tests.bench.capacity import Backends, group_cpu  # here: it imports this module's helpers

    data_dir = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    redis_server = None
    if not os.environ.get("REDIS_URL"):
        from config.embedded_redis import EmbeddedRedis

        redis_server = EmbeddedRedis(data_dir)
        redis_server.start()
        os.environ["REDIS_URL"] = redis_server.url
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": "bench-only-secret-key",
        "PLATFORM_DATA_DIR": str(data_dir),
        "LOG_LEVEL": "WARNING",
        "JOB_HEARTBEAT_MS": "500",
        "CELERY_RESULT_BACKEND": os.environ["REDIS_URL"],
    }
    scratch_database = None
    admin_url = os.environ.get("DATABASE_URL", "")
    if os.environ.get("DATABASE_URL", "").startswith("postgres"):
        # A database of its own, dropped at the end: the benchmark never writes into yours.
        env["DATABASE_URL"], scratch_database = scratch_postgres(os.environ["DATABASE_URL"])
        os.environ["DATABASE_URL"] = env["DATABASE_URL"]
    os.environ.update({key: env[key] for key in ("DJANGO_SETTINGS_MODULE", "SECRET_KEY", "PLATFORM_DATA_DIR")})
    os.environ["CELERY_RESULT_BACKEND"] = env["CELERY_RESULT_BACKEND"]
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=env, cwd=REPO, check=True)

    import django

    django.setup()
    from accounts.models import Organization
    from accounts.services import create_api_key, sign_up
    from billing.ledger import grant_credits
    from config.celery import app
    from inference.models import Job, JobStatus

    user = sign_up(email="bench@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=10_000)
    # Every round's submissions are held for: the sign-up credit would run out.
    grant_credits(organization=organization, amount_micros=10**12, reason="queue benchmark")
    _, key = create_api_key(
        organization=organization, name="bench", scopes=["inference"], created_by=user, requests_per_minute=10**9
    )

    celery = [sys.executable, "-m", "celery", "--app", "config", "worker", "--loglevel", "WARNING"]
    commands = [
        [*celery, "--queues", "cpu", "--concurrency", "1", "--prefetch-multiplier", "1", "-n", "bench-gpu@%h"],
        [*celery, "--queues", "default", "--concurrency", "1", "-n", "bench-hk@%h", "--beat", "--schedule",
         str(data_dir / "beat")],
    ]  # fmt: skip
    # The processes' own output (shutdown chatter included) goes to files beside the data, not into the report.
    pin = ["taskset", "--cpu-list", args.web_cpus] if args.web_cpus else []
    launches = [(command, env) for command in commands] + [
        ([*pin, *command], server_env) for command, server_env in (server.launch(env) for server in servers)
    ]
    processes = [
        subprocess.Popen(
            command,
            env=process_env,
            cwd=REPO,
            start_new_session=True,
            stdout=(data_dir / f"process-{number}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for number, (command, process_env) in enumerate(launches)
    ]
    base = f"http://127.0.0.1:{servers[0].port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60)
    try:
        for server in servers:
            wait_until(
                lambda port=server.port: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200,
                timeout=90,
                message=f"{server.spec} to start",
                interval=0.2,
                ignoring=(httpx.HTTPError,),
                failure=SystemExit,
            )

        def run_one() -> tuple[float, Job]:
            started = time.perf_counter()
            response = client.post("/queue/platform/tiny-sd", json=JOB)
            submit_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            job_id = response.json()["request_id"]

            def ended() -> Job | None:
                job = Job.objects.get(pk=job_id)
                return job if job.is_final else None

            job = wait_until(
                ended,
                timeout=JOB_TIMEOUT_SECONDS,
                message=f"job {job_id} to end",
                interval=0.01,
                failure=SystemExit,
            )
            if job.status != JobStatus.COMPLETED:
                raise SystemExit(f"job {job_id} ended {job.status}: {job.error}")
            return submit_ms, job

        # Warm-up: the first job loads the model (cold start) and warms every path.
        for _ in range(3):
            run_one()
            app.send_task("inference.probe", queue="cpu", ignore_result=False).get(timeout=60, interval=0.005)

        baseline: list[float] = []
        baseline_start: list[float] = []
        submit: list[float] = []
        to_start: list[float] = []
        to_dispatch: list[float] = []
        dispatch_to_start: list[float] = []
        overhead: list[float] = []
        gpu: list[float] = []
        for _ in range(args.jobs):
            started, sent_at = time.perf_counter(), time.time()
            pending = app.send_task("inference.probe", queue="cpu", ignore_result=False)
            ran_at = pending.get(timeout=60, interval=0.005)
            baseline.append((time.perf_counter() - started) * 1000)
            baseline_start.append((ran_at - sent_at) * 1000)
            submit_ms, job = run_one()
            assert job.started_at
            assert job.finished_at
            submit.append(submit_ms)
            to_start.append((job.started_at - job.created_at).total_seconds() * 1000)
            assert job.dispatched_at
            to_dispatch.append((job.dispatched_at - job.created_at).total_seconds() * 1000)
            dispatch_to_start.append((job.started_at - job.dispatched_at).total_seconds() * 1000)
            overhead.append((job.finished_at - job.created_at).total_seconds() * 1000 - job.gpu_ms)
            gpu.append(job.gpu_ms)

        async def sustained(server_base: str) -> float:
            async with httpx.AsyncClient(
                base_url=server_base, headers={"Authorization": f"Key {key}"}, timeout=60
            ) as async_client:
                per_connection = args.submits // args.concurrency

                async def submitter() -> None:
                    for _ in range(per_connection):
                        (await async_client.post("/queue/platform/tiny-sd", json=JOB)).raise_for_status()

                started = time.perf_counter()
                await asyncio.gather(*(submitter() for _ in range(args.concurrency)))
                return per_connection * args.concurrency / (time.perf_counter() - started)

        # Warm every server's workers (each process loads its memos on its first requests), then the rounds.
        app.control.cancel_consumer("cpu", reply=True, timeout=5)
        for server in servers:
            asyncio.run(sustained(f"http://127.0.0.1:{server.port}"))
            cancel_backlog(organization.pk)
        rates: dict[str, list[float]] = {server.spec: [] for server in servers}
        # CPU per submission of the server's processes and of PostgreSQL's backends (tests/bench/capacity.py's
        # readings): what bounds the rate on shared cores, where the wall-clock rate moves with others' load.
        web_cpu: dict[str, list[float]] = {server.spec: [] for server in servers}
        database_cpu: dict[str, list[float]] = {server.spec: [] for server in servers}
        backends = Backends(admin_url, scratch_database).start() if scratch_database else None
        for round_number in range(args.rounds):
            shift = round_number % len(servers)
            for server in servers[shift:] + servers[:shift]:
                process = processes[len(commands) + servers.index(server)]
                web_before, database_before = group_cpu(process.pid), backends.total() if backends else 0.0
                rates[server.spec].append(asyncio.run(sustained(f"http://127.0.0.1:{server.port}")))
                count = args.submits // args.concurrency * args.concurrency
                web_cpu[server.spec].append((group_cpu(process.pid) - web_before) * 1000 / count)
                if backends:
                    database_cpu[server.spec].append((backends.total() - database_before) * 1000 / count)
                cancel_backlog(organization.pk)
        if backends:
            backends.stop()

        database = "PostgreSQL" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
        broker = "a private Redis, as make run starts" if redis_server else "Redis (REDIS_URL)"
        print(
            f"{servers[0].described} + GPU worker + housekeeping worker; database {database}, broker {broker};"
            f" {os.cpu_count()} cores; {args.jobs} jobs one at a time, tiny model 64x64, 2 steps"
        )
        start_p50, _ = percentiles(baseline_start)
        trip_p50, _ = percentiles(baseline)
        print(line("bare Celery: send to task start", baseline_start))
        print(line("bare Celery: round trip with result", baseline))
        print(line("submit latency (HTTP POST)", submit))
        print(line("submit to worker start", to_start, start_p50))
        # The two halves: the submission's transaction (the row made, admitted, committed) until dispatch took the
        # organization's lock; then the dispatch statement, its COMMIT, the message to the broker and the worker.
        print(line("  of which: made to dispatched", to_dispatch))
        print(line("  of which: dispatched to start", dispatch_to_start, start_p50))
        print(line("end-to-end minus GPU time", overhead, trip_p50))
        print(line("GPU time (model, for scale)", gpu))
        pinned = f", web processes on CPUs {args.web_cpus} only" if args.web_cpus else ""
        print(
            f"sustained submits over {args.concurrency} connections, {args.submits} requests a round, GPU worker"
            f" paused{pinned}; per server: the rounds, their median and its ratio to the first server's, and the"
            f" median CPU per submission of the server's processes and of PostgreSQL:"
        )
        first = statistics.median(rates[servers[0].spec])
        for server in servers:
            rounds = rates[server.spec]
            database_ms = f"{statistics.median(database_cpu[server.spec]):5.1f}" if backends else "    -"
            print(
                f"  {server.described:52} {' '.join(f'{rate:5.0f}' for rate in rounds)}   median"
                f" {statistics.median(rounds):5.0f}/s {statistics.median(rounds) / first:5.2f}x   CPU ms: web"
                f" {statistics.median(web_cpu[server.spec]):5.1f}, PostgreSQL {database_ms}"
            )
    finally:
        client.close()
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        if redis_server is not None:
            redis_server.stop()
        if scratch_database:
            from django.db import connections

            connections.close_all()
            drop_postgres(os.environ["DATABASE_URL"], scratch_database)


class Server:
    """A web process to start: the command line and environment of one ``--servers`` entry."""

    def __init__(self, spec: str, kind: str, workers: int | None, threads: int | None) -> None:
        self.spec, self.kind, self.workers, self.threads = spec, kind, workers, threads
        self.port = free_port()

    @classmethod
    def parse(cls, spec: str) -> Server:
        kind, *numbers = spec.strip().split(":")
        counts = [int(number) for number in numbers]
        if kind == "uvicorn" and not counts:
            return cls(spec, kind, None, None)
        if kind == "gunicorn" and len(counts) <= 1:
            return cls(spec, kind, counts[0] if counts else None, None)
        if kind == "gthread" and len(counts) == 2:
            return cls(spec, kind, counts[0], counts[1])
        raise SystemExit(f"--servers: {spec!r} is not uvicorn, gunicorn, gunicorn:N or gthread:N:T")

    @property
    def described(self) -> str:
        if self.kind == "uvicorn":
            return "uvicorn, 1 process"
        if self.kind == "gthread":
            return f"gunicorn gthread (WSGI), {self.workers} x {self.threads} threads"
        workers = f"{self.workers}" if self.workers else "the config's"
        return f"gunicorn + {workers} uvicorn workers (deploy/gunicorn.conf.py)"

    def launch(self, env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
        if self.kind == "uvicorn":
            return [
                sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(self.port),
                "--no-access-log", "--log-level", "warning",
            ], env  # fmt: skip
        # As deploy/entrypoint.sh starts the web process; its log lines (access log included) go to a file.
        server_env = {**env, "BIND": f"127.0.0.1:{self.port}"}
        if self.workers:
            server_env["WEB_CONCURRENCY"] = str(self.workers)
        command = [sys.executable, "-m", "gunicorn", "--config", "deploy/gunicorn.conf.py"]
        if self.kind == "gthread":
            command += ["--worker-class", "gthread", "--threads", str(self.threads), "config.wsgi:application"]
        else:
            command.append("config.asgi:application")
        return command, server_env


def cancel_backlog(organization_id: object) -> None:
    """Cancels what a round left queued (through the API's own cancel: holds released, nothing billed) and empties
    the paused GPU queue, so every round starts from the same database."""
    from django.db import transaction

    from config.celery import app
    from inference.closing import cancel_job
    from inference.models import Job

    for job in Job.objects.filter(organization_id=organization_id, finished_at__isnull=True):
        with transaction.atomic():
            cancel_job(job=job)
    with app.connection_for_write() as connection:
        connection.default_channel.queue_purge("cpu")


def scratch_postgres(url: str) -> tuple[str, str]:
    import psycopg

    name = f"bench_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}", name


def drop_postgres(url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
