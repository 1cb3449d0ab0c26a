"""Only a superuser grants power in the console: an operator with "change user" alone cannot tick is_superuser or
give groups and permissions (to anyone, themselves included), nor change a superuser (whose password they could
then set); a superuser still does all of it."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Group, Permission
from django.test import Client

from accounts.models import User

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("unhashed_static_files")]


@pytest.fixture
def user_admin(db: None) -> User:
    """Staff with the user model's permissions, not a superuser."""
    operator = User.objects.create_user(email="helpdesk@example.com", password="helpdesk password 1", is_staff=True)
    operator.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="accounts", codename__in=["view_user", "change_user", "delete_user"]
        )
    )
    return operator


@pytest.fixture
def powerful() -> tuple[Group, Permission]:
    group = Group.objects.create(name="everything")
    permission = Permission.objects.get(content_type__app_label="auth", codename="change_group")
    group.permissions.add(permission)
    return group, permission


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def change_form(person: User, **changes: Any) -> dict[str, Any]:
    """What the change form posts for ``person``, with ``changes`` laid over it."""
    data: dict[str, Any] = {
        "email": person.email,
        "name": person.name,
        "is_staff": "on" if person.is_staff else "",
        "last_login_0": "",
        "last_login_1": "",
        "date_joined_0": "",
        "date_joined_1": "",
        # The memberships inline (read-only rows, none added).
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "memberships-MIN_NUM_FORMS": "0",
        "memberships-MAX_NUM_FORMS": "1000",
        "_save": "Save",
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value != ""}


def post_change(client: Client, person: User, **changes: Any) -> Any:
    return client.post(f"/admin/accounts/user/{person.pk}/change/", change_form(person, **changes))


def test_the_form_shows_the_power_fields_read_only(user_admin: User, make_user: Any) -> None:
    page = logged_in(user_admin).get(f"/admin/accounts/user/{make_user().pk}/change/")
    assert page.status_code == 200
    form = page.context["adminform"].form
    assert {"is_superuser", "groups", "user_permissions"}.isdisjoint(form.fields)
    assert {"email", "name", "is_staff"} <= set(form.fields)  # the rest is still theirs to edit


def test_an_operator_cannot_make_themselves_superuser(user_admin: User, powerful: tuple[Group, Permission]) -> None:
    group, permission = powerful
    answer = post_change(
        logged_in(user_admin),
        user_admin,
        name="Helpdesk",
        is_superuser="on",
        groups=[str(group.pk)],
        user_permissions=[str(permission.pk)],
    )
    assert answer.status_code == 302, answer.content
    user_admin.refresh_from_db()
    assert user_admin.name == "Helpdesk"  # the form was saved, without the fields it may not set
    assert not user_admin.is_superuser
    assert not user_admin.groups.exists()
    assert not user_admin.user_permissions.filter(pk=permission.pk).exists()
    assert user_admin.user_permissions.count() == 3


def test_an_operator_cannot_grant_power_to_someone_else(
    user_admin: User, make_user: Any, powerful: tuple[Group, Permission]
) -> None:
    group, permission = powerful
    accomplice = make_user()
    client = logged_in(user_admin)
    answer = post_change(
        client,
        accomplice,
        is_staff="on",
        is_superuser="on",
        groups=[str(group.pk)],
        user_permissions=[str(permission.pk)],
    )
    assert answer.status_code == 302, answer.content
    accomplice.refresh_from_db()
    assert accomplice.is_staff
    assert (accomplice.is_superuser, accomplice.groups.count(), accomplice.user_permissions.count()) == (False, 0, 0)


def test_an_operator_cannot_change_a_superuser(user_admin: User) -> None:
    root = User.objects.create_superuser(email="root@example.com", password="root password 1")
    client = logged_in(user_admin)
    page = client.get(f"/admin/accounts/user/{root.pk}/change/")
    assert page.status_code == 200  # they may still look
    assert "adminform" in page.context
    assert page.context["has_change_permission"] is False
    refused = post_change(client, root, email="helpdesk+root@example.com")
    assert refused.status_code == 403
    password = client.post(
        f"/admin/accounts/user/{root.pk}/password/", {"password1": "taken over 123", "password2": "taken over 123"}
    )
    assert password.status_code == 403
    assert client.get(f"/admin/accounts/user/{root.pk}/deactivate/").status_code == 403
    assert client.post(f"/admin/accounts/user/{root.pk}/delete/", {"post": "yes"}).status_code == 403
    root.refresh_from_db()
    assert (root.email, root.is_active, root.check_password("root password 1")) == ("root@example.com", True, True)


def test_a_superuser_still_grants_everything(make_user: Any, powerful: tuple[Group, Permission]) -> None:
    group, permission = powerful
    root = User.objects.create_superuser(email="root@example.com", password="root password 1")
    person = make_user()
    client = logged_in(root)
    form = client.get(f"/admin/accounts/user/{person.pk}/change/").context["adminform"].form
    assert {"is_superuser", "groups", "user_permissions"} <= set(form.fields)
    answer = post_change(
        client, person, is_staff="on", is_superuser="on", groups=[str(group.pk)], user_permissions=[str(permission.pk)]
    )
    assert answer.status_code == 302, answer.content
    person.refresh_from_db()
    assert person.is_superuser
    assert list(person.groups.all()) == [group]
    assert list(person.user_permissions.all()) == [permission]
