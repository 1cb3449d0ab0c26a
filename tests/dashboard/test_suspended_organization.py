"""A suspended organization is read, not changed: the dashboard refuses everything but reading (and taking access
away) with 403, as its API keys are refused, and no door can queue work for it; unsuspended, all works again."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import ApiKey, Membership, Role
from accounts.services import add_member, create_api_key, set_organization_suspended
from billing.ledger import grant_credits
from billing.models import MemberSpendLimit
from inference.models import Endpoint, Job
from inference.submission import SubmissionRefused, submit_job
from tests.conftest import TEST_PASSWORD, personal_organization
from tests.lifecycle import SMALL, run_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

READ_PAGES = [
    "/dashboard/",
    "/dashboard/requests",
    "/dashboard/usage",
    "/dashboard/usage?format=csv",
    "/dashboard/members",
    "/dashboard/billing",
    "/dashboard/keys",
    "/dashboard/playground",
]
PLAYGROUND_BODY = {"endpoint": "platform/tiny-sd", "input": {"prompt": "a cat", "num_inference_steps": 2}}


def browser(user: Any) -> tuple[Client, str]:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get("/dashboard/")
    return client, client.cookies["csrftoken"].value


def run_in_playground(client: Client, token: str) -> Any:
    return client.post(
        "/dashboard/playground/run", PLAYGROUND_BODY, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )


@pytest.fixture
def suspended(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> dict[str, Any]:
    grant_credits(organization=tenant["organization"], amount_micros=50_000_000, reason="suspension test")
    run_as(tenant, builtin_endpoint, gpu_ms=1_500)  # a request and usage to read
    set_organization_suspended(organization=tenant["organization"], suspended=True)
    return tenant


def test_the_playground_is_refused_and_queues_nothing(suspended: dict[str, Any]) -> None:
    client, token = browser(suspended["user"])
    before = Job.objects.filter(organization=suspended["organization"]).count()
    answer = run_in_playground(client, token)
    assert answer.status_code == 403
    assert answer.json() == {
        "detail": "This organization is suspended. Contact support.",
        "error_type": "organization_suspended",
    }
    assert Job.objects.filter(organization=suspended["organization"]).count() == before


def test_submission_itself_refuses_a_suspended_organization(
    suspended: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    """Whatever door calls it (the dashboard, the API, a script), nothing is queued to hold credit until unsuspended."""
    before = Job.objects.filter(organization=suspended["organization"]).count()
    with pytest.raises(SubmissionRefused) as refused:
        submit_job(organization=suspended["organization"], api_key=None, endpoint=builtin_endpoint, payload=SMALL)
    assert (refused.value.error_type, refused.value.status_code) == ("organization_suspended", 403)
    assert str(refused.value.detail) == "This organization is suspended. Contact support."
    assert Job.objects.filter(organization=suspended["organization"]).count() == before


def test_an_api_submission_is_still_refused(suspended: dict[str, Any]) -> None:
    answer = suspended["client"].post("/queue/platform/tiny-sd", SMALL, format="json")
    assert answer.status_code == 403
    assert answer.json()["error_type"] == "organization_suspended"


def test_keys_cannot_be_made(suspended: dict[str, Any]) -> None:
    client, token = browser(suspended["user"])
    answer = client.post("/dashboard/keys", {"name": "ci", "scopes": ["inference"], "csrfmiddlewaretoken": token})
    assert answer.status_code == 403
    assert not ApiKey.objects.filter(organization=suspended["organization"], name="ci").exists()


def test_every_other_change_is_refused(suspended: dict[str, Any], make_user: Any) -> None:
    organization = suspended["organization"]
    client, token = browser(suspended["user"])
    other = make_user()
    membership = add_member(organization=organization, user=other, role=Role.DEVELOPER)
    refused = {
        "/dashboard/billing/buy": {"amount_dollars": "10"},
        "/dashboard/billing/top-up": {"enabled": "on", "threshold_dollars": "5", "amount_dollars": "10"},
        "/dashboard/billing/spend": {"budget_dollars": "1"},
        "/dashboard/billing/details": {"legal_name": "Acme"},
        "/dashboard/billing/end-users/limit": {"end_user": "alice", "limit_dollars": "1"},
        f"/dashboard/billing/keys/{suspended['api_key'].pk}/limit": {f"{suspended['api_key'].pk}-limit_dollars": "1"},
        f"/dashboard/billing/members/{other.pk}/limit": {f"member-{other.pk}-limit_dollars": "1"},
        "/dashboard/billing/cards/pm_card_visa": {"action": "remove"},
        "/dashboard/members/invite": {"email": "new@example.com", "role": Role.ADMIN},
        f"/dashboard/members/{membership.pk}/role": {"role": Role.ADMIN},
    }
    for url, form in refused.items():
        answer = client.post(url, {**form, "csrfmiddlewaretoken": token})
        assert answer.status_code == 403, url
    membership.refresh_from_db()
    assert membership.role == Role.DEVELOPER
    assert not MemberSpendLimit.objects.filter(organization=organization).exists()
    assert not Membership.objects.filter(organization=organization, user__email="new@example.com").exists()


def test_reading_still_works_under_a_banner(suspended: dict[str, Any]) -> None:
    client, _ = browser(suspended["user"])
    job = Job.objects.filter(organization=suspended["organization"]).first()
    assert job is not None
    month = timezone.now().strftime("%Y-%m")
    for page in [*READ_PAGES, f"/dashboard/requests/{job.pk}", f"/dashboard/billing/statements/{month}"]:
        response = client.get(page)
        assert response.status_code == 200, page
        if response["Content-Type"].startswith("text/html"):
            text = response.content.decode()
            assert 'data-testid="suspended"' in text, page
            assert "This organization is suspended." in text
            assert "Contact support" in text


def test_access_can_still_be_taken_away(suspended: dict[str, Any], make_user: Any) -> None:
    """A leaked key or a departed member is cut off now, not when the organization comes back."""
    organization = suspended["organization"]
    client, token = browser(suspended["user"])
    leaked, _ = create_api_key(organization=organization, name="leaked", scopes=["inference"], created_by=None)
    gone = add_member(organization=organization, user=make_user(), role=Role.DEVELOPER)
    assert client.post(f"/dashboard/keys/{leaked.pk}/revoke", {"csrfmiddlewaretoken": token}).status_code == 302
    assert client.post(f"/dashboard/members/{gone.pk}/remove", {"csrfmiddlewaretoken": token}).status_code == 302
    leaked.refresh_from_db()
    assert leaked.revoked_at is not None
    assert not Membership.objects.filter(pk=gone.pk).exists()


def test_a_member_of_another_organization_switches_away_and_works_there(
    suspended: dict[str, Any], make_user: Any
) -> None:
    """The suspension is the organization's, not the person's: their own organization is untouched."""
    person = make_user(password=TEST_PASSWORD)
    own = personal_organization(person)
    add_member(organization=suspended["organization"], user=person, role=Role.ADMIN)
    client, token = browser(person)
    client.post(
        "/dashboard/organization", {"organization": str(suspended["organization"].pk), "csrfmiddlewaretoken": token}
    )
    assert 'data-testid="suspended"' in client.get("/dashboard/").content.decode()
    assert client.post("/dashboard/keys", {"name": "x", "csrfmiddlewaretoken": token}).status_code == 403
    client.post("/dashboard/organization", {"organization": str(own.pk), "csrfmiddlewaretoken": token})
    assert 'data-testid="suspended"' not in client.get("/dashboard/").content.decode()
    made = client.post("/dashboard/keys", {"name": "mine", "scopes": ["inference"], "csrfmiddlewaretoken": token})
    assert made.status_code == 200
    assert ApiKey.objects.filter(organization=own, name="mine").exists()


def test_unsuspended_everything_works_again(suspended: dict[str, Any]) -> None:
    organization = suspended["organization"]
    set_organization_suspended(organization=organization, suspended=False)
    client, token = browser(suspended["user"])
    assert 'data-testid="suspended"' not in client.get("/dashboard/").content.decode()
    ran = run_in_playground(client, token)
    assert ran.status_code == 202, ran.content
    assert Job.objects.filter(pk=ran.json()["request_id"], organization=organization).exists()
    made = client.post("/dashboard/keys", {"name": "ci", "scopes": ["inference"], "csrfmiddlewaretoken": token})
    assert made.status_code == 200
    assert ApiKey.objects.filter(organization=organization, name="ci").exists()
    assert suspended["client"].post("/queue/platform/tiny-sd", SMALL, format="json").status_code == 200
