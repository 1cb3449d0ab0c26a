"""The operators' console for the platform core: pages render, rows with a rule are changed only on form views and
actions, and those go through the services (what each service does is tested in test_services.py)."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.test import Client

from accounts.models import ApiKey, AuditAction, AuditEvent, Membership, Organization, Role, User
from accounts.services import create_organization, deactivate_user
from tests.conftest import personal_organization

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files")]

OPERATOR_EMAIL = "ops@example.com"


@pytest.fixture
def operator(db: None) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser(email=OPERATOR_EMAIL, password="operator password 1"))
    return client


def messages_of(response: Any) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def audits(action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action=action).order_by("pk"))


def run_action(client: Client, model: str, action: str, objects: list[Any]) -> Any:
    return client.post(
        f"/admin/accounts/{model}/",
        {"action": action, "_selected_action": [str(obj.pk) for obj in objects], "index": 0},
    )


def test_every_page_and_form_view_renders(operator: Client, tenant: dict[str, Any], make_user: Any) -> None:
    user, organization, api_key = tenant["user"], tenant["organization"], tenant["api_key"]
    membership = Membership.objects.create(user=make_user(), organization=organization, role=Role.DEVELOPER)
    event = AuditEvent.objects.filter(organization=organization).first()
    assert event is not None
    pages = {
        "user": user.pk,
        "organization": organization.pk,
        "membership": membership.pk,
        "apikey": api_key.pk,
        "auditevent": event.pk,
    }
    for model, pk in pages.items():
        assert operator.get(f"/admin/accounts/{model}/").status_code == 200, model
        assert operator.get(f"/admin/accounts/{model}/{pk}/change/").status_code == 200, model
    form_views = [
        "/admin/accounts/user/sign-up/",
        f"/admin/accounts/user/{user.pk}/deactivate/",
        "/admin/accounts/organization/create/",
        f"/admin/accounts/organization/{organization.pk}/edit/",
        f"/admin/accounts/membership/{membership.pk}/remove/",
        f"/admin/accounts/apikey/{api_key.pk}/edit/",
    ]
    for url in form_views:
        page = operator.get(url)
        assert page.status_code == 200, url
        assert '<input type="submit"' in page.content.decode(), url
    # Each is linked from the page it acts on.
    assert "/admin/accounts/user/sign-up/" in operator.get("/admin/accounts/user/").content.decode()
    assert "/admin/accounts/organization/create/" in operator.get("/admin/accounts/organization/").content.decode()
    organization_page = operator.get(f"/admin/accounts/organization/{organization.pk}/change/").content.decode()
    assert f"/admin/accounts/organization/{organization.pk}/edit/" in organization_page
    membership_page = operator.get(f"/admin/accounts/membership/{membership.pk}/change/").content.decode()
    assert f"/admin/accounts/membership/{membership.pk}/remove/" in membership_page
    key_page = operator.get(f"/admin/accounts/apikey/{api_key.pk}/change/").content.decode()
    assert f"/admin/accounts/apikey/{api_key.pk}/edit/" in key_page
    user_page = operator.get(f"/admin/accounts/user/{user.pk}/change/").content.decode()
    assert f"/admin/accounts/user/{user.pk}/deactivate/" in user_page


def test_rows_with_a_rule_are_not_added_or_edited_on_the_admins_own_forms(
    operator: Client, tenant: dict[str, Any]
) -> None:
    organization, api_key = tenant["organization"], tenant["api_key"]
    membership = Membership.objects.get(user=tenant["user"], organization=organization)
    for model in ("user", "organization", "membership", "apikey", "auditevent"):
        assert operator.get(f"/admin/accounts/{model}/add/").status_code == 403, model
    for model, pk in (("organization", organization.pk), ("membership", membership.pk), ("apikey", api_key.pk)):
        assert operator.post(f"/admin/accounts/{model}/{pk}/change/", {"name": "changed"}).status_code == 403
        assert 'name="_save"' not in operator.get(f"/admin/accounts/{model}/{pk}/change/").content.decode()
    assert Organization.objects.get(pk=organization.pk).name == organization.name
    assert ApiKey.objects.get(pk=api_key.pk).name == api_key.name
    # A membership is removed through the service, never deleted past it.
    assert operator.get(f"/admin/accounts/membership/{membership.pk}/delete/").status_code == 403
    # A key is revoked, never deleted, even by a superuser: its usage and audit rows name it.
    assert operator.get(f"/admin/accounts/apikey/{api_key.pk}/delete/").status_code == 403
    assert operator.post(f"/admin/accounts/apikey/{api_key.pk}/delete/", {"post": "yes"}).status_code == 403
    assert "delete_selected" not in operator.get("/admin/accounts/apikey/").content.decode()
    assert ApiKey.objects.filter(pk=api_key.pk).exists()


def test_a_person_added_in_the_console_is_signed_up(operator: Client) -> None:
    data = {
        "email": "Newcomer@Example.com",
        "name": "Newcomer",
        "usable_password": "true",
        "password1": "a long enough password 7",
        "password2": "a long enough password 7",
    }
    response = operator.post("/admin/accounts/user/sign-up/", data)
    user = User.objects.get(email="newcomer@example.com")
    assert response.status_code == 302
    assert response["Location"] == f"/admin/accounts/user/{user.pk}/change/"
    assert user.check_password("a long enough password 7")
    assert personal_organization(user).is_personal
    (event,) = audits(AuditAction.USER_SIGNED_UP)
    assert event.target_id == str(user.pk)
    assert event.actor_user is not None
    assert event.actor_user.email == OPERATOR_EMAIL
    again = operator.post("/admin/accounts/user/sign-up/", {**data, "email": "NEWCOMER@example.com"})
    assert again.status_code == 200  # the form again
    assert "already exists" in str(again.context["form"].errors["email"])
    assert User.objects.filter(email__iexact="newcomer@example.com").count() == 1


def test_a_person_added_without_a_password_sets_one_later(operator: Client) -> None:
    response = operator.post(
        "/admin/accounts/user/sign-up/", {"email": "nopass@example.com", "name": "", "usable_password": "false"}
    )
    assert response.status_code == 302
    assert not User.objects.get(email="nopass@example.com").has_usable_password()


def test_an_organization_made_in_the_console_has_its_owner(operator: Client, make_user: Any) -> None:
    owner = make_user()
    response = operator.post("/admin/accounts/organization/create/", {"name": "Globex", "owner": owner.pk})
    organization = Organization.objects.get(name="Globex")
    assert response.status_code == 302
    assert response["Location"] == f"/admin/accounts/organization/{organization.pk}/change/"
    assert not organization.is_personal
    assert Membership.objects.get(organization=organization).user == owner
    assert Membership.objects.get(organization=organization).role == Role.OWNER
    event = AuditEvent.objects.get(action=AuditAction.MEMBER_ADDED, organization=organization)
    assert event.actor_user is not None
    assert event.actor_user.email == OPERATOR_EMAIL


def test_the_last_owner_is_not_removed(operator: Client, make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = create_organization(name="Acme", owner=owner)
    Membership.objects.create(user=developer, organization=acme, role=Role.DEVELOPER)
    ownership = Membership.objects.get(user=owner, organization=acme)
    page = operator.get(f"/admin/accounts/membership/{ownership.pk}/remove/").content.decode()
    assert "is the only owner of Acme" in page
    assert '<input type="submit"' not in page
    response = operator.post(f"/admin/accounts/membership/{ownership.pk}/remove/")
    assert response.status_code == 302
    assert response["Location"] == f"/admin/accounts/membership/{ownership.pk}/change/"
    assert any("was not removed from Acme" in m for m in messages_of(response))
    assert Membership.objects.filter(pk=ownership.pk).exists()
    assert not audits(AuditAction.MEMBER_REMOVED)


def test_members_are_removed_from_the_list_through_the_service(operator: Client, make_user: Any) -> None:
    owner, developer = make_user(), make_user()
    acme = create_organization(name="Acme", owner=owner)
    Membership.objects.create(user=developer, organization=acme, role=Role.DEVELOPER)
    selected = list(Membership.objects.filter(organization=acme))
    response = run_action(operator, "membership", "remove_selected", selected)
    texts = messages_of(response)
    assert any("Removed 1 member(s)." in m for m in texts), texts
    assert any(f"{owner} was not removed" in m for m in texts), texts
    assert list(Membership.objects.filter(organization=acme).values_list("user", flat=True)) == [owner.pk]
    (event,) = audits(AuditAction.MEMBER_REMOVED)
    assert event.target_id == str(developer.pk)


def test_a_deactivated_person_is_reactivated_from_the_list(operator: Client, make_user: Any) -> None:
    solo, active = make_user(), make_user()
    deactivate_user(user=solo)
    response = run_action(operator, "user", "reactivate_selected", [solo, active])
    assert any("Reactivated 1 user(s) (1 already active)." in m for m in messages_of(response))
    assert User.objects.get(pk=solo.pk).is_active


def test_the_form_views_need_the_models_change_permission(tenant: dict[str, Any], make_user: Any) -> None:
    viewer = User.objects.create_user(email="viewer@example.com", password="viewer password 1", is_staff=True)
    viewer.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_user", "view_organization", "view_apikey"])
    )
    client = Client()
    client.force_login(viewer)
    organization = tenant["organization"]
    page = client.get(f"/admin/accounts/organization/{organization.pk}/change/")
    assert page.status_code == 200
    assert "/edit/" not in page.content.decode()
    assert "/sign-up/" not in client.get("/admin/accounts/user/").content.decode()
    forbidden = [
        f"/admin/accounts/organization/{organization.pk}/edit/",
        "/admin/accounts/organization/create/",
        f"/admin/accounts/apikey/{tenant['api_key'].pk}/edit/",
        f"/admin/accounts/user/{tenant['user'].pk}/deactivate/",
        "/admin/accounts/user/sign-up/",
    ]
    for url in forbidden:
        assert client.get(url).status_code == 403, url
        assert client.post(url, {"name": "changed"}).status_code == 403, url
    assert User.objects.get(pk=tenant["user"].pk).is_active
