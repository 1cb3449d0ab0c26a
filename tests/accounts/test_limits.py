from __future__ import annotations

import random
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from accounts import limits
from accounts.limits import check_rate
from accounts.models import Organization
from config.cache import LEASE_SHARE, lease_size

pytestmark = pytest.mark.django_db


# The start of a minute far from the wall clock, so these windows never meet real traffic.
MINUTE = 60 * 20_000_000.0


def fresh_bucket() -> str:
    return f"test:{uuid.uuid4().hex}"


def client_for(token: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return client


def test_a_key_gets_its_requests_per_minute_then_429(tenant: dict[str, Any], make_key: Any) -> None:
    _, token = make_key(tenant["organization"], requests_per_minute=3)
    client = client_for(token)
    assert [client.get("/v1/me").status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/v1/me")
    assert refused.status_code == 429
    retry_after = refused["Retry-After"]
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    body = refused.json()
    assert set(body) == {"detail", "error_type"}
    assert body["error_type"] == "rate_limited"
    assert body["detail"]
    # The limit is the key's, whatever endpoint it calls.
    assert client.get("/v1/keys").status_code == 429


def test_another_key_of_the_same_organization_is_unaffected(tenant: dict[str, Any], make_key: Any) -> None:
    _, token = make_key(tenant["organization"], requests_per_minute=1)
    limited = client_for(token)
    assert limited.get("/v1/me").status_code == 200
    assert limited.get("/v1/me").status_code == 429
    for _ in range(5):
        assert tenant["client"].get("/v1/me").status_code == 200
    _, sibling_token = make_key(tenant["organization"], requests_per_minute=1)
    assert client_for(sibling_token).get("/v1/me").status_code == 200


def test_unauthenticated_requests_are_not_counted_against_a_key(tenant: dict[str, Any], make_key: Any) -> None:
    _, token = make_key(tenant["organization"], requests_per_minute=1)
    for _ in range(3):
        assert APIClient().get("/v1/me").status_code == 401
    assert client_for(token).get("/v1/me").status_code == 200


def test_a_client_that_waits_retry_after_gets_through(
    tenant: dict[str, Any], make_key: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [MINUTE + 10]
    monkeypatch.setattr(limits, "time", SimpleNamespace(time=lambda: clock[0]))
    _, token = make_key(tenant["organization"], requests_per_minute=3)
    client = client_for(token)
    assert [client.get("/v1/me").status_code for _ in range(3)] == [200, 200, 200]
    refused = client.get("/v1/me")
    assert refused.status_code == 429
    clock[0] += int(refused["Retry-After"])
    assert client.get("/v1/me").status_code == 200


# check_rate itself, on a clock the test controls.


def test_allows_the_limit_within_a_minute_then_refuses() -> None:
    bucket = fresh_bucket()
    assert [check_rate(bucket=bucket, limit=3, now=MINUTE + 5 + n) for n in range(3)] == [0.0, 0.0, 0.0]
    wait = check_rate(bucket=bucket, limit=3, now=MINUTE + 9)
    assert wait > 0


def test_buckets_are_independent() -> None:
    first, second = fresh_bucket(), fresh_bucket()
    assert check_rate(bucket=first, limit=1, now=MINUTE + 1) == 0.0
    assert check_rate(bucket=first, limit=1, now=MINUTE + 2) > 0
    assert check_rate(bucket=second, limit=1, now=MINUTE + 2) == 0.0


def test_previous_minute_counts_by_how_much_of_it_is_still_inside_the_window() -> None:
    bucket = fresh_bucket()
    assert all(check_rate(bucket=bucket, limit=10, now=MINUTE + 30) == 0.0 for _ in range(10))
    # 15 s into the next minute, three quarters of the previous one still count: 7.5 + 2 <= 10 < 7.5 + 3.
    assert [check_rate(bucket=bucket, limit=10, now=MINUTE + 75) for _ in range(2)] == [0.0, 0.0]
    assert check_rate(bucket=bucket, limit=10, now=MINUTE + 75) > 0
    # 45 s in, only a quarter does: 2.5 + 7 <= 10 < 2.5 + 8.
    assert [check_rate(bucket=bucket, limit=10, now=MINUTE + 105) for _ in range(5)] == [0.0] * 5
    assert check_rate(bucket=bucket, limit=10, now=MINUTE + 105) > 0


def test_a_minute_with_no_traffic_before_it_starts_fresh() -> None:
    bucket = fresh_bucket()
    assert check_rate(bucket=bucket, limit=2, now=MINUTE + 1) == 0.0
    assert check_rate(bucket=bucket, limit=2, now=MINUTE + 2) == 0.0
    assert check_rate(bucket=bucket, limit=2, now=MINUTE + 3) > 0
    # Two minutes later the old minute is out of the window altogether.
    assert [check_rate(bucket=bucket, limit=2, now=MINUTE + 121) for _ in range(2)] == [0.0, 0.0]


def test_refused_requests_are_not_counted() -> None:
    bucket = fresh_bucket()
    assert check_rate(bucket=bucket, limit=2, now=MINUTE) == 0.0
    assert check_rate(bucket=bucket, limit=2, now=MINUTE) == 0.0
    assert all(check_rate(bucket=bucket, limit=2, now=MINUTE + 1) > 0 for _ in range(20))
    # Half-way through the next minute the previous one weighs 2 * 0.5 = 1: one more fits.
    # Had the 20 refusals counted, it would weigh 11 and this would be refused.
    assert check_rate(bucket=bucket, limit=2, now=MINUTE + 90) == 0.0
    assert check_rate(bucket=bucket, limit=2, now=MINUTE + 90) > 0


@pytest.mark.skipif(not settings.REDIS_URL, reason="the counter's script runs on Redis")
def test_the_counter_on_redis_expires_with_its_window_and_keeps_counting_after_redis_forgets_the_script() -> None:
    redis_cache = caches["default"]
    client = redis_cache._cache.get_client(write=True)  # type: ignore[attr-defined]
    bucket = fresh_bucket()
    window = int(MINUTE // limits.WINDOW_SECONDS)
    current = redis_cache.make_and_validate_key(f"ratelimit:{bucket}:{window}")
    assert check_rate(bucket=bucket, limit=5, now=MINUTE + 1) == 0.0
    assert client.get(current) == b"1"  # a plain integer, as Django's incr and decr read it
    assert 0 < client.ttl(current) <= 2 * limits.WINDOW_SECONDS
    client.expire(current, 30)
    assert check_rate(bucket=bucket, limit=5, now=MINUTE + 2) == 0.0
    assert client.ttl(current) <= 30  # a live window keeps its expiry
    client.script_flush()  # as after a restart of Redis: the script is loaded again
    assert check_rate(bucket=bucket, limit=5, now=MINUTE + 3) == 0.0
    assert client.get(current) == b"3"
    # The next minute reads this one's count: 1 s in, it weighs 3 * 59/60, so two more fit and a third does not.
    assert [check_rate(bucket=bucket, limit=5, now=MINUTE + 61) for _ in range(2)] == [0.0, 0.0]
    assert check_rate(bucket=bucket, limit=5, now=MINUTE + 61) > 0


def test_waiting_as_told_lets_the_next_request_through_when_the_previous_minute_weighs() -> None:
    bucket = fresh_bucket()
    assert all(check_rate(bucket=bucket, limit=10, now=MINUTE + 30) == 0.0 for _ in range(10))
    now = MINUTE + 75
    assert [check_rate(bucket=bucket, limit=10, now=now) for _ in range(2)] == [0.0, 0.0]
    wait = check_rate(bucket=bucket, limit=10, now=now)
    assert wait == pytest.approx(3.0)
    # Not much earlier (and asking does not count) ...
    assert check_rate(bucket=bucket, limit=10, now=now + wait - 0.5) > 0
    # ... but at the time it said.
    assert check_rate(bucket=bucket, limit=10, now=now + wait + 1e-6) == 0.0


def test_waiting_as_told_lets_the_next_request_through_after_a_full_minute() -> None:
    bucket = fresh_bucket()
    now = MINUTE + 10
    assert [check_rate(bucket=bucket, limit=3, now=now) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = check_rate(bucket=bucket, limit=3, now=now)
    assert wait > 0
    assert check_rate(bucket=bucket, limit=3, now=now + wait - 0.5) > 0
    assert check_rate(bucket=bucket, limit=3, now=now + wait + 1e-6) == 0.0


def test_the_wait_ends_when_the_previous_minute_has_slid_far_enough_out() -> None:
    bucket = fresh_bucket()
    assert all(check_rate(bucket=bucket, limit=4, now=MINUTE + 50) == 0.0 for _ in range(4))
    now = MINUTE + 62  # previous 4 * 58/60 = 3.87; nothing more fits until it drops to 3
    wait = check_rate(bucket=bucket, limit=4, now=now)
    assert wait == pytest.approx(13.0)
    assert check_rate(bucket=bucket, limit=4, now=now + wait + 1e-6) == 0.0


# The organization's concurrency limit (enforced by the dispatcher; the core owns the number).


def test_organization_concurrency_defaults_to_two_and_is_shown_in_me(tenant: dict[str, Any]) -> None:
    assert tenant["organization"].concurrency_limit == 2
    assert tenant["client"].get("/v1/me").json()["organization"]["concurrency_limit"] == 2


def test_organization_concurrency_default_comes_from_settings(make_user: Any) -> None:
    from tests.conftest import personal_organization

    with override_settings(ORGANIZATION_DEFAULT_CONCURRENCY=5):
        organization = personal_organization(make_user())
    assert organization.concurrency_limit == 5


def test_a_raised_concurrency_limit_is_shown_in_me(tenant: dict[str, Any]) -> None:
    Organization.objects.filter(pk=tenant["organization"].pk).update(concurrency_limit=7)
    assert tenant["client"].get("/v1/me").json()["organization"]["concurrency_limit"] == 7


# Leases: a process counts a busy key's requests in Redis a lease at a time.


def leased_on_redis() -> bool:
    return hasattr(caches["default"], "lease_in_window")


def counter(bucket: str, now: float) -> int:
    return int(caches["default"].get(f"ratelimit:{bucket}:{int(now // limits.WINDOW_SECONDS)}", 0))


def counting_round_trips(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The leases asked of the cache, by size wanted."""
    asked: list[int] = []
    leasing = caches["default"].lease_in_window  # type: ignore[attr-defined]

    def counted(*args: Any, **kwargs: Any) -> tuple[int, int, int]:
        asked.append(kwargs["want"])
        return leasing(*args, **kwargs)  # type: ignore[no-any-return]

    monkeypatch.setattr(caches["default"], "lease_in_window", counted)
    return asked


@pytest.mark.skipif(not leased_on_redis(), reason="leases are taken on the platform's Redis cache")
def test_a_busy_key_takes_its_requests_in_leases_of_up_to_sixteen(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = counting_round_trips(monkeypatch)
    bucket = fresh_bucket()
    now = MINUTE + 5
    assert all(check_rate(bucket=bucket, limit=10_000, now=now + n / 1000) == 0.0 for n in range(200))
    # 1, 2, 4, 8 and then 16 at a time: 16 round trips for 200 requests, not 200.
    assert asked == [1, 2, 4, 8] + [16] * 12
    assert counter(bucket, now) == 1 + 2 + 4 + 8 + 16 * 12  # what was leased: 200 served, 7 in hand
    assert limits._limiter.unspent(bucket, int(now // limits.WINDOW_SECONDS)) == counter(bucket, now) - 200


@pytest.mark.skipif(not leased_on_redis(), reason="leases are taken on the platform's Redis cache")
def test_a_key_sending_now_and_then_is_counted_one_request_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = counting_round_trips(monkeypatch)
    bucket = fresh_bucket()
    for n in range(5):
        assert check_rate(bucket=bucket, limit=10_000, now=MINUTE + 1 + n * 2 * limits.LEASE_SECONDS) == 0.0
    assert asked == [1] * 5
    assert counter(bucket, MINUTE) == 5


@pytest.mark.skipif(not leased_on_redis(), reason="leases are taken on the platform's Redis cache")
def test_near_the_limit_leases_shrink_to_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    leases: list[tuple[int, int, int]] = []  # (room before, wanted, granted)
    leasing = caches["default"].lease_in_window  # type: ignore[attr-defined]

    def recorded(*args: Any, **kwargs: Any) -> tuple[int, int, int]:
        count, previous, granted = leasing(*args, **kwargs)
        leases.append((kwargs["limit"] - count, kwargs["want"], granted))
        return count, previous, granted

    monkeypatch.setattr(caches["default"], "lease_in_window", recorded)
    bucket = fresh_bucket()
    now = MINUTE + 1
    served = 0
    while check_rate(bucket=bucket, limit=2000, now=now) == 0.0:
        served += 1
    # Exactly the limit, whatever the leases were ...
    assert served == 2000
    assert counter(bucket, now) == 2000
    # ... each at most a 64th of the room left (the script's rule is the Python one), 16 while the room was large and
    # one at a time below 128 left.
    assert all(granted == lease_size(room=room, want=wanted) for room, wanted, granted in leases)
    assert all(granted <= max(1, room // LEASE_SHARE) for room, _, granted in leases)
    assert max(granted for _, _, granted in leases) == limits.MOST_LEASED
    assert all(granted == 1 for room, _, granted in leases if 0 < room < 2 * LEASE_SHARE)
    assert (leases[-1][0], leases[-1][2]) == (0, 0)  # the limit reached: nothing granted


@pytest.mark.skipif(not leased_on_redis(), reason="leases are taken on the platform's Redis cache")
@pytest.mark.parametrize(("processes", "limit", "seconds"), [(16, 60, 5), (16, 600, 5), (32, 600, 55), (8, 6000, 20)])
def test_a_client_sending_exactly_its_limit_to_many_processes_is_refused_none(
    processes: int, limit: int, seconds: int
) -> None:
    """Leases held unspent in the processes a request did not go to never make another process refuse it."""
    chosen = random.Random(f"{processes}-{limit}")
    bucket = fresh_bucket()
    limiters = [limits.Limiter() for _ in range(processes)]
    waits = [
        limiters[chosen.randrange(processes)].check(bucket=bucket, limit=limit, now=MINUTE + 1 + seconds * n / limit)
        for n in range(limit)
    ]
    assert [wait for wait in waits if wait] == []
    assert limiters[0].check(bucket=bucket, limit=limit, now=MINUTE + 1 + seconds) > 0 or any(
        limiter.unspent(bucket, int(MINUTE // limits.WINDOW_SECONDS)) for limiter in limiters
    )


@pytest.mark.skipif(not leased_on_redis(), reason="leases are taken on the platform's Redis cache")
def test_a_new_limit_applies_from_the_next_lease() -> None:
    bucket = fresh_bucket()
    now = MINUTE + 1
    assert all(check_rate(bucket=bucket, limit=1000, now=now) == 0.0 for _ in range(31))  # leases 1, 2, 4, 8, 16
    assert check_rate(bucket=bucket, limit=20, now=now) > 0  # 31 counted: the lease of the old limit is not used


# Several processes (one Limiter each) on one counter, on a clock the test moves: every request served fits the
# sliding window counted exactly, whatever the leases; every request leased is served or still in a process's hand;
# and a refusal comes only when what was served, with what the processes hold unspent, fills the window.
PROCESSES = 3


@given(
    limit=st.integers(min_value=1, max_value=24),
    steps=st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=PROCESSES - 1),
            # Bursts (leases grow), a second or so apart (they start over), and minutes (the window slides).
            st.one_of(st.just(0.0), st.floats(0, 0.1), st.floats(0, 0.1), st.floats(0, 3), st.floats(0, 70)),
        ),
        min_size=1,
        max_size=300,
    ),
)
@example(limit=5, steps=[(0, 0.0)] * 12)  # one process's burst at a small limit: leases outgrow the room
@example(limit=9, steps=[(n % PROCESSES, 0.01) for n in range(30)] + [(0, 61.0)] + [(1, 0.0)] * 10)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_leases_never_let_a_key_past_its_limit(limit: int, steps: list[tuple[int, float]]) -> None:
    bucket = fresh_bucket()
    processes = [limits.Limiter() for _ in range(PROCESSES)]
    served: dict[int, int] = {}
    now = MINUTE + 0.5
    for process, gap in steps:
        now += gap
        window = int(now // limits.WINDOW_SECONDS)
        weight = (limits.WINDOW_SECONDS - (now - window * limits.WINDOW_SECONDS)) / limits.WINDOW_SECONDS
        wait = processes[process].check(bucket=bucket, limit=limit, now=now)
        in_hand = sum(limiter.unspent(bucket, window) for limiter in processes)
        if wait == 0.0:
            served[window] = served.get(window, 0) + 1
            assert served[window] + served.get(window - 1, 0) * weight <= limit + 1e-9
        else:
            assert wait > 0
            unspent_before = counter(bucket, now - limits.WINDOW_SECONDS) - served.get(window - 1, 0)
            assert served.get(window, 0) + in_hand + (served.get(window - 1, 0) + unspent_before) * weight + 1 > limit
        assert counter(bucket, now) == served.get(window, 0) + in_hand


def test_a_process_keeps_a_bounded_number_of_leases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits, "LEASES_KEPT", 10)
    limiter = limits.Limiter()
    # Past the bound, a past window's leases go first ...
    earlier, later = [fresh_bucket() for _ in range(9)], [fresh_bucket() for _ in range(2)]
    for bucket in earlier:
        assert limiter.check(bucket=bucket, limit=1000, now=MINUTE + 1) == 0.0
    for bucket in later:
        assert limiter.check(bucket=bucket, limit=1000, now=MINUTE + 61) == 0.0
    assert set(limiter._leases) == set(later)
    # ... and when this window's alone would still be many, all but the newest go at once (what they held unspent
    # counts as used), so the next prune is half the bound away, not one lease.
    crowd = [fresh_bucket() for _ in range(9)]
    for bucket in crowd:
        assert limiter.check(bucket=bucket, limit=1000, now=MINUTE + 62) == 0.0
    assert set(limiter._leases) == {crowd[-1]}
