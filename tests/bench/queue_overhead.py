"""What the platform adds on top of the model: submit latency, queue overhead, sustained submits/s.

    python -m tests.bench.queue_overhead [--jobs 30] [--submits 300] [--concurrency 8]

Starts the platform as the embedded run does (uvicorn, a GPU worker on the ``cpu`` queue, the
housekeeping worker with beat) against a fresh database (a SQLite file, or DATABASE_URL) and the
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

REPO = Path(__file__).resolve().parents[2]
JOB = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


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
    args = parser.parse_args()

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
    from config.celery import app
    from inference.models import Job, JobStatus

    user = sign_up(email="bench@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)
    Organization.objects.filter(pk=organization.pk).update(concurrency_limit=10_000)
    _, key = create_api_key(
        organization=organization, name="bench", scopes=["inference"], created_by=user, requests_per_minute=10**9
    )

    port = free_port()
    celery = [sys.executable, "-m", "celery", "--app", "config", "worker", "--loglevel", "WARNING"]
    commands = [
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port), "--no-access-log",
         "--log-level", "warning"],
        [*celery, "--queues", "cpu", "--concurrency", "1", "--prefetch-multiplier", "1", "-n", "bench-gpu@%h"],
        [*celery, "--queues", "default", "--concurrency", "1", "-n", "bench-hk@%h", "--beat", "--schedule",
         str(data_dir / "beat")],
    ]  # fmt: skip
    # The processes' own output (shutdown chatter included) goes to files beside the data, not into the report.
    processes = [
        subprocess.Popen(
            command,
            env=env,
            cwd=REPO,
            start_new_session=True,
            stdout=(data_dir / f"process-{number}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for number, command in enumerate(commands)
    ]
    base = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if client.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)

        def run_one() -> tuple[float, Job]:
            started = time.perf_counter()
            response = client.post("/queue/platform/tiny-sd", json=JOB)
            submit_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            job_id = response.json()["request_id"]
            while True:
                job = Job.objects.get(pk=job_id)
                if job.is_final:
                    if job.status != JobStatus.COMPLETED:
                        raise SystemExit(f"job {job_id} ended {job.status}: {job.error}")
                    return submit_ms, job
                time.sleep(0.01)

        # Warm-up: the first job loads the model (cold start) and warms every path.
        for _ in range(3):
            run_one()
            app.send_task("inference.probe", queue="cpu", ignore_result=False).get(timeout=60, interval=0.005)

        baseline: list[float] = []
        baseline_start: list[float] = []
        submit: list[float] = []
        to_start: list[float] = []
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
            overhead.append((job.finished_at - job.created_at).total_seconds() * 1000 - job.gpu_ms)
            gpu.append(job.gpu_ms)

        async def sustained() -> float:
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60
            ) as async_client:
                per_connection = args.submits // args.concurrency

                async def submitter() -> None:
                    for _ in range(per_connection):
                        (await async_client.post("/queue/platform/tiny-sd", json=JOB)).raise_for_status()

                started = time.perf_counter()
                await asyncio.gather(*(submitter() for _ in range(args.concurrency)))
                return per_connection * args.concurrency / (time.perf_counter() - started)

        rate = asyncio.run(sustained())

        database = "PostgreSQL" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
        broker = "a private Redis, as make run starts" if redis_server else "Redis (REDIS_URL)"
        print(
            f"uvicorn (1 process) + GPU worker + housekeeping worker; database {database}, broker {broker};"
            f" {os.cpu_count()} cores; {args.jobs} jobs one at a time, tiny model 64x64, 2 steps"
        )
        start_p50, _ = percentiles(baseline_start)
        trip_p50, _ = percentiles(baseline)
        print(line("bare Celery: send to task start", baseline_start))
        print(line("bare Celery: round trip with result", baseline))
        print(line("submit latency (HTTP POST)", submit))
        print(line("submit to worker start", to_start, start_p50))
        print(line("end-to-end minus GPU time", overhead, trip_p50))
        print(line("GPU time (model, for scale)", gpu))
        print(f"  sustained submits: {rate:.0f}/s over {args.concurrency} connections ({args.submits} requests)")
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
