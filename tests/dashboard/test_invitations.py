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
from accounts.services import (
    Actor,
    InvitationUnusable,
    accept_invitation,
    change_member_role,
    deactivate_user,
    invite_member,
    remove_member,
    set_organization_suspended,
)
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


PAGE = "/auth/invitation"  # where the link leads, its secret kept in the session


def opened(client: Client, link: str) -> Any:
    """The invitation's page as the link leads to it (the secret goes to the session, the URL loses it)."""
    answer = client.get(link, follow=True)
    assert answer.redirect_chain == [(PAGE, 302)]
    return answer


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
    page = opened(anonymous, link)
    assert page.status_code == 200
    assert "sign in" in page.content.decode()
    assert member(tenant, person) is None

    invited = browser(person)
    page = opened(invited, link)
    assert page.status_code == 200
    assert tenant["organization"].name in page.content.decode()
    assert link.rsplit("/", 1)[1] not in page.content.decode()
    assert member(tenant, person) is None  # looking is not accepting
    answer = invited.post(PAGE, {"answer": "accept", "csrfmiddlewaretoken": invited.cookies["csrftoken"].value})
    assert answer.status_code == 302
    joined = member(tenant, person)
    assert joined is not None
    assert joined.role == Role.ADMIN
    assert invited.session[SESSION_KEY] == str(tenant["organization"].pk)
    assert not Invitation.objects.filter(organization=tenant["organization"]).exists()
    assert opened(Client(), link).status_code == 404  # used up
    actions = set(AuditEvent.objects.filter(organization=tenant["organization"]).values_list("action", flat=True))
    assert {AuditAction.MEMBER_INVITED, AuditAction.MEMBER_ADDED} <= actions


def test_someone_signed_in_with_another_address_joins_nothing(tenant: dict[str, Any], make_user: Any) -> None:
    make_user("invited@example.com")
    invite(tenant, "invited@example.com")
    link = emailed_link("invited@example.com")
    intruder = make_user("intruder@example.com")
    client = browser(intruder)
    page = opened(client, link)
    assert page.status_code == 403
    assert "invited@example.com" in page.content.decode()
    refused = client.post(PAGE, {"answer": "accept", "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
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
    form = opened(client, link)
    assert form.status_code == 200
    assert "Choose a password" in form.content.decode()
    weak = client.post(PAGE, {"password": "123"})
    assert weak.status_code == 200
    assert not User.objects.filter(email="newcomer@example.com").exists()
    client.post(PAGE, {"password": PASSWORD})
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
    assert opened(Client(), first).status_code == 404
    assert Invitation.objects.get(email="maybe@example.com").role == Role.BILLING

    client = browser(person)
    opened(client, second)
    client.post(PAGE, {"answer": "decline", "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
    assert member(tenant, person) is None
    assert opened(client, second).status_code == 404

    mail.outbox.clear()
    invite(tenant, "maybe@example.com")
    third = emailed_link("maybe@example.com")
    listed = owner.get("/dashboard/members").content.decode()
    assert "maybe@example.com" in listed
    assert "Withdraw" in listed
    invitation = Invitation.objects.get(email="maybe@example.com")
    token = owner.cookies["csrftoken"].value
    owner.post(f"/dashboard/members/invitations/{invitation.pk}/revoke", {"csrfmiddlewaretoken": token})
    assert opened(client, third).status_code == 404

    _, secret = invite_member(organization=tenant["organization"], email="maybe@example.com", role=Role.DEVELOPER)
    Invitation.objects.filter(email="maybe@example.com").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert opened(client, f"/auth/invitation/{secret}").status_code == 404
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
    page = opened(client, link).content.decode()
    login_url = re.search(r'href="(/auth/login\?next=[^"]+)"', page)
    assert login_url is not None
    signed_in = client.post(login_url.group(1), {"username": person.email, "password": TEST_PASSWORD})
    assert signed_in.status_code == 302
    assert signed_in["Location"] == PAGE
    assert client.get(PAGE).status_code == 200
    client.post(PAGE, {"answer": "accept"})
    assert member(tenant, person) is not None


def sent_by_admin(tenant: dict[str, Any], make_user: Any, role: str = Role.ADMIN) -> tuple[Membership, str]:
    """An admin of the tenant invites an address they hold, as ``role``: the invitation's secret."""
    from accounts.services import add_member

    admin = add_member(organization=tenant["organization"], user=make_user(), role=Role.ADMIN)
    _, secret = invite_member(
        organization=tenant["organization"], email="accomplice@example.com", role=role, actor=Actor(user=admin.user)
    )
    return admin, secret


@pytest.mark.parametrize("fate", ["removed", "deactivated", "demoted"])
def test_an_invitation_holds_only_while_its_sender_may_still_invite(
    tenant: dict[str, Any], make_user: Any, fate: str
) -> None:
    """Found in review: an admin invited an address of their own (as owner then; as admin since only an owner makes an
    owner), was removed (or deactivated, or made a developer), and the invitation still made that address a member
    with the power. An invitation is a grant made with its sender's power, as a key is: it ends when that power does."""
    admin, secret = sent_by_admin(tenant, make_user)
    accomplice = make_user("accomplice@example.com")
    if fate == "removed":
        remove_member(membership=admin)
    elif fate == "deactivated":
        deactivate_user(user=admin.user)
    else:
        change_member_role(membership=admin, role=Role.DEVELOPER)
    assert not Invitation.objects.filter(organization=tenant["organization"]).exists()  # withdrawn with the power
    with pytest.raises(InvitationUnusable):
        accept_invitation(secret=secret, user=accomplice)
    assert member(tenant, accomplice) is None


def test_an_invitation_whose_sender_lost_the_power_by_other_means_is_refused_at_acceptance(
    tenant: dict[str, Any], make_user: Any
) -> None:
    """Whatever way the sender's power went (an operator's SQL, a role changed in the admin console), acceptance
    checks the sender as they stand then, under a lock."""
    admin, secret = sent_by_admin(tenant, make_user)
    accomplice = make_user("accomplice@example.com")
    Membership.objects.filter(pk=admin.pk).update(role=Role.BILLING)
    client = browser(accomplice)
    page = opened(client, f"/auth/invitation/{secret}")
    assert page.status_code == 404
    assert "can no longer invite" in page.content.decode()
    with pytest.raises(InvitationUnusable):
        accept_invitation(secret=secret, user=accomplice)
    User.objects.filter(pk=admin.user.pk).delete()  # the sender gone altogether
    with pytest.raises(InvitationUnusable):
        accept_invitation(secret=secret, user=accomplice)
    assert member(tenant, accomplice) is None


def test_a_suspended_organization_takes_nobody_in_until_it_is_active_again(tenant: dict[str, Any]) -> None:
    """Found in review: an invitation sent before a suspension was accepted during it (and, for a new address, made
    an account and an owner). Now it waits: refused while suspended, no account made, accepted once unsuspended."""
    invite(tenant, "patient@example.com", Role.OWNER)
    link = emailed_link("patient@example.com")
    set_organization_suspended(organization=tenant["organization"], suspended=True)
    client = Client()
    page = opened(client, link)
    assert page.status_code == 404
    assert "suspended" in page.content.decode()
    client.post(PAGE, {"password": PASSWORD})
    assert not User.objects.filter(email="patient@example.com").exists()
    assert Invitation.objects.filter(email="patient@example.com").exists()  # it waits
    set_organization_suspended(organization=tenant["organization"], suspended=False)
    client.post(PAGE, {"password": PASSWORD})
    patient = User.objects.get(email="patient@example.com")
    joined = member(tenant, patient)
    assert joined is not None
    assert joined.role == Role.OWNER


def test_the_links_secret_leaves_the_url_at_once(tenant: dict[str, Any]) -> None:
    """Found in review: the secret was in the path of every request of the page (access logs, a Referer, history).
    The link now puts it in the session and redirects to a URL without it, as Django's password reset does."""
    invite(tenant, "private@example.com")
    link = emailed_link("private@example.com")
    client = Client()
    first = client.get(link)
    assert first.status_code == 302
    assert first["Location"] == PAGE
    assert Client().get(PAGE).status_code == 404  # another browser, no link opened: nothing to show


def test_an_owner_made_an_admin_after_inviting_an_owner_makes_nobody_owner(
    tenant: dict[str, Any], make_user: Any
) -> None:
    """Only an owner makes an owner (``accounts.policy.may_give_role``): an invitation as owner holds while its sender
    is still one; as admin they could make the invited person an admin, not an owner."""
    from accounts.services import add_member

    sender = add_member(organization=tenant["organization"], user=make_user(), role=Role.OWNER)
    organization, by_owner, OWNER = tenant["organization"], Actor(user=sender.user), Role.OWNER
    _, secret = invite_member(organization=organization, email="accomplice@example.com", role=OWNER, actor=by_owner)
    accomplice = make_user("accomplice@example.com")
    change_member_role(membership=sender, role=Role.ADMIN)
    with pytest.raises(InvitationUnusable, match="can no longer make someone owner"):
        accept_invitation(secret=secret, user=accomplice)
    assert member(tenant, accomplice) is None
    change_member_role(membership=sender, role=Role.OWNER)  # an owner again: the invitation holds once more
    assert accept_invitation(secret=secret, user=accomplice).role == Role.OWNER
