"""Dispatch reads the organization's limit and suspension from its row, in the statement that follows its lock."""

from __future__ import annotations

from typing import Any

import pytest

from accounts.services import set_concurrency_limit, set_organization_suspended
from billing.ledger import grant_credits
from inference import dispatch
from inference.models import Endpoint, Job, JobStatus
from tests.lifecycle import start, submit_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("priced_without_broker")]


def _statuses(tenant: dict[str, Any]) -> list[str]:
    return list(
        Job.objects.filter(organization=tenant["organization"]).order_by("created_at").values_list("status", flat=True)
    )


def test_dispatch_sends_the_oldest_queued_jobs_up_to_the_limit_less_those_running(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch test")
    set_concurrency_limit(organization=tenant["organization"], limit=3)
    running = start(submit_as(tenant, builtin_endpoint))
    jobs = [submit_as(tenant, builtin_endpoint) for _ in range(4)]
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 2  # 3 less the one running
    assert _statuses(tenant) == [JobStatus.RUNNING] + [JobStatus.DISPATCHED] * 2 + [JobStatus.QUEUED] * 2
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 0  # at its limit
    assert running.pk not in {job.pk for job in jobs}


def test_a_suspended_organization_s_queued_jobs_wait_until_it_is_reinstated(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    grant_credits(organization=tenant["organization"], amount_micros=100_000_000, reason="dispatch test")
    set_concurrency_limit(organization=tenant["organization"], limit=2)
    for _ in range(3):
        submit_as(tenant, builtin_endpoint)
    set_organization_suspended(organization=tenant["organization"], suspended=True)
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 0
    assert _statuses(tenant) == [JobStatus.QUEUED] * 3
    set_organization_suspended(organization=tenant["organization"], suspended=False)
    assert dispatch.dispatch_organization(tenant["organization"].pk) == 2
    assert _statuses(tenant) == [JobStatus.DISPATCHED] * 2 + [JobStatus.QUEUED]
