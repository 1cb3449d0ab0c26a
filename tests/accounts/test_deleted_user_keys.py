"""Deleting a person never revives their keys: an empty ``created_by`` means a key made by no one, which keeps all
its scopes (accounts.policy), so the keys a person made are revoked before their row goes (accounts.signals)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.core.cache import caches
from rest_framework.test import APIClient

from accounts.models import ApiKey, AuditAction, AuditEvent, Membership, Organization, Role, Scope, User
from accounts.services import change_member_role, create_api_key, create_organization, remove_member

pytestmark = pytest.mark.django_db


@pytest.fixture
def organization(make_user: Callable[..., User]) -> Organization:
    return create_organization(name="Acme", owner=make_user())


def member(organization: Organization, user: User, role: str) -> Membership:
    return Membership.objects.create(user=user, organization=organization, role=role)


def key_client(organization: Organization, user: User | None, scopes: list[str]) -> tuple[ApiKey, APIClient]:
    api_key, token = create_api_key(organization=organization, name="k", scopes=scopes, created_by=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return api_key, client


def test_a_removed_admins_key_stays_dead_when_the_person_is_deleted(
    organization: Organization, make_user: Callable[..., User]
) -> None:
    admin = make_user()
    membership = member(organization, admin, Role.ADMIN)
    api_key, client = key_client(organization, admin, [Scope.ADMIN])
    assert client.get("/v1/keys").status_code == 200
    remove_member(membership=membership)
    assert client.get("/v1/me").json()["error_type"] == "api_key_maker_removed"
    admin.delete()
    api_key.refresh_from_db()
    assert api_key.revoked_at is not None
    refused = client.get("/v1/me")
    assert (refused.status_code, refused.json()["error_type"]) == (401, "api_key_revoked")
    minted = client.post("/v1/keys", {"name": "backdoor", "scopes": [Scope.ADMIN]}, format="json")
    assert minted.status_code == 401
    assert not ApiKey.objects.filter(name="backdoor").exists()
    assert AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED, target_id=str(api_key.pk)).count() == 1


def test_a_demoted_makers_admin_key_does_not_regain_admin(
    organization: Organization, make_user: Callable[..., User]
) -> None:
    person = make_user()
    membership = member(organization, person, Role.ADMIN)
    _, client = key_client(organization, person, [Scope.ADMIN])
    change_member_role(membership=membership, role=Role.DEVELOPER)
    assert client.post("/v1/keys", {"name": "k2", "scopes": [Scope.INFERENCE]}, format="json").status_code == 403
    person.delete()  # the membership goes with the person
    assert client.get("/v1/me").status_code == 401
    assert client.post("/v1/keys", {"name": "k3", "scopes": [Scope.ADMIN]}, format="json").status_code == 401
    assert not ApiKey.objects.filter(name__in=["k2", "k3"]).exists()


def test_every_key_the_person_made_goes_and_no_other(
    organization: Organization, make_user: Callable[..., User]
) -> None:
    leaving, staying = make_user(), make_user()
    member(organization, leaving, Role.ADMIN)
    member(organization, staying, Role.ADMIN)
    theirs = [key_client(organization, leaving, [Scope.INFERENCE])[0] for _ in range(2)]
    already, _ = key_client(organization, leaving, [Scope.INFERENCE])
    already.revoked_at = "2026-01-01T00:00:00Z"
    already.save(update_fields=["revoked_at"])
    others, _ = key_client(organization, staying, [Scope.ADMIN])
    system, system_client = key_client(organization, None, [Scope.ADMIN])
    User.objects.filter(pk=leaving.pk).delete()  # a queryset's delete sends the same signal
    assert all(ApiKey.objects.get(pk=key.pk).revoked_at is not None for key in theirs)
    assert ApiKey.objects.get(pk=already.pk).revoked_at.isoformat().startswith("2026-01-01")  # type: ignore[union-attr]
    assert ApiKey.objects.get(pk=others.pk).revoked_at is None
    # A key made by no person keeps its meaning: all its scopes.
    assert ApiKey.objects.get(pk=system.pk).revoked_at is None
    assert system_client.get("/v1/keys").status_code == 200


@pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="keys are kept only in a cache shared between processes")
def test_a_kept_key_is_refused_at_the_next_request(
    organization: Organization, make_user: Callable[..., User], settings: Any
) -> None:
    """A key kept verified in the shared cache is not answered from it after its maker is deleted."""
    settings.CACHES = {
        "default": {
            "BACKEND": "config.cache.FailSoftRedisCache",
            "LOCATION": os.environ["REDIS_URL"],
            "KEY_PREFIX": f"keys-{uuid.uuid4().hex[:8]}",
        }
    }
    settings.API_KEY_CACHE_SECONDS = 60
    assert caches["default"].__class__.__name__ == "FailSoftRedisCache"
    person = make_user()
    member(organization, person, Role.ADMIN)
    _, client = key_client(organization, person, [Scope.ADMIN])
    assert client.get("/v1/me").status_code == 200  # kept
    person.delete()
    assert client.get("/v1/me").status_code == 401
