from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from accounts.models import (
    ApiKey,
    AuditAction,
    AuditEvent,
    Membership,
    Organization,
    Role,
    Scope,
    TenantModel,
    TenantQuerySet,
    User,
)
from accounts.services import (
    AccountsError,
    Actor,
    change_member_role,
    create_api_key,
    organizations_of,
    revoke_api_key,
    set_organization_suspended,
    sign_up,
)
from tests.conftest import personal_organization

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"


def add_member(organization: Organization, role: str, make_user: Any) -> Membership:
    return Membership.objects.create(user=make_user(), organization=organization, role=role)


# Signing up.


def test_sign_up_creates_the_person_their_organization_and_ownership() -> None:
    user = sign_up(email="Alice.Smith@Example.COM", password=PASSWORD, name="Alice")
    assert user.email == "alice.smith@example.com"
    assert user.check_password(PASSWORD)
    assert not user.is_staff
    assert not user.is_superuser
    organization = personal_organization(user)
    assert organization.name == "Alice"
    assert organization.concurrency_limit == 2
    membership = Membership.objects.get(user=user)
    assert membership.organization == organization
    assert membership.role == Role.OWNER
    events = {event.action: event for event in AuditEvent.objects.filter(organization=organization)}
    assert set(events) == {AuditAction.MEMBER_ADDED, AuditAction.USER_SIGNED_UP}
    for event in events.values():
        assert event.target_type == "accounts.user"
        assert event.target_id == str(user.pk)
    assert events[AuditAction.MEMBER_ADDED].metadata == {"role": Role.OWNER}


def test_personal_organizations_are_named_for_the_address_with_unique_slugs() -> None:
    first = personal_organization(sign_up(email="sam@one.example", password=PASSWORD))
    second = personal_organization(sign_up(email="sam@two.example", password=PASSWORD))
    assert first.name == second.name == "sam"
    assert first.slug == "sam"
    assert second.slug == "sam-2"


@pytest.mark.parametrize("again", ["bob@example.com", "BOB@example.com", "Bob@EXAMPLE.COM"])
def test_an_email_address_signs_up_once_whatever_its_case(again: str) -> None:
    sign_up(email="bob@example.com", password=PASSWORD)
    users, organizations = User.objects.count(), Organization.objects.count()
    with pytest.raises(AccountsError):
        sign_up(email=again, password=PASSWORD)
    assert (User.objects.count(), Organization.objects.count()) == (users, organizations)


def test_organizations_of_lists_the_personal_one_first(make_user: Any) -> None:
    from accounts.services import create_organization

    user = make_user()
    shared = create_organization(name="Acme", owner=user)
    assert organizations_of(user) == [personal_organization(user), shared]


# Roles.


def test_changing_a_role_is_audited_from_and_to(tenant: dict[str, Any], make_user: Any) -> None:
    membership = add_member(tenant["organization"], Role.DEVELOPER, make_user)
    actor = Actor(user=tenant["user"], ip_address="203.0.113.7")
    changed = change_member_role(membership=membership, role=Role.ADMIN, actor=actor)
    assert changed.role == Role.ADMIN
    assert Membership.objects.get(pk=membership.pk).role == Role.ADMIN
    event = AuditEvent.objects.get(action=AuditAction.ROLE_CHANGED)
    assert event.metadata == {"from": Role.DEVELOPER, "to": Role.ADMIN}
    assert event.organization == tenant["organization"]
    assert event.actor_user == tenant["user"]
    assert event.ip_address == "203.0.113.7"
    assert event.target_id == str(membership.user_id)


def test_setting_the_same_role_changes_and_audits_nothing(tenant: dict[str, Any]) -> None:
    membership = Membership.objects.get(user=tenant["user"])
    change_member_role(membership=membership, role=Role.OWNER)
    assert not AuditEvent.objects.filter(action=AuditAction.ROLE_CHANGED).exists()


def test_the_last_owner_cannot_be_demoted(tenant: dict[str, Any], make_user: Any) -> None:
    add_member(tenant["organization"], Role.ADMIN, make_user)
    owner = Membership.objects.get(user=tenant["user"])
    with pytest.raises(AccountsError):
        change_member_role(membership=owner, role=Role.DEVELOPER)
    assert Membership.objects.get(pk=owner.pk).role == Role.OWNER
    assert not AuditEvent.objects.filter(action=AuditAction.ROLE_CHANGED).exists()


def test_an_owner_can_be_demoted_when_another_owner_remains(tenant: dict[str, Any], make_user: Any) -> None:
    second_owner = add_member(tenant["organization"], Role.OWNER, make_user)
    owner = Membership.objects.get(user=tenant["user"])
    change_member_role(membership=owner, role=Role.BILLING)
    assert Membership.objects.get(pk=owner.pk).role == Role.BILLING
    # Now the other one is the last owner.
    with pytest.raises(AccountsError):
        change_member_role(membership=second_owner, role=Role.DEVELOPER)
    assert Membership.objects.get(pk=second_owner.pk).role == Role.OWNER


def test_an_unknown_role_is_refused(tenant: dict[str, Any], make_user: Any) -> None:
    membership = add_member(tenant["organization"], Role.DEVELOPER, make_user)
    with pytest.raises(AccountsError):
        change_member_role(membership=membership, role="superuser")
    assert Membership.objects.get(pk=membership.pk).role == Role.DEVELOPER


# Tenant scoping (no concrete tenant-owned model exists yet: the queryset is tried on a model with the same field).


def test_tenant_model_is_abstract() -> None:
    assert TenantModel._meta.abstract
    with pytest.raises(AttributeError):
        TenantModel.objects.all()  # abstract models have no manager


def test_for_organization_keeps_only_that_organizations_rows(
    tenant: dict[str, Any], other_tenant: dict[str, Any]
) -> None:
    rows = TenantQuerySet(model=ApiKey).for_organization(tenant["organization"])
    assert list(rows) == [tenant["api_key"]]


# Logins: a failure is audited with who was tried, never the password.


def test_a_failed_login_is_audited_without_the_password(tenant: dict[str, Any]) -> None:
    tried_password = "wrong-password-6f1c"
    assert not Client().login(email=tenant["user"].email, password=tried_password)
    event = AuditEvent.objects.get(action=AuditAction.LOGIN_FAILED)
    assert event.metadata == {"username": tenant["user"].email}
    assert event.organization is None
    assert event.actor_user is None
    assert tried_password not in json.dumps(event.metadata)


def test_a_login_as_nobody_is_audited_too(db: None) -> None:
    assert not Client().login(email="nobody@example.com", password="whatever-1234")
    assert AuditEvent.objects.get(action=AuditAction.LOGIN_FAILED).metadata == {"username": "nobody@example.com"}


@pytest.mark.usefixtures("unhashed_static_files")
def test_a_failed_admin_login_is_audited_with_the_address(tenant: dict[str, Any]) -> None:
    tried_password = "admin-guess-91ab"
    response = Client().post(
        "/admin/login/", {"username": tenant["user"].email, "password": tried_password, "next": "/admin/"}
    )
    assert response.status_code == 200  # the form again, with an error
    event = AuditEvent.objects.get(action=AuditAction.LOGIN_FAILED)
    assert event.metadata == {"username": tenant["user"].email}
    assert event.ip_address == "127.0.0.1"
    stored = AuditEvent.objects.filter(pk=event.pk).values().get()
    assert tried_password not in json.dumps(stored, default=str)


def test_a_successful_login_audits_no_failure(tenant: dict[str, Any]) -> None:
    assert Client().login(email=tenant["user"].email, password=PASSWORD)
    assert not AuditEvent.objects.filter(action=AuditAction.LOGIN_FAILED).exists()


def test_a_person_logs_in_with_the_address_they_signed_up_with(db: None) -> None:
    sign_up(email="Carol@Example.com", password=PASSWORD)
    assert Client().login(email="Carol@Example.com", password=PASSWORD)


# Keys and organizations: audit rows say who acted and for which organization.


def test_key_creation_and_revocation_are_audited_with_actor_and_organization(tenant: dict[str, Any]) -> None:
    actor = Actor(user=tenant["user"], ip_address="198.51.100.4")
    api_key, _ = create_api_key(
        organization=tenant["organization"],
        name="deploy",
        scopes=[Scope.INFERENCE],
        created_by=tenant["user"],
        actor=actor,
    )
    revoke_api_key(api_key=api_key, actor=actor)
    for action in (AuditAction.KEY_CREATED, AuditAction.KEY_REVOKED):
        event = AuditEvent.objects.get(action=action, target_id=str(api_key.id))
        assert event.organization == tenant["organization"]
        assert event.actor_user == tenant["user"]
        assert event.actor_api_key is None
        assert event.ip_address == "198.51.100.4"
        assert event.target_type == "accounts.apikey"
    created = AuditEvent.objects.get(action=AuditAction.KEY_CREATED, target_id=str(api_key.id))
    assert created.metadata == {"name": "deploy", "scopes": [Scope.INFERENCE]}


def test_revocation_through_the_api_is_audited_with_the_acting_key(tenant: dict[str, Any], make_key: Any) -> None:
    victim, _ = make_key(tenant["organization"], scopes=[Scope.INFERENCE])
    assert tenant["client"].delete(f"/v1/keys/{victim.id}").status_code == 200
    event = AuditEvent.objects.get(action=AuditAction.KEY_REVOKED, target_id=str(victim.id))
    assert event.actor_api_key == tenant["api_key"]
    assert event.organization == tenant["organization"]
    assert event.ip_address == "127.0.0.1"


def test_suspension_is_audited_both_ways(tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    set_organization_suspended(organization=organization, suspended=True, actor=Actor(user=tenant["user"]))
    assert organization.is_suspended
    set_organization_suspended(organization=organization, suspended=False)
    assert not Organization.objects.get(pk=organization.pk).is_suspended
    actions = list(
        AuditEvent.objects.filter(organization=organization, target_type="accounts.organization")
        .order_by("id")
        .values_list("action", flat=True)
    )
    assert actions == [AuditAction.ORG_SUSPENDED, AuditAction.ORG_UNSUSPENDED]
