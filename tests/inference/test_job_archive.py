"""Old requests are archived after JOB_RETENTION_DAYS (inference/archive.py): the input keeps its settings only, the
webhook deliveries go, a request that never started is deleted; the money trail and the books stay whole."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st
from rest_framework.test import APIClient

from billing.models import Hold, UsageRecord
from billing.reconciliation import run_reconciliation
from inference import closing
from inference.archive import archive_old_jobs, archived_input
from inference.file_tasks import archive_old_jobs_task
from inference.models import AttemptOutcome, Endpoint, Job, JobLog, JobStatus, WebhookDelivery
from inference.requeue import RequeueRefused, requeue_job
from tests import lifecycle

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
FREE_TEXT_KEYS = ("prompt", "negative_prompt", "image_url", "image_path", "lyrics_prompt", "text", "file_name")


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [*value.keys(), *(text for item in value.values() for text in strings_in(item))]
    if isinstance(value, list):
        return [text for item in value for text in strings_in(item)]
    return []


@given(payload=st.dictionaries(st.text(max_size=16) | st.sampled_from(FREE_TEXT_KEYS), JSON, max_size=8))
def test_an_archived_input_keeps_no_text_and_archiving_it_again_changes_nothing(payload: dict[str, Any]) -> None:
    kept = archived_input(payload)
    values = [text for key, value in kept.items() for text in strings_in(value)]
    assert all(len(text) <= 32 and " " not in text and text == text.lower() for text in values)
    assert not set(kept) & set(FREE_TEXT_KEYS)
    assert archived_input(kept) == kept
    assert set(kept) <= set(payload)


def test_an_archived_input_keeps_the_settings_billing_and_progress_read() -> None:
    payload = {
        "prompt": "a lighthouse at dusk, oil painting",
        "negative_prompt": "blurry",
        "image_url": "data:image/png;base64,iVBORw0KGgo=",
        "image_path": "uploads/ab/cd.png",
        "image_size": {"width": 768, "height": 512},
        "num_inference_steps": 4,
        "num_images": 2,
        "seed": 7,
        "seeds": [7, 8],
        "output_format": "png",
        "aspect_ratio": "16:9",
        "sync_mode": False,
        "loras": [{"path": "https://example.com/lora.safetensors", "scale": 1.0}],
    }
    assert archived_input(payload) == {
        "image_size": {"width": 768, "height": 512},
        "num_inference_steps": 4,
        "num_images": 2,
        "seed": 7,
        "seeds": [7, 8],
        "output_format": "png",
        "aspect_ratio": "16:9",
        "sync_mode": False,
    }


def ended(job: Job, *, days_ago: int, **also: Any) -> Job:
    Job.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(days=days_ago), **also)
    job.refresh_from_db()
    return job


@pytest.mark.django_db
def test_old_requests_are_archived_or_deleted_and_the_books_still_prove(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any
) -> None:
    settings.JOB_RETENTION_DAYS = 90
    billed = lifecycle.run_as(tenant, builtin_endpoint)
    Job.objects.filter(pk=billed.pk).update(
        webhook_url="https://hooks.example.com/done", outputs_expire_at=None, input={**billed.input, "seed": 11}
    )
    WebhookDelivery.objects.create(job=billed, url="https://hooks.example.com/done", message_id="msg_1")
    billed = ended(billed, days_ago=91)
    failed = ended(
        lifecycle.run_as(tenant, builtin_endpoint, outcome=AttemptOutcome.FAILED, error="bad input"),
        days_ago=95,
        outputs_expire_at=None,
    )
    never_started = lifecycle.submit_as(tenant, builtin_endpoint)
    closing.cancel_job(job=never_started)
    never_started = ended(never_started, days_ago=120, outputs_expire_at=None)
    recent = ended(lifecycle.run_as(tenant, builtin_endpoint), days_ago=89, outputs_expire_at=None)
    outputs_kept = ended(lifecycle.run_as(tenant, builtin_endpoint), days_ago=200)  # its outputs not purged yet
    assert outputs_kept.outputs_expire_at is not None
    running = lifecycle.start(lifecycle.submit_as(tenant, builtin_endpoint))
    Job.objects.filter(pk=running.pk).update(created_at=timezone.now() - timedelta(days=300))
    records = {job.pk: list(UsageRecord.objects.filter(job=job).values()) for job in (billed, failed)}

    assert archive_old_jobs(limit=1) == 1  # oldest first: the request that never started, deleted
    assert not Job.objects.filter(pk=never_started.pk).exists()
    assert not Hold.objects.filter(job_id=never_started.pk).exists()
    assert not JobLog.objects.filter(job_id=never_started.pk).exists()
    assert archive_old_jobs_task() == 2
    assert archive_old_jobs() == 0

    for job in (billed, failed):
        job.refresh_from_db()
        assert job.archived_at is not None
        assert "prompt" not in job.input
        assert job.input["num_inference_steps"] == lifecycle.SMALL["num_inference_steps"]
        assert list(UsageRecord.objects.filter(job=job).values()) == records[job.pk]
    assert billed.input["seed"] == 11
    assert not WebhookDelivery.objects.filter(job=billed).exists()
    for job in (recent, outputs_kept, running):
        job.refresh_from_db()
        assert job.archived_at is None
        assert job.input["prompt"] == lifecycle.SMALL["prompt"]

    run = run_reconciliation(full=True)
    assert run.drift == [], run.drift

    # Its status and result still answer (the outputs were purged before); an archived request never runs again.
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {tenant['token']}")
    answered = client.get(f"/queue/platform/tiny-sd/requests/{billed.pk}/status")
    assert answered.status_code == 200, answered.content
    assert answered.json()["status"] == "COMPLETED"
    with pytest.raises(RequeueRefused) as refused:
        requeue_job(job=failed)
    assert (refused.value.status_code, refused.value.error_type) == (409, "request_archived")
    failed.refresh_from_db()
    assert failed.status == JobStatus.FAILED


@pytest.mark.django_db
def test_the_dashboard_says_a_request_was_archived(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, client: Any
) -> None:
    job = ended(lifecycle.run_as(tenant, builtin_endpoint), days_ago=100, outputs_expire_at=None)
    assert archive_old_jobs() == 1
    client.force_login(tenant["user"])
    page = client.get(f"/dashboard/requests/{job.pk}")
    assert page.status_code == 200
    text = page.content.decode()
    assert "after the retention period" in text
    assert lifecycle.SMALL["prompt"] not in text
    assert json.dumps(lifecycle.SMALL["num_inference_steps"]) in text


@pytest.mark.django_db
def test_a_request_requeued_as_its_archive_runs_is_neither_deleted_nor_stripped(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, priced_without_broker: None, settings: Any, monkeypatch: Any
) -> None:
    """An operator's requeue that commits between the archive's read of the due requests and its delete or archive
    of them: the request runs again, so it keeps its row, its hold (and the account's held amount with it) and its
    input. Forced by requeueing each job at the moment the archive reaches it."""
    from billing.models import Account
    from inference import archive

    settings.JOB_RETENTION_DAYS = 90
    never_started = lifecycle.submit_as(tenant, builtin_endpoint)
    closing.cancel_job(job=never_started)
    never_started = ended(never_started, days_ago=120, outputs_expire_at=None)
    failed = ended(
        lifecycle.run_as(tenant, builtin_endpoint, outcome=AttemptOutcome.FAILED, error="bad input"),
        days_ago=95,
        outputs_expire_at=None,
    )
    delete, archive_one = archive._delete, archive._archive

    def requeued_then_deleted(job_ids: list[Any], *args: Any) -> set[Any]:
        assert requeue_job(job=never_started)
        return delete(job_ids, *args)

    def requeued_then_archived(job_id: Any, now: Any) -> int:
        if job_id == failed.pk:
            assert requeue_job(job=failed)
        return archive_one(job_id, now)

    monkeypatch.setattr(archive, "_delete", requeued_then_deleted)
    monkeypatch.setattr(archive, "_archive", requeued_then_archived)

    assert archive_old_jobs() == 0
    for job in (never_started, failed):
        job.refresh_from_db()
        assert job.status == JobStatus.QUEUED
        assert job.archived_at is None
        assert job.input["prompt"] == lifecycle.SMALL["prompt"]
    open_holds = Hold.objects.filter(organization=tenant["organization"], released_at=None)
    assert set(open_holds.values_list("job_id", flat=True)) == {never_started.pk, failed.pk}
    account = Account.objects.get(pk=tenant["organization"].pk)
    assert account.held_micros == sum(open_holds.values_list("amount_micros", flat=True))
