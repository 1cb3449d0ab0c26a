"""Fixtures the inference tests share: jobs dispatched at once, and the messages handed to the broker."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from accounts.services import set_concurrency_limit
from billing.ledger import grant_credits
from inference import dispatch as dispatching
from inference.dispatch import dispatch_organization
from inference.models import Endpoint, Job, JobStatus
from tests.lifecycle import submit_as


@pytest.fixture
def dispatch(tenant: dict[str, Any], builtin_endpoint: Endpoint, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Submits jobs and dispatches them at once (no broker: the messages are only recorded)."""
    monkeypatch.setattr(dispatching, "send_run_message", lambda *message: True)
    organization = tenant["organization"]
    type(organization).objects.filter(pk=organization.pk).update(concurrency_limit=20)

    def submit(**payload: Any) -> Job:
        job = submit_as(tenant, builtin_endpoint, **payload)
        dispatch_organization(organization.pk)
        return Job.objects.get(pk=job.pk)

    return submit


@pytest.fixture
def room_to_run(tenant: dict[str, Any]) -> None:
    """The tenant's organization with more credit and a higher concurrency limit than any test here comes near."""
    grant_credits(organization=tenant["organization"], amount_micros=10**9, reason="room to run")
    set_concurrency_limit(organization=tenant["organization"], limit=10_000)


@pytest.fixture
def dispatched(tenant: dict[str, Any], builtin_endpoint: Endpoint, room_to_run: None) -> Callable[[], Job]:
    """Makes jobs submitted with the tenant's key and dispatched by their own submission, on their first attempt
    (the test's module puts a price in force with no broker: ``priced_without_broker``)."""

    def make() -> Job:
        job = submit_as(tenant, builtin_endpoint)
        job.refresh_from_db()
        assert (job.status, job.attempt) == (JobStatus.DISPATCHED, 1)
        return job

    return make


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, str]]:
    """What the dispatcher and the sweep hand to the broker, in order (no broker needed)."""
    messages: list[tuple[str, int, str]] = []

    def record(job_id: str, attempt: int, queue: str) -> bool:
        messages.append((job_id, attempt, queue))
        return True

    monkeypatch.setattr(dispatching, "send_run_message", record)
    return messages
