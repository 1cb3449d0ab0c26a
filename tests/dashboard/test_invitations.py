"""Invitations: nobody joins an organization unless they accept, signed in with the invited address."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from accounts.models import AuditAction, AuditEvent, Invitation, Membership, Role, User
from accounts.services import InvitationUnusable, accept_invitation, invite_member
from dashboard.access import SESSION_KEY
from tests.conftest import TEST_PASSWORD
from tests.dashboard.test_pages import browser, csrf

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

PASSWORD = "a long enough passphrase 42"


def invite(tenant: dict[str, Any], email: str, role: str = Role.DEVELOPER) -> Client:
    owner = browser(tenant["user"])
    token = csrf(owner, "/dashboard/members")
    owner.post("/dashboard/members/invite", {"email": email, "role": role, "csrfmiddlewaretoken": token})
    return owner


def emailed_link(to: str) -> str:
    [message] = [m for m in mail.outbox if m.to == [to]]
    link = re.search(r"https?://[^/]+(/auth/invitation/\S+)", message.body)
    assert link is not None, message.body
    return link.group(1)


def member(tenant: dict[str, Any], user: User) -> Membership | None:
    return Membership.objects.filter(organization=tenant["organization"], user=user).first()


def test_an_existing_person_is_not_added_until_they_accept(tenant: dict[str, Any], make_user: Any) -> None:
    """Before, an invitation added an existing account at once: whoever knew an address could put its owner in an
    organization they had never heard of (and, once switched to it, see them run work billed and shown there)."""
    person = make_user("someone@example.com")
    invite(tenant, "Someone@Example.com", Role.ADMIN)
    assert member(tenant, person) is None
    link = emailed_link("someone@example.com")
    assert tenant["organization"].name in mail.outbox[0].body

    anonymous = Client()
    page = anonymous.get(link)
    assert page.status_code == 200
    assert "sign in" in page.content.decode()
    assert member(tenant, person) is None

    invited = browser(person)
    page = invited.get(link)
    assert page.status_code == 200
    assert tenant["organization"].name in page.content.decode()
    assert member(tenant, person) is None  # looking is not accepting
    answer = invited.post(link, {"answer": "accept", "csrfmiddlewaretoken": invited.cookies["csrftoken"].value})
    assert answer.status_code == 302
    joined = member(tenant, person)
    assert joined is not None
    assert joined.role == Role.ADMIN
    assert invited.session[SESSION_KEY] == str(tenant["organization"].pk)
    assert not Invitation.objects.filter(organization=tenant["organization"]).exists()
    assert Client().get(link).status_code == 404  # used up
    actions = set(AuditEvent.objects.filter(organization=tenant["organization"]).values_list("action", flat=True))
    assert {AuditAction.MEMBER_INVITED, AuditAction.MEMBER_ADDED} <= actions


def test_someone_signed_in_with_another_address_joins_nothing(tenant: dict[str, Any], make_user: Any) -> None:
    make_user("invited@example.com")
    invite(tenant, "invited@example.com")
    link = emailed_link("invited@example.com")
    intruder = make_user("intruder@example.com")
    client = browser(intruder)
    page = client.get(link)
    assert page.status_code == 403
    assert "invited@example.com" in page.content.decode()
    refused = client.post(link, {"answer": "accept", "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert refused.status_code == 403
    assert member(tenant, intruder) is None
    assert Invitation.objects.filter(email="invited@example.com").exists()  # still waiting for its person
    with pytest.raises(InvitationUnusable):
        accept_invitation(secret=link.rsplit("/", 1)[1], user=intruder)


def test_a_new_address_gets_no_account_until_it_accepts(tenant: dict[str, Any]) -> None:
    invite(tenant, "newcomer@example.com", Role.BILLING)
    assert not User.objects.filter(email="newcomer@example.com").exists()
    link = emailed_link("newcomer@example.com")
    client = Client()
    form = client.get(link)
    assert form.status_code == 200
    assert "Choose a password" in form.content.decode()
    weak = client.post(link, {"password": "123"})
    assert weak.status_code == 200
    assert not User.objects.filter(email="newcomer@example.com").exists()
    client.post(link, {"password": PASSWORD})
    newcomer = User.objects.get(email="newcomer@example.com")
    assert newcomer.check_password(PASSWORD)
    joined = member(tenant, newcomer)
    assert joined is not None
    assert joined.role == Role.BILLING
    assert Membership.objects.filter(user=newcomer, organization__is_personal=True).exists()
    assert client.session[SESSION_KEY] == str(tenant["organization"].pk)
    assert client.get("/dashboard/usage").status_code == 200  # signed in, working in the organization


def test_declining_withdrawing_reinviting_and_expiry_end_a_link(tenant: dict[str, Any], make_user: Any) -> None:
    person = make_user("maybe@example.com")
    owner = invite(tenant, "maybe@example.com")
    first = emailed_link("maybe@example.com")
    mail.outbox.clear()
    invite(tenant, "maybe@example.com", Role.BILLING)  # again: a new link, the first one stops working
    second = emailed_link("maybe@example.com")
    assert first != second
    assert Client().get(first).status_code == 404
    assert Invitation.objects.get(email="maybe@example.com").role == Role.BILLING

    client = browser(person)
    client.get(second)
    client.post(second, {"answer": "decline", "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert member(tenant, person) is None
    assert client.get(second).status_code == 404

    mail.outbox.clear()
    invite(tenant, "maybe@example.com")
    third = emailed_link("maybe@example.com")
    listed = owner.get("/dashboard/members").content.decode()
    assert "maybe@example.com" in listed
    assert "Withdraw" in listed
    invitation = Invitation.objects.get(email="maybe@example.com")
    token = owner.cookies["csrftoken"].value
    owner.post(f"/dashboard/members/invitations/{invitation.pk}/revoke", {"csrfmiddlewaretoken": token})
    assert client.get(third).status_code == 404

    _, secret = invite_member(organization=tenant["organization"], email="maybe@example.com", role=Role.DEVELOPER)
    Invitation.objects.filter(email="maybe@example.com").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get(f"/auth/invitation/{secret}").status_code == 404
    with pytest.raises(InvitationUnusable):
        accept_invitation(secret=secret, user=person)
    assert member(tenant, person) is None


def test_an_organization_withdraws_only_its_own_invitations(
    tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    invitation, _ = invite_member(organization=other_tenant["organization"], email="x@example.com", role=Role.OWNER)
    owner = browser(tenant["user"])
    token = csrf(owner, "/dashboard/members")
    answer = owner.post(f"/dashboard/members/invitations/{invitation.pk}/revoke", {"csrfmiddlewaretoken": token})
    assert answer.status_code == 404
    assert Invitation.objects.filter(pk=invitation.pk).exists()
    assert "x@example.com" not in owner.get("/dashboard/members").content.decode()


def test_the_cap_counts_invitations_to_existing_accounts_too(tenant: dict[str, Any], make_user: Any) -> None:
    """Existing addresses used to pass the hourly cap (they were added, not emailed): now each one is an email."""
    from dashboard.views.team import INVITATIONS_PER_HOUR

    for number in range(INVITATIONS_PER_HOUR + 2):
        make_user(f"existing{number}@example.com")
        invite(tenant, f"existing{number}@example.com")
    assert len(mail.outbox) == INVITATIONS_PER_HOUR
    assert Invitation.objects.filter(organization=tenant["organization"]).count() == INVITATIONS_PER_HOUR


def test_a_member_is_not_invited_again(tenant: dict[str, Any]) -> None:
    owner = invite(tenant, tenant["user"].email)
    assert not Invitation.objects.exists()
    assert not mail.outbox
    assert "already a member" in owner.get("/dashboard/members").content.decode()


def test_signing_in_from_the_link_comes_back_to_it(tenant: dict[str, Any], make_user: Any) -> None:
    person = make_user("returning@example.com")
    invite(tenant, "returning@example.com")
    link = emailed_link("returning@example.com")
    client = Client()
    page = client.get(link).content.decode()
    login_url = re.search(r'href="(/auth/login\?next=[^"]+)"', page)
    assert login_url is not None
    signed_in = client.post(login_url.group(1), {"username": person.email, "password": TEST_PASSWORD})
    assert signed_in.status_code == 302
    assert signed_in["Location"] == link
    assert client.get(link).status_code == 200
    client.post(link, {"answer": "accept"})
    assert member(tenant, person) is not None
