"""The money guarantee on real processes (docs/money.md), with a worker killed in the middle.

One organization with a few cents of credit sends more work than it can pay for, while the estimate admission
holds is far too low (as when a default held a fraction of what jobs cost). Holds must grow before each step and
stop jobs where the credit ends; a GPU worker is SIGKILLed mid-job. Afterwards:

- the balance never went below zero (no usage debit left it negative);
- no job was debited more than its hold;
- every job that ran all its steps delivered its output (none stopped after its last step);
- reconciliation finds no drift.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.db.models import Sum
from django.utils import timezone

from billing.ledger import grant_credits
from billing.models import Account, CreditEntry, EntryKind, Granularity, Hold, Price, UsageRecord, UsageRollup
from billing.rates import ensure_opening_prices
from billing.reconciliation import run_reconciliation
from inference.models import Endpoint, Job
from tests.e2e.conftest import Stack
from tests.e2e.test_lifecycle import APP, ensure_gpu_worker, request_body, set_concurrency_limit
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CREDIT_MICROS = 150  # 1.5 CPU-seconds at the opening rate card's 100 µ$ per second
FINAL = ("COMPLETED", "FAILED", "CANCELLED")


def test_usage_never_overdraws_and_finished_work_is_delivered_with_a_worker_killed(
    stack: Stack, e2e_tenant: dict[str, Any]
) -> None:
    ensure_opening_prices(Price)
    organization = e2e_tenant["organization"]
    set_concurrency_limit(organization, 2)
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-sd", path="")
    # A week of history saying a work unit costs almost nothing: admission holds next to nothing.
    history = UsageRollup.objects.create(
        granularity=Granularity.DAY,
        bucket_start=timezone.now().replace(hour=0, minute=0, second=0, microsecond=0),
        organization=organization,
        endpoint=endpoint,
        key_id=uuid.uuid4(),
        gpu_class=endpoint.gpu_class,
        gpu_ms=1,
        work_units=1_000_000,
    )
    account = Account.objects.get(pk=organization.pk)
    grant_credits(
        organization=organization,
        amount_micros=CREDIT_MICROS - account.balance_micros,
        reason="a few cents left",
        kind=EntryKind.ADJUSTMENT,
    )

    request_ids: list[str] = []
    refused = 0
    with stack.client(e2e_tenant["key"]) as client:
        for seed in range(8):
            response = client.post(f"/queue/{APP}", json=request_body(size=128, steps=30, seed=seed))
            if response.status_code == 402:
                refused += 1
                continue
            assert response.status_code == 200, response.text
            request_ids.append(str(response.json()["request_id"]))
        assert request_ids, "admission refused everything: the test needs some admitted work"
        # Kill the GPU worker in the middle of the first job, then bring one back.
        wait_until(
            lambda: Job.objects.filter(pk__in=request_ids, status="RUNNING", progress_step__gte=1).exists(),
            timeout=90,
            message=lambda: f"a job to run its first step\n{stack.log_tail('gpu')}",
        )
        try:
            stack.kill("gpu")
        finally:
            ensure_gpu_worker(stack)
        wait_until(
            lambda: not Job.objects.filter(pk__in=request_ids).exclude(status__in=FINAL).exists(),
            timeout=240,
            message=lambda: f"every job to finish\n{stack.log_tail('gpu')}",
        )

    jobs = list(Job.objects.filter(pk__in=request_ids))
    usage = CreditEntry.objects.filter(organization=organization, kind=EntryKind.USAGE)
    assert not usage.filter(balance_after_micros__lt=0).exists()
    account = Account.objects.get(pk=organization.pk)
    assert account.balance_micros >= 0
    assert account.held_micros == 0
    for job in jobs:
        charged = UsageRecord.objects.filter(job=job).aggregate(total=Sum("cost_micros"))["total"] or 0
        assert charged <= Hold.objects.get(job=job).amount_micros, job.pk
        # Work that was done is delivered: a job never stops after its last step.
        assert f"Stopped after step {job.progress_total} of {job.progress_total}" not in job.error
        if job.status == "COMPLETED":
            assert job.result["images"], job.pk
    stopped = [job for job in jobs if job.error_type == "insufficient_credits"]
    assert stopped, "credit never ran out mid-run: the test did not exercise the guarantee"
    assert all(job.status == "CANCELLED" for job in stopped)
    # The credit was used up to (nearly) the last micro-dollar, and not one beyond it.
    assert CREDIT_MICROS - account.balance_micros == -int(usage.aggregate(total=Sum("amount_micros"))["total"] or 0)
    history.delete()  # made up: no usage record stands behind it
    run = run_reconciliation()
    assert run.drift == []
