"""The operators' run-rate page: staff only, figures from the rollups, bounded queries."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import User
from billing.ledger import refund_job
from inference.models import Endpoint
from tests.lifecycle import run_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]


def test_only_operators_with_the_revenue_permission_see_the_run_rate(
    tenant: dict[str, Any], client: Client, admin_user: Any
) -> None:
    """Staff status is not enough (found in review): an operator who may change people can make anyone staff, a
    customer among them, and the page is every organization's revenue."""
    assert client.get("/admin/run-rate/").status_code == 302
    client.force_login(tenant["user"])
    assert client.get("/admin/run-rate/").status_code == 302  # not staff: the admin login
    User.objects.filter(pk=tenant["user"].pk).update(is_staff=True)
    refused = client.get("/admin/run-rate/")
    assert refused.status_code == 403
    assert "revenue run-rate page" in refused.content.decode()
    assert "/admin/run-rate/" not in client.get("/admin/").content.decode()
    tenant["user"].user_permissions.add(
        Permission.objects.get(codename="view_revenue", content_type__app_label="billing")
    )
    assert client.get("/admin/run-rate/").status_code == 200
    assert "/admin/run-rate/" in client.get("/admin/").content.decode()
    client.force_login(admin_user)  # a superuser holds every permission
    assert client.get("/admin/run-rate/").status_code == 200


def test_run_rate_figures_and_bounded_queries(
    tenant: dict[str, Any],
    other_tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    admin_user: Any,
    client: Client,
    settings: Any,
) -> None:
    settings.BILLING_GPU_COST_MICROS_PER_HOUR = {"cpu": 40_000}
    client.force_login(admin_user)
    run_as(tenant, builtin_endpoint, gpu_ms=3_000_000)  # 3,000 s x 100 µ$/s = $0.30
    refund_job(job=run_as(tenant, builtin_endpoint, gpu_ms=600_000))  # $0.06, refunded
    with CaptureQueriesContext(connection) as first:
        page = client.get("/admin/run-rate/")
    body = page.content.decode()
    assert page.status_code == 200
    assert 'data-testid="mrr">$0.30<' in body  # $0.36 of usage less the $0.06 refunded
    assert 'data-testid="run-rate">$3.65<' in body  # 0.30 x 365 / 30
    assert "after $0.06 of request refunds" in body
    # The endpoint's margin: $0.30 of revenue against 3,600 s of CPU at $0.04 an hour, the refunded request's too.
    [row] = re.findall(r"<tr><td>platform/tiny-sd</td>.*?</tr>", body)
    cells = re.findall(r'<td class="n[^"]*">([^<]*)</td>', row)
    assert cells == ["2", "3,600.000 s", "3,600.000 s", "$0.06", "$0.30", "$0.04", "$0.26 (86.67 %)"]
    assert tenant["organization"].name in body
    for _ in range(3):
        run_as(other_tenant, builtin_endpoint, gpu_ms=1_500)
    with CaptureQueriesContext(connection) as second:
        client.get("/admin/run-rate/")
    assert len(first) == len(second) <= 15
    index = client.get("/admin/").content.decode()
    assert "/admin/run-rate/" in index


def test_an_organization_page_shows_its_credit(tenant: dict[str, Any], admin_user: Any, client: Client) -> None:
    client.force_login(admin_user)
    listing = client.get("/admin/accounts/organization/").content.decode()
    assert "available credit" in listing.lower()
    assert "$1.00" in listing  # the free credits
    page = client.get(f"/admin/accounts/organization/{tenant['organization'].pk}/change/").content.decode()
    assert "Budget, grants and the ledger" in page


def test_an_operator_replays_a_stripe_event(admin_user: Any, client: Client) -> None:
    from accounts.models import AuditEvent
    from billing.models import StripeEvent

    event = StripeEvent.objects.create(
        id="evt_unknown", type="customer.created", payload={"id": "evt_unknown", "type": "customer.created"}
    )
    client.force_login(admin_user)
    answer = client.post(
        "/admin/billing/stripeevent/", {"action": "replay", "_selected_action": [event.pk]}, follow=True
    )
    assert "Replayed 1 event(s)." in answer.content.decode()
    event.refresh_from_db()
    assert event.status in ("ignored", "processed")
    assert AuditEvent.objects.filter(action="billing.stripe_event_replayed", target_id="evt_unknown").exists()
