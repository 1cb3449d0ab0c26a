"""Dashboard pages through Django's test client: scoping, roles, CSRF, bounded queries."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core import mail
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.models import ApiKey, Invitation, Membership, Role, User
from accounts.services import add_member
from inference.models import Endpoint, Job
from tests.conftest import TEST_PASSWORD
from tests.dashboard.test_password_reset_worker import deliver_reset_emails
from tests.lifecycle import run_as

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

PAGES = ["/dashboard/", "/dashboard/requests", "/dashboard/usage", "/dashboard/members", "/dashboard/billing"]


def browser(user: Any) -> Client:
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


def csrf(client: Client, page: str = "/dashboard/") -> str:
    client.get(page)
    return client.cookies["csrftoken"].value


def switch(client: Client, organization: Any) -> None:
    token = csrf(client)
    client.post("/dashboard/organization", {"organization": str(organization.pk), "csrfmiddlewaretoken": token})


def test_anonymous_visitors_are_sent_to_log_in(client: Client) -> None:
    for page in [*PAGES, "/dashboard/keys", "/dashboard/playground"]:
        response = client.get(page)
        assert response.status_code == 302, page
        assert response["Location"].startswith("/auth/login?next=")
    assert client.get("/").status_code == 302


def test_sign_up_log_out_and_log_in(client: Client) -> None:
    page = client.get("/auth/signup")
    assert page.status_code == 200
    sent = client.post("/auth/signup", {"email": "New@Example.com", "name": "Ada"})
    assert (sent.status_code, sent["Location"]) == (302, "/auth/signup/sent")
    assert "Check your email" in client.get(sent["Location"]).content.decode()
    [message] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/signup/confirm/\S+)", message.body)
    assert link is not None
    weak = client.post(link.group(1), {"password": "123"})
    assert weak.status_code == 200
    assert "too short" in weak.content.decode()
    created = client.post(link.group(1), {"password": TEST_PASSWORD})
    assert created.status_code == 302
    home = client.get("/dashboard/")
    assert "Available credit" in home.content.decode()
    assert "new@example.com" in home.content.decode()  # the address as the link carried it, lower-cased
    client.post("/auth/logout")
    assert client.get("/dashboard/").status_code == 302
    # The link made its account once; signing up again never says the address is taken (tests/accounts).
    assert "has an account already" in client.get(link.group(1)).content.decode()
    again = client.post("/auth/signup", {"email": "new@example.com"})
    assert (again.status_code, again["Location"]) == (302, "/auth/signup/sent")
    logged_in = client.post("/auth/login", {"username": "NEW@example.com", "password": TEST_PASSWORD})
    assert logged_in.status_code == 302


def test_password_reset_sends_a_working_link(client: Client, make_user: Any, sent_tasks: list[Any]) -> None:
    user = make_user("forgetful@example.com")
    client.post("/auth/password-reset", {"email": "forgetful@example.com"})
    deliver_reset_emails(sent_tasks)
    [message] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/password-reset/\S+)", message.body)
    assert link is not None
    form = client.get(link.group(1), follow=True)
    assert "Choose a password" in form.content.decode()
    done = client.post(
        form.redirect_chain[-1][0], {"new_password1": "a new long secret", "new_password2": "a new long secret"}
    )
    assert done.status_code == 302
    user.refresh_from_db()
    assert user.check_password("a new long secret")


def test_every_page_renders_for_every_role(tenant: dict[str, Any], make_user: Any, builtin_endpoint: Endpoint) -> None:
    run_as(tenant, builtin_endpoint, gpu_ms=1_500)
    for role in Role:
        person = make_user()
        add_member(organization=tenant["organization"], user=person, role=role)
        client = browser(person)
        switch(client, tenant["organization"])
        for page in PAGES:
            response = client.get(page)
            assert response.status_code == 200, (role, page)
            assert tenant["organization"].name in response.content.decode()
        keys = client.get("/dashboard/keys").status_code
        playground = client.get("/dashboard/playground").status_code
        assert (keys, playground) == ((403, 403) if role == Role.BILLING else (200, 200)), role


def test_keys_are_shown_once_and_revoked(tenant: dict[str, Any]) -> None:
    client = browser(tenant["user"])
    token = csrf(client, "/dashboard/keys")
    made = client.post("/dashboard/keys", {"name": "ci", "scopes": ["inference"], "csrfmiddlewaretoken": token})
    secret = re.search(r'data-testid="new-key">([^<]+)<', made.content.decode())
    assert secret is not None
    key = ApiKey.objects.get(name="ci")
    assert secret.group(1).startswith(f"{key.pk}:")
    assert secret.group(1) not in client.get("/dashboard/keys").content.decode()
    client.post(f"/dashboard/keys/{key.pk}/revoke", {"csrfmiddlewaretoken": token})
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_posts_without_csrf_are_refused(tenant: dict[str, Any]) -> None:
    client = browser(tenant["user"])
    assert client.post("/dashboard/keys", {"name": "x", "scopes": ["inference"]}).status_code == 403
    assert not ApiKey.objects.filter(name="x").exists()


def test_no_page_shows_another_organizations_data(
    tenant: dict[str, Any], other_tenant: dict[str, Any], builtin_endpoint: Endpoint
) -> None:
    theirs = run_as(other_tenant, builtin_endpoint, gpu_ms=1_500)
    client = browser(tenant["user"])
    their_pages = [
        f"/dashboard/requests/{theirs.pk}",
        f"/dashboard/requests/{theirs.pk}/outcome",
        f"/dashboard/requests/{theirs.pk}/events",
        f"/dashboard/keys/{other_tenant['api_key'].pk}/revoke",
    ]
    for page in their_pages:
        method = client.post if page.endswith("revoke") else client.get
        assert method(page).status_code in (403, 404), page
    # Switching to an organization you are not in does nothing.
    token = csrf(client)
    client.post(
        "/dashboard/organization", {"organization": str(other_tenant["organization"].pk), "csrfmiddlewaretoken": token}
    )
    for page in PAGES:
        body = client.get(page).content.decode()
        assert (
            other_tenant["organization"].name not in body
            or other_tenant["organization"].name == tenant["organization"].name
        )
        assert str(theirs.pk) not in body
    membership = Membership.objects.get(organization=other_tenant["organization"])
    assert client.post(f"/dashboard/members/{membership.pk}/remove", {"csrfmiddlewaretoken": token}).status_code == 404


def test_members_invite_change_role_and_remove(tenant: dict[str, Any], make_user: Any) -> None:
    client = browser(tenant["user"])
    token = csrf(client, "/dashboard/members")
    client.post(
        "/dashboard/members/invite", {"email": "colleague@example.com", "role": "billing", "csrfmiddlewaretoken": token}
    )
    [invitation] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/invitation/\S+)", invitation.body)
    assert link is not None
    colleague = Client()
    colleague.get(link.group(1), follow=True)  # the secret to the session, the page at /auth/invitation
    colleague.post("/auth/invitation", {"password": "a long enough passphrase 42"})
    membership = Membership.objects.get(organization=tenant["organization"], user__email="colleague@example.com")
    assert membership.role == Role.BILLING
    client.post(f"/dashboard/members/{membership.pk}/role", {"role": "developer", "csrfmiddlewaretoken": token})
    membership.refresh_from_db()
    assert membership.role == Role.DEVELOPER
    developer = browser(membership.user)
    switch(developer, tenant["organization"])
    developer_token = csrf(developer, "/dashboard/members")
    owner = Membership.objects.get(organization=tenant["organization"], user=tenant["user"])
    assert (
        developer.post(f"/dashboard/members/{owner.pk}/remove", {"csrfmiddlewaretoken": developer_token}).status_code
        == 403
    )
    client.post(f"/dashboard/members/{membership.pk}/remove", {"csrfmiddlewaretoken": token})
    assert not Membership.objects.filter(pk=membership.pk).exists()
    last_owner = client.post(f"/dashboard/members/{owner.pk}/remove", {"csrfmiddlewaretoken": token}, follow=True)
    assert Membership.objects.filter(pk=owner.pk).exists()
    assert "owner" in last_owner.content.decode().lower()


def test_the_playground_runs_a_model_as_the_organization(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    client = browser(tenant["user"])
    page = client.get("/dashboard/playground")
    assert "platform/tiny-sd" in page.content.decode()
    token = client.cookies["csrftoken"].value
    body = {"endpoint": "platform/tiny-sd", "input": {"prompt": "a cat", "num_inference_steps": 2}}
    answer = client.post("/dashboard/playground/run", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert answer.status_code == 202, answer.content
    job = Job.objects.get(pk=answer.json()["request_id"])
    assert (job.organization_id, job.api_key_id) == (tenant["organization"].pk, None)
    invalid = {"endpoint": "platform/tiny-sd", "input": {"num_inference_steps": 0}}
    bad = client.post("/dashboard/playground/run", invalid, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert bad.status_code == 422
    assert client.get(answer.json()["outcome_url"]).status_code == 404  # not finished yet


def test_list_pages_answer_in_a_bounded_number_of_queries(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    client = browser(tenant["user"])
    counts = []
    for jobs in (1, 6):
        while Job.objects.filter(organization=tenant["organization"]).count() < jobs:
            run_as(tenant, builtin_endpoint, gpu_ms=1_500)
        per_page = {}
        for page in PAGES:
            with CaptureQueriesContext(connection) as queries:
                assert client.get(page).status_code == 200
            per_page[page] = len(queries)
        counts.append(per_page)
    assert counts[0] == counts[1], counts
    assert max(counts[1].values()) <= 16, counts


def test_usage_page_and_csv(tenant: dict[str, Any], builtin_endpoint: Endpoint) -> None:
    run_as(tenant, builtin_endpoint, gpu_ms=2_000)
    client = browser(tenant["user"])
    page = client.get("/dashboard/usage").content.decode()
    assert "$0.0002" in page  # 2 s x 100 µ$/s
    assert 'id="usage-data"' in page
    export = client.get("/dashboard/usage", {"format": "csv"})
    assert export["Content-Type"].startswith("text/csv")
    assert "platform/tiny-sd" in export.content.decode()
    assert client.get("/dashboard/usage", {"start": "2026-02-01", "end": "2026-01-01"}).status_code == 200


def test_invitations_to_new_addresses_are_capped_per_organization(tenant: dict[str, Any]) -> None:
    """An organization's name is in the invitation: without a cap anyone who signs up could mail any number of
    addresses through us (each also made an account)."""
    from dashboard.views.team import INVITATIONS_PER_HOUR

    client = browser(tenant["user"])
    token = csrf(client, "/dashboard/members")
    for number in range(INVITATIONS_PER_HOUR + 3):
        invitation = {"email": f"invitee{number}@example.com", "role": "developer", "csrfmiddlewaretoken": token}
        client.post("/dashboard/members/invite", invitation)
    assert len(mail.outbox) == INVITATIONS_PER_HOUR
    assert not Invitation.objects.filter(email=f"invitee{INVITATIONS_PER_HOUR}@example.com").exists()


def test_an_invited_person_who_lost_the_invitation_claims_the_address_by_a_password_reset(
    tenant: dict[str, Any], client: Client, sent_tasks: list[Any]
) -> None:
    """Invitations used to make an account with no password, whose link expired (an invitation now makes none until
    it is accepted): a reset reaches such an account (Django's leaves it out), or the address would be held for good
    by whoever invited it."""
    User.objects.create_user(email="lost@example.com", password=None)
    assert not User.objects.get(email="lost@example.com").has_usable_password()
    mail.outbox.clear()
    client.post("/auth/password-reset", {"email": "LOST@example.com"})
    deliver_reset_emails(sent_tasks)
    [message] = mail.outbox
    link = re.search(r"https?://[^/]+(/auth/password-reset/\S+)", message.body)
    assert link is not None
    chosen = client.get(link.group(1), follow=True)
    form_url = chosen.redirect_chain[-1][0] if chosen.redirect_chain else link.group(1)
    chosen_password = "a long enough passphrase 42"
    client.post(form_url, {"new_password1": chosen_password, "new_password2": chosen_password})
    assert User.objects.get(email="lost@example.com").check_password(chosen_password)
