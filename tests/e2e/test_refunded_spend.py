"""A refund gives a tenant at its monthly budget its room back, on real processes (billing.ledger.refund_job).

One request runs on the real GPU worker and spends the whole of the organization's monthly budget: the next request
is refused by the web server (402 ``spend_limit_exceeded``). An operator refunds the first; the same request is then
admitted, runs, and is billed; what the limits report is usage less the refund, and reconciliation finds no drift.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db.models import Sum

from billing import admission, controls
from billing.ledger import refund_job
from billing.models import Price, UsageRecord
from billing.rates import ensure_opening_prices
from billing.reconciliation import run_reconciliation
from inference.models import Job
from tests.e2e.conftest import Stack
from tests.e2e.test_lifecycle import APP, QUICK, request_body, wait_final

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Many times QUICK's work: whatever GPU time per work unit admission has measured, QUICK's estimate is a fraction of
# what this one cost, so the room its refund gives back admits QUICK.
BIG = request_body(size=128, steps=30)


def cost_of(request_id: str) -> int:
    return int(UsageRecord.objects.filter(job_id=request_id).aggregate(total=Sum("cost_micros"))["total"] or 0)


def test_a_refunded_request_stops_counting_against_the_monthly_budget(stack: Stack, e2e_tenant: dict[str, Any]) -> None:
    ensure_opening_prices(Price)
    organization = e2e_tenant["organization"]
    with stack.client(e2e_tenant["key"]) as client:
        answer = client.post(f"/queue/{APP}", json=BIG)
        assert answer.status_code == 200, answer.text
        big = str(answer.json()["request_id"])
        assert wait_final(stack, big, timeout=180).status == "COMPLETED"
        spent = cost_of(big)
        assert spent > 0
        controls.set_monthly_budget(organization=organization, budget_micros=spent)  # all of it spent

        refused = client.post(f"/queue/{APP}", json=QUICK)
        assert (refused.status_code, refused.json()["error_type"]) == (402, "spend_limit_exceeded"), refused.text

        refund_job(job=Job.objects.get(pk=big), reason="the output was wrong")

        assert client.get("/v1/billing/limits").json()["spent_this_month_micros"] == 0
        answer = client.post(f"/queue/{APP}", json=QUICK)
        assert answer.status_code == 200, answer.text
        quick = str(answer.json()["request_id"])
        assert wait_final(stack, quick).status == "COMPLETED"

    assert 0 < cost_of(quick) <= spent
    assert admission.spent_this_month(organization_id=organization.pk) == cost_of(quick)
    run = run_reconciliation()
    assert run.drift == []
