"""Request rate of an authenticated ``GET /v1/me`` against ``GET /healthz`` on a real ASGI server.

    python -m tests.bench.api_rate [--requests 3000] [--concurrency 16] [--rounds 3]

Starts uvicorn (one process, as the embedded run does) on a free loopback port, against
DATABASE_URL/REDIS_URL when set and a fresh SQLite file otherwise, creates a key with no rate
limit, then alternates rounds of /healthz (no auth, no database: the framework's floor) and /v1/me
(key lookup, hash check, serializers) through keep-alive HTTP/1.1 connections. It prints each
round and the median req/s, p50 and p99 latency, and /v1/me's rate as a ratio of /healthz's.
The load generator shares the machine's cores with the server, so absolute figures are a floor.
Each round also prints the CPU it cost per request (from /proc, Linux): the server's processes,
and this machine's PostgreSQL and Redis processes (all of them: run it on a machine otherwise idle).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from config.embedded_process import free_port
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


async def one_connection(
    port: int, path: str, headers: str, count: int, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}\r\n".encode()
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


def cpu_seconds(match: Callable[[int, str], bool]) -> float:
    """User and system CPU seconds of this machine's processes that ``match(pid, name)`` (Linux's /proc)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parent = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if match(int(entry.name), name) or match(parent, ""):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def process_families(server: int) -> dict[str, Callable[[int, str], bool]]:
    """The server (its workers are its children) and the services it talks to, by process name."""
    return {
        "server": lambda pid, name: pid == server,
        "postgres": lambda pid, name: name.startswith("postgres"),
        "redis": lambda pid, name: name.startswith("redis"),
    }


async def run_round(port: int, path: str, headers: str, total: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[int] = []
    per_connection = total // concurrency
    started = time.perf_counter()
    await asyncio.gather(
        *(one_connection(port, path, headers, per_connection, latencies, errors) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    if errors:
        raise SystemExit(f"{path}: {len(errors)} non-200 answers, e.g. {errors[:3]}")
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def make_key(env: dict[str, str]) -> str:
    script = (
        "import django; django.setup();"
        "from accounts.services import sign_up, create_api_key;"
        "from accounts.models import Organization;"
        "import uuid;"
        "u = sign_up(email=f'bench-{uuid.uuid4().hex[:8]}@example.com', password=None);"
        "o = Organization.objects.get(memberships__user=u);"
        "print(create_api_key(organization=o, name='bench', scopes=['inference'], created_by=u,"
        " requests_per_minute=10**9)[1])"
    )
    output = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    return output.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--server",
        choices=["uvicorn", "gunicorn"],
        default="uvicorn",
        help="uvicorn: one process, as the embedded run; gunicorn: deploy/gunicorn.conf.py, the production server",
    )
    parser.add_argument("--workers", type=int, default=2, help="gunicorn's uvicorn workers (WEB_CONCURRENCY)")
    args = parser.parse_args()

    data_dir = tempfile.mkdtemp(prefix="bench-api-")
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "SECRET_KEY": os.environ.get("SECRET_KEY", "bench-only-secret-key"),
        "PLATFORM_DATA_DIR": data_dir,
        "LOG_LEVEL": "WARNING",
    }
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], env=env, cwd=REPO, check=True)
    token = make_key(env)
    port = free_port()
    if args.server == "gunicorn":
        command = [sys.executable, "-m", "gunicorn", "-c", "deploy/gunicorn.conf.py", "config.asgi:application"]
        env = {**env, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(args.workers)}
        described = f"gunicorn with {args.workers} uvicorn workers (deploy/gunicorn.conf.py)"
    else:
        command = [sys.executable, "-m", "uvicorn", "config.asgi:application", "--port", str(port), "--no-access-log"]
        described = "uvicorn, 1 process"
    server = subprocess.Popen(
        command, env=env, cwd=REPO, stdout=subprocess.DEVNULL if args.server == "gunicorn" else None
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200,
            timeout=60,
            message=f"{described} to answer /healthz",
            interval=0.2,
            ignoring=(httpx.HTTPError,),
            failure=SystemExit,
        )
        database = "PostgreSQL" if os.environ.get("DATABASE_URL", "").startswith("postgres") else "SQLite"
        cache = "Redis" if os.environ.get("REDIS_URL") else "local memory"
        print(
            f"{described}; database {database}, cache {cache}; {os.cpu_count()} cores shared with the client;"
            f" {args.requests} requests a round over {args.concurrency} keep-alive connections"
        )
        auth = f"Authorization: Key {token}\r\n"
        asyncio.run(run_round(port, "/v1/me", auth, 400, 4))  # warm-up
        results: dict[str, list[dict[str, float]]] = {"/healthz": [], "/v1/me": []}
        for number in range(1, args.rounds + 1):
            for path, headers in (("/healthz", ""), ("/v1/me", auth)):
                families = process_families(server.pid)
                before = {family: cpu_seconds(match) for family, match in families.items()}
                result = asyncio.run(run_round(port, path, headers, args.requests, args.concurrency))
                cpu = {
                    family: (cpu_seconds(match) - before[family]) / args.requests * 1000
                    for family, match in families.items()
                }
                results[path].append(result)
                print(
                    f"  round {number} {path:9} {result['rps']:8.0f} req/s"
                    f"  p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms"
                    "  CPU per request: " + ", ".join(f"{family} {ms:.2f} ms" for family, ms in cpu.items())
                )
        summary = {
            path: {key: statistics.median(r[key] for r in rounds) for key in ("rps", "p50_ms", "p99_ms")}
            for path, rounds in results.items()
        }
        print("median of rounds:")
        for path, figures in summary.items():
            print(
                f"  {path:9} {figures['rps']:8.0f} req/s  p50 {figures['p50_ms']:6.2f} ms"
                f"  p99 {figures['p99_ms']:6.2f} ms"
            )
        ratio = summary["/v1/me"]["rps"] / summary["/healthz"]["rps"]
        print(f"authenticated /v1/me runs at {ratio:.2f}x the rate of /healthz")
        print(json.dumps({"summary": summary, "ratio_me_to_healthz": round(ratio, 3)}))
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    main()
