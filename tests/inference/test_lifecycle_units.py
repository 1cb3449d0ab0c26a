"""The job lifecycle through its modules, without workers: dispatch order, reaping, cancel, inputs."""

from __future__ import annotations

import base64
import io
import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from PIL import Image

from accounts.models import Organization
from inference import attempts, closing, dispatch
from inference.models import AttemptOutcome, Endpoint, Job, JobAttempt, JobStatus
from inference.presenters import queue_position
from tests.lifecycle import SMALL, submit_as

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _credit_for_every_request(tenant: dict[str, Any]) -> None:
    """These tests queue several requests of the tenant: each must be admitted whatever admission holds for it (the
    price in force and the usage recorded for the endpoint depend on the tests that ran before in this database)."""
    from billing.ledger import grant_credits

    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="Dispatch tests")


def test_dispatch_sends_the_oldest_first_and_positions_are_distinct(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    sent: list[tuple[str, int, str]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=0)
    with django_capture_on_commit_callbacks(execute=True):
        jobs = [submit_as(tenant, builtin_endpoint, seed=n) for n in range(4)]
    assert sent == []  # over the limit: they wait
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=10)
    with django_capture_on_commit_callbacks(execute=True):
        assert dispatch.dispatch_organization(tenant["organization"].pk) == 4
    assert [job_id for job_id, _, _ in sent] == [str(job.id) for job in jobs]
    positions = [queue_position(Job.objects.get(pk=job.pk)) for job in jobs]
    assert positions == [0, 1, 2, 3]


def test_a_broker_that_refuses_is_asked_once_and_every_dispatched_job_waits_in_the_queue(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    attempts: list[str] = []

    def refuse(job_id: str, attempt: int, queue: str, **options: Any) -> None:
        attempts.append(job_id)
        raise ConnectionError("the broker is down")

    monkeypatch.setattr(dispatch, "publish_run", refuse)
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=0)
    with django_capture_on_commit_callbacks(execute=True):
        jobs = [submit_as(tenant, builtin_endpoint, seed=n) for n in range(4)]
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=10)
    with django_capture_on_commit_callbacks(execute=True):
        assert dispatch.dispatch_organization(tenant["organization"].pk) == 4
    # One refusal is enough to know: the submission does not wait on the broker once per waiting job.
    assert attempts == [str(jobs[0].id)]
    assert [Job.objects.get(pk=job.pk).status for job in jobs] == [JobStatus.QUEUED] * 4
    assert [Job.objects.get(pk=job.pk).attempt for job in jobs] == [0] * 4


def test_the_concurrency_limit_holds(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    sent: list[tuple[str, int, str]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        for n in range(5):
            submit_as(tenant, builtin_endpoint, seed=n)
    assert len(sent) == 2  # the default limit
    assert Job.objects.filter(status=JobStatus.QUEUED).count() == 3
    queued = Job.objects.filter(status=JobStatus.QUEUED).order_by("created_at")
    assert [queue_position(job) for job in queued] == [2, 3, 4]


def test_a_finished_job_hands_its_slot_to_the_oldest_waiting_one(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    sent: list[tuple[str, int, str]],
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        jobs = [submit_as(tenant, builtin_endpoint, seed=n) for n in range(4)]
    assert [job_id for job_id, _, _ in sent] == [str(jobs[0].pk), str(jobs[1].pk)]  # the default limit of 2
    for job in jobs[:2]:
        assert attempts.claim_job(job_id=str(job.pk), attempt=1, worker="test") is not None

    for finished, waiting in ((jobs[0], jobs[2]), (jobs[1], jobs[3])):
        with django_capture_on_commit_callbacks(execute=True):
            closing.finish_attempt(
                job_id=str(finished.pk), attempt=1, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=500, result={}
            )
        assert sent[-1] == (str(waiting.pk), 1, "cpu")
    assert not Job.objects.filter(status=JobStatus.QUEUED).exists()
    # A retry waits in the queue too, and takes the slot its own attempt freed.
    assert attempts.claim_job(job_id=str(jobs[2].pk), attempt=1, worker="test") is not None
    with django_capture_on_commit_callbacks(execute=True):
        closing.finish_attempt(
            job_id=str(jobs[2].pk), attempt=1, outcome=AttemptOutcome.ERRORED, gpu_ms=500, error="lost", retry=True
        )
    assert sent[-1] == (str(jobs[2].pk), 2, "cpu")
    assert len(sent) == 5


def test_redispatch_keeps_the_place_in_line(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    sent: list[tuple[str, int, str]],
    django_capture_on_commit_callbacks: Any,
    settings: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        job = submit_as(tenant, builtin_endpoint)
    before = Job.objects.get(pk=job.pk)
    Job.objects.filter(pk=job.pk).update(sent_at=timezone.now() - timedelta(hours=1))
    assert dispatch.redispatch_stale() == 1
    after = Job.objects.get(pk=job.pk)
    assert after.dispatched_at == before.dispatched_at
    assert after.sent_at > before.sent_at
    assert sent[-1] == (str(job.id), 1, "cpu")


def claimed(tenant: dict[str, Any], endpoint: Endpoint, sent: list[Any], capture: Any) -> Job:
    with capture(execute=True):
        job = submit_as(tenant, endpoint)
    running = attempts.claim_job(job_id=str(job.id), attempt=1, worker="test")
    assert running is not None
    return running


def test_a_cancelled_job_whose_worker_died_ends_cancelled(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    job = claimed(tenant, builtin_endpoint, sent, django_capture_on_commit_callbacks)
    assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"
    Job.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert closing.reap_expired_leases() == 1
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert job.error_type == "cancelled"
    assert JobAttempt.objects.get(job=job).outcome == AttemptOutcome.LOST


def test_one_bad_job_does_not_stop_the_reaper(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    sent: list[Any],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = claimed(tenant, builtin_endpoint, sent, django_capture_on_commit_callbacks)
    second = claimed(tenant, builtin_endpoint, sent, django_capture_on_commit_callbacks)
    Job.objects.filter(pk__in=[first.pk, second.pk]).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    real_close = closing._close

    def fail_for_first(job: Job, *args: Any, **kwargs: Any) -> None:
        if job.pk == first.pk:
            raise OverflowError("simulated")
        real_close(job, *args, **kwargs)

    monkeypatch.setattr(closing, "_close", fail_for_first)
    with django_capture_on_commit_callbacks(execute=True):
        assert closing.reap_expired_leases() == 1
    retried = Job.objects.get(pk=second.pk)
    assert (retried.status, retried.attempt) == (JobStatus.DISPATCHED, 2)  # queued again and sent at once
    assert Job.objects.get(pk=first.pk).status == JobStatus.RUNNING  # left for the next sweep


def api_submit(tenant: dict[str, Any], body: Any, **headers: str) -> Any:
    return tenant["client"].post(
        "/queue/platform/tiny-sd/image-to-image" if "image_url" in body else "/queue/platform/tiny-sd",
        data=json.dumps(body),
        content_type="application/json",
        **headers,
    )


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"prompt": None}, ["body", "prompt"]),
        ({"prompt": "a\u0000b"}, ["body", "prompt"]),
        ({"prompt": "x", "negative_prompt": "\ud800"}, ["body", "negative_prompt"]),
    ],
)
def test_text_postgres_cannot_store_is_422(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[Any], body: dict[str, Any], location: list[str]
) -> None:
    response = api_submit(tenant, body)
    assert response.status_code == 422, response.content
    assert location in [item["loc"] for item in response.json()["detail"]]
    assert not Job.objects.exists()


def test_a_corrupt_image_is_422(tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[Any]) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    png[29] ^= 0xFF  # inside the IHDR checksum: Pillow's verify() raises SyntaxError
    uri = "data:image/png;base64," + base64.b64encode(bytes(png)).decode()
    response = api_submit(tenant, {**SMALL, "image_url": uri})
    assert response.status_code == 422, response.content
    assert response.json()["detail"][0]["loc"] == ["body", "image_url"]


def test_an_absurd_retention_is_422(tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[Any]) -> None:
    response = api_submit(
        tenant,
        SMALL,
        HTTP_X_FAL_OBJECT_LIFECYCLE_PREFERENCE=json.dumps({"expiration_duration_seconds": 10**12}),
    )
    assert response.status_code == 422
    assert not Job.objects.exists()


def test_the_result_body_carries_its_usage(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    job = claimed(tenant, builtin_endpoint, sent, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=True):
        closing.finish_attempt(
            job_id=str(job.id), attempt=1, outcome=AttemptOutcome.SUCCEEDED, gpu_ms=12,
            result={"images": [], "seed": 1, "timings": {}, "has_nsfw_concepts": [], "prompt": "x"},
        )  # fmt: skip
    body = tenant["client"].get(f"/queue/platform/tiny-sd/requests/{job.id}").json()
    assert "usage" in body  # null until billing registers its hook
    assert body["seed"] == 1
