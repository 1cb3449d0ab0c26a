"""Waiting on a request over HTTPS, against the real server and workers: a client that disconnects from ``POST /run``
or ``/stream`` leaves its request running and billed as usual, and many sync runs wait at once without a thread
each (inference/api.py, inference/streaming.py)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from billing.models import CreditEntry, Price, UsageRecord
from billing.money import divide_half_up
from billing.pricing import price_for
from billing.rates import ensure_opening_prices
from config import request_threads
from inference.models import Job, JobStatus
from tests.e2e.conftest import Stack
from tests.e2e.test_fal_client import set_concurrency_limit
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
SMALL = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
# Long enough to be caught running, however fast the machine (the worker checks for a cancel between steps; nothing
# here cancels).
RUNNING = {**SMALL, "image_size": {"width": 256, "height": 256}, "num_inference_steps": 12}


@pytest.fixture(autouse=True)
def _priced() -> None:
    """The opening rate card (a transactional test before this one may have emptied the table its migration
    filled): every request here is billed at a price above zero."""
    ensure_opening_prices(Price)


@contextmanager
def raw_request(stack: Stack, path: str, key: str, body: dict[str, Any], accept: str) -> Iterator[ssl.SSLSocket]:
    """An HTTP/1.1 request written on a TLS socket of its own, left open for the block: closing it is the client
    going away, with nothing of an HTTP client library in between."""
    address = urlsplit(stack.base_url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Key {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nAccept: {accept}\r\n\r\n"
    )
    raw = socket.create_connection((address.hostname, address.port), timeout=60)
    with closing(stack.ssl_context().wrap_socket(raw, server_hostname=address.hostname)) as connection:
        connection.sendall(head.encode() + payload)
        yield connection


def billed_as_usual(job: Job) -> UsageRecord:
    """The request finished with its output, one billable usage record costs its GPU time at the endpoint's price,
    and the ledger debited exactly that."""
    assert job.status == JobStatus.COMPLETED, (job.status, job.error)
    assert job.result
    assert job.result["images"]
    record = UsageRecord.objects.get(job=job)
    quote = price_for(job.endpoint, record.started_at, job.organization_id)
    assert (record.billable, record.unit, record.unit_price_micros) == (True, "gpu_second", quote.unit_price_micros)
    assert quote.unit_price_micros > 0
    assert record.gpu_ms == job.gpu_ms > 0
    assert record.cost_micros == divide_half_up(record.gpu_ms * quote.unit_price_micros, 1000) > 0
    debit = CreditEntry.objects.get(usage_record=record)
    assert debit.amount_micros == -record.cost_micros
    return record


def finished(job_id: Any) -> Job | None:
    job = Job.objects.select_related("endpoint").get(pk=job_id)
    return job if job.is_final and UsageRecord.objects.filter(job=job).exists() else None


def test_a_run_whose_client_disconnects_goes_on_and_is_billed(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    organization, key = e2e_tenant["organization"], e2e_tenant["key"]
    with raw_request(stack, f"/run/{APP}", key, {**RUNNING, "seed": 31}, "application/json"):
        running = wait_until(
            lambda: Job.objects.filter(organization=organization, input__seed=31, status=JobStatus.RUNNING).first(),
            timeout=120,
            message=lambda: f"the run's request to start\n{stack.log_tail('web')}\n{stack.log_tail('gpu')}",
        )
        assert running.progress_step < RUNNING["num_inference_steps"]
    # The socket is closed: nobody waits for the answer any more.
    job = wait_until(
        lambda: finished(running.pk), timeout=120, message=lambda: f"the request to finish\n{stack.log_tail('gpu')}"
    )
    billed_as_usual(job)
    with stack.client(key) as client:
        result = client.get(f"/queue/{APP}/requests/{job.pk}")
    assert result.status_code == 200, result.text
    assert result.json()["usage"]["cost_micros"] == UsageRecord.objects.get(job=job).cost_micros


def test_a_stream_whose_client_disconnects_goes_on_and_is_billed(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    organization, key = e2e_tenant["organization"], e2e_tenant["key"]
    with raw_request(stack, f"/run/{APP}/stream", key, {**RUNNING, "seed": 32}, "text/event-stream") as connection:
        received = b""
        # The stream has begun: its headers and a first event are in.
        while b"data: " not in received.partition(b"\r\n\r\n")[2]:
            chunk = connection.recv(65536)
            assert chunk, f"the server closed the stream before its first event: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 "), received
        running = wait_until(
            lambda: Job.objects.filter(organization=organization, input__seed=32, status=JobStatus.RUNNING).first(),
            timeout=120,
            message=lambda: f"the streamed request to start\n{stack.log_tail('gpu')}",
        )
        assert running.progress_step < RUNNING["num_inference_steps"]
    job = wait_until(
        lambda: finished(running.pk), timeout=120, message=lambda: f"the request to finish\n{stack.log_tail('gpu')}"
    )
    billed_as_usual(job)


def threads_of(pid: int) -> int:
    """The number of threads the process has now (Linux's /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


# More waiting runs than the server has threads to lend: the waiters' looks run on asyncio's default executor, at most
# min(32, cores + 4) threads (the server runs on this machine, with this Python); the stack's database pool
# (DATABASE_POOL_MAX_SIZE) holds 4 connections. The submits' burst leaves at most MAX_IDLE request threads idle in the
# server's pool (config/request_threads.py), held by no request.
LOOK_THREADS = min(32, (os.cpu_count() or 1) + 4)
WAITING_RUNS = 64
# Besides those: a few runs may still be in their submit's hop to a thread when the threads are counted.
SUBMITTING = 8


def test_many_sync_runs_wait_at_once_without_a_thread_each(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    organization, key = e2e_tenant["organization"], e2e_tenant["key"]
    set_concurrency_limit(organization, WAITING_RUNS)
    web = stack.processes["web"].pid
    with stack.client(key) as client:  # a first run: what the server starts once (its listeners, pools) is running
        assert client.post(f"/run/{APP}", json={**SMALL, "seed": 100}).status_code == 200
    idle = threads_of(web)
    answers: dict[int, httpx.Response | BaseException] = {}

    async def run_all() -> None:
        limits = httpx.Limits(max_connections=WAITING_RUNS)
        headers = {"Authorization": f"Key {key}"}
        async with httpx.AsyncClient(
            base_url=stack.base_url, verify=stack.ssl_context(), headers=headers, limits=limits, timeout=300
        ) as client:

            async def run(seed: int) -> None:
                try:
                    answers[seed] = await client.post(f"/run/{APP}", json={**SMALL, "seed": seed})
                except BaseException as error:  # reported by the assertions below
                    answers[seed] = error

            await asyncio.gather(*(run(seed) for seed in range(1, WAITING_RUNS + 1)))

    runner = threading.Thread(target=asyncio.run, args=(run_all(),), daemon=True)
    with stack.paused("gpu"):  # no request can end: every run waits
        runner.start()
        wait_until(
            lambda: (
                Job.objects.filter(organization=organization, input__seed__lte=WAITING_RUNS).count() == WAITING_RUNS
            ),
            timeout=120,
            message="every run's request to be submitted",
        )
        waiting = threads_of(web)
        assert not answers, answers
    runner.join(timeout=300)
    assert not runner.is_alive(), f"{len(answers)} of {WAITING_RUNS} runs answered"
    assert waiting - idle <= LOOK_THREADS + SUBMITTING + request_threads.MAX_IDLE < WAITING_RUNS, (idle, waiting)
    for seed in range(1, WAITING_RUNS + 1):
        answer = answers[seed]
        assert isinstance(answer, httpx.Response), answer
        assert answer.status_code == 200, answer.text
        assert answer.json()["seed"] == seed


def test_api_requests_reuse_the_servers_connections_to_redis(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    # Django makes a cache object per request under ASGI; the rate limit's Redis round trip of each authenticated
    # request went over a new connection of its own (config/cache.py keeps one client per server and process).
    if not stack.env.get("REDIS_URL"):
        pytest.skip("the cache is in process memory without REDIS_URL")
    cache_redis = redis.Redis.from_url(stack.env["REDIS_URL"])

    def connections_received() -> int:
        return int(cache_redis.info("stats")["total_connections_received"])

    with stack.client(e2e_tenant["key"]) as client:
        assert client.get("/v1/me").status_code == 200
        before = connections_received()
        assert [client.get("/v1/me").status_code for _ in range(50)] == [200] * 50
    # The workers share that Redis: a few connections of theirs may arrive meanwhile, not one per request.
    assert connections_received() - before <= 5
