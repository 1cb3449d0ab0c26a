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
from billing.models import Granularity, Hold, Price, UsageRecord, UsageRollup
from billing.rates import ensure_opening_prices
from billing.reconciliation import run_reconciliation
from inference.models import Endpoint, Job
from tests.e2e.conftest import Stack
from tests.e2e.test_lifecycle import APP, LONG, QUICK, set_concurrency_limit, wait_final

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
