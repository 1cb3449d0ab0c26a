"""One authorization policy at every door: role x action x door, as a table (accounts/policy.py).

The dashboard door is the member signed in; the API door is the broadest key the member may make
(every scope their role grants). ``None``: the door has no route for the action. A new action cannot be
added to the policy without its row here (``test_the_table_covers_every_role_and_action``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from accounts import policy
from accounts.models import ApiKey, Membership, Organization, Role, Scope, User
from accounts.services import (
    InsufficientRole,
    create_api_key,
    create_organization,
    deactivate_user,
    remove_member,
)
from accounts.services import (
    change_member_role as change_role,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files", "priced_without_broker")]

OWN, A, D, B = Role.OWNER, Role.ADMIN, Role.DEVELOPER, Role.BILLING
Y, N = True, False

# action: {role: (dashboard, api)}
TABLE: dict[str, dict[str, tuple[bool, bool | None]]] = {
    policy.VIEW: {OWN: (Y, Y), A: (Y, Y), D: (Y, Y), B: (Y, Y)},
    policy.RUN_MODELS: {OWN: (Y, Y), A: (Y, Y), D: (Y, Y), B: (N, N)},
    policy.READ_USAGE: {OWN: (Y, Y), A: (Y, Y), D: (Y, Y), B: (Y, Y)},
    policy.MANAGE_KEYS: {OWN: (Y, Y), A: (Y, Y), D: (Y, N), B: (N, N)},
    policy.MANAGE_MEMBERS: {OWN: (Y, None), A: (Y, None), D: (N, None), B: (N, None)},
    policy.MANAGE_BILLING: {OWN: (Y, Y), A: (Y, Y), D: (N, N), B: (Y, N)},
}
GRANTABLE = {
    OWN: {Scope.INFERENCE, Scope.USAGE_READ, Scope.ADMIN},
    A: {Scope.INFERENCE, Scope.USAGE_READ, Scope.ADMIN},
    D: {Scope.INFERENCE, Scope.USAGE_READ},
    B: {Scope.USAGE_READ},
}
CASES = [(role, action) for action in TABLE for role in Role.values]


def dashboard_attempt(client: Client, action: str, organization: Organization) -> int:
    """The status of one page or form of the dashboard that needs ``action``."""
    if action == policy.VIEW:
        return client.get("/dashboard/").status_code
    if action == policy.RUN_MODELS:
        return client.get("/dashboard/playground").status_code
    if action == policy.READ_USAGE:
        return client.get("/dashboard/usage").status_code
    if action == policy.MANAGE_KEYS:
        return client.post("/dashboard/keys", {"name": "k", "scopes": [Scope.INFERENCE]}).status_code
    if action == policy.MANAGE_MEMBERS:
        return client.post("/dashboard/members/invite", {"email": "x@example.com", "role": D}).status_code
    if action == policy.MANAGE_BILLING:
        form = {"enabled": "", "threshold_dollars": "5", "amount_dollars": "10"}
        return client.post("/dashboard/billing/top-up", form).status_code
    raise AssertionError(f"no dashboard door for {action}")


def api_attempt(client: APIClient, action: str) -> int | None:
    """The status of one ``/v1`` (or queue) call that needs ``action``; None where the API has none."""
    if action == policy.VIEW:
        return client.get("/v1/me").status_code
    if action == policy.RUN_MODELS:
        return client.post("/queue/nobody/nothing", {}, format="json").status_code  # 404 once allowed in
    if action == policy.READ_USAGE:
        return client.get("/v1/billing/balance").status_code
    if action == policy.MANAGE_KEYS:
        return client.post("/v1/keys", {"name": "k", "scopes": [Scope.INFERENCE]}, format="json").status_code
    if action == policy.MANAGE_MEMBERS:
        return None
    if action == policy.MANAGE_BILLING:
        return client.put("/v1/billing/limits", {"monthly_budget_micros": None}, format="json").status_code
    raise AssertionError(f"no API door for {action}")


@pytest.fixture
def member_of(make_user: Callable[..., User]) -> Callable[[str], tuple[User, Organization]]:
    def make(role: str) -> tuple[User, Organization]:
        organization = create_organization(name="Acme", owner=make_user())
        user = make_user()
        if role == Role.OWNER:
            user = Membership.objects.get(organization=organization).user
        else:
            Membership.objects.create(user=user, organization=organization, role=role)
        return user, organization

    return make


def key_client(organization: Organization, user: User | None, scopes: list[str]) -> tuple[ApiKey, APIClient]:
    api_key, token = create_api_key(organization=organization, name="k", scopes=scopes, created_by=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return api_key, client


def test_the_table_covers_every_role_and_action() -> None:
    assert tuple(TABLE) == policy.ACTIONS
    assert all(set(row) == set(Role.values) for row in TABLE.values())
    assert set(policy.ROLE_ACTIONS) == set(Role.values)
    assert {role: set(policy.grantable_scopes(role)) for role in Role.values} == GRANTABLE


@pytest.mark.parametrize(("role", "action"), CASES)
def test_the_dashboard_door(role: str, action: str, member_of: Any) -> None:
    user, organization = member_of(role)
    client = Client()
    client.force_login(user)
    client.post("/dashboard/organization", {"organization": str(organization.pk)})
    allowed, _ = TABLE[action][role]
    assert policy.role_can(role, action) is allowed
    status = dashboard_attempt(client, action, organization)
    assert (status != 403) is allowed, status
    assert status < 500


@pytest.mark.parametrize(("role", "action"), CASES)
def test_the_api_door(role: str, action: str, member_of: Any) -> None:
    user, organization = member_of(role)
    _, client = key_client(organization, user, sorted(policy.grantable_scopes(role)))
    _, expected = TABLE[action][role]
    status = api_attempt(client, action)
    if expected is None:
        assert status is None
        return
    assert status is not None
    assert status < 500
    assert (status != 403) is expected, status
    # Never wider than the member: the API allows only what the dashboard allows.
    assert not expected or TABLE[action][role][0]


@pytest.mark.parametrize("role", Role.values)
def test_a_member_makes_only_keys_their_role_grants(role: str, member_of: Any) -> None:
    user, organization = member_of(role)
    for scope in Scope.values:
        if scope in GRANTABLE[role]:
            create_api_key(organization=organization, name="k", scopes=[scope], created_by=user)
        else:
            with pytest.raises(InsufficientRole, match=scope):
                create_api_key(organization=organization, name="k", scopes=[scope], created_by=user)


def test_a_developer_cannot_make_an_admin_key_on_the_dashboard(member_of: Any) -> None:
    user, organization = member_of(D)
    client = Client()
    client.force_login(user)
    client.post("/dashboard/organization", {"organization": str(organization.pk)})
    page = client.get("/dashboard/keys").content.decode()
    assert f'value="{Scope.INFERENCE}"' in page
    assert f'value="{Scope.ADMIN}"' not in page  # not offered
    client.post("/dashboard/keys", {"name": "sneaky", "scopes": [Scope.ADMIN]})  # nor taken when forged
    assert not ApiKey.objects.filter(organization=organization, name="sneaky").exists()


def test_a_developers_admin_key_has_no_admin_power_through_the_api(member_of: Any) -> None:
    """A key made before the check (or forged into the table) is cut down to the maker's role when used."""
    user, organization = member_of(D)
    api_key, client = key_client(organization, None, [Scope.ADMIN])
    ApiKey.objects.filter(pk=api_key.pk).update(created_by=user)
    made = client.post("/v1/keys", {"name": "k", "scopes": [Scope.ADMIN]}, format="json")
    assert (made.status_code, made.json()["error_type"]) == (403, "insufficient_scope")
    bought = client.post("/v1/billing/purchases", {"amount_cents": 2_000}, format="json")
    assert bought.status_code == 403
    assert client.put("/v1/billing/limits", {"monthly_budget_micros": None}, format="json").status_code == 403
    assert client.get("/v1/billing/ledger").status_code == 200  # a developer reads usage and the ledger


def test_an_admin_key_made_by_a_demoted_admin_loses_admin_power(member_of: Any) -> None:
    user, organization = member_of(A)
    _, client = key_client(organization, user, [Scope.ADMIN])
    budget = {"monthly_budget_micros": None}
    assert client.put("/v1/billing/limits", budget, format="json").status_code == 200
    change_role(membership=Membership.objects.get(user=user, organization=organization), role=D)
    refused = client.put("/v1/billing/limits", budget, format="json")
    assert (refused.status_code, refused.json()["error_type"]) == (403, "insufficient_scope")
    assert client.post("/v1/keys", {"name": "k", "scopes": [Scope.INFERENCE]}, format="json").status_code == 403
    assert client.get("/v1/me").status_code == 200  # still what a developer may do
    assert client.post("/queue/nobody/nothing", {}, format="json").status_code == 404


def test_a_key_stops_when_its_maker_leaves_the_organization(member_of: Any) -> None:
    user, organization = member_of(A)
    _, client = key_client(organization, user, [Scope.INFERENCE])
    assert client.get("/v1/me").status_code == 200
    remove_member(membership=Membership.objects.get(user=user, organization=organization))
    response = client.get("/v1/me")
    assert (response.status_code, response.json()["error_type"]) == (401, "api_key_maker_removed")


def test_a_key_stops_when_its_maker_is_deactivated(member_of: Any) -> None:
    user, organization = member_of(D)
    _, client = key_client(organization, user, [Scope.INFERENCE])
    deactivate_user(user=user)
    response = client.get("/v1/me")
    assert (response.status_code, response.json()["error_type"]) == (401, "api_key_maker_removed")


def test_a_key_made_by_no_person_keeps_its_scopes(member_of: Any) -> None:
    _, organization = member_of(OWN)
    _, client = key_client(organization, None, [Scope.ADMIN])
    assert client.put("/v1/billing/limits", {"monthly_budget_micros": None}, format="json").status_code == 200


def test_a_developer_revokes_only_keys_their_role_could_make(member_of: Any) -> None:
    """Found in review: ``manage_keys`` let a developer revoke every key of the organization on the dashboard, the
    owners' ``admin`` keys and the system's among them (a key they could never make, and the one that runs the
    organization's billing or deployments). A member revokes the keys they made, and those whose scopes their role
    may grant; the others are not offered, and a forged form is refused."""
    developer, organization = member_of(D)
    owner = Membership.objects.get(organization=organization, role=OWN).user
    owners, _ = key_client(organization, owner, [Scope.ADMIN])
    systems, _ = key_client(organization, None, [Scope.INFERENCE, Scope.ADMIN])
    shared, _ = key_client(organization, owner, [Scope.INFERENCE])
    client = Client()
    client.force_login(developer)
    client.post("/dashboard/organization", {"organization": str(organization.pk)})
    page = client.get("/dashboard/keys").content.decode()
    for api_key in (owners, systems):
        assert f"/dashboard/keys/{api_key.pk}/revoke" not in page
        assert client.post(f"/dashboard/keys/{api_key.pk}/revoke").status_code == 403
        api_key.refresh_from_db()
        assert api_key.revoked_at is None
    # A key within their role (an inference key, whoever made it) and their own key are still theirs to revoke,
    # their own even after a demotion left it broader than their role.
    own, _ = key_client(organization, developer, [Scope.USAGE_READ])
    ApiKey.objects.filter(pk=own.pk).update(scopes=[Scope.ADMIN])
    page = client.get("/dashboard/keys").content.decode()
    for api_key in (shared, own):
        assert f"/dashboard/keys/{api_key.pk}/revoke" in page
        assert client.post(f"/dashboard/keys/{api_key.pk}/revoke").status_code == 302
        api_key.refresh_from_db()
        assert api_key.revoked_at is not None
    # An owner revokes any of them.
    admin = Client()
    admin.force_login(owner)
    admin.post("/dashboard/organization", {"organization": str(organization.pk)})
    assert admin.post(f"/dashboard/keys/{systems.pk}/revoke").status_code == 302
    systems.refresh_from_db()
    assert systems.revoked_at is not None


def test_only_an_owner_makes_changes_or_removes_an_owner(member_of: Any, make_user: Callable[..., User]) -> None:
    """Found in review: owners and admins could do everything alike, so an admin could invite an accomplice as owner,
    or demote or remove every owner, and hold the organization, its keys and its billing alone. An admin still
    manages every other member; owner choices are not offered to them, and a forged form is refused (403)."""
    admin, organization = member_of(A)
    owner_membership = Membership.objects.get(organization=organization, role=OWN)
    developer = Membership.objects.create(user=make_user(), organization=organization, role=D)
    client = Client()
    client.force_login(admin)
    client.post("/dashboard/organization", {"organization": str(organization.pk)})
    page = client.get("/dashboard/members").content.decode()
    assert f"/dashboard/members/{owner_membership.pk}/role" not in page
    assert f"/dashboard/members/{owner_membership.pk}/remove" not in page
    assert f"/dashboard/members/{developer.pk}/role" in page
    assert f'value="{OWN}"' not in page  # neither a role to change to nor one to invite as
    refused = [
        client.post(f"/dashboard/members/{owner_membership.pk}/role", {"role": A}),
        client.post(f"/dashboard/members/{owner_membership.pk}/remove"),
        client.post(f"/dashboard/members/{developer.pk}/role", {"role": OWN}),
        client.post("/dashboard/members/invite", {"email": "accomplice@example.com", "role": OWN}),
    ]
    assert [answer.status_code for answer in refused] == [403] * 4
    assert "cannot change or remove an owner" in refused[0].content.decode()
    assert "cannot make someone owner" in refused[2].content.decode()
    memberships = Membership.objects.filter(organization=organization)
    assert dict(memberships.values_list("pk", "role")) == {
        owner_membership.pk: OWN,
        developer.pk: D,
        Membership.objects.get(organization=organization, user=admin).pk: A,
    }
    assert not organization.invitations.exists()
    # Every other member is still the admin's to manage.
    assert client.post(f"/dashboard/members/{developer.pk}/role", {"role": B}).status_code == 302
    assert client.post("/dashboard/members/invite", {"email": "admin2@example.com", "role": A}).status_code == 302
    assert memberships.get(pk=developer.pk).role == B
    # An owner does all four.
    owner = Client()
    owner.force_login(owner_membership.user)
    owner.post("/dashboard/organization", {"organization": str(organization.pk)})
    page = owner.get("/dashboard/members").content.decode()
    assert f'value="{OWN}"' in page
    assert owner.post(f"/dashboard/members/{developer.pk}/role", {"role": OWN}).status_code == 302
    assert owner.post(f"/dashboard/members/{owner_membership.pk}/role", {"role": A}).status_code == 302
    assert memberships.get(pk=developer.pk).role == OWN
    assert memberships.get(pk=owner_membership.pk).role == A


def test_an_admins_invitation_with_a_bad_address_is_the_forms_error_not_a_refusal(member_of: Any) -> None:
    """Found in review of the owner rule: an invitation with a mistyped address and a role the admin may give was
    answered 403 "cannot make someone developer"; it is the form's error, as before."""
    admin, organization = member_of(A)
    client = Client()
    client.force_login(admin)
    client.post("/dashboard/organization", {"organization": str(organization.pk)})
    answer = client.post("/dashboard/members/invite", {"email": "not an address", "role": D}, follow=True)
    assert answer.status_code == 200
    assert "Give a valid email address and a role." in answer.content.decode()
