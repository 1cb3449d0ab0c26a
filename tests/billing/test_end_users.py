"""End user attribution (fal#425): a request tagged with ``X-Fal-End-User`` keeps its tag on the job, its hold and
its usage; usage is grouped and exported by tag (API, CSV, dashboard); a tag's monthly limit is held at admission
and at every reservation like a key's (402 ``end_user_limit_exceeded``), and the books stay reconciled.
"""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

import pytest
from django.test import Client

from accounts.models import AuditAction, AuditEvent
from billing import end_users, reconciliation
from billing.admission import END_USER_OVER_LIMIT
from billing.ledger import BillingError, grant_credits
from billing.models import EndUserRollup, Hold, UsageRecord
from inference import attempts
from inference.hooks import Refusal
from inference.models import Endpoint, Job
from inference.submission import SubmissionRefused
from tests.lifecycle import SMALL, finish, run, start

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("quiet_books")]

QUEUE = "/queue/platform/tiny-sd"
JOB_COST = 200  # 2,000 GPU ms at the opening CPU price


def tagged(tenant: dict[str, Any], endpoint: Endpoint, end_user: str, gpu_ms: int = 2_000) -> Job:
    job, _ = submit_tagged(tenant, endpoint, end_user)
    return finish(start(job), gpu_ms=gpu_ms)


def submit_tagged(tenant: dict[str, Any], endpoint: Endpoint, end_user: str) -> tuple[Job, bool]:
    from inference.submission import submit_job

    return submit_job(
        organization=tenant["organization"],
        api_key=tenant["api_key"],
        endpoint=endpoint,
        payload=SMALL,
        end_user=end_user,
    )


def test_the_header_tags_the_request_its_hold_and_its_usage(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    client = tenant["client"]
    answer = client.post(QUEUE, SMALL, format="json", HTTP_X_FAL_END_USER="customer-42@example.com")
    assert answer.status_code == 200, answer.content
    job = Job.objects.get(pk=answer.json()["request_id"])
    assert job.end_user == "customer-42@example.com"
    assert "end_user" not in job.input  # the model's input is untouched
    assert Hold.objects.get(job=job).end_user == job.end_user
    finish(start(job))
    assert UsageRecord.objects.get(job=job).end_user == job.end_user
    detail = client.get(f"/v1/requests/{job.pk}").json()
    assert detail["end_user"] == "customer-42@example.com"
    listed = client.get("/v1/requests", {"end_user": "customer-42@example.com"}).json()["results"]
    assert [row["request_id"] for row in listed] == [str(job.pk)]
    assert client.get("/v1/requests", {"end_user": "someone-else"}).json()["results"] == []
    untagged = client.post(QUEUE, SMALL, format="json")
    assert Job.objects.get(pk=untagged.json()["request_id"]).end_user == ""


@pytest.mark.parametrize("tag", ["x" * 65, "=HYPERLINK(1)", "-1", "two words", "caf\u00e9"])
def test_a_malformed_tag_is_a_located_422_and_nothing_is_stored(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, tag: str
) -> None:
    answer = tenant["client"].post(QUEUE, SMALL, format="json", HTTP_X_FAL_END_USER=tag.encode().decode("latin-1"))
    assert answer.status_code == 422, answer.content
    body = answer.json()
    assert body["error_type"] == "validation_error"
    assert body["detail"][0]["loc"] == ["header", "X-Fal-End-User"]
    assert not Job.objects.filter(organization=tenant["organization"]).exists()


def test_the_same_idempotency_key_with_another_tag_is_refused(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    client = tenant["client"]
    first = client.post(QUEUE, SMALL, format="json", HTTP_IDEMPOTENCY_KEY="k1", HTTP_X_FAL_END_USER="alice")
    again = client.post(QUEUE, SMALL, format="json", HTTP_IDEMPOTENCY_KEY="k1", HTTP_X_FAL_END_USER="alice")
    assert again.json()["request_id"] == first.json()["request_id"]
    other = client.post(QUEUE, SMALL, format="json", HTTP_IDEMPOTENCY_KEY="k1", HTTP_X_FAL_END_USER="bob")
    assert other.status_code == 422
    assert other.json()["error_type"] == "idempotency_key_reused"


# Django's clock held in its hour: one day's usage even when the test crosses midnight.
def test_usage_is_grouped_and_exported_by_end_user(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    for end_user in ("alice", "alice", "bob"):
        tagged(tenant, builtin_endpoint, end_user)
    run(tenant["organization"], builtin_endpoint, api_key=tenant["api_key"], gpu_ms=2_000)  # untagged: not counted
    client = tenant["client"]
    report = client.get("/v1/usage", {"group_by": "end_user"}).json()
    assert [(row["end_user"], row["requests"], row["cost_micros"]) for row in report["data"]] == [
        ("alice", 2, 2 * JOB_COST),
        ("bob", 1, JOB_COST),
    ]
    assert report["totals"]["cost_micros"] == 3 * JOB_COST
    only_bob = client.get("/v1/usage", {"group_by": "day,endpoint", "end_user": "bob"}).json()
    assert [row["cost_micros"] for row in only_bob["data"]] == [JOB_COST]
    assert only_bob["data"][0]["endpoint"] == "platform/tiny-sd"

    exported = client.get("/v1/usage", {"group_by": "day,end_user,endpoint", "format": "csv"})
    assert exported["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.content.decode())))
    assert [(row["end_user"], row["endpoint"], row["requests"], row["cost_micros"]) for row in rows] == [
        ("alice", "platform/tiny-sd", "2", str(2 * JOB_COST)),
        ("bob", "platform/tiny-sd", "1", str(JOB_COST)),
    ]
    assert set(rows[0]) >= {"day", "end_user", "endpoint", "requests", "gpu_ms", "cost_micros"}

    for refused in ({"group_by": "end_user,key"}, {"group_by": "hour", "end_user": "alice"}):
        answer = client.get("/v1/usage", refused)
        assert answer.status_code == 422, refused
        assert answer.json()["detail"][0]["loc"] == ["query", "group_by"]

    page = Client()
    page.force_login(tenant["user"])
    usage_page = page.get("/dashboard/usage").content.decode()
    assert 'data-testid="by-end-user"' in usage_page
    assert "<code>alice</code>" in usage_page
    download = page.get("/dashboard/usage", {"format": "csv", "by": "end_user"})
    downloaded = list(csv.DictReader(io.StringIO(download.content.decode())))
    assert [row["end_user"] for row in downloaded] == ["alice", "bob"]

    run_ = reconciliation.run_reconciliation(full=True)
    assert run_.checked["end_user_rollups"]["checked"] == 3
    assert run_.ok, run_.drift


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_tags_monthly_limit_refuses_its_requests_at_admission_and_no_one_elses(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    tagged(tenant, builtin_endpoint, "alice")  # measured: each request now holds 240 µ$
    client = tenant["client"]
    changed = client.put(
        "/v1/billing/limits", {"end_users": [{"end_user": "alice", "monthly_limit_micros": 600}]}, format="json"
    )
    assert changed.status_code == 200, changed.content
    assert changed.json()["end_users"] == [
        {"end_user": "alice", "monthly_limit_micros": 600, "spent_this_month_micros": JOB_COST}
    ]
    assert AuditEvent.objects.filter(
        organization=tenant["organization"], action=AuditAction.SPEND_LIMITS_CHANGED, metadata__end_user="alice"
    ).exists()
    held, _ = submit_tagged(tenant, builtin_endpoint, "alice")  # 200 spent + 240 held: room for no more
    refused = client.post(QUEUE, SMALL, format="json", HTTP_X_FAL_END_USER="alice")
    assert refused.status_code == 402
    assert refused.json()["error_type"] == END_USER_OVER_LIMIT
    assert "alice" in refused.json()["detail"]
    assert client.post(QUEUE, SMALL, format="json", HTTP_X_FAL_END_USER="bob").status_code == 200
    assert client.post(QUEUE, SMALL, format="json").status_code == 200
    finish(start(held), gpu_ms=1_000)  # settles 100: 300 spent, nothing held: room for one more
    assert client.post(QUEUE, SMALL, format="json", HTTP_X_FAL_END_USER="alice").status_code == 200
    removed = client.put(
        "/v1/billing/limits", {"end_users": [{"end_user": "alice", "monthly_limit_micros": None}]}, format="json"
    )
    assert removed.json()["end_users"] == []
    assert client.post(QUEUE, SMALL, format="json", HTTP_X_FAL_END_USER="alice").status_code == 200
    bad = client.put(
        "/v1/billing/limits", {"end_users": [{"end_user": "=SUM(A1)", "monthly_limit_micros": 5}]}, format="json"
    )
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "end_users", 0, "end_user"]


# Django's clock held in its hour: one month's spend even when the test crosses a month's end.
def test_a_running_request_stops_where_its_tags_limit_cannot_cover_the_next_step(
    tenant: dict[str, Any], builtin_endpoint: Endpoint, clock_held_in_the_hour: datetime
) -> None:
    tagged(tenant, builtin_endpoint, "alice")
    end_users.set_end_user_limit(organization=tenant["organization"], end_user="alice", monthly_limit_micros=700)
    job, _ = submit_tagged(tenant, builtin_endpoint, "alice")
    running = start(job)
    assert not isinstance(attempts.reserve_work(job=running, gpu_ms=4_000), Refusal)  # 400 µ$: within 500 left
    refused = attempts.reserve_work(job=running, gpu_ms=6_000)  # 600 µ$: over
    assert isinstance(refused, Refusal)
    assert refused.error_type == END_USER_OVER_LIMIT
    assert Hold.objects.get(job=job).amount_micros <= 500


def test_set_end_user_limit_refuses_bad_input() -> None:
    from accounts.models import Organization

    organization = Organization.objects.create(name="o", slug="o-end-users")
    with pytest.raises(BillingError):
        end_users.set_end_user_limit(organization=organization, end_user="", monthly_limit_micros=1)
    with pytest.raises(BillingError):
        end_users.set_end_user_limit(organization=organization, end_user="a", monthly_limit_micros=-1)


def test_an_admission_reads_the_limit_behind_the_organizations_share_lock(
    tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    organization = tenant["organization"]
    assert end_users.limit_for_admission(organization.pk, "alice") is None
    end_users.set_end_user_limit(organization=organization, end_user="alice", monthly_limit_micros=5)
    assert end_users.limit_for_admission(organization.pk, "alice") == 5
    assert end_users.limit_for_admission(organization.pk, "bob") is None
    grant_credits(organization=organization, amount_micros=10_000_000, reason="test")
    with pytest.raises(SubmissionRefused) as refused:
        submit_tagged(tenant, builtin_endpoint, "alice")
    assert refused.value.error_type == END_USER_OVER_LIMIT
    assert EndUserRollup.objects.filter(organization=organization).count() == 0
