"""Redis killed under load and restarted (issue 14): submits never answer 5xx, every accepted request runs.

The stack as production runs it: one Redis (the stack's private redis-server) is the cache and the
broker of the HTTPS server and both workers. Clients keep submitting while it is SIGKILLed and for a
few seconds after; it comes back on the same port with nothing in it (no persistence), and the sweep
dispatches what waited in QUEUED and re-sends what the broker lost (docs/lifecycle.md).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from inference.models import Job
from tests.e2e.conftest import Stack
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
BODY = {"prompt": "a lighthouse in a storm", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
SUBMITTERS = 3
# Each submitter's pace: steady load the single CPU worker can drain afterwards (~6 submits/s in all).
PACE_SECONDS = 0.5
# Answers wanted in each phase, and how long Redis stays down at least (the incident: about 5 s).
BEFORE, DURING, AFTER = 6, 20, 6
OUTAGE_SECONDS = 5.0


@pytest.fixture
def production_redis(stack: Stack) -> Iterator[Stack]:
    with stack.restarted(REDIS_URL=stack.broker.url) as restarted:
        yield restarted


class Submitters:
    """Threads that submit at a steady pace until stopped, recording every answer (or transport error)."""

    def __init__(self, stack: Stack, key: str) -> None:
        self.stack = stack
        self.key = key
        # (answered at, status, body, seconds the answer took)
        self.answers: list[tuple[float, int, dict[str, Any] | str, float]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(SUBMITTERS)]

    def __enter__(self) -> Submitters:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def _run(self) -> None:
        with self.stack.client(self.key) as client:
            while not self._stop.wait(PACE_SECONDS):
                sent_at = time.monotonic()
                try:
                    response = client.post(f"/queue/{APP}", json=BODY)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                try:
                    body: dict[str, Any] | str = response.json()
                except ValueError:
                    body = response.text
                with self._lock:
                    self.answers.append((time.monotonic(), response.status_code, body, time.monotonic() - sent_at))

    def count_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for answered_at, *_ in self.answers if answered_at >= moment)


def readiness(stack: Stack) -> tuple[int, dict[str, Any]]:
    with stack.client() as client:
        response = client.get("/readyz")
        return response.status_code, response.json()


def test_submits_survive_redis_killed_and_every_accepted_request_completes(
    production_redis: Stack, e2e_tenant: dict[str, Any]
) -> None:
    from billing.ledger import grant_credits

    stack = production_redis
    organization = e2e_tenant["organization"]
    # Enough credit that admission never refuses for money while the queue grows, and no concurrency
    # limit to wait behind: every submit hands its job to the broker at once, the path the outage cuts.
    grant_credits(organization=organization, amount_micros=500_000_000, reason="outage test")
    organization.concurrency_limit = 1000
    organization.save(update_fields=["concurrency_limit"])
    web_log = stack.logs["web"]
    log_offset = web_log.stat().st_size
    assert readiness(stack)[0] == 200

    with Submitters(stack, e2e_tenant["key"]) as load:
        started = time.monotonic()
        wait_until(lambda: load.count_since(started) >= BEFORE, timeout=60, message="answers to the first submits")

        broker = stack.broker
        assert broker.process is not None
        broker.process.send_signal(signal.SIGKILL)
        broker.process.wait(10)
        killed_at = time.monotonic()
        wait_until(
            lambda: load.count_since(killed_at) >= DURING and time.monotonic() - killed_at >= OUTAGE_SECONDS,
            timeout=120,
            message=f"{DURING} answers with Redis down, for {OUTAGE_SECONDS:g} s at least",
        )
        # The probe's job is to say it; the cache check sees Redis itself, not the fail-soft answers.
        status, body = readiness(stack)
        assert status == 503, body
        assert body["checks"]["cache"].startswith("error: "), body
        assert body["checks"]["database"] == "ok", body

        broker.start()  # same port and password, empty
        restarted_at = time.monotonic()
        wait_until(lambda: readiness(stack)[0] == 200, timeout=60, message="readiness to recover")
        wait_until(
            lambda: load.count_since(restarted_at) >= AFTER, timeout=60, message="answers to submits after the restart"
        )

    assert load.errors == [], load.errors[:5]
    failed = [(status, body) for _, status, body, _ in load.answers if status >= 300]
    assert failed == [], failed[:5]
    during = [took for answered_at, _, _, took in load.answers if killed_at <= answered_at < restarted_at]
    assert len(during) >= DURING
    accepted = [str(body["request_id"]) for _, _, body, _ in load.answers if isinstance(body, dict)]
    assert len(accepted) == len(load.answers) == len(set(accepted))

    # Every accepted request runs once Redis is back: queued ones by the sweep, lost messages re-sent.
    unfinished: dict[str, str] = {}

    def all_completed() -> bool:
        statuses = dict(Job.objects.filter(pk__in=accepted).values_list("id", "status"))
        unfinished.clear()
        unfinished.update({str(job_id): status for job_id, status in statuses.items() if status != "COMPLETED"})
        return len(statuses) == len(accepted) and not unfinished

    wait_until(
        all_completed,
        timeout=120 + 3 * len(accepted),
        interval=0.25,
        message=lambda: (
            f"every accepted request to complete; {len(unfinished)} of {len(accepted)} unfinished:"
            f" {list(unfinished.items())[:5]}"
            f"\n--- gpu worker ---\n{stack.log_tail('gpu')}\n--- housekeeping ---\n{stack.log_tail('housekeeping')}"
        ),
    )

    outage_log = web_log.read_bytes()[log_offset:].decode(errors="replace")
    # The outage is in the server's log, once (not a line per request), and so is the recovery.
    assert outage_log.count("cache unavailable (") == 1, outage_log[-3000:]
    assert "cache available again" in outage_log
    # Submits during the outage reached the broker and were left QUEUED for the sweep (inference/dispatch.py).
    assert "broker refused job" in outage_log
    # Figures for the record, not assertions: how long a submit took with Redis down.
    during.sort()
    print(
        f"\n{len(accepted)} submits accepted, all 2xx; {len(during)} with Redis down took"
        f" {during[len(during) // 2] * 1000:.0f} ms (median), {during[-1] * 1000:.0f} ms (slowest);"
        f" {len(outage_log.splitlines())} server log lines in all"
    )
