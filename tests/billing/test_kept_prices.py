"""Endpoints and price lines kept in process memory (accounts/memo.py): no query per submission, and never an answer
the database would not give.

The property pins the price period: for any rate card (class, endpoint and negotiated lines, past and scheduled)
and any sequence of questions and changes, ``price_for`` answers what the query answers. The Redis tests show a
change reaching the next call at once, and a scheduled line taking over when its moment comes with no change made.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.core.cache import caches
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts import key_cache
from accounts.models import Organization
from billing import pricing
from billing.models import Price
from inference.api import EndpointNotFound, find_endpoint
from inference.models import Endpoint

pytestmark = pytest.mark.django_db

REDIS_URL = os.environ.get("REDIS_URL")


def queried(endpoint: Endpoint, at: datetime, organization_id: Any) -> pricing.Quote:
    """What the database answers, nothing kept."""
    lines = pricing._lines(at, endpoint=endpoint, gpu_class=endpoint.gpu_class, organization_id=organization_id)
    return pricing._quote(lines.first())


@pytest.fixture
def generations(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """A generation this process keeps by itself: every ``forget_all`` (the models' receivers) moves it on."""
    counter = [0]
    monkeypatch.setattr(key_cache, "generation", lambda: f"g{counter[0]}")
    monkeypatch.setattr(key_cache, "forget_all", lambda: counter.__setitem__(0, counter[0] + 1))
    pricing._periods.clear()
    yield counter
    pricing._periods.clear()


START = timezone.now().replace(microsecond=0) - timedelta(days=30)
HOURS = st.integers(0, 24 * 60)
LINE = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["class", "endpoint", "negotiated", "other class"]),
        "hour": HOURS,
        "price": st.integers(0, 10_000),
    }
)
STEP = st.one_of(
    st.tuples(st.just("add"), LINE),
    st.tuples(st.just("ask"), st.tuples(HOURS, st.booleans())),
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=1, max_size=25))
def test_a_kept_price_is_the_price_the_database_gives(
    steps: list[tuple[str, Any]], generations: list[int], builtin_endpoint: Endpoint, tenant: dict[str, Any]
) -> None:
    organization: Organization = tenant["organization"]
    Price.objects.all().delete()
    pricing._periods.clear()
    for action, argument in steps:
        if action == "add":
            scope: dict[str, Any] = {
                "class": {"gpu_class": builtin_endpoint.gpu_class},
                "other class": {"gpu_class": "gpu-h100" if builtin_endpoint.gpu_class != "gpu-h100" else "cpu"},
                "endpoint": {"endpoint": builtin_endpoint},
                "negotiated": {"endpoint": builtin_endpoint, "organization": organization},
            }[argument["kind"]]
            Price.objects.create(
                **scope,
                unit_price_micros=argument["price"],
                effective_from=START + timedelta(hours=argument["hour"]),
            )
        else:
            hour, negotiated = argument
            at = START + timedelta(hours=hour, minutes=30)
            organization_id = organization.pk if negotiated else None
            kept = pricing.price_for(builtin_endpoint, at, organization_id)
            assert kept == queried(builtin_endpoint, at, organization_id), (hour, negotiated)


def test_a_kept_period_asks_nothing_and_ends_where_the_next_line_begins(
    generations: list[int], builtin_endpoint: Endpoint, django_assert_num_queries: Any
) -> None:
    Price.objects.all().delete()
    now = timezone.now()
    today = Price.objects.create(gpu_class=builtin_endpoint.gpu_class, unit_price_micros=100, effective_from=now)
    tomorrow = Price.objects.create(
        gpu_class=builtin_endpoint.gpu_class, unit_price_micros=150, effective_from=now + timedelta(days=1)
    )
    pricing._periods.clear()
    with django_assert_num_queries(1):
        assert pricing.price_for(builtin_endpoint, now + timedelta(hours=1)).price == today
    with django_assert_num_queries(0):  # kept: the same period
        assert pricing.price_for(builtin_endpoint, now + timedelta(hours=23)).price == today
    with django_assert_num_queries(1):  # past the period's end, no change made: asked again
        assert pricing.price_for(builtin_endpoint, now + timedelta(days=1, hours=1)).price == tomorrow
    with django_assert_num_queries(1):  # before that period's start
        assert pricing.price_for(builtin_endpoint, now + timedelta(hours=2)).price == today


# On the real Redis: the generation every process hears.


@pytest.fixture
def shared_cache(settings: Any) -> None:
    if not REDIS_URL:
        pytest.skip("needs Redis (REDIS_URL): rows are kept only while the cache is shared between processes")
    settings.CACHES = {
        "default": {
            "BACKEND": "config.cache.FailSoftRedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": f"memo-{uuid.uuid4().hex[:8]}",
        }
    }
    settings.API_KEY_CACHE_SECONDS = 60
    assert caches["default"].set("probe", 1) is not False


def test_an_endpoint_is_read_once_and_a_change_is_seen_at_the_next_call(
    shared_cache: None, builtin_endpoint: Endpoint, django_assert_num_queries: Any
) -> None:
    path = (builtin_endpoint.owner, builtin_endpoint.name, builtin_endpoint.path)
    find_endpoint(*path)
    with django_assert_num_queries(0):
        assert find_endpoint(*path).pk == builtin_endpoint.pk
    Endpoint.objects.filter(pk=builtin_endpoint.pk).update(is_active=False)  # a bulk change, as the admin's action
    with pytest.raises(EndpointNotFound):
        find_endpoint(*path)
    Endpoint.objects.filter(pk=builtin_endpoint.pk).update(is_active=True)
    builtin_endpoint.refresh_from_db()
    builtin_endpoint.max_steps = 3
    builtin_endpoint.save()
    assert find_endpoint(*path).max_steps == 3


def test_a_new_price_line_is_charged_from_the_next_call(
    shared_cache: None, builtin_endpoint: Endpoint, django_assert_num_queries: Any
) -> None:
    now = timezone.now()
    before = pricing.price_for(builtin_endpoint, now)
    with django_assert_num_queries(0):
        assert pricing.price_for(builtin_endpoint, now) == before
    line = Price.objects.create(endpoint=builtin_endpoint, unit_price_micros=before.unit_price_micros + 7)
    assert pricing.price_for(builtin_endpoint, timezone.now()).price == line


def test_a_price_line_rolled_back_is_never_kept(shared_cache: None, builtin_endpoint: Endpoint) -> None:
    """A transaction that adds a line and prices a request with it, then rolls back: no process keeps that line."""
    now = timezone.now()
    before = pricing.price_for(builtin_endpoint, now)
    with transaction.atomic():
        line = Price.objects.create(endpoint=builtin_endpoint, unit_price_micros=before.unit_price_micros + 7)
        assert pricing.price_for(builtin_endpoint, timezone.now()).price == line
        transaction.set_rollback(True)  # the operator's save failed after the line was written
    assert not Price.objects.filter(pk=line.pk).exists()
    assert pricing.price_for(builtin_endpoint, timezone.now()) == before


def test_a_measured_gpu_time_is_kept_in_memory_and_an_unmeasured_one_for_a_second(
    generations: list[int], builtin_endpoint: Endpoint, tenant: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission's measured GPU ms per work unit: read from the cache or the rollups once, then from this process's
    memory; an endpoint with no usage yet gets its class's bound, read again once a second, and its first usage is
    measured at the first call after that."""
    from django.core.cache import cache

    from billing.models import Granularity, UsageRollup
    from billing.periods import day_start

    pricing.forget_measurement(builtin_endpoint.pk)
    reads: list[str] = []
    real_get = cache.get
    monkeypatch.setattr(cache, "get", lambda key, *args, **kwargs: reads.append(key) or real_get(key, *args, **kwargs))
    clock = [1_000.0]
    monkeypatch.setattr(pricing, "monotonic", lambda: clock[0])
    bound = pricing.ms_per_work_unit(builtin_endpoint)
    assert pricing.ms_per_work_unit(builtin_endpoint) == bound
    assert len(reads) == 1  # kept in memory for a second
    UsageRollup.objects.create(
        granularity=Granularity.DAY, bucket_start=day_start(timezone.now()), organization=tenant["organization"],
        endpoint=builtin_endpoint, gpu_class=builtin_endpoint.gpu_class, gpu_ms=12_345, work_units=1_000,
    )  # fmt: skip
    clock[0] += pricing.UNMEASURED_RECHECK_SECONDS * 0.9
    assert pricing.ms_per_work_unit(builtin_endpoint) == bound  # within its second
    assert len(reads) == 1
    clock[0] += pricing.UNMEASURED_RECHECK_SECONDS * 0.1
    assert pricing.ms_per_work_unit(builtin_endpoint) == 12.345  # the first usage, once the second is over
    reads.clear()
    assert pricing.ms_per_work_unit(builtin_endpoint) == 12.345
    assert reads == []  # kept in memory: no round trip to the cache
    UsageRollup.objects.update(gpu_ms=20_000)
    assert pricing.ms_per_work_unit(builtin_endpoint) == 12.345  # a minute's measurement stands
    pricing.forget_measurement(builtin_endpoint.pk)
    assert pricing.ms_per_work_unit(builtin_endpoint) == 20.0
    generations[0] += 1  # an endpoint or price changed: nothing kept is used
    cache.delete(f"billing:ms-per-work:{builtin_endpoint.pk}")
    UsageRollup.objects.update(gpu_ms=30_000)
    assert pricing.ms_per_work_unit(builtin_endpoint) == 30.0
