"""The job lifecycle end to end (docs/lifecycle.md): fairness, idempotency, webhooks, the status
stream, cancels, a worker killed mid-job, a broker outage and the sync API's fallback.

Plain httpx against the HTTPS server, real Celery workers, and the database (which the test
process shares with them) to observe what the API does not show.
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from django.utils import timezone
from standardwebhooks import Webhook

from inference.models import Job, JobAttempt
from tests import sessions
from tests.e2e.conftest import Stack
from tests.lifecycle import active_counts
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

APP = "platform/tiny-sd"
FINAL = ("COMPLETED", "FAILED", "CANCELLED")
ACTIVE = ("DISPATCHED", "RUNNING")


def request_body(size: int = 64, steps: int = 8, images: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse at dusk",
        "image_size": {"width": size, "height": size},
        "num_inference_steps": steps,
        "num_images": images,
        **extra,
    }


QUICK = request_body()
# Several seconds of work on this CPU (and many more under load): long enough to observe or kill.
LONG = request_body(size=256, steps=50)


# Tenants and observation helpers.


def new_tenant(concurrency_limit: int | None = None) -> dict[str, Any]:
    """Like the ``e2e_tenant`` fixture, for tests that need several tenants."""
    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up

    user = sign_up(email=f"e2e-{os.urandom(4).hex()}@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)
    if concurrency_limit is not None:
        set_concurrency_limit(organization, concurrency_limit)
    _, key = create_api_key(
        organization=organization, name="e2e", scopes=[Scope.INFERENCE, Scope.USAGE_READ], created_by=user
    )
    return {"user": user, "organization": organization, "key": key}


@pytest.fixture
def make_tenant(e2e_tenant: dict[str, Any]) -> Callable[..., dict[str, Any]]:
    return new_tenant  # e2e_tenant made sure the built-in endpoints exist


def set_concurrency_limit(organization: Any, limit: int) -> None:
    organization.concurrency_limit = limit
    organization.save(update_fields=["concurrency_limit"])


def job_row(request_id: str) -> Job:
    return Job.objects.get(pk=request_id)


def attempts_of(request_id: str) -> list[JobAttempt]:
    return list(JobAttempt.objects.filter(job_id=request_id).order_by("number"))


def wait_for_job(stack: Stack, request_id: str, condition: Callable[[Any], bool], timeout: float, what: str) -> Any:
    """Polls the job row until ``condition(job)`` and returns the row; fails with the workers' logs otherwise."""
    seen: list[Job] = []

    def job_if_ready() -> Job | None:
        seen[:] = [job_row(request_id)]
        return seen[0] if condition(seen[0]) else None

    def state() -> str:
        job = seen[0]
        return (
            f"job {request_id} to {what}; it is {job.status} (step {job.progress_step}/{job.progress_total})"
            f"\n--- gpu worker ---\n{stack.log_tail('gpu')}\n--- housekeeping ---\n{stack.log_tail('housekeeping', 30)}"
        )

    return wait_until(job_if_ready, timeout=timeout, message=state)


def wait_final(stack: Stack, request_id: str, timeout: float = 90) -> Any:
    return wait_for_job(stack, request_id, lambda job: job.status in FINAL, timeout, "finish")


def wait_running(stack: Stack, request_id: str, timeout: float = 60) -> Any:
    return wait_for_job(
        stack,
        request_id,
        lambda job: job.status == "RUNNING" and job.progress_step >= 1,
        timeout,
        "run its first step",
    )


def sweeps_since(stack: Stack, offset: int) -> int:
    """Sweeps the housekeeping worker finished after ``offset`` bytes of its log."""
    log = stack.logs["housekeeping"].read_bytes()[offset:]
    return len(re.findall(rb"Task inference\.sweep\[[^\]]+\] succeeded", log))


def submit(client: httpx.Client, body: dict[str, Any], **kwargs: Any) -> str:
    response = client.post(f"/queue/{APP}", json=body, **kwargs)
    assert response.status_code == 200, response.text
    return str(response.json()["request_id"])


def fal_status(client: httpx.Client, request_id: str) -> dict[str, Any]:
    response = client.get(f"/queue/{APP}/requests/{request_id}/status")
    assert response.status_code == 200, response.text
    return dict(response.json())


def cancel(client: httpx.Client, request_id: str) -> httpx.Response:
    return client.put(f"/queue/{APP}/requests/{request_id}/cancel")


def ensure_gpu_worker(stack: Stack) -> None:
    if "gpu" not in stack.processes:
        stack.start_gpu_worker()


# 1. Fairness: a tenant's burst waits behind its own limit, never in front of another tenant.


def test_a_burst_waits_behind_its_own_limit_not_in_front_of_other_tenants(
    stack: Stack, make_tenant: Callable[..., dict[str, Any]]
) -> None:
    busy, a, b = make_tenant(), make_tenant(concurrency_limit=1), make_tenant()
    with (
        stack.client(busy["key"]) as busy_client,
        stack.client(a["key"]) as a_client,
        stack.client(b["key"]) as b_client,
    ):
        # A third tenant keeps the only GPU worker busy, so the queue holds still while we look at it.
        blocker = submit(busy_client, LONG)
        wait_running(stack, blocker)

        burst = [submit(a_client, {**QUICK, "seed": seed}) for seed in range(6)]
        statuses = [fal_status(a_client, request_id) for request_id in burst]
        assert job_row(blocker).status == "RUNNING", "the blocker finished while the queue was read"
        assert [status["status"] for status in statuses] == ["IN_QUEUE"] * 6
        positions = [status["queue_position"] for status in statuses]
        # One of A's requests is dispatched (first in line on the GPU class); five wait behind it.
        assert positions == [0, 1, 2, 3, 4, 5], positions
        assert [job_row(request_id).status for request_id in burst] == ["DISPATCHED"] + ["QUEUED"] * 5

        b_request = submit(b_client, QUICK)
        assert job_row(b_request).status in ("DISPATCHED", "RUNNING", "COMPLETED")  # not behind A's burst
        assert cancel(busy_client, blocker).status_code == 202

        everything = [*burst, b_request]
        active_counts: list[int] = []

        def all_final() -> bool:
            active_counts.append(Job.objects.filter(organization=a["organization"], status__in=ACTIVE).count())
            return not Job.objects.filter(pk__in=everything).exclude(status__in=FINAL).exists()

        wait_until(all_final, timeout=120, message=lambda: f"every request to finish\n{stack.log_tail('gpu')}")
        most_active = max(active_counts)

    jobs = {job.pk: job for job in Job.objects.filter(pk__in=everything)}
    assert {job.status for job in jobs.values()} == {"COMPLETED"}
    assert most_active == 1, f"tenant A had {most_active} jobs dispatched or running at once"
    b_started = jobs[uuid.UUID(b_request)].started_at
    started_after_b = [request_id for request_id in burst if jobs[uuid.UUID(request_id)].started_at > b_started]
    assert len(started_after_b) >= 4, "B waited behind A's burst"
    # A's own requests run in submission order.
    a_starts = [jobs[uuid.UUID(request_id)].started_at for request_id in burst]
    assert a_starts == sorted(a_starts)


def test_requests_the_broker_lost_are_sent_again_oldest_first(
    stack: Stack, make_tenant: Callable[..., dict[str, Any]]
) -> None:
    """The sweep re-sends what the broker lost in the order it was queued, not newest first
    (before 0b25a25 redispatch_stale had no order_by, so Job.Meta.ordering sent the newest first)."""
    if stack.broker is None:
        pytest.skip("needs a private redis-server as the broker")
    busy, a, b = make_tenant(), make_tenant(), make_tenant()
    with (
        stack.client(busy["key"]) as busy_client,
        stack.client(a["key"]) as a_client,
        stack.client(b["key"]) as b_client,
    ):
        blocker = submit(busy_client, LONG)
        wait_running(stack, blocker)
        older = submit(a_client, QUICK)
        newer = submit(b_client, QUICK)
        assert job_row(older).status == job_row(newer).status == "DISPATCHED"
        stack.broker.stop()  # a broker without persistence: both messages are lost
        try:
            assert cancel(busy_client, blocker).status_code == 202
            wait_final(stack, blocker)
            # Both are stale by the sweep's rule before the broker is back, so one sweep re-sends both.
            resend_after = timedelta(seconds=int(stack.env["JOB_REDISPATCH_AFTER_SECONDS"]))
            wait_until(
                lambda: (
                    Job.objects.filter(
                        pk__in=[older, newer], status="DISPATCHED", sent_at__lt=timezone.now() - resend_after
                    ).count()
                    == 2
                ),
                timeout=60,
                message="both requests to be unclaimed for longer than JOB_REDISPATCH_AFTER_SECONDS",
            )
        finally:
            stack.broker.start()
        wait_final(stack, older, timeout=90)
        wait_final(stack, newer, timeout=90)
    assert job_row(older).status == job_row(newer).status == "COMPLETED"
    assert job_row(older).started_at < job_row(newer).started_at, "the newer request ran first"


# 2. Idempotency-Key.


def test_idempotency_key_replays_the_same_request(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    organization = e2e_tenant["organization"]
    body = {**QUICK, "seed": 11}
    with stack.client(e2e_tenant["key"]) as client:
        first = client.post(f"/queue/{APP}", json=body, headers={"Idempotency-Key": "order-1"})
        second = client.post(f"/queue/{APP}", json=body, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == second.status_code == 200, (first.text, second.text)
        assert "Idempotent-Replayed" not in first.headers
        assert second.headers["Idempotent-Replayed"] == "true"
        request_id = first.json()["request_id"]
        assert second.json()["request_id"] == request_id
        assert second.headers["x-fal-request-id"] == request_id
        assert Job.objects.filter(organization=organization).count() == 1

        reused = client.post(f"/queue/{APP}", json={**body, "seed": 12}, headers={"Idempotency-Key": "order-1"})
        assert reused.status_code == 422, reused.text
        assert reused.json()["error_type"] == "idempotency_key_reused"
        assert Job.objects.filter(organization=organization).count() == 1

        other = client.post(f"/queue/{APP}", json=body, headers={"Idempotency-Key": "order-2"})
        assert other.status_code == 200, other.text
        assert "Idempotent-Replayed" not in other.headers
        assert other.json()["request_id"] != request_id

        # Clients that retry at once, side by side, still make one request.
        answers: list[httpx.Response] = []

        def send() -> None:
            with stack.client(e2e_tenant["key"]) as own:
                answers.append(own.post(f"/queue/{APP}", json=body, headers={"Idempotency-Key": "order-3"}))

        threads = [threading.Thread(target=send) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert [answer.status_code for answer in answers] == [200] * 4, [answer.text for answer in answers]
        assert len({answer.json()["request_id"] for answer in answers}) == 1
        assert sum(answer.headers.get("Idempotent-Replayed") == "true" for answer in answers) == 3
        assert Job.objects.filter(organization=organization).count() == 3

        # The replay of a finished request answers with the same request, not a new run.
        wait_final(stack, request_id)
        replay = client.post(f"/queue/{APP}", json=body, headers={"Idempotency-Key": "order-1"})
        assert replay.json()["request_id"] == request_id
        assert len(attempts_of(request_id)) == 1
    for job in Job.objects.filter(organization=organization):
        wait_final(stack, str(job.pk))


# 3. Webhooks.


class Receiver:
    """A webhook receiver on 127.0.0.1: every POST is queued as (path, headers, body)."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.put((self.path, {key.lower(): value for key, value in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self, timeout: float = 60) -> tuple[str, dict[str, str], bytes]:
        return self.received.get(timeout=timeout)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    try:
        yield server
    finally:
        server.close()


def wait_for_delivery_log(client: httpx.Client, request_id: str, timeout: float = 30) -> dict[str, Any]:
    last: list[Any] = [None]

    def settled_webhook() -> dict[str, Any] | None:
        response = client.get(f"/v1/requests/{request_id}")
        assert response.status_code == 200, response.text
        last[0] = webhook = response.json()["webhook"]
        return dict(webhook) if webhook and webhook["status"] != "pending" else None

    return wait_until(
        settled_webhook, timeout=timeout, message=lambda: f"the webhook's delivery to be logged; last seen {last[0]}"
    )


def test_webhooks_are_signed_and_logged(stack: Stack, e2e_tenant: dict[str, Any], receiver: Receiver) -> None:
    from inference.webhooks import webhook_secret_for

    with stack.client(e2e_tenant["key"]) as client:
        request_id = submit(client, QUICK, params={"fal_webhook": receiver.url})
        path, headers, body = receiver.next()
        assert path == "/hook"
        signed = Webhook(webhook_secret_for(e2e_tenant["organization"].id)).verify(body, headers)
        assert signed["request_id"] == request_id
        assert signed["status"] == "OK"
        assert signed["error"] is None
        image_url = signed["payload"]["images"][0]["url"]
        assert httpx.get(image_url, verify=stack.ssl_context(), timeout=30).status_code == 200
        assert job_row(request_id).status == "COMPLETED"

        webhook = wait_for_delivery_log(client, request_id)
        assert webhook["status"] == "delivered"
        assert webhook["url"] == receiver.url
        assert webhook["attempts"] == 1
        assert [(entry["attempt"], entry["status_code"]) for entry in webhook["log"]] == [(1, 200)]
        assert webhook["log"][0]["response"] == "ok"

        # A cancelled request sends an error webhook.
        cancelled = submit(client, LONG, params={"fal_webhook": receiver.url})
        assert cancel(client, cancelled).status_code == 202
        path, headers, body = receiver.next()
        signed = Webhook(webhook_secret_for(e2e_tenant["organization"].id)).verify(body, headers)
        assert signed["request_id"] == cancelled
        assert signed["status"] == "ERROR"
        assert signed["error"]
        assert signed["payload"]["error_type"] == "cancelled"
        assert headers["webhook-id"].startswith("msg_")
        assert wait_for_delivery_log(client, cancelled)["status"] == "delivered"
        wait_final(stack, cancelled)
    assert receiver.received.empty(), "a webhook was sent twice"


# 4. The status stream.


def test_status_stream_follows_the_request_until_it_completes(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    set_concurrency_limit(e2e_tenant["organization"], 1)
    steps = 6
    with stack.client(e2e_tenant["key"]) as client:
        ahead = submit(client, LONG)  # holds the tenant's only slot, so ours starts IN_QUEUE
        wait_for_job(stack, ahead, lambda job: job.status == "RUNNING", 60, "never started")
        # As large as the endpoint takes, so that most steps outlast the stream's 100 ms poll on a fast machine too.
        request_id = submit(client, request_body(size=256, steps=steps, images=4))
        events: list[dict[str, Any]] = []
        failures: list[BaseException] = []

        def follow_stream() -> None:
            try:
                with client.stream("GET", f"/queue/{APP}/requests/{request_id}/status/stream") as stream:
                    assert stream.status_code == 200
                    assert stream.headers["content-type"].startswith("text/event-stream")
                    for line in stream.iter_lines():
                        if line.startswith("data:"):
                            events.append(json.loads(line.removeprefix("data:")))
            except BaseException as exc:  # raised again in the test's own thread
                failures.append(exc)

        reader = threading.Thread(target=follow_stream, daemon=True)
        reader.start()
        wait_until(lambda: events or failures, timeout=60, message="the stream's first event")
        assert cancel(client, ahead).status_code == 202  # let ours go
        # The stream ends by itself, after the final event.
        wait_until(
            lambda: not reader.is_alive(),
            timeout=120,
            message=lambda: f"the stream to end after the final event; the last ones: {events[-5:]}",
        )
        if failures:
            raise failures[0]
    assert events
    assert all(event["request_id"] == request_id for event in events)
    phases = [event["status"] for event in events]
    collapsed = [phase for i, phase in enumerate(phases) if i == 0 or phases[i - 1] != phase]
    assert collapsed == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"], phases
    assert events[0]["queue_position"] == 0
    progress = [event["progress"] for event in events if event["status"] == "IN_PROGRESS"]
    counted = [entry for entry in progress if entry["total"]]
    assert progress[: len(progress) - len(counted)] == [{"step": 0, "total": 0}] * (len(progress) - len(counted))
    assert {entry["total"] for entry in counted} == {steps}
    # The stream samples the row every 100 ms: steps only go forward, end at the last one, and most are seen
    # (two steps finishing inside one poll legitimately show as one).
    seen = [entry["step"] for entry in counted]
    assert seen == sorted(set(seen)), progress
    assert seen[-1] == steps, progress
    assert len(seen) * 2 >= steps, progress
    assert events[-1]["error"] is None
    assert job_row(request_id).status == "COMPLETED"


# 5. Cancelling a queued request.


def test_cancelling_a_queued_request_never_runs_or_bills_it(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    set_concurrency_limit(e2e_tenant["organization"], 1)
    with stack.client(e2e_tenant["key"]) as client:
        running = submit(client, LONG)
        wait_running(stack, running)
        waiting = submit(client, QUICK)
        assert job_row(waiting).status == "QUEUED"

        response = cancel(client, waiting)
        assert response.status_code == 202, response.text
        assert response.json() == {"status": "CANCELLATION_REQUESTED"}
        status = fal_status(client, waiting)
        assert status["status"] == "COMPLETED"
        assert status["error_type"] == "cancelled"
        assert status["error"]
        result = client.get(f"/queue/{APP}/requests/{waiting}")
        assert result.status_code == 400
        assert result.json()["error_type"] == "cancelled"

        # Sent again (its first answer lost on the way, say): answered as the first was, and nothing changes.
        again = cancel(client, waiting)
        assert again.status_code == 202
        assert again.json() == {"status": "CANCELLATION_REQUESTED"}
        assert job_row(waiting).status == "CANCELLED"
        unknown = cancel(client, str(uuid.uuid4()))
        assert unknown.status_code == 404
        assert unknown.json()["status"] == "NOT_FOUND"

        # The running one stops at its next step and frees the slot; the cancelled one must not take it.
        assert cancel(client, running).json() == {"status": "CANCELLATION_REQUESTED"}
        stopped = wait_final(stack, running)
        assert stopped.status == "CANCELLED"
        assert [attempt.outcome for attempt in attempts_of(running)] == ["cancelled"]
        # The slot is free: two sweeps finished since, and neither gave it to the cancelled request.
        offset = stack.logs["housekeeping"].stat().st_size
        wait_until(
            lambda: sweeps_since(stack, offset) >= 2,
            timeout=60,
            message=lambda: f"two sweeps after the stop\n{stack.log_tail('housekeeping', 30)}",
        )
        # Cancelled again once stopped: answered as the accepted cancel was (a retry whose answer was lost).
        again = cancel(client, running)
        assert (again.status_code, again.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    job = job_row(waiting)
    assert job.status == "CANCELLED"
    assert job.error_type == "cancelled"
    assert job.started_at is None
    assert job.gpu_ms == 0
    assert attempts_of(waiting) == []


# 8. The sync API: waits as long as the request takes, answers 504 (never a queue handle) past its timeout, ends a
# request that missed its start deadline unbilled, refuses bad input and bad keys.


SYNC_RUN_TIMEOUT_SECONDS = 2


@pytest.fixture
def short_sync_timeout(stack: Stack) -> Iterator[Stack]:
    """The server with a sync-run timeout of SYNC_RUN_TIMEOUT_SECONDS."""
    with stack.restarted("web", SYNC_RUN_TIMEOUT_SECONDS=str(SYNC_RUN_TIMEOUT_SECONDS)) as restarted:
        yield restarted


def test_run_past_its_timeout_answers_504_and_the_request_goes_on(
    short_sync_timeout: Stack, e2e_tenant: dict[str, Any]
) -> None:
    from billing.models import Account

    stack = short_sync_timeout
    set_concurrency_limit(e2e_tenant["organization"], 1)
    with stack.client(e2e_tenant["key"]) as client:
        # With the GPU worker paused, a dispatched request holds the tenant's only slot until it is cancelled,
        # however fast the machine: ours waits in the queue behind it past the sync run's timeout.
        with stack.paused("gpu"):
            blocker = submit(client, QUICK)
            assert job_row(blocker).status == "DISPATCHED"
            response = client.post(f"/run/{APP}", json={**QUICK, "seed": 5}, timeout=90)
            assert response.status_code == 504, response.text
            answer = response.json()
            request_id = answer["request_id"]
            assert answer["error_type"] == "timeout"
            assert answer["detail"]
            assert "images" not in answer
            assert response.headers["x-fal-request-id"] == request_id
            assert response.headers["X-Fal-Request-Timeout-Type"] == "user"  # never resent: it goes on
            assert job_row(request_id).status == "QUEUED"

            # A start deadline that passes while the request waits ends it at that moment, unbilled.
            held_before = Account.objects.get(organization=e2e_tenant["organization"]).held_micros
            late = client.post(
                f"/run/{APP}", json={**QUICK, "seed": 6}, headers={"X-Fal-Request-Timeout": "1.5"}, timeout=90
            )
            assert late.status_code == 504, late.text
            assert late.headers["X-Fal-Request-Timeout-Type"] == "user"
            assert late.json()["error_type"] == "timeout"
            late_job = job_row(late.headers["x-fal-request-id"])
            assert late_job.status == "CANCELLED"
            assert late_job.error_type == "timeout"
            assert late_job.started_at is None
            assert late_job.gpu_ms == 0
            assert attempts_of(str(late_job.pk)) == []
            assert Account.objects.get(organization=e2e_tenant["organization"]).held_micros == held_before
            assert cancel(client, blocker).status_code == 202
        # The request that outlived the sync run was not lost: it runs, and its result is at its URL.
        wait_final(stack, request_id)
        assert client.get(answer["status_url"]).json()["status"] == "COMPLETED"
        result = client.get(answer["response_url"])
        assert result.status_code == 200, result.text
        assert result.json()["seed"] == 5
        assert len(result.json()["images"]) == 1
        expired = client.get(f"/queue/{APP}/requests/{late_job.pk}")
        assert expired.status_code == 504, expired.text
        assert expired.headers["X-Fal-Request-Timeout-Type"] == "user"


def test_run_waits_as_long_as_the_request_takes_and_refuses_bad_calls(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    with stack.client(e2e_tenant["key"]) as client:
        outcome: dict[str, httpx.Response] = {}
        with stack.paused("gpu"):
            runner = threading.Thread(
                target=lambda: outcome.update(
                    response=client.post(f"/run/{APP}", json={**QUICK, "seed": 9}, timeout=120)
                )
            )
            runner.start()
            # The run waits on a request no worker can take until the worker is resumed.
            waiting = wait_until(
                lambda: Job.objects.filter(organization=e2e_tenant["organization"], input__seed=9).first(),
                timeout=30,
                message="the sync run's request to be stored",
            )
            wait_until(lambda: job_row(str(waiting.pk)).status == "DISPATCHED", timeout=30, message="its dispatch")
            assert "response" not in outcome
        runner.join(timeout=120)
        response = outcome["response"]
        assert response.status_code == 200, response.text
        assert response.json()["seed"] == 9
        assert response.headers["x-fal-request-id"] == str(waiting.pk)

        invalid = client.post(f"/run/{APP}", json={"num_inference_steps": 10_000})
        assert invalid.status_code == 422, invalid.text
        assert isinstance(invalid.json()["detail"], list)
        locations = [item["loc"] for item in invalid.json()["detail"]]
        assert ["body", "prompt"] in locations
        assert ["body", "num_inference_steps"] in locations

    key_id = e2e_tenant["key"].split(":", 1)[0]
    for key in (f"{key_id}:wrong-secret", "nonsense"):
        with stack.client(key) as stranger:
            refused = stranger.post(f"/run/{APP}", json=QUICK)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error_type"]
    with stack.client() as anonymous:
        assert anonymous.post(f"/run/{APP}", json=QUICK).status_code == 401


# 6. A worker killed in the middle of a job.


def test_a_worker_killed_mid_job_is_replaced_and_the_job_billed_once(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    with stack.client(e2e_tenant["key"]) as client:
        # Long enough to be killed in the middle; short enough that the rerun from scratch is quick.
        request_id = submit(client, request_body(size=256, steps=20))
        wait_running(stack, request_id)
        try:
            stack.kill("gpu")
            killed_at = time.time()
        finally:
            ensure_gpu_worker(stack)
        # The reaper notices once the lease (3 s) has lapsed, at the next sweep (every second).
        wait_until(
            lambda: [attempt.outcome for attempt in attempts_of(request_id)][:1] == ["lost"],
            timeout=30,
            message=lambda: f"the reaper to close the killed attempt\n{stack.log_tail('housekeeping', 30)}",
        )
        # Completion also waits for a new worker to start and rerun the job, slow on a loaded machine.
        job = wait_for_job(stack, request_id, lambda job: job.status in FINAL, 120, "finish after the kill")
        status = fal_status(client, request_id)
    assert job.status == "COMPLETED", job.error
    assert status["status"] == "COMPLETED"
    assert status["error"] is None
    first, second = attempts_of(request_id)
    assert (first.number, first.outcome) == (1, "lost")
    assert first.finished_at is not None
    assert first.finished_at.timestamp() > killed_at
    assert first.gpu_ms > 0  # the GPU time it held, recorded, unbilled
    assert not first.billable
    assert (second.number, second.outcome) == (2, "succeeded")
    assert second.worker != first.worker
    assert second.started_at >= first.finished_at
    assert job.attempt == 2
    assert job.gpu_ms == second.gpu_ms > 0
    assert job.error == ""
    # The reaper's requeue and the rerun's finish kept the count the dispatch reads.
    summed, counted = active_counts(e2e_tenant["organization"].pk)
    assert summed == counted


# 6b. A worker killed while its claim waits for the submission its message was sent ahead of.


def test_a_worker_killed_while_waiting_for_a_submission_leaves_its_job_to_the_sweep(
    stack: Stack, e2e_tenant: dict[str, Any]
) -> None:
    """The submission's dispatch is held up (this test holds its organization's row), so the GPU worker that took
    the job's message, sent ahead of the commit, waits on the submission's end. Killed there, it took the message
    with it: the submission still answers, its job is dispatched, and the sweep sends it again to the new worker,
    which runs it once."""
    import psycopg
    import redis
    from django.db import connection

    redis_url = stack.env.get("REDIS_URL")
    if connection.vendor != "postgresql" or not redis_url:
        pytest.skip("a message goes ahead of its commit on PostgreSQL, with Redis for its mark")
    conninfo = sessions.conninfo()
    answers: list[httpx.Response] = []

    def waiting_claims() -> int:
        """Clients waiting on a submission's end (``inference.dispatch.await_end``), in the stack's Redis."""
        clients = redis.Redis.from_url(redis_url).client_list()
        return sum(1 for client in clients if client.get("cmd") == "blmove" and "b" in client["flags"])

    with stack.client(e2e_tenant["key"]) as client, psycopg.connect(**conninfo) as blocker:
        blocker.execute(
            "SELECT 1 FROM accounts_organization WHERE id = %s FOR NO KEY UPDATE", [e2e_tenant["organization"].pk]
        )
        poster = threading.Thread(target=lambda: answers.append(client.post(f"/queue/{APP}", json=QUICK)))
        poster.start()
        try:
            wait_until(
                lambda: waiting_claims() == 1,
                timeout=60,
                message=lambda: f"the GPU worker's claim to wait for the submission\n{stack.log_tail('gpu')}",
            )
            stack.kill("gpu")
        finally:
            blocker.rollback()  # the submission's dispatch goes on
            poster.join(60)
            ensure_gpu_worker(stack)
        assert len(answers) == 1
        assert answers[0].status_code == 200, answers[0].text
        request_id = answers[0].json()["request_id"]
        job = wait_final(stack, request_id, timeout=90)
        status = fal_status(client, request_id)
    assert job.status == "COMPLETED", job.error
    assert status["status"] == "COMPLETED"
    assert [(attempt.number, attempt.outcome) for attempt in attempts_of(request_id)] == [(1, "succeeded")]
    assert job.attempt == 1
    # The sweep sent it again: the killed worker took its message unacknowledged, and the broker gives such a message
    # back only after its visibility timeout (an hour).
    assert job.sent_at > job.dispatched_at
    assert waiting_claims() == 0


# 7. The broker down when a request comes in.


def test_a_request_submitted_while_the_broker_is_down_runs_once_it_is_back(
    stack: Stack, e2e_tenant: dict[str, Any]
) -> None:
    if stack.broker is None:
        pytest.skip("needs a private redis-server as the broker")
    with stack.client(e2e_tenant["key"]) as client:
        stack.broker.stop()
        try:
            # The broker's connect timeout is a second: the submit answers long before this one.
            response = client.post(f"/queue/{APP}", json=QUICK, timeout=15)
            assert response.status_code == 200, response.text
            request_id = response.json()["request_id"]
            assert response.json()["status"] == "IN_QUEUE"
            assert fal_status(client, request_id)["status"] == "IN_QUEUE"
            assert f"broker refused job {request_id}" in stack.logs["web"].read_text(errors="replace")
            job = job_row(request_id)
            assert (job.status, job.attempt) == ("QUEUED", 0)
        finally:
            stack.broker.start()
        job = wait_final(stack, request_id, timeout=60)
        assert job.status == "COMPLETED", job.error
        assert [attempt.outcome for attempt in attempts_of(request_id)] == ["succeeded"]
        # The server's own connection to the broker recovered too: new requests run as usual.
        after = submit(client, QUICK)
        assert wait_final(stack, after, timeout=60).status == "COMPLETED"
        assert f"broker refused job {after}" not in stack.logs["web"].read_text(errors="replace")
