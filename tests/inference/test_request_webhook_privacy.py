"""A request's webhook URL (``?fal_webhook=`` or ``webhook_url``) is its sender's: its path and query are often a
secret (a chat service's incoming-webhook URL, a token the receiver checks). The key that sent the request and the
organization's admins read it in full; any other key or member of the organization reads where it goes."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import Role, Scope
from accounts.services import add_member
from inference.models import Job
from tests.conftest import TEST_PASSWORD
from tests.dashboard.test_pages import switch

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

HOOK = "https://hooks.example.com/services/T0/B1/s3cretToken?sig=abc"
WHERE = "https://hooks.example.com/…"


def key_client(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return client


def shown_by_api(client: APIClient, job_id: str) -> str:
    answer = client.get(f"/v1/requests/{job_id}")
    assert answer.status_code == 200, answer.content
    return str(answer.json()["webhook"]["url"])


def test_the_webhook_url_is_read_in_full_by_its_sender_and_admins_only(
    tenant: dict[str, Any], make_user: Any, make_key: Any
) -> None:
    organization = tenant["organization"]
    sender, colleague = make_user(), make_user()
    for person in (sender, colleague):
        add_member(organization=organization, user=person, role=Role.DEVELOPER)
    _, sender_token = make_key(organization, scopes=[Scope.INFERENCE, Scope.USAGE_READ], created_by=sender)
    _, colleague_token = make_key(organization, scopes=[Scope.INFERENCE, Scope.USAGE_READ], created_by=colleague)
    submitted = key_client(sender_token).post(
        f"/queue/platform/tiny-sd?fal_webhook={HOOK.replace('?', '%3F').replace('=', '%3D')}",
        {"prompt": "a lighthouse"},
        format="json",
    )
    assert submitted.status_code == 200, submitted.content
    job_id = submitted.json()["request_id"]
    assert Job.objects.get(pk=job_id).webhook_url == HOOK

    # The API: the sending key and an admin key in full; a colleague's key where it goes.
    assert shown_by_api(key_client(sender_token), job_id) == HOOK
    assert shown_by_api(tenant["client"], job_id) == HOOK  # the owner's admin-scoped key
    assert shown_by_api(key_client(colleague_token), job_id) == WHERE

    # The dashboard: the member whose key sent it and the owner in full; another developer where it goes.
    for person, expected, hidden in ((sender, HOOK, None), (tenant["user"], HOOK, None), (colleague, WHERE, "s3cret")):
        browser = Client()
        assert browser.login(email=person.email, password=TEST_PASSWORD)
        switch(browser, organization)
        page = browser.get(f"/dashboard/requests/{job_id}").content.decode()
        assert expected.replace("&", "&amp;") in page, person.email
        if hidden:
            assert hidden not in page
