"""The operators' console for inference: pages render, the registry form validates, actions go through services."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import AuditEvent, Organization, User
from inference.models import (
    AttemptOutcome,
    Endpoint,
    Job,
    JobAttempt,
    JobLog,
    JobStatus,
    TenantSettings,
    WebhookAttempt,
    WebhookDelivery,
    WebhookStatus,
)

OPERATOR_EMAIL = "ops@example.com"
CANCELLED_BY_OPERATOR = "job.cancelled_by_operator"
REQUEUED_BY_OPERATOR = "job.requeued_by_operator"


@pytest.fixture
def operator(db: None) -> Client:
    superuser = User.objects.create_superuser(email=OPERATOR_EMAIL, password="operator password 1")
    client = Client()
    client.force_login(superuser)
    return client


@pytest.fixture
def organization(tenant: dict[str, Any]) -> Organization:
    return tenant["organization"]


@pytest.fixture
def make_job(organization: Organization, builtin_endpoint: Endpoint) -> Callable[..., Job]:
    def make(**fields: Any) -> Job:
        fields.setdefault("organization", organization)
        fields.setdefault("endpoint", builtin_endpoint)
        fields.setdefault("gpu_class", builtin_endpoint.gpu_class)
        fields.setdefault("input", {"prompt": "a lighthouse", "num_inference_steps": 4})
        return Job.objects.create(**fields)

    return make


def failed_job(make_job: Callable[..., Job], **fields: Any) -> Job:
    """A job that used all its attempts, with the traces a real failure leaves."""
    now = timezone.now()
    failure: dict[str, Any] = {
        "status": JobStatus.FAILED,
        "attempt": 3,
        "max_attempts": 3,
        "error": "CUDA out of memory",
        "error_type": "internal_error",
        "gpu_ms": 1234,
        "dispatched_at": now,
        "started_at": now,
        "finished_at": now,
    }
    job = make_job(**{**failure, **fields})
    JobAttempt.objects.create(job=job, number=3, outcome=AttemptOutcome.ERRORED, worker="gpu-1:42", gpu_ms=1234)
    JobLog.objects.create(job=job, message="Failed: CUDA out of memory", level="ERROR")
    return job


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def run_action(client: Client, model: str, action: str, objects: list[Any]) -> Any:
    return client.post(
        f"/admin/inference/{model}/",
        {"action": action, "_selected_action": [str(obj.pk) for obj in objects], "index": 0},
    )


def audits(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("pk"))


# Pages.


def test_every_changelist_and_change_page_renders(
    operator: Client, make_job: Callable[..., Job], organization: Organization, builtin_endpoint: Endpoint
) -> None:
    job = failed_job(make_job, webhook_url="https://hooks.example.com/done")
    attempt = JobAttempt.objects.get(job=job)
    delivery = WebhookDelivery.objects.create(job=job, url=job.webhook_url, message_id=f"msg_{job.pk.hex}")
    WebhookAttempt.objects.create(delivery=delivery, number=1, status_code=500, error="HTTP 500")
    tenant_settings = TenantSettings.objects.create(organization=organization, webhook_secret="whsec_c2VjcmV0Cg==")
    pages = {
        "endpoint": builtin_endpoint.pk,
        "job": job.pk,
        "jobattempt": attempt.pk,
        "webhookdelivery": delivery.pk,
        "tenantsettings": tenant_settings.pk,
    }
    for model, pk in pages.items():
        listing = operator.get(f"/admin/inference/{model}/")
        assert listing.status_code == 200, model
        page = operator.get(f"/admin/inference/{model}/{pk}/change/")
        assert page.status_code == 200, model
    assert operator.get("/admin/inference/endpoint/add/").status_code == 200
    assert operator.get("/admin/inference/tenantsettings/add/").status_code == 200
    assert operator.get("/admin/").status_code == 200


def test_the_job_page_shows_the_request_its_attempts_and_log(operator: Client, make_job: Callable[..., Job]) -> None:
    job = failed_job(make_job)
    content = operator.get(f"/admin/inference/job/{job.pk}/change/").content.decode()
    assert "a lighthouse" in content  # the input
    assert "CUDA out of memory" in content  # the error, the attempt and the log line
    assert "gpu-1:42" in content
    assert "3/3" in content


def test_the_job_page_shows_only_the_last_log_lines(operator: Client, make_job: Callable[..., Job]) -> None:
    job = make_job(status=JobStatus.COMPLETED)
    JobLog.objects.bulk_create([JobLog(job=job, message=f"step line #{n:04d}") for n in range(205)])
    content = operator.get(f"/admin/inference/job/{job.pk}/change/").content.decode()
    assert "step line #0204" in content
    assert "step line #0005" in content
    assert "step line #0004" not in content
    assert content.index("step line #0005") < content.index("step line #0204")  # oldest first


def test_the_job_list_does_not_grow_queries_with_its_rows(operator: Client, make_job: Callable[..., Job]) -> None:
    for _ in range(2):
        failed_job(make_job)
    with CaptureQueriesContext(connection) as few:
        assert operator.get("/admin/inference/job/").status_code == 200
    for _ in range(8):
        failed_job(make_job)
    with CaptureQueriesContext(connection) as many:
        assert operator.get("/admin/inference/job/").status_code == 200
    assert len(many) == len(few)


def test_job_search_and_filters(
    operator: Client, make_job: Callable[..., Job], tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    failed = failed_job(make_job, api_key=tenant["api_key"])
    queued = make_job()
    elsewhere = make_job(organization=other_tenant["organization"])

    def listed(query: dict[str, str]) -> set[str]:
        response = operator.get("/admin/inference/job/", query)
        assert response.status_code == 200
        return {str(job.pk) for job in response.context["cl"].result_list}

    assert listed({"q": str(failed.pk)}) == {str(failed.pk)}
    assert listed({"q": str(tenant["api_key"].pk)}) == {str(failed.pk)}
    assert listed({"q": tenant["organization"].slug}) == {str(failed.pk), str(queued.pk)}
    assert listed({"q": str(other_tenant["organization"].pk)}) == {str(elsewhere.pk)}
    assert listed({"status__exact": JobStatus.FAILED}) == {str(failed.pk)}
    assert listed({"error_type": "internal_error"}) == {str(failed.pk)}
    assert listed({"endpoint__id__exact": str(failed.endpoint_id)}) == {str(j.pk) for j in (failed, queued, elsewhere)}
    # The date hierarchy's month: the first job's, with the jobs made in it (all three, unless a month ended between).
    month = timezone.localtime(failed.created_at)
    made_then = {
        str(j.pk) for j in (failed, queued, elsewhere) if timezone.localtime(j.created_at).month == month.month
    }
    assert listed({"created_at__year": str(month.year), "created_at__month": str(month.month)}) == made_then


def test_attempt_and_webhook_lists_filter_and_search(operator: Client, make_job: Callable[..., Job]) -> None:
    job = failed_job(make_job, webhook_url="https://hooks.example.com/done")
    WebhookDelivery.objects.create(job=job, url=job.webhook_url, message_id="msg_1", status=WebhookStatus.FAILED)
    attempts = operator.get("/admin/inference/jobattempt/", {"outcome__exact": AttemptOutcome.ERRORED})
    assert [a.job_id for a in attempts.context["cl"].result_list] == [job.pk]
    assert not operator.get("/admin/inference/jobattempt/", {"outcome__exact": "succeeded"}).context["cl"].result_list
    assert len(operator.get("/admin/inference/jobattempt/", {"q": str(job.pk)}).context["cl"].result_list) == 1
    deliveries = operator.get("/admin/inference/webhookdelivery/", {"status__exact": WebhookStatus.FAILED})
    assert len(deliveries.context["cl"].result_list) == 1
    assert len(operator.get("/admin/inference/webhookdelivery/", {"q": "hooks.example"}).context["cl"].result_list) == 1


def test_endpoint_search_and_filters(operator: Client, builtin_endpoint: Endpoint) -> None:
    def listed(query: dict[str, str]) -> set[str]:
        response = operator.get("/admin/inference/endpoint/", query)
        assert response.status_code == 200
        return {endpoint.endpoint_id for endpoint in response.context["cl"].result_list}

    assert "platform/tiny-sd" in listed({"q": "tiny"})
    assert listed({"q": "no-such-model"}) == set()
    assert listed({"owner": "platform", "kind__exact": "image-to-image"}) == {"platform/tiny-sd/image-to-image"}
    assert "platform/tiny-sd" in listed({"is_active__exact": "1", "gpu_class__exact": "cpu"})


# The registry form.


def endpoint_form(endpoint: Endpoint | None = None, **changes: Any) -> dict[str, Any]:
    """The endpoint form as posted: the stored values (a new local model if none), with changes."""
    values: dict[str, Any] = {
        "owner": "local",
        "name": "my-model",
        "path": "",
        "title": "My model",
        "description": "",
        "kind": "text-to-image",
        "weights": "builtin:tiny-sd",
        "gpu_class": "cpu",
        "is_active": "on",
        "max_width": 1024,
        "max_height": 1024,
        "max_steps": 50,
        "max_images": 4,
        "max_prompt_chars": 2000,
        "max_input_image_bytes": 8 * 1024 * 1024,
        "max_frames": 121,
        "max_fps": 30,
        "max_audio_seconds": 47,
        "default_width": 512,
        "default_height": 512,
        "default_steps": 25,
        "default_guidance_scale": 7.5,
        "default_strength": 0.75,
        "default_num_frames": 121,
        "default_fps": 24,
        "default_audio_seconds": 30,
        "optimization_profile": "{}",
    }
    if endpoint is not None:
        for name in values:
            values[name] = getattr(endpoint, name)
        values["is_active"] = "on" if endpoint.is_active else ""
        values["optimization_profile"] = json.dumps(endpoint.optimization_profile)
    values.update(changes)
    return {name: value for name, value in values.items() if value != "" or name in ("path", "description")}


@pytest.mark.parametrize(
    ("weights", "reason"),
    [
        ("builtin:huge-sd", "Unknown built-in model"),
        ("https://huggingface.co/stabilityai/sd-turbo", "never downloaded"),
        ("s3://bucket/model", "never downloaded"),
        ("../outside/models", "stays inside MODELS_DIR"),
        ("~/models/sd", "absolute path"),
        ("models\nsd", "control characters"),
    ],
)
def test_the_endpoint_form_refuses_weights_that_are_not_a_builtin_or_a_path(
    operator: Client, weights: str, reason: str
) -> None:
    response = operator.post("/admin/inference/endpoint/add/", endpoint_form(weights=weights))
    assert response.status_code == 200  # the form again
    assert reason in " ".join(response.context["adminform"].form.errors["weights"])
    assert not Endpoint.objects.filter(owner="local", name="my-model").exists()


def test_the_endpoint_form_accepts_a_builtin(operator: Client) -> None:
    response = operator.post("/admin/inference/endpoint/add/", endpoint_form(weights="builtin:tiny-sd"))
    assert response.status_code == 302
    endpoint = Endpoint.objects.get(owner="local", name="my-model", path="")
    assert endpoint.weights == "builtin:tiny-sd"
    assert not [m for m in messages_of(response) if "does not exist" in m]


def test_a_folder_missing_here_is_saved_with_a_warning(operator: Client, settings: Any, tmp_path: Path) -> None:
    settings.MODELS_DIR = tmp_path
    response = operator.post("/admin/inference/endpoint/add/", endpoint_form(weights="sd-turbo"))
    assert response.status_code == 302
    assert Endpoint.objects.get(owner="local", name="my-model").weights == "sd-turbo"
    assert any(f"{tmp_path / 'sd-turbo'} does not exist on this machine" in m for m in messages_of(response))


def test_a_diffusers_folder_is_saved_without_a_warning(operator: Client, settings: Any, tmp_path: Path) -> None:
    settings.MODELS_DIR = tmp_path / "elsewhere"
    folder = tmp_path / "sd-turbo"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    response = operator.post("/admin/inference/endpoint/add/", endpoint_form(weights=f" {folder} "))
    assert response.status_code == 302
    assert Endpoint.objects.get(owner="local", name="my-model").weights == str(folder)
    assert not [m for m in messages_of(response) if "does not exist" in m or "model_index" in m]


def test_an_endpoint_is_edited_in_the_console(operator: Client, builtin_endpoint: Endpoint) -> None:
    data = endpoint_form(builtin_endpoint, max_steps=30, optimization_profile='{"channels_last": true}')
    response = operator.post(f"/admin/inference/endpoint/{builtin_endpoint.pk}/change/", data)
    assert response.status_code == 302, response.content.decode()[:2000]
    builtin_endpoint.refresh_from_db()
    assert (builtin_endpoint.max_steps, builtin_endpoint.optimization_profile) == (30, {"channels_last": True})


def test_an_optimization_profile_with_unknown_keys_or_bad_values_is_refused(
    operator: Client, builtin_endpoint: Endpoint
) -> None:
    profile = '{"channel_last": true, "max_batch_size": 0, "precision": "fp8"}'
    response = operator.post(
        f"/admin/inference/endpoint/{builtin_endpoint.pk}/change/",
        endpoint_form(builtin_endpoint, optimization_profile=profile),
    )
    assert response.status_code == 200  # the form again, with the errors
    errors = response.context["adminform"].form.errors["optimization_profile"]
    assert any("unknown optimization 'channel_last'" in error for error in errors)
    assert any("max_batch_size must be a whole number from 1 to 64" in error for error in errors)
    assert any("precision must be one of" in error for error in errors)
    builtin_endpoint.refresh_from_db()
    assert builtin_endpoint.optimization_profile == {}
    page = operator.get(f"/admin/inference/endpoint/{builtin_endpoint.pk}/change/").content.decode()
    assert "feature_cache_interval" in page  # every key is explained beside the field


def test_endpoints_are_deactivated_and_activated(operator: Client, builtin_endpoint: Endpoint) -> None:
    response = run_action(operator, "endpoint", "deactivate_selected", [builtin_endpoint])
    assert response.status_code == 302
    assert not Endpoint.objects.get(pk=builtin_endpoint.pk).is_active
    assert any("Deactivated 1 endpoint(s)." in m for m in messages_of(response))
    response = run_action(operator, "endpoint", "activate_selected", [builtin_endpoint])
    assert Endpoint.objects.get(pk=builtin_endpoint.pk).is_active
    response = run_action(operator, "endpoint", "activate_selected", [builtin_endpoint])
    assert any("Activated 0 endpoint(s) (1 already active)." in m for m in messages_of(response))


# Requests are history.


def test_the_job_admin_has_no_add_edit_or_delete(operator: Client, make_job: Callable[..., Job]) -> None:
    job = failed_job(make_job)
    assert operator.get("/admin/inference/job/add/").status_code == 403
    assert operator.get(f"/admin/inference/job/{job.pk}/delete/").status_code == 403
    assert operator.post(f"/admin/inference/job/{job.pk}/change/", {"status": "QUEUED"}).status_code == 403
    listing = operator.get("/admin/inference/job/")
    actions = {name for name, _ in listing.context["action_form"].fields["action"].choices}
    assert actions == {"", "cancel_selected", "requeue_selected"}
    response = run_action(operator, "job", "delete_selected", [job])
    assert response.status_code == 302  # back to the list: no such action
    assert Job.objects.filter(pk=job.pk).exists()
    assert operator.get("/admin/inference/jobattempt/add/").status_code == 403
    assert operator.get("/admin/inference/webhookdelivery/add/").status_code == 403


def test_cancel_action_cancels_a_queued_job_and_audits(operator: Client, make_job: Callable[..., Job]) -> None:
    queued = make_job()
    completed = make_job(status=JobStatus.COMPLETED, finished_at=timezone.now())
    response = run_action(operator, "job", "cancel_selected", [queued, completed])
    assert response.status_code == 302
    queued.refresh_from_db()
    assert (queued.status, queued.error_type) == (JobStatus.CANCELLED, "cancelled")
    assert Job.objects.get(pk=completed.pk).status == JobStatus.COMPLETED
    assert any("Cancellation requested for 1 request(s); 1 had already completed." in m for m in messages_of(response))
    (event,) = audits(CANCELLED_BY_OPERATOR)
    assert (event.target_type, event.target_id) == ("inference.job", str(queued.pk))
    assert event.organization_id == queued.organization_id
    assert event.actor_user is not None
    assert event.actor_user.email == OPERATOR_EMAIL
    assert event.ip_address == "127.0.0.1"
    assert event.metadata == {"status_before": "QUEUED", "endpoint": "platform/tiny-sd"}


def test_cancel_action_asks_a_running_job_to_stop(operator: Client, make_job: Callable[..., Job]) -> None:
    running = make_job(status=JobStatus.RUNNING, attempt=1, worker="gpu-1:42")
    run_action(operator, "job", "cancel_selected", [running])
    running.refresh_from_db()
    assert running.status == JobStatus.RUNNING  # it stops at its next step
    assert running.cancel_requested_at is not None
    assert len(audits(CANCELLED_BY_OPERATOR)) == 1


def test_requeue_action_puts_a_failed_job_back_in_the_queue(
    operator: Client,
    make_job: Callable[..., Job],
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    sent: list[tuple[str, int, str]] = []

    def send_run_message(job_id: str, attempt: int, queue: str) -> bool:
        sent.append((job_id, attempt, queue))
        return True

    monkeypatch.setattr("inference.dispatch.send_run_message", send_run_message)
    job = failed_job(make_job)
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(operator, "job", "requeue_selected", [job])
    assert response.status_code == 302
    job.refresh_from_db()
    # The dispatcher took it at once: the next attempt is the 4th, and it is allowed.
    assert (job.status, job.attempt, job.max_attempts) == (JobStatus.DISPATCHED, 4, 4)
    assert (job.error, job.error_type, job.gpu_ms, job.finished_at, job.result) == ("", "", 0, None, None)
    assert sent == [(str(job.pk), 4, "cpu")]
    assert JobLog.objects.filter(job=job, message=f"Requeued by operator {OPERATOR_EMAIL}.").exists()
    assert any("Requeued 1 request(s)." in m for m in messages_of(response))
    (event,) = audits(REQUEUED_BY_OPERATOR)
    assert event.target_id == str(job.pk)
    assert event.actor_user is not None
    assert event.metadata == {
        "status_before": "FAILED",
        "error_type_before": "internal_error",
        "attempt": 3,
        "max_attempts_before": 3,
    }


def test_requeue_with_no_broker_leaves_the_job_queued(
    operator: Client,
    make_job: Callable[..., Job],
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError("no broker")

    monkeypatch.setattr("inference.dispatch.publish_run", broker_down)
    job = failed_job(make_job, max_attempts=5)
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(operator, "job", "requeue_selected", [job])
    assert response.status_code == 302
    job.refresh_from_db()
    # Dispatched, refused by the broker, and back in the queue for the sweep; attempts left as they were.
    assert (job.status, job.attempt, job.max_attempts) == (JobStatus.QUEUED, 3, 5)
    assert f"broker refused job {job.pk} attempt 4" in caplog.text


def test_requeue_clears_a_cancel_request_and_skips_other_states(operator: Client, make_job: Callable[..., Job]) -> None:
    now = timezone.now()
    cancelled = make_job(
        status=JobStatus.CANCELLED, attempt=1, cancel_requested_at=now, finished_at=now, error_type="cancelled"
    )
    completed = make_job(status=JobStatus.COMPLETED, finished_at=now, result={"images": []})
    response = run_action(operator, "job", "requeue_selected", [cancelled, completed])
    cancelled.refresh_from_db()
    assert (cancelled.status, cancelled.cancel_requested_at, cancelled.max_attempts) == (JobStatus.QUEUED, None, 3)
    stored = Job.objects.get(pk=completed.pk)
    assert (stored.status, stored.result) == (JobStatus.COMPLETED, {"images": []})
    texts = messages_of(response)
    assert any("Requeued 1 request(s)." in m for m in texts), texts
    assert any("Skipped 1 request(s)" in m and str(completed.pk) in m for m in texts), texts
    assert [e.target_id for e in audits(REQUEUED_BY_OPERATOR)] == [str(cancelled.pk)]


# Webhooks and tenant settings.


def test_retry_now_makes_failed_and_pending_deliveries_due(
    operator: Client,
    make_job: Callable[..., Job],
    monkeypatch: pytest.MonkeyPatch,
    django_capture_on_commit_callbacks: Any,
) -> None:
    enqueued: list[int] = []
    monkeypatch.setattr("inference.admin.enqueue_delivery", lambda delivery_id: enqueued.append(delivery_id))
    later = timezone.now() + timedelta(hours=1)
    failed = WebhookDelivery.objects.create(
        job=make_job(), url="https://hooks.example.com/a", message_id="msg_a", status=WebhookStatus.FAILED
    )
    pending = WebhookDelivery.objects.create(
        job=make_job(), url="https://hooks.example.com/b", message_id="msg_b", next_attempt_at=later
    )
    delivered = WebhookDelivery.objects.create(
        job=make_job(), url="https://hooks.example.com/c", message_id="msg_c", status=WebhookStatus.DELIVERED
    )
    with django_capture_on_commit_callbacks(execute=True):
        response = run_action(operator, "webhookdelivery", "retry_now", [failed, pending, delivered])
    assert any("2 webhook(s) will be retried now (1 already delivered)." in m for m in messages_of(response))
    for delivery in (failed, pending):
        delivery.refresh_from_db()
        assert delivery.status == WebhookStatus.PENDING
        assert delivery.next_attempt_at is not None
        assert delivery.next_attempt_at <= timezone.now()
    assert WebhookDelivery.objects.get(pk=delivered.pk).status == WebhookStatus.DELIVERED
    assert sorted(enqueued) == sorted([failed.pk, pending.pk])


def test_tenant_settings_mask_the_secret_and_edit_retention(operator: Client, organization: Organization) -> None:
    secret = "whsec_" + "A" * 28 + "wxyz"
    tenant_settings = TenantSettings.objects.create(organization=organization, webhook_secret=secret)
    url = f"/admin/inference/tenantsettings/{tenant_settings.pk}/change/"
    for page in (operator.get(url), operator.get("/admin/inference/tenantsettings/")):
        content = page.content.decode()
        assert secret not in content
        assert "wxyz" in content
    response = operator.post(url, {"output_retention_seconds": 3600})
    assert response.status_code == 302
    tenant_settings.refresh_from_db()
    assert (tenant_settings.output_retention_seconds, tenant_settings.webhook_secret) == (3600, secret)
    assert tenant_settings.organization_id == organization.pk
    assert operator.get(f"/admin/inference/tenantsettings/{tenant_settings.pk}/delete/").status_code == 403


def test_tenant_settings_made_in_the_console_get_a_secret(operator: Client, organization: Organization) -> None:
    response = operator.post(
        "/admin/inference/tenantsettings/add/", {"organization": organization.pk, "output_retention_seconds": 60}
    )
    assert response.status_code == 302
    made = TenantSettings.objects.get(organization=organization)
    assert made.output_retention_seconds == 60
    assert made.webhook_secret.startswith("whsec_")


def test_an_endpoint_default_beyond_its_limit_is_refused(operator: Client) -> None:
    form = endpoint_form(kind="text-to-video", weights="builtin:tiny-ltx-video", max_frames=33, default_num_frames=34)
    response = operator.post("/admin/inference/endpoint/add/", form)
    assert response.status_code == 200  # the form again
    assert "max_frames" in " ".join(response.context["adminform"].form.errors["default_num_frames"])
    assert not Endpoint.objects.filter(owner="local", name="my-model").exists()
