"""A request that ends with a webhook ends with its delivery, whatever happens after its transaction commits.

The delivery is written by the transaction that ends the request (``inference.webhooks.record_delivery``); only the
first try's message is sent once it commits. So a worker killed between that COMMIT and its on-commit callbacks (a
time limit, the OOM killer), a database error in them, or a broker that is down loses no webhook: the delivery is
there and due, and the ``deliver_due_webhooks`` sweep tries it. Property: over every path that ends a request and
every fate of its on-commit callbacks, the request has exactly one delivery, and it is tried.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import current_app
from django.db import OperationalError, transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference import closing, submission, webhooks
from inference.models import AttemptOutcome, Endpoint, Job, JobStatus, WebhookDelivery, WebhookStatus
from tests.lifecycle import SMALL, start

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker", "private_hooks")]


@pytest.fixture
def private_hooks(settings: Any) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = True  # the hook's address is a loopback one


HOOK = "http://127.0.0.1:9/fal"  # never called: deliveries are recorded, not sent
PATHS = ("finished", "failed", "reaped", "cancelled_in_queue", "start_timeout")
FATES = ("ran", "process_died", "database_error", "broker_down")


def _submitted(tenant: dict[str, Any], endpoint: Endpoint, **options: Any) -> Job:
    job, _ = submission.submit_job(organization=tenant["organization"], api_key=tenant["api_key"], endpoint=endpoint,
                                   payload=SMALL, webhook_url=HOOK, **options)  # fmt: skip
    return job


def _ended(path: str, tenant: dict[str, Any], endpoint: Endpoint) -> Job:
    """A request with a webhook, ended by ``path`` (the callbacks of the ending transaction as the caller captures
    them)."""
    now = timezone.now()
    if path == "start_timeout":
        job = _submitted(tenant, endpoint, start_timeout=30)
        Job.objects.filter(pk=job.pk).update(start_deadline=now - timedelta(seconds=1))  # its 30 s have passed
        assert closing.expire_unstarted(job_id=job.pk) == 1
    elif path == "cancelled_in_queue":
        job = _submitted(tenant, endpoint)
        assert closing.cancel_job(job=job) == "CANCELLATION_REQUESTED"
    elif path == "reaped":
        job = _submitted(tenant, endpoint)
        Job.objects.filter(pk=job.pk).update(max_attempts=1)
        job = start(job)
        Job.objects.filter(pk=job.pk).update(lease_expires_at=now - timedelta(seconds=1))
        assert closing.reap_expired_leases() == 1
    else:
        job = start(_submitted(tenant, endpoint))
        outcome = AttemptOutcome.SUCCEEDED if path == "finished" else AttemptOutcome.FAILED
        closing.finish_attempt(job_id=str(job.pk), attempt=job.attempt, outcome=outcome, gpu_ms=10,
                               result={"images": [], "seed": 1} if path == "finished" else None,
                               error="" if path == "finished" else "boom")  # fmt: skip
    job.refresh_from_db()
    assert job.is_final, (path, job.status)
    return job


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), fate=st.sampled_from(FATES))
def test_every_ended_request_has_its_one_delivery_and_it_is_tried(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent_tasks: list[Any],
    django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch, path: str, fate: str,
) -> None:  # fmt: skip
    with transaction.atomic():
        sent_tasks.clear()
        with monkeypatch.context() as patched:
            if fate == "database_error":

                def hiccup(*_: Any, **__: Any) -> None:
                    raise OperationalError("server closed the connection unexpectedly")

                patched.setattr(webhooks, "send_first_try", hiccup)
            elif fate == "broker_down":

                def refused(*_: Any, **__: Any) -> None:
                    raise ConnectionError("broker down")

                patched.setattr(current_app, "send_task", refused)
            # "process_died": the ending transaction committed, and its callbacks never ran.
            with django_capture_on_commit_callbacks(execute=fate != "process_died"):
                job = _ended(path, tenant, builtin_endpoint)
        deliveries = list(WebhookDelivery.objects.filter(job=job))
        assert len(deliveries) == 1, (path, fate)
        delivery = deliveries[0]
        assert (delivery.url, delivery.status, delivery.attempts) == (HOOK, WebhookStatus.PENDING, 0)
        assert delivery.message_id == webhooks.message_id_for(job.pk, job.attempt)
        first_try = [args for name, args in sent_tasks if name == webhooks.DELIVER_TASK]
        assert first_try == ([[delivery.pk]] if fate == "ran" else []), (path, fate)
        tried: list[int] = []
        monkeypatch.setattr(webhooks, "deliver", lambda delivery_id: tried.append(delivery_id) or True)
        assert webhooks.deliver_due_webhooks() >= 1
        assert delivery.pk in tried  # the sweep finds it due, its first try's message lost or not
        transaction.set_rollback(True)


def test_a_delivery_already_written_is_kept_and_not_sent_twice(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, sent_tasks: list[Any], django_capture_on_commit_callbacks: Any
) -> None:
    """Writing the delivery again (``schedule_webhook`` by hand after the end wrote it) changes nothing."""
    with django_capture_on_commit_callbacks(execute=True):
        job = _ended("finished", tenant, builtin_endpoint)
    delivery = WebhookDelivery.objects.get(job=job)
    with django_capture_on_commit_callbacks(execute=True):
        again = webhooks.schedule_webhook(job.pk)
        webhooks.record_delivery(job)
    assert again is not None
    assert again.pk == delivery.pk
    assert WebhookDelivery.objects.filter(job=job).count() == 1
    assert [args for name, args in sent_tasks if name == webhooks.DELIVER_TASK] == [[delivery.pk]]


def test_a_request_that_ends_without_a_webhook_writes_no_delivery(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, django_capture_on_commit_callbacks: Any
) -> None:
    job, _ = submission.submit_job(organization=tenant["organization"], api_key=tenant["api_key"],
                                   endpoint=builtin_endpoint, payload=SMALL)  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        closing.cancel_job(job=job)
    job.refresh_from_db()
    assert job.status == JobStatus.CANCELLED
    assert not WebhookDelivery.objects.exists()
