from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from django.core.serializers.json import DjangoJSONEncoder
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiKey, AuditAction, AuditEvent, Scope

pytestmark = pytest.mark.django_db


def client_for(token: str, scheme: str = "Key") -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"{scheme} {token}")
    return client


def test_me_with_key_and_bearer(tenant: dict[str, Any]) -> None:
    for scheme in ("Key", "Bearer", "key"):
        response = client_for(tenant["token"], scheme).get("/v1/me")
        assert response.status_code == 200, response.content
        body = response.json()
        assert body["organization"]["id"] == str(tenant["organization"].id)
        assert body["organization"]["concurrency_limit"] == 2
        assert body["api_key"]["id"] == str(tenant["api_key"].id)
        assert body["user"]["email"] == tenant["user"].email
        assert "secret_hash" not in body["api_key"]


@pytest.mark.parametrize(
    ("header", "error_type"),
    [
        (None, "unauthorized"),
        ("Key nothing-here", "invalid_api_key"),
        ("Key 7d1b4bbf-7d3a-4a43-9d3e-6d1f0f6c9d7e:deadbeef", "invalid_api_key"),
        ("Key :", "invalid_api_key"),
        ("Basic dXNlcjpwYXNz", "invalid_api_key"),
        ("Key", "invalid_api_key"),
    ],
)
def test_bad_credentials_are_401_json(header: str | None, error_type: str, tenant: dict[str, Any]) -> None:
    client = APIClient()
    if header is not None:
        client.credentials(HTTP_AUTHORIZATION=header)
    response = client.get("/v1/me")
    assert response.status_code == 401
    assert response.json()["error_type"] == error_type
    assert response.json()["detail"]
    assert response["WWW-Authenticate"].startswith("Key")


def test_wrong_secret_for_a_real_key_is_401(tenant: dict[str, Any]) -> None:
    key_id = tenant["token"].split(":")[0]
    response = client_for(f"{key_id}:{'0' * 64}").get("/v1/me")
    assert response.status_code == 401
    assert response.json() == {"detail": "Invalid API key.", "error_type": "invalid_api_key"}


def test_non_ascii_authorization_header_is_401(tenant: dict[str, Any]) -> None:
    response = APIClient().get("/v1/me", HTTP_AUTHORIZATION="Key \u00e9\u00e9:\u00e9".encode().decode("latin-1"))
    assert response.status_code == 401


def test_revocation_is_effective_on_the_next_request(tenant: dict[str, Any], make_key: Any) -> None:
    victim, victim_token = make_key(tenant["organization"], scopes=[Scope.INFERENCE])
    assert client_for(victim_token).get("/v1/me").status_code == 200
    response = tenant["client"].delete(f"/v1/keys/{victim.id}")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"
    after = client_for(victim_token).get("/v1/me")
    assert after.status_code == 401
    assert after.json()["error_type"] == "api_key_revoked"
    # Revoking again is harmless and audits once.
    assert tenant["client"].delete(f"/v1/keys/{victim.id}").status_code == 200
    assert AuditEvent.objects.filter(action=AuditAction.KEY_REVOKED, target_id=str(victim.id)).count() == 1


def test_expired_key_is_401(tenant: dict[str, Any], make_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, token = make_key(tenant["organization"], expires_at=timezone.now() + timedelta(hours=1))
    assert client_for(token).get("/v1/me").status_code == 200
    # Two hours later: a key kept since the first request (accounts/key_cache.py) expires all the same.
    later = timezone.now() + timedelta(hours=2)
    monkeypatch.setattr(timezone, "now", lambda: later)
    response = client_for(token).get("/v1/me")
    assert response.status_code == 401
    assert response.json()["error_type"] == "api_key_expired"


def test_suspended_organization_is_403(tenant: dict[str, Any]) -> None:
    from accounts.services import set_organization_suspended

    set_organization_suspended(organization=tenant["organization"], suspended=True)
    response = tenant["client"].get("/v1/me")
    assert response.status_code == 403
    assert response.json()["error_type"] == "organization_suspended"


def test_wrong_scope_is_403(tenant: dict[str, Any], make_key: Any) -> None:
    _, token = make_key(tenant["organization"], scopes=[Scope.INFERENCE, Scope.USAGE_READ])
    client = client_for(token)
    assert client.get("/v1/me").status_code == 200
    for response in (
        client.get("/v1/keys"),
        client.post("/v1/keys", {"name": "x"}, format="json"),
        client.delete(f"/v1/keys/{tenant['api_key'].id}"),
    ):
        assert response.status_code == 403
        assert response.json() == {
            "detail": "This API key lacks the 'admin' scope.",
            "error_type": "insufficient_scope",
        }
    assert not tenant["api_key"].__class__.objects.get(pk=tenant["api_key"].pk).is_revoked


def test_create_shows_the_secret_once_and_stores_only_its_hash(tenant: dict[str, Any]) -> None:
    expires = (timezone.now() + timedelta(days=30)).isoformat()
    response = tenant["client"].post(
        "/v1/keys",
        {"name": "ci", "scopes": ["inference", "usage:read"], "expires_at": expires, "requests_per_minute": 30},
        format="json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    key_id, secret = body["key"].split(":")
    assert key_id == body["id"]
    assert len(secret) == 64
    assert body["scopes"] == ["inference", "usage:read"]
    assert body["rate_limit_per_minute"] == 30
    stored = ApiKey.objects.get(pk=key_id)
    assert secret not in stored.secret_hash
    assert stored.created_by == tenant["user"]
    # Never shown again: not in the list, not on the key's own page.
    assert secret not in tenant["client"].get("/v1/keys").content.decode()
    detail = tenant["client"].get(f"/v1/keys/{key_id}").json()
    assert "key" not in detail
    assert detail["secret_hint"] == secret[-4:]
    # The new key works at once.
    assert client_for(body["key"]).get("/v1/me").status_code == 200
    event = AuditEvent.objects.get(action=AuditAction.KEY_CREATED, target_id=key_id)
    assert event.actor_api_key == tenant["api_key"]
    assert event.organization == tenant["organization"]


def test_create_defaults_to_inference_scope(tenant: dict[str, Any]) -> None:
    response = tenant["client"].post("/v1/keys", {"name": "default"}, format="json")
    assert response.status_code == 201
    assert response.json()["scopes"] == ["inference"]


@pytest.mark.parametrize(
    ("payload", "locations"),
    [
        ({}, [["body", "name"]]),
        ({"name": "x", "scopes": ["root"]}, [["body", "scopes", 0]]),
        ({"name": "x", "scopes": []}, [["body", "scopes"]]),
        ({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, [["body", "expires_at"]]),
        ({"name": "x", "expires_at": "tomorrow"}, [["body", "expires_at"]]),
        ({"name": "x" * 101}, [["body", "name"]]),
        ({"name": "x", "requests_per_minute": 0}, [["body", "requests_per_minute"]]),
        ([], [["body"]]),
        ("just a string", [["body"]]),
    ],
)
def test_invalid_create_is_422_naming_the_field(tenant: dict[str, Any], payload: Any, locations: list[Any]) -> None:
    before = ApiKey.objects.count()
    response = tenant["client"].post("/v1/keys", payload, format="json")
    assert response.status_code == 422, response.content
    body = response.json()
    assert body["error_type"] == "validation_error"
    assert [item["loc"] for item in body["detail"]] == locations
    assert all(item["msg"] and item["type"] for item in body["detail"])
    assert ApiKey.objects.count() == before


def test_list_is_paginated_newest_first_and_scoped(tenant: dict[str, Any], make_key: Any) -> None:
    for n in range(4):
        make_key(tenant["organization"], name=f"k{n}")
    page = tenant["client"].get("/v1/keys?limit=2").json()
    assert [item["name"] for item in page["results"]] == ["k3", "k2"]
    second = tenant["client"].get(page["next"]).json()
    assert [item["name"] for item in second["results"]] == ["k1", "k0"]


def test_list_does_not_grow_queries_with_rows(
    tenant: dict[str, Any], make_key: Any, django_assert_max_num_queries: Any
) -> None:
    for n in range(20):
        make_key(tenant["organization"], name=f"k{n}", created_by=tenant["user"])
    tenant["client"].get("/v1/me")  # last_used_at is written at most once a minute
    with django_assert_max_num_queries(2):
        assert tenant["client"].get("/v1/keys?limit=100").status_code == 200


def test_another_organizations_keys_are_404(tenant: dict[str, Any], other_tenant: dict[str, Any]) -> None:
    theirs = other_tenant["api_key"].id
    assert tenant["client"].get(f"/v1/keys/{theirs}").status_code == 404
    response = tenant["client"].delete(f"/v1/keys/{theirs}")
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"
    assert not ApiKey.objects.get(pk=theirs).is_revoked
    listed = [item["id"] for item in tenant["client"].get("/v1/keys").json()["results"]]
    assert str(theirs) not in listed
    assert listed == [str(tenant["api_key"].id)]
    assert other_tenant["client"].get("/v1/me").json()["organization"]["id"] == str(other_tenant["organization"].id)


@pytest.mark.parametrize("key_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000", "%20"])
def test_unknown_or_malformed_key_ids_are_404(tenant: dict[str, Any], key_id: str) -> None:
    assert tenant["client"].get(f"/v1/keys/{key_id}").status_code == 404
    assert tenant["client"].delete(f"/v1/keys/{key_id}").status_code == 404


def test_last_used_is_kept_without_a_write_per_request(
    tenant: dict[str, Any], django_assert_num_queries: Any, settings: Any
) -> None:
    settings.API_KEY_CACHE_SECONDS = 0  # every request reads the key (tests/accounts/test_key_cache.py keeps it)
    assert ApiKey.objects.get(pk=tenant["api_key"].pk).last_used_at is None
    with django_assert_num_queries(2):  # look the key up, stamp last_used_at
        tenant["client"].get("/v1/me")
    first = ApiKey.objects.get(pk=tenant["api_key"].pk).last_used_at
    assert first is not None
    with django_assert_num_queries(1):  # look the key up only
        tenant["client"].get("/v1/me")
    assert ApiKey.objects.get(pk=tenant["api_key"].pk).last_used_at == first


def test_me_matches_its_documented_serializer(tenant: dict[str, Any]) -> None:
    from accounts.serializers import MeSerializer

    api_key = ApiKey.objects.select_related("organization", "created_by").get(pk=tenant["api_key"].pk)
    tenant["client"].get("/v1/me")  # stamp last_used_at first, so both read the same row
    api_key.refresh_from_db()
    documented = MeSerializer(
        {"organization": api_key.organization, "api_key": api_key, "user": api_key.created_by}
    ).data
    answered = tenant["client"].get("/v1/me").json()
    assert answered == json.loads(json.dumps(documented, cls=DjangoJSONEncoder))


def test_a_key_made_by_an_expiring_key_expires_with_it(tenant: dict[str, Any], make_key: Any) -> None:
    """Found in review: an ``admin`` key given for a day (a contractor's, a CI run's) made a key that never expires,
    attributed to the same person, and so kept its access past the day it was given for. A key made through the API
    expires no later than the key that made it: by default with it, and a later expiry is refused."""
    ends = timezone.now() + timedelta(days=1)
    _, token = make_key(tenant["organization"], created_by=tenant["user"], expires_at=ends)
    expiring = client_for(token)
    later = (ends + timedelta(days=30)).isoformat()
    refused = expiring.post("/v1/keys", {"name": "forever", "expires_at": later}, format="json")
    assert refused.status_code == 422, refused.content
    assert [item["loc"] for item in refused.json()["detail"]] == [["body", "expires_at"]]
    made = expiring.post("/v1/keys", {"name": "forever", "scopes": ["admin"]}, format="json")
    assert made.status_code == 201, made.content
    assert ApiKey.objects.get(pk=made.json()["id"]).expires_at == ends
    sooner = expiring.post(
        "/v1/keys", {"name": "hour", "expires_at": (ends - timedelta(hours=23)).isoformat()}, format="json"
    )
    assert sooner.status_code == 201, sooner.content
    # A key with no expiry still makes keys with none.
    assert tenant["client"].post("/v1/keys", {"name": "open"}, format="json").json()["expires_at"] is None
