"""A member's monthly limit binds every key they make, on real processes (billing.models.MemberSpendLimit).

A developer of an organization is limited to a few CPU-seconds a month; they then make a second key, without a limit
of its own. Two long requests, one through each key, run on the real GPU worker while admission holds next to
nothing for each (a week of made-up history says a work unit costs almost nothing): the holds grow before each step
within the limit the two keys share, so the requests are stopped where it is spent (``spend_limit_exceeded``) and the
member's spend never passes it. With the limit at what the member spent, the web server refuses their next request
through either key, and through a third key made then (402, naming the member's limit), while the owner's key is
not limited. The books reconcile.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from django.db.models import Sum
from django.utils import timezone

from accounts.models import Role, Scope
from accounts.services import add_member, create_api_key, sign_up
from billing import admission, controls
from billing.models import Account, Granularity, Hold, Price, UsageRecord, UsageRollup
from billing.rates import ensure_opening_prices
from billing.reconciliation import run_reconciliation
from inference.models import Endpoint, Job
from tests.e2e.conftest import Stack
from tests.e2e.test_lifecycle import (
    APP,
    LONG,
    QUICK,
    attempts_of,
    ensure_gpu_worker,
    request_body,
    set_concurrency_limit,
    wait_final,
)
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

LIMIT_MICROS = 150  # 1.5 CPU-seconds at the opening rate card's 100 µ$ per second: less than one LONG request


def test_a_limited_member_s_new_key_shares_the_limit_and_is_stopped_then_refused(
    stack: Stack, e2e_tenant: dict[str, Any]
) -> None:
    ensure_opening_prices(Price)
    organization = e2e_tenant["organization"]
    set_concurrency_limit(organization, 3)
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-sd", path="")
    history = UsageRollup.objects.create(
        granularity=Granularity.DAY,
        bucket_start=timezone.now().replace(hour=0, minute=0, second=0, microsecond=0),
        organization=organization,
        endpoint=endpoint,
        key_id=uuid.uuid4(),  # no one's key: not the member's spend
        gpu_class=endpoint.gpu_class,
        gpu_ms=1,
        work_units=1_000_000,
    )
    developer = sign_up(email=f"e2e-dev-{os.urandom(4).hex()}@example.com", password=None)
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    scopes = [Scope.INFERENCE, Scope.USAGE_READ]
    _, first = create_api_key(organization=organization, name="dev", scopes=scopes, created_by=developer)
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=LIMIT_MICROS)
    # The escape the limit closes: a new key, made after it, with no limit of its own.
    _, second = create_api_key(organization=organization, name="dev again", scopes=scopes, created_by=developer)

    request_ids = []
    for token in (first, second):
        with stack.client(token) as client:
            answer = client.post(f"/queue/{APP}", json=LONG)
            assert answer.status_code == 200, answer.text
            request_ids.append(str(answer.json()["request_id"]))
    jobs = [wait_final(stack, request_id, timeout=240) for request_id in request_ids]

    spent = admission.member_spent_this_month(organization_id=organization.pk, user_id=developer.pk)
    assert spent <= LIMIT_MICROS
    assert admission.member_held(organization_id=organization.pk, user_id=developer.pk) == 0
    stopped = [job for job in jobs if job.error_type == "spend_limit_exceeded"]
    assert stopped, f"the shared limit never stopped a request: {[(job.status, job.error) for job in jobs]}"
    assert all(job.status == "CANCELLED" for job in stopped)
    for job in jobs:
        charged = UsageRecord.objects.filter(job=job).aggregate(total=Sum("cost_micros"))["total"] or 0
        assert charged <= Hold.objects.get(job=job).amount_micros, job.pk

    # The billing manager leaves no room: the member is refused through every key of theirs, a new one included.
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=spent)
    _, third = create_api_key(organization=organization, name="dev once more", scopes=scopes, created_by=developer)
    for token in (first, second, third):
        with stack.client(token) as client:
            refused = client.post(f"/queue/{APP}", json=QUICK)
            assert (refused.status_code, refused.json()["error_type"]) == (402, "spend_limit_exceeded"), refused.text
            assert "member spend limit" in refused.json()["detail"]
            mine = client.get("/v1/billing/limits").json()["member"]
            assert (mine["monthly_limit_micros"], mine["spent_this_month_micros"]) == (spent, spent)
    with stack.client(e2e_tenant["key"]) as client:  # the owner's key: not the member's
        answer = client.post(f"/queue/{APP}", json=QUICK)
        assert answer.status_code == 200, answer.text
        assert wait_final(stack, str(answer.json()["request_id"])).status == "COMPLETED"
    assert Job.objects.filter(organization=organization, api_key__created_by=developer).count() == 2

    history.delete()  # made up: no usage record stands behind it
    run = run_reconciliation()
    assert run.drift == []


KILLED_LIMIT_MICROS = 300  # 3 CPU-seconds: more than one step, less than the requests below want


def test_a_limited_member_s_job_whose_worker_is_killed_is_billed_once_within_the_limit(
    stack: Stack, e2e_tenant: dict[str, Any]
) -> None:
    """Two requests through two keys of a limited developer; the GPU worker is SIGKILLed in the middle of one. The
    lease lapses, the reaper closes the lost attempt (recorded, unbilled) and requeues or fails the job; a new worker
    runs what the shared limit still allows. Afterwards the member's spend is within the limit and nothing of theirs
    is held, each job billed by one attempt at most and never beyond its hold, the account holds nothing, and the
    books reconcile."""
    ensure_opening_prices(Price)
    organization = e2e_tenant["organization"]
    set_concurrency_limit(organization, 2)
    endpoint = Endpoint.objects.get(owner="platform", name="tiny-sd", path="")
    history = UsageRollup.objects.create(  # a work unit costs almost nothing: admission holds next to nothing
        granularity=Granularity.DAY,
        bucket_start=timezone.now().replace(hour=0, minute=0, second=0, microsecond=0),
        organization=organization,
        endpoint=endpoint,
        key_id=uuid.uuid4(),
        gpu_class=endpoint.gpu_class,
        gpu_ms=1,
        work_units=1_000_000,
    )
    developer = sign_up(email=f"e2e-dev-{os.urandom(4).hex()}@example.com", password=None)
    add_member(organization=organization, user=developer, role=Role.DEVELOPER)
    scopes = [Scope.INFERENCE, Scope.USAGE_READ]
    tokens = [
        create_api_key(organization=organization, name=f"dev {n}", scopes=scopes, created_by=developer)[1]
        for n in range(2)
    ]
    controls.set_member_limit(organization=organization, user=developer, monthly_limit_micros=KILLED_LIMIT_MICROS)

    request_ids = []
    for seed, token in enumerate(tokens):
        with stack.client(token) as client:
            answer = client.post(f"/queue/{APP}", json=request_body(size=128, steps=30, seed=seed))
            assert answer.status_code == 200, answer.text
            request_ids.append(str(answer.json()["request_id"]))
    wait_until(
        lambda: Job.objects.filter(pk__in=request_ids, status="RUNNING", progress_step__gte=1).exists(),
        timeout=90,
        message=lambda: f"a job to run its first step\n{stack.log_tail('gpu')}",
    )
    killed = [str(pk) for pk in Job.objects.filter(pk__in=request_ids, status="RUNNING").values_list("pk", flat=True)]
    try:
        stack.kill("gpu")
    finally:
        ensure_gpu_worker(stack)
    jobs = [wait_final(stack, request_id, timeout=240) for request_id in request_ids]

    assert killed
    lost = [attempt for request_id in killed for attempt in attempts_of(request_id) if attempt.outcome == "lost"]
    assert lost, f"the reaper closed no attempt as lost: {[(a.number, a.outcome) for a in attempts_of(killed[0])]}"
    assert all(not attempt.billable for attempt in lost)
    spent = admission.member_spent_this_month(organization_id=organization.pk, user_id=developer.pk)
    assert spent <= KILLED_LIMIT_MICROS
    assert admission.member_held(organization_id=organization.pk, user_id=developer.pk) == 0
    for job in jobs:
        hold = Hold.objects.get(job=job)
        assert hold.released_at is not None, job.pk
        billed = UsageRecord.objects.filter(job=job, billable=True)
        assert billed.count() <= 1, job.pk
        charged = billed.aggregate(total=Sum("cost_micros"))["total"] or 0
        assert charged <= hold.amount_micros, job.pk
    account = Account.objects.get(pk=organization.pk)
    open_holds = Hold.objects.filter(organization=organization, released_at=None)
    assert account.held_micros == (open_holds.aggregate(total=Sum("amount_micros"))["total"] or 0) == 0

    history.delete()  # made up: no usage record stands behind it
    run = run_reconciliation()
    assert run.drift == []
