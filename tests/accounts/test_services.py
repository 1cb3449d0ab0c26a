"""The state changes of accounts.services: idempotence, the owner rule, limits, deactivation, races, and the admin
console going through them."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.core import checks
from django.db import IntegrityError, connection, transaction
from django.test import Client
from django.utils import timezone

from accounts import services
from accounts.models import ApiKey, AuditAction, AuditEvent, Membership, Organization, Role, User, UserManager
from accounts.services import (
    AccountsError,
    Actor,
    add_member,
    change_member_role,
    create_organization,
    deactivate_user,
    remove_member,
    revoke_api_key,
    set_concurrency_limit,
    set_organization_suspended,
    sign_up,
    update_api_key,
)
from tests.conftest import personal_organization

pytestmark = pytest.mark.django_db

PASSWORD = "correct horse battery"
ACTOR = Actor(ip_address="192.0.2.10")

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="needs a database where two transactions run at once"
)


def audits(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("pk"))


def team(owner: User, *members: tuple[User, str], name: str = "Acme") -> Organization:
    organization = create_organization(name=name, owner=owner)
    for user, role in members:
        Membership.objects.create(user=user, organization=organization, role=role)
    return organization


def membership_of(user: User, organization: Organization) -> Membership:
    return Membership.objects.get(user=user, organization=organization)


# 1. Suspension is idempotent.


def test_suspending_a_suspended_organization_changes_and_audits_nothing(tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    set_organization_suspended(organization=organization, suspended=True, actor=ACTOR)
    first = Organization.objects.get(pk=organization.pk).suspended_at
    assert first is not None
    again = set_organization_suspended(organization=organization, suspended=True, actor=ACTOR)
    assert again.suspended_at == first
    assert Organization.objects.get(pk=organization.pk).suspended_at == first
    assert len(audits(AuditAction.ORG_SUSPENDED)) == 1


def test_unsuspending_an_active_organization_changes_and_audits_nothing(tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    set_organization_suspended(organization=organization, suspended=False, actor=ACTOR)
    assert Organization.objects.get(pk=organization.pk).suspended_at is None
    assert not audits(AuditAction.ORG_UNSUSPENDED)
    set_organization_suspended(organization=organization, suspended=True)
    set_organization_suspended(organization=organization, suspended=False)
    set_organization_suspended(organization=organization, suspended=False)
    assert len(audits(AuditAction.ORG_SUSPENDED)) == len(audits(AuditAction.ORG_UNSUSPENDED)) == 1


def test_a_stale_instance_does_not_resuspend(tenant: dict[str, Any]) -> None:
    stale = Organization.objects.get(pk=tenant["organization"].pk)
    set_organization_suspended(organization=tenant["organization"], suspended=True)
    first = Organization.objects.get(pk=stale.pk).suspended_at
    set_organization_suspended(organization=stale, suspended=True)
    assert stale.suspended_at == first
    assert len(audits(AuditAction.ORG_SUSPENDED)) == 1


# 2a. Members: added and removed through services, under the owner rule.


def test_add_member_is_audited_with_the_role(tenant: dict[str, Any], make_user: Any) -> None:
    newcomer = make_user()
    actor = Actor(user=tenant["user"], ip_address="198.51.100.9")
    membership = add_member(organization=tenant["organization"], user=newcomer, role=Role.DEVELOPER, actor=actor)
    assert membership.pk is not None
    assert membership_of(newcomer, tenant["organization"]).role == Role.DEVELOPER
    event = AuditEvent.objects.get(
        action=AuditAction.MEMBER_ADDED, organization=tenant["organization"], target_id=str(newcomer.pk)
    )
    assert event.metadata == {"role": Role.DEVELOPER}
    assert event.actor_user == tenant["user"]
    assert event.ip_address == "198.51.100.9"


def test_adding_a_member_twice_is_refused(tenant: dict[str, Any], make_user: Any) -> None:
    newcomer = make_user()
    add_member(organization=tenant["organization"], user=newcomer, role=Role.DEVELOPER)
    before = AuditEvent.objects.count()
    with pytest.raises(AccountsError, match="already a member"):
        add_member(organization=tenant["organization"], user=newcomer, role=Role.ADMIN)
    assert membership_of(newcomer, tenant["organization"]).role == Role.DEVELOPER
    assert AuditEvent.objects.count() == before


def test_adding_with_an_unknown_role_is_refused(tenant: dict[str, Any], make_user: Any) -> None:
    newcomer = make_user()
    with pytest.raises(AccountsError, match="Unknown role"):
        add_member(organization=tenant["organization"], user=newcomer, role="root")
    assert not Membership.objects.filter(user=newcomer, organization=tenant["organization"]).exists()


def test_remove_member_is_audited(tenant: dict[str, Any], make_user: Any) -> None:
    leaving = make_user()
    membership = add_member(organization=tenant["organization"], user=leaving, role=Role.BILLING)
    remove_member(membership=membership, actor=Actor(user=tenant["user"]))
    assert not Membership.objects.filter(pk=membership.pk).exists()
    event = AuditEvent.objects.get(action=AuditAction.MEMBER_REMOVED)
    assert event.organization == tenant["organization"]
    assert event.target_id == str(leaving.pk)
    assert event.actor_user == tenant["user"]
    assert event.metadata == {"role": Role.BILLING}


def test_the_last_owner_cannot_be_removed(tenant: dict[str, Any], make_user: Any) -> None:
    add_member(organization=tenant["organization"], user=make_user(), role=Role.ADMIN)
    owner = membership_of(tenant["user"], tenant["organization"])
    with pytest.raises(AccountsError, match="at least one owner"):
        remove_member(membership=owner)
    assert Membership.objects.filter(pk=owner.pk, role=Role.OWNER).exists()
    assert not audits(AuditAction.MEMBER_REMOVED)


def test_an_owner_can_be_removed_while_another_owner_remains(tenant: dict[str, Any], make_user: Any) -> None:
    other_owner = add_member(organization=tenant["organization"], user=make_user(), role=Role.OWNER)
    owner = membership_of(tenant["user"], tenant["organization"])
    remove_member(membership=owner)
    assert not Membership.objects.filter(pk=owner.pk).exists()
    with pytest.raises(AccountsError):
        remove_member(membership=other_owner)


def test_a_stale_membership_sees_the_role_as_stored(tenant: dict[str, Any], make_user: Any) -> None:
    """The rule is checked on the locked rows, not on what the caller's instance says."""
    other = add_member(organization=tenant["organization"], user=make_user(), role=Role.OWNER)
    stale_owner = membership_of(tenant["user"], tenant["organization"])
    change_member_role(membership=other, role=Role.DEVELOPER)  # tenant's owner is now the only one
    stale_owner.role = Role.DEVELOPER  # what a stale form might hold
    with pytest.raises(AccountsError):
        remove_member(membership=stale_owner)


def test_removing_a_removed_membership_is_refused(tenant: dict[str, Any], make_user: Any) -> None:
    membership = add_member(organization=tenant["organization"], user=make_user(), role=Role.DEVELOPER)
    remove_member(membership=membership)
    with pytest.raises(AccountsError, match="no longer exists"):
        remove_member(membership=membership)
    assert len(audits(AuditAction.MEMBER_REMOVED)) == 1


# 2b. Limits.


def test_set_concurrency_limit_is_audited_from_and_to(tenant: dict[str, Any]) -> None:
    organization = tenant["organization"]
    changed = set_concurrency_limit(organization=organization, limit=5, actor=ACTOR)
    assert changed.concurrency_limit == 5
    assert Organization.objects.get(pk=organization.pk).concurrency_limit == 5
    event = AuditEvent.objects.get(action=AuditAction.LIMITS_CHANGED)
    assert event.metadata == {"concurrency_limit": {"from": 2, "to": 5}}
    assert event.organization == organization
    assert event.target_type == "accounts.organization"
    assert event.ip_address == ACTOR.ip_address


def test_an_unchanged_concurrency_limit_is_not_audited(tenant: dict[str, Any]) -> None:
    set_concurrency_limit(organization=tenant["organization"], limit=2)
    assert not audits(AuditAction.LIMITS_CHANGED)


@pytest.mark.parametrize("limit", [0, -1])
def test_a_concurrency_limit_below_one_is_refused(tenant: dict[str, Any], limit: int) -> None:
    with pytest.raises(AccountsError):
        set_concurrency_limit(organization=tenant["organization"], limit=limit)
    assert Organization.objects.get(pk=tenant["organization"].pk).concurrency_limit == 2
    assert not audits(AuditAction.LIMITS_CHANGED)


def test_the_concurrency_limit_is_taken_from_the_stored_row(tenant: dict[str, Any]) -> None:
    stale = Organization.objects.get(pk=tenant["organization"].pk)
    set_concurrency_limit(organization=tenant["organization"], limit=4)
    set_concurrency_limit(organization=stale, limit=6)
    assert [e.metadata for e in audits(AuditAction.LIMITS_CHANGED)] == [
        {"concurrency_limit": {"from": 2, "to": 4}},
        {"concurrency_limit": {"from": 4, "to": 6}},
    ]


# 2c. Key changes.


def test_renaming_a_key_writes_the_name_and_audits_nothing(tenant: dict[str, Any]) -> None:
    api_key = tenant["api_key"]
    update_api_key(api_key=api_key, name="renamed")
    assert ApiKey.objects.get(pk=api_key.pk).name == "renamed"
    assert api_key.name == "renamed"
    assert not audits(AuditAction.LIMITS_CHANGED)


def test_rate_and_expiry_changes_are_audited_from_and_to(tenant: dict[str, Any]) -> None:
    api_key = tenant["api_key"]
    expires = timezone.now() + timedelta(days=7)
    update_api_key(api_key=api_key, requests_per_minute=30, expires_at=expires, actor=ACTOR)
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert (stored.requests_per_minute, stored.expires_at) == (30, expires)
    event = AuditEvent.objects.get(action=AuditAction.LIMITS_CHANGED)
    assert event.metadata == {
        "requests_per_minute": {"from": None, "to": 30},
        "expires_at": {"from": None, "to": expires.isoformat()},
    }
    assert event.organization == tenant["organization"]
    assert event.target_id == str(api_key.pk)
    # Back to the default: audited too; the same values again: nothing.
    update_api_key(api_key=api_key, requests_per_minute=None)
    update_api_key(api_key=api_key, requests_per_minute=None, expires_at=expires, name=api_key.name)
    assert [e.metadata for e in audits(AuditAction.LIMITS_CHANGED)][1:] == [
        {"requests_per_minute": {"from": 30, "to": None}}
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"expires_at": timezone.now() - timedelta(minutes=1)},
        {"requests_per_minute": 0},
        {"name": "   "},
        {"name": "x" * 101},
    ],
)
def test_invalid_key_changes_are_refused_as_on_creation(tenant: dict[str, Any], changes: dict[str, Any]) -> None:
    api_key = tenant["api_key"]
    with pytest.raises(AccountsError):
        update_api_key(api_key=api_key, **changes)
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert (stored.name, stored.requests_per_minute, stored.expires_at) == ("test key", None, None)
    assert not audits(AuditAction.LIMITS_CHANGED)


def test_creating_a_key_with_zero_rate_is_refused(tenant: dict[str, Any], make_key: Any) -> None:
    with pytest.raises(AccountsError):
        make_key(tenant["organization"], requests_per_minute=0)


def test_a_key_update_writes_only_its_columns(tenant: dict[str, Any]) -> None:
    stale = ApiKey.objects.get(pk=tenant["api_key"].pk)
    revoke_api_key(api_key=tenant["api_key"])
    update_api_key(api_key=stale, name="renamed", requests_per_minute=10)
    stored = ApiKey.objects.get(pk=stale.pk)
    assert stored.is_revoked  # not written back from the stale instance
    assert (stored.name, stored.requests_per_minute) == ("renamed", 10)


# 2d. Deactivation.


def test_deactivating_a_solo_person_suspends_their_personal_organization(tenant: dict[str, Any]) -> None:
    user = tenant["user"]
    assert tenant["client"].get("/v1/me").status_code == 200
    deactivated = deactivate_user(user=user, actor=ACTOR)
    assert deactivated.is_active is False
    assert User.objects.get(pk=user.pk).is_active is False
    assert Organization.objects.get(pk=tenant["organization"].pk).is_suspended
    # Their organization's keys stop working; they cannot log in.
    response = tenant["client"].get("/v1/me")
    assert response.status_code == 403
    assert response.json()["error_type"] == "organization_suspended"
    assert not Client().login(email=user.email, password=PASSWORD)
    event = AuditEvent.objects.get(action=AuditAction.USER_DEACTIVATED)
    assert event.target_id == str(user.pk)
    assert event.ip_address == ACTOR.ip_address
    assert event.metadata == {"suspended_organizations": [str(tenant["organization"].pk)]}
    assert AuditEvent.objects.get(action=AuditAction.ORG_SUSPENDED).organization == tenant["organization"]


def test_deactivating_twice_changes_and_audits_nothing(tenant: dict[str, Any]) -> None:
    deactivate_user(user=tenant["user"])
    before = AuditEvent.objects.count()
    deactivate_user(user=tenant["user"])
    assert AuditEvent.objects.count() == before


def test_the_only_owner_of_a_team_is_not_deactivated(make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = team(owner, (developer, Role.DEVELOPER))
    with pytest.raises(AccountsError, match="only owner"):
        deactivate_user(user=owner)
    assert User.objects.get(pk=owner.pk).is_active
    assert not Organization.objects.filter(suspended_at__isnull=False).exists()
    assert not audits(AuditAction.USER_DEACTIVATED)
    # Once someone else owns it, they can go; the team keeps working, their personal organization is suspended.
    change_member_role(membership=membership_of(developer, acme), role=Role.OWNER)
    deactivate_user(user=owner)
    assert not User.objects.get(pk=owner.pk).is_active
    assert not Organization.objects.get(pk=acme.pk).is_suspended
    assert Organization.objects.get(pk=personal_organization(owner).pk).is_suspended


def test_a_member_who_is_not_an_owner_is_deactivated(make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = team(owner, (developer, Role.DEVELOPER))
    deactivate_user(user=developer)
    assert not User.objects.get(pk=developer.pk).is_active
    assert not Organization.objects.get(pk=acme.pk).is_suspended


def test_a_personal_organization_with_other_members_is_not_orphaned(make_user: Any) -> None:
    owner, guest = make_user(), make_user()
    Membership.objects.create(user=guest, organization=personal_organization(owner), role=Role.DEVELOPER)
    with pytest.raises(AccountsError):
        deactivate_user(user=owner)
    assert User.objects.get(pk=owner.pk).is_active


# 3. Races at sign-up.


def test_a_concurrent_sign_up_for_the_same_address_is_an_accounts_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another sign-up inserts the address after this one's check: the unique index decides, as AccountsError."""
    create_user = UserManager.create_user

    def racing(self: UserManager, email: str, password: str | None = None, **fields: Any) -> User:
        User.objects.create(email=email.upper())  # the other sign-up, in any case
        return create_user(self, email, password, **fields)

    monkeypatch.setattr(UserManager, "create_user", racing)
    with pytest.raises(AccountsError, match="already exists"):
        sign_up(email="dana@example.com", password=PASSWORD)
    assert not Organization.objects.filter(slug="dana").exists()


def test_a_taken_slug_gets_a_random_suffix(make_user: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = make_user()
    first = create_organization(name="Acme", owner=owner)
    assert first.slug == "acme"
    # As if another create took "acme" between the check and the insert.
    monkeypatch.setattr(services, "_unique_slug", lambda name: "acme")
    second = create_organization(name="Acme", owner=owner)
    assert second.slug.startswith("acme-")
    assert len(second.slug) == len("acme-") + 6
    assert membership_of(owner, second).role == Role.OWNER


def test_slug_retries_are_bounded(make_user: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    owner = make_user()
    create_organization(name="Acme", owner=owner)
    create_organization(name="Acme fixed", owner=owner)
    Organization.objects.filter(name="Acme fixed").update(slug="acme-000000")
    monkeypatch.setattr(services, "_unique_slug", lambda name: "acme")
    monkeypatch.setattr(secrets, "token_hex", lambda n: "000000")
    count = Organization.objects.count()
    with pytest.raises(IntegrityError):
        create_organization(name="Acme", owner=owner)
    assert Organization.objects.count() == count


def _run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Each call in its own thread (and database connection); returns each one's result or exception."""
    results: list[Any] = [None] * len(calls)

    def run(index: int, call: Callable[[], Any]) -> None:
        try:
            results[index] = call()
        except Exception as error:
            results[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_sign_ups_at_once_for_one_address(monkeypatch: pytest.MonkeyPatch) -> None:
    both_checked = threading.Barrier(2, timeout=10)
    create_user = UserManager.create_user

    def after_both_checks(self: UserManager, email: str, password: str | None = None, **fields: Any) -> User:
        both_checked.wait()  # both have seen the address free
        return create_user(self, email, password, **fields)

    monkeypatch.setattr(UserManager, "create_user", after_both_checks)
    results = _run_together(
        lambda: sign_up(email="erin@example.com", password=PASSWORD),
        lambda: sign_up(email="Erin@Example.com", password=PASSWORD),
    )
    assert sum(isinstance(r, User) for r in results) == 1, results
    assert sum(isinstance(r, AccountsError) for r in results) == 1, results
    assert User.objects.filter(email__iexact="erin@example.com").count() == 1
    assert Organization.objects.filter(slug__startswith="erin").count() == 1


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_two_organizations_created_at_once_with_one_name(monkeypatch: pytest.MonkeyPatch) -> None:
    owners = [sign_up(email=f"owner{n}@example.com", password=PASSWORD) for n in range(2)]
    both_chose = threading.Barrier(2, timeout=10)
    unique_slug = services._unique_slug

    def after_both_chose(name: str) -> str:
        slug = unique_slug(name)
        both_chose.wait()  # both have chosen the same free slug
        return slug

    monkeypatch.setattr(services, "_unique_slug", after_both_chose)
    results = _run_together(*(lambda owner=owner: create_organization(name="Globex", owner=owner) for owner in owners))
    assert all(isinstance(r, Organization) for r in results), results
    slugs = sorted(r.slug for r in results)
    assert slugs[0] == "globex"
    assert slugs[1].startswith("globex-")


# 4. A membership that is gone.


def test_changing_the_role_of_a_removed_membership_is_an_accounts_error(tenant: dict[str, Any], make_user: Any) -> None:
    membership = add_member(organization=tenant["organization"], user=make_user(), role=Role.DEVELOPER)
    Membership.objects.filter(pk=membership.pk).delete()
    with pytest.raises(AccountsError, match="no longer exists"):
        change_member_role(membership=membership, role=Role.ADMIN)


# 5. One address per person whatever its case, in the database itself.


def test_the_database_refuses_a_case_variant_of_an_address(make_user: Any) -> None:
    make_user(email="frank@example.com")
    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.create(email="Frank@Example.COM")  # past the manager, which would lower-case it
    assert User.objects.filter(email__iexact="frank@example.com").count() == 1


def test_email_stays_unique_for_djangos_auth_check() -> None:
    errors = checks.run_checks(tags=[checks.Tags.models])
    assert not [e for e in errors if e.id in ("auth.E003", "auth.W004")]
    assert User._meta.get_field("email").unique


# The admin console goes through the services.


@pytest.fixture
def operator(db: None) -> Client:
    superuser = User.objects.create_superuser(email="ops@example.com", password=PASSWORD)
    client = Client()
    client.force_login(superuser)
    return client


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def organization_form(organization: Organization, roles: Mapping[Membership, str] | None = None) -> dict[str, Any]:
    """The organization's edit form as posted, with each membership's role (the stored one unless given)."""
    memberships = list(Membership.objects.filter(organization=organization))
    data: dict[str, Any] = {
        "name": organization.name,
        "slug": organization.slug,
        "concurrency_limit": organization.concurrency_limit,
        "memberships-TOTAL_FORMS": len(memberships),
        "memberships-INITIAL_FORMS": len(memberships),
    }
    for index, membership in enumerate(memberships):
        data[f"memberships-{index}-id"] = membership.pk
        data[f"memberships-{index}-organization"] = organization.pk
        data[f"memberships-{index}-user"] = membership.user_id
        data[f"memberships-{index}-role"] = (roles or {}).get(membership, membership.role)
    return data


def test_admin_refuses_demoting_the_last_owner_in_the_inline(operator: Client, make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = team(owner, (developer, Role.DEVELOPER))
    owner_membership = membership_of(owner, acme)
    url = f"/admin/accounts/organization/{acme.pk}/edit/"
    response = operator.post(url, organization_form(acme, {owner_membership: Role.ADMIN}))
    assert response.status_code == 302, response.content.decode()[:2000]
    assert membership_of(owner, acme).role == Role.OWNER
    assert any("keeps the role they had" in m for m in messages_of(response))
    assert not audits(AuditAction.ROLE_CHANGED)


def test_admin_hands_ownership_over_in_one_save(operator: Client, make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = team(owner, (developer, Role.DEVELOPER))
    roles = {membership_of(owner, acme): Role.ADMIN, membership_of(developer, acme): Role.OWNER}
    response = operator.post(f"/admin/accounts/organization/{acme.pk}/edit/", organization_form(acme, roles))
    assert response.status_code == 302
    assert (membership_of(owner, acme).role, membership_of(developer, acme).role) == (Role.ADMIN, Role.OWNER)
    assert len(audits(AuditAction.ROLE_CHANGED)) == 2


def test_admin_changes_the_concurrency_limit_through_the_service(operator: Client, make_user: Any) -> None:
    acme = team(make_user())
    data = {**organization_form(acme), "concurrency_limit": 7, "name": "Acme Inc"}
    response = operator.post(f"/admin/accounts/organization/{acme.pk}/edit/", data)
    assert response.status_code == 302
    stored = Organization.objects.get(pk=acme.pk)
    assert (stored.name, stored.concurrency_limit) == ("Acme Inc", 7)
    event = AuditEvent.objects.get(action=AuditAction.LIMITS_CHANGED)
    assert event.metadata == {"concurrency_limit": {"from": 2, "to": 7}}
    assert event.actor_user is not None
    assert event.actor_user.email == "ops@example.com"


@pytest.mark.usefixtures("unhashed_static_files")
def test_admin_shows_a_zero_concurrency_limit_as_a_form_error(operator: Client, make_user: Any) -> None:
    acme = team(make_user())
    data = {**organization_form(acme), "concurrency_limit": 0}
    response = operator.post(f"/admin/accounts/organization/{acme.pk}/edit/", data)
    assert response.status_code == 200  # the form again
    assert Organization.objects.get(pk=acme.pk).concurrency_limit == 2
    assert not audits(AuditAction.LIMITS_CHANGED)


def test_admin_adds_inline_members_through_the_service(operator: Client, make_user: Any) -> None:
    owner, newcomer = make_user(), make_user()
    acme = team(owner)
    data = organization_form(acme)
    data.update(
        {
            "memberships-TOTAL_FORMS": 2,
            "memberships-1-organization": acme.pk,
            "memberships-1-user": newcomer.pk,
            "memberships-1-role": Role.BILLING,
        }
    )
    response = operator.post(f"/admin/accounts/organization/{acme.pk}/edit/", data)
    assert response.status_code == 302
    assert membership_of(newcomer, acme).role == Role.BILLING
    event = AuditEvent.objects.get(action=AuditAction.MEMBER_ADDED, target_id=str(newcomer.pk), organization=acme)
    assert event.metadata == {"role": Role.BILLING}
    assert event.actor_user is not None


def test_admin_deletes_a_membership_through_the_service(operator: Client, make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = team(owner, (developer, Role.DEVELOPER))
    membership = membership_of(developer, acme)
    response = operator.post(f"/admin/accounts/membership/{membership.pk}/remove/")
    assert response.status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()
    event = AuditEvent.objects.get(action=AuditAction.MEMBER_REMOVED)
    assert event.actor_user is not None
    assert event.metadata == {"role": Role.DEVELOPER}


def test_admin_key_change_goes_through_the_service(operator: Client, tenant: dict[str, Any]) -> None:
    api_key = tenant["api_key"]
    response = operator.post(
        f"/admin/accounts/apikey/{api_key.pk}/edit/",
        {"name": "renamed", "requests_per_minute": 42, "expires_at_0": "", "expires_at_1": ""},
    )
    assert response.status_code == 302
    stored = ApiKey.objects.get(pk=api_key.pk)
    assert (stored.name, stored.requests_per_minute) == ("renamed", 42)
    event = AuditEvent.objects.get(action=AuditAction.LIMITS_CHANGED)
    assert event.metadata == {"requests_per_minute": {"from": None, "to": 42}}


def test_admin_deactivate_action(operator: Client, make_user: Any) -> None:
    solo, owner, developer = make_user(), make_user(), make_user()
    team(owner, (developer, Role.DEVELOPER))
    response = operator.post(
        "/admin/accounts/user/",
        {"action": "deactivate_selected", "_selected_action": [solo.pk, owner.pk], "index": 0},
    )
    assert response.status_code == 302
    assert not User.objects.get(pk=solo.pk).is_active
    assert Organization.objects.get(pk=personal_organization(solo).pk).is_suspended
    assert User.objects.get(pk=owner.pk).is_active
    texts = messages_of(response)
    assert any(f"{owner} stays active" in m for m in texts), texts
    assert any("Deactivated 1 user(s)" in m for m in texts), texts
    event = AuditEvent.objects.get(action=AuditAction.USER_DEACTIVATED)
    assert event.target_id == str(solo.pk)
    assert event.actor_user is not None


def user_form(user: User, **changes: Any) -> dict[str, Any]:
    """The user change form as posted (None: a box left unticked), with the read-only memberships inline."""
    memberships = list(Membership.objects.filter(user=user))
    data: dict[str, Any] = {
        "email": user.email,
        "name": user.name,
        **changes,
        "memberships-TOTAL_FORMS": len(memberships),
        "memberships-INITIAL_FORMS": len(memberships),
    }
    for index, membership in enumerate(memberships):
        data[f"memberships-{index}-id"] = membership.pk
        data[f"memberships-{index}-user"] = user.pk
    return {key: value for key, value in data.items() if value is not None}


def test_admin_deactivates_a_user_through_the_service(operator: Client, make_user: Any) -> None:
    solo = make_user()
    renamed = operator.post(f"/admin/accounts/user/{solo.pk}/change/", user_form(solo, name="Solo"))
    assert renamed.status_code == 302
    response = operator.post(f"/admin/accounts/user/{solo.pk}/deactivate/")
    assert response.status_code == 302
    stored = User.objects.get(pk=solo.pk)
    assert (stored.is_active, stored.name) == (False, "Solo")
    assert Organization.objects.get(pk=personal_organization(solo).pk).is_suspended
    assert AuditEvent.objects.filter(action=AuditAction.USER_DEACTIVATED, target_id=str(solo.pk)).exists()


def test_admin_refuses_deactivating_the_only_owner_of_a_team(operator: Client, make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    team(owner, (developer, Role.DEVELOPER))
    url = f"/admin/accounts/user/{owner.pk}/change/"
    response = operator.post(f"/admin/accounts/user/{owner.pk}/deactivate/")
    assert response.status_code == 302
    assert response["Location"] == url  # back to the person's page, not to the list
    stored = User.objects.get(pk=owner.pk)
    assert (stored.is_active, stored.name) == (True, "")  # nothing was saved
    assert any("was not deactivated" in m for m in messages_of(response))
    assert not audits(AuditAction.USER_DEACTIVATED)
