"""Verified keys kept in memory and Redis: no database query per request, and every change that touches
authentication stops the kept answer at the very next request, on every process (accounts/key_cache.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.core.cache import caches
from rest_framework.exceptions import AuthenticationFailed, PermissionDenied

from accounts import key_cache
from accounts.authentication import authenticate_token
from accounts.models import ApiKey, Membership
from accounts.services import (
    change_member_role,
    deactivate_user,
    remove_member,
    revoke_api_key,
    set_organization_suspended,
    update_api_key,
)
from config.cache import FailSoftRedisCache
from tests.waiting import wait_until

pytestmark = pytest.mark.django_db

REDIS_URL = os.environ.get("REDIS_URL")


@pytest.fixture
def shared_cache(settings: Any) -> FailSoftRedisCache:
    """The platform's cache on the real Redis, under a prefix of this test's own."""
    if not REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL): keys are kept only in a cache shared between processes")
    settings.CACHES = {
        "default": {
            "BACKEND": "config.cache.FailSoftRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"keys-{uuid.uuid4().hex[:8]}",
        }
    }
    settings.API_KEY_CACHE_SECONDS = 60
    cache = caches["default"]
    assert isinstance(cache, FailSoftRedisCache)
    return cache


def another_process_changes_something() -> str:
    """What another process's ``forget_all`` does, seen from here: a new generation in Redis, published; this
    process's memory is left as it was until its subscription hears it (at once, when it is subscribed)."""
    cache = caches["default"]
    token = "from-another-process"
    cache.set(key_cache.GENERATION_KEY, token, timeout=None)
    cache._cache.get_client(write=True).publish(key_cache._channel(), token)  # type: ignore[attr-defined]
    heard = key_cache._subscription
    if heard is not None and heard.live:
        wait_until(lambda: heard.current == token, timeout=10, message="the subscription to hear the change")
    return token


def subscribed() -> key_cache._Subscription:
    """This process's subscription to generation changes, once it is listening."""
    heard = key_cache._subscribed()
    assert heard is not None
    # Live once it is subscribed and holds the generation (read at subscribing, or by the next request after it).
    wait_until(lambda: key_cache.generation() and heard.live, timeout=10, message="the generation subscription")
    return heard


def test_a_kept_key_costs_no_query(
    tenant: dict[str, Any], shared_cache: FailSoftRedisCache, django_assert_num_queries: Callable[..., Any]
) -> None:
    with django_assert_num_queries(2):  # the key, then its last_used_at
        authenticate_token(tenant["token"])
    with django_assert_num_queries(0):
        api_key = authenticate_token(tenant["token"])
    assert api_key.pk == tenant["api_key"].pk
    assert api_key.organization == tenant["organization"]
    assert api_key.last_used_at is not None  # kept as it was after the touch


def test_a_wrong_secret_is_refused_even_for_a_kept_key(
    tenant: dict[str, Any], shared_cache: FailSoftRedisCache
) -> None:
    authenticate_token(tenant["token"])
    key_id, _, secret = tenant["token"].partition(":")
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate_token(f"{key_id}:{'0' * len(secret)}")
    assert refused.value.get_codes() == "invalid_api_key"


def test_each_request_gets_its_own_copy(tenant: dict[str, Any], shared_cache: FailSoftRedisCache) -> None:
    first = authenticate_token(tenant["token"])
    first.name = "changed by one request"
    first.organization.name = "changed too"
    second = authenticate_token(tenant["token"])
    assert second.name != "changed by one request"
    assert second.organization.name != "changed too"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda t: revoke_api_key(api_key=t["api_key"]), "api_key_revoked"),
        (
            lambda t: set_organization_suspended(organization=t["organization"], suspended=True),
            "organization_suspended",
        ),
        (lambda t: deactivate_user(user=t["user"]), "organization_suspended"),  # its only member: suspended with them
        (lambda t: update_api_key(api_key=t["api_key"], requests_per_minute=7), None),
    ],
    ids=["revoked", "suspended", "maker-deactivated", "rate-limit-changed"],
)
def test_a_change_through_the_services_is_seen_at_the_next_request(
    tenant: dict[str, Any], shared_cache: FailSoftRedisCache, change: Callable[[dict[str, Any]], Any], code: str | None
) -> None:
    assert authenticate_token(tenant["token"]).requests_per_minute is None
    change(tenant)
    if code is None:
        assert authenticate_token(tenant["token"]).requests_per_minute == 7
        return
    with pytest.raises((AuthenticationFailed, PermissionDenied)) as refused:
        authenticate_token(tenant["token"])
    assert refused.value.get_codes() == code  # type: ignore[attr-defined]


def test_a_maker_who_leaves_or_loses_the_role_is_seen_at_the_next_request(
    tenant: dict[str, Any], make_user: Callable[..., Any], shared_cache: FailSoftRedisCache
) -> None:
    from accounts.services import add_member

    owner = make_user()
    add_member(organization=tenant["organization"], user=owner, role="owner")
    membership = Membership.objects.get(user=tenant["user"], organization=tenant["organization"])
    assert authenticate_token(tenant["token"]).has_scope("admin")
    change_member_role(membership=membership, role="developer")
    assert not authenticate_token(tenant["token"]).has_scope("admin")  # cut to the maker's role
    remove_member(membership=Membership.objects.get(pk=membership.pk))
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate_token(tenant["token"])
    assert refused.value.get_codes() == "api_key_maker_removed"


def test_another_processs_change_is_seen_at_the_next_request(
    tenant: dict[str, Any], shared_cache: FailSoftRedisCache
) -> None:
    authenticate_token(tenant["token"])
    # Another process revokes the key: its row changes, and its forget_all replaces the generation in Redis.
    ApiKey.objects.filter(pk=tenant["api_key"].pk).update(revoked_at="2026-01-01T00:00:00Z")
    another_process_changes_something()
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate_token(tenant["token"])
    assert refused.value.get_codes() == "api_key_revoked"


def test_a_per_process_cache_keeps_nothing(
    tenant: dict[str, Any], settings: Any, django_assert_num_queries: Callable[..., Any]
) -> None:
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "keys"}}
    authenticate_token(tenant["token"])
    with django_assert_num_queries(1):  # local memory cannot carry another process's change: the database decides
        authenticate_token(tenant["token"])


def test_no_key_is_kept_while_redis_is_down_and_the_generation_changes_once_it_is_back(
    tenant: dict[str, Any],
    shared_cache: FailSoftRedisCache,
    monkeypatch: pytest.MonkeyPatch,
    django_assert_num_queries: Callable[..., Any],
) -> None:
    authenticate_token(tenant["token"])
    before = shared_cache.get(key_cache.GENERATION_KEY)
    monkeypatch.setattr(FailSoftRedisCache, "redis_unavailable", property(lambda self: True))
    with django_assert_num_queries(1):
        authenticate_token(tenant["token"])
    monkeypatch.undo()
    authenticate_token(tenant["token"])
    assert shared_cache.get(key_cache.GENERATION_KEY) not in (None, before)


def test_a_subscribed_process_reads_the_generation_from_memory(
    tenant: dict[str, Any],
    shared_cache: FailSoftRedisCache,
    monkeypatch: pytest.MonkeyPatch,
    django_assert_num_queries: Callable[..., Any],
) -> None:
    authenticate_token(tenant["token"])
    heard = subscribed()
    authenticate_token(tenant["token"])  # kept again under the generation the subscription holds

    def no_round_trip(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the generation was read from Redis")

    monkeypatch.setattr(FailSoftRedisCache, "get", no_round_trip)
    assert key_cache.generation() == heard.current
    with django_assert_num_queries(0):
        authenticate_token(tenant["token"])


def test_a_change_published_by_another_process_stops_the_kept_key_here(
    tenant: dict[str, Any], shared_cache: FailSoftRedisCache
) -> None:
    authenticate_token(tenant["token"])
    subscribed()
    authenticate_token(tenant["token"])
    ApiKey.objects.filter(pk=tenant["api_key"].pk).update(revoked_at="2026-01-01T00:00:00Z")
    token = another_process_changes_something()
    assert key_cache.generation() == token
    with pytest.raises(AuthenticationFailed) as refused:
        authenticate_token(tenant["token"])
    assert refused.value.get_codes() == "api_key_revoked"


def test_the_subscription_follows_the_cache_when_changes_cross_or_the_cache_is_emptied(
    shared_cache: FailSoftRedisCache,
) -> None:
    key_cache.generation()
    heard = subscribed()
    shared_cache.set(key_cache.GENERATION_KEY, "the-latest", timeout=None)
    shared_cache._cache.get_client(write=True).publish(key_cache._channel(), "an-earlier-one")  # type: ignore[attr-defined]
    wait_until(lambda: heard.current == "the-latest", timeout=10, message="the subscription to read the cache")
    shared_cache.clear()
    key_cache.forget_all()
    assert heard.current not in (None, "the-latest")
    assert key_cache.generation() == shared_cache.get(key_cache.GENERATION_KEY)
