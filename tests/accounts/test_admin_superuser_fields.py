"""Only a superuser grants power in the console: an operator with "change user" alone cannot tick is_superuser or
give groups and permissions (to anyone, themselves included), nor change a superuser or another operator with
permissions they lack (whose password they could then set), and one with "change group" cannot set a group's
permissions; a superuser still does all of it."""

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


@pytest.fixture
def finance() -> User:
    """Another operator, who may grant credits (change accounts): power the user admin does not hold."""
    person = User.objects.create_user(email="finance@example.com", password="finance password 1", is_staff=True)
    person.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="billing", codename__in=["view_account", "change_account"])
    )
    return person


def test_an_operator_cannot_take_over_an_operator_with_more_power(user_admin: User, finance: User) -> None:
    """Found in review: "change user" let an operator set another operator's password (or address, then reset it)
    and log in with that operator's permissions: the helpdesk granted itself credits through the finance desk's
    account. Whoever holds a permission the operator lacks is theirs to look at only; held through a group, and
    while deactivated (reactivating is one action away), too."""
    client = logged_in(user_admin)
    page = client.get(f"/admin/accounts/user/{finance.pk}/change/")
    assert page.status_code == 200
    assert page.context["has_change_permission"] is False
    password = client.post(
        f"/admin/accounts/user/{finance.pk}/password/", {"password1": "taken over 123", "password2": "taken over 123"}
    )
    assert password.status_code == 403
    assert post_change(client, finance, email="helpdesk+finance@example.com").status_code == 403
    assert client.get(f"/admin/accounts/user/{finance.pk}/deactivate/").status_code == 403
    assert client.post(f"/admin/accounts/user/{finance.pk}/delete/", {"post": "yes"}).status_code == 403
    finance.refresh_from_db()
    assert (finance.email, finance.is_active, finance.check_password("finance password 1")) == (
        "finance@example.com",
        True,
        True,
    )
    # Held through a group, and while deactivated, the same.
    desk = Group.objects.create(name="finance")
    desk.permissions.set(finance.user_permissions.all())
    finance.user_permissions.clear()
    finance.groups.add(desk)
    User.objects.filter(pk=finance.pk).update(is_active=False)
    assert (
        client.post(
            f"/admin/accounts/user/{finance.pk}/password/",
            {"password1": "taken over 123", "password2": "taken over 123"},
        ).status_code
        == 403
    )
    actions = {"action": "reactivate_selected", "_selected_action": [str(finance.pk)]}
    assert client.post("/admin/accounts/user/", actions).status_code == 302
    finance.refresh_from_db()
    assert (finance.is_active, finance.check_password("finance password 1")) == (False, True)


def test_an_operator_still_changes_people_with_no_more_power_than_theirs(user_admin: User, make_user: Any) -> None:
    customer, peer = make_user(), User.objects.create_user(email="peer@example.com", is_staff=True)
    peer.user_permissions.add(*Permission.objects.filter(content_type__app_label="accounts", codename="view_user"))
    client = logged_in(user_admin)
    for person in (customer, peer):
        answer = client.post(
            f"/admin/accounts/user/{person.pk}/password/", {"password1": "a new one 123", "password2": "a new one 123"}
        )
        assert answer.status_code == 302, answer.content
        person.refresh_from_db()
        assert person.check_password("a new one 123")


def test_only_a_superuser_sets_a_groups_permissions(powerful: tuple[Group, Permission]) -> None:
    """Found in review: an operator with "change group" gave the group they belong to every permission, and so
    themselves; the group's other columns are still theirs to edit."""
    group, _ = powerful
    operator = User.objects.create_user(email="ops@example.com", password="ops password 1", is_staff=True)
    operator.groups.add(group)
    everything = [str(pk) for pk in Permission.objects.values_list("pk", flat=True)]
    client = logged_in(operator)
    form = client.get(f"/admin/auth/group/{group.pk}/change/").context["adminform"].form
    assert "permissions" not in form.fields
    answer = client.post(
        f"/admin/auth/group/{group.pk}/change/", {"name": "operations", "permissions": everything, "_save": "Save"}
    )
    assert answer.status_code == 302, answer.content
    group.refresh_from_db()
    assert group.name == "operations"
    assert [p.codename for p in group.permissions.all()] == ["change_group"]
    assert not User.objects.get(pk=operator.pk).has_perm("billing.change_account")
    root = User.objects.create_superuser(email="root@example.com", password="root password 1")
    granted = logged_in(root).post(
        f"/admin/auth/group/{group.pk}/change/", {"name": "operations", "permissions": everything, "_save": "Save"}
    )
    assert granted.status_code == 302, granted.content
    assert group.permissions.count() == len(everything)
