"""Test environment: real PostgreSQL and Redis when DATABASE_URL/REDIS_URL are set (CI), SQLite otherwise."""

from __future__ import annotations

import os
import tempfile
import uuid

# Before Django reads its settings (pytest-django sets Django up after this module is imported).
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("SECRET_KEY", "tests-only-" + uuid.uuid4().hex)
os.environ.setdefault("PLATFORM_DATA_DIR", tempfile.mkdtemp(prefix="platform-tests-"))
os.makedirs(os.path.join(os.environ["PLATFORM_DATA_DIR"], "static"), exist_ok=True)
os.environ.setdefault("STATIC_MANIFEST", "0")  # no collectstatic before the suite
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
# Keys of this run never meet another run's in a shared Redis.
os.environ.setdefault("CACHE_KEY_PREFIX", "test-" + uuid.uuid4().hex[:8])

from collections.abc import Callable, Iterator  # noqa: E402
from datetime import datetime, timedelta  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import django  # noqa: E402
import pytest  # noqa: E402

django.setup()  # so test modules can import models at the top; pytest-django takes it from here

from hypothesis import settings as hypothesis_settings  # noqa: E402

# No example is timed: Hypothesis's default deadline (200 ms an example) fails a test whose example the machine
# paused for a moment (CI runs the suite on two loaded cores), a failure of the machine and not of the code; every
# test that touches the database says ``deadline=None`` itself, and so now do those that leave it to the default.
hypothesis_settings.register_profile("platform", deadline=None)
hypothesis_settings.load_profile("platform")

from accounts import key_cache, memo  # noqa: E402

if TYPE_CHECKING:
    from accounts.models import ApiKey, Organization, User
    from tests.e2e.conftest import Stack

TEST_PASSWORD = "correct horse battery"


def _flush_again_after_a_lost_race() -> None:
    """A transactional test's teardown empties every table with one TRUNCATE, which takes each table's exclusive
    lock in turn; the platform's own processes (the session's ``stack``: its worker still taking a leftover message,
    its housekeeping's sweep) may hold one of them and wait for another, and PostgreSQL ends the deadlock by failing
    the TRUNCATE. Its transaction rolled back, it is run again (the processes' statement is short) instead of failing
    the test that had passed."""
    from django.db import OperationalError
    from django.db.backends.base.operations import BaseDatabaseOperations

    flush = BaseDatabaseOperations.execute_sql_flush

    def execute_sql_flush(self: BaseDatabaseOperations, sql_list: list[str]) -> None:
        for attempt in range(5):
            try:
                flush(self, sql_list)
                return
            except OperationalError as error:
                if getattr(error.__cause__, "sqlstate", None) != "40P01" or attempt == 4:  # deadlock_detected
                    raise

    BaseDatabaseOperations.execute_sql_flush = execute_sql_flush  # type: ignore[method-assign,assignment]


_flush_again_after_a_lost_race()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests that run the platform's own processes (the session's ``stack``) go last, after pytest-django's
    ordering: once started, its housekeeping sweeps the shared test database and re-sends any job left DISPATCHED,
    and its worker claims it, so a test that ran after them could find its jobs taken from under it."""
    items.sort(key=lambda item: "stack" in getattr(item, "fixturenames", ()))


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Each test starts with an empty shared cache: a measurement, counter or lock one test leaves (a price
    estimate cached for a minute, a login throttle) must not decide another's outcome. In Redis only this run's
    keys go (its CACHE_KEY_PREFIX is its own), never anything else the server holds."""
    from django.core.cache import caches
    from django.core.cache.backends.locmem import LocMemCache

    from accounts import limits
    from inference import batch_pace, stream_limits

    memo.clear_all()  # rows kept in process memory under a generation that outlives the test's tables
    batch_pace.forget_all()  # a worker's pace of requests per endpoint, by endpoint ids the next test reuses
    stream_limits.forget_local_slots()  # streams' slots kept in memory without Redis, by user ids the next test reuses
    limits.forget_leases()  # requests leased from counters this fixture clears
    cache = caches["default"]  # the backend itself (``django.core.cache.cache`` is a proxy to it)
    if isinstance(cache, LocMemCache):
        cache.clear()
        return
    prefix = cache.make_key("")
    local = getattr(cache, "_local", None)
    if local is not None:
        local.clear()  # what the fail-soft backend answered from memory during an outage
    try:
        client = cache._cache.get_client(write=True)  # type: ignore[attr-defined]
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    except Exception:  # noqa: S110 - a Redis that is down (an outage test) has nothing to clear
        pass


@pytest.fixture(autouse=True, scope="session")
def _key_subscription_stopped() -> Iterator[None]:
    """The API key cache's subscription thread ends with the session, before pytest closes the log streams."""
    yield
    key_cache.stop_listening()


@pytest.fixture(autouse=True)
def _no_subscription_left_to_a_cache_gone() -> Iterator[None]:
    """A test that gave the platform a Redis cache of its own (an outage test) leaves no subscription thread behind
    reconnecting to it every few seconds for the rest of the session (the next use of a cache subscribes to it)."""
    from django.core.cache import caches

    yield
    subscription = key_cache._subscription
    if subscription is not None and subscription.cache is not caches["default"]:
        key_cache.stop_listening()


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: Any) -> None:
    # PBKDF2 at production strength dominates a suite that makes hundreds of users.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def clock_held_in_the_hour(monkeypatch: pytest.MonkeyPatch) -> datetime:
    """Django's clock as usual, except that it stops at the last microsecond of the UTC hour this fixture started in
    rather than leave it: what the services stamp with ``timezone.now()`` (a usage record's time, and so its hour and
    day rollups; holds; the month ``spent_this_month`` counts; an alert's period; a statement's month) stays in that
    hour, day and month when the test crosses the hour, midnight or a month's end. Returns the instant it started.

    Fields declared ``default=timezone.now`` keep the real clock (a row's ``created_at``, a price's
    ``effective_from``): ask for this after the fixtures that make such rows."""
    from django.utils import timezone

    real = timezone.now
    started = real()
    last = started.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1) - timedelta(microseconds=1)
    monkeypatch.setattr(timezone, "now", lambda: min(real(), last))
    return started


@pytest.fixture
def unhashed_static_files(settings: Any) -> None:
    """Pages link static files through the manifest collectstatic writes; the suite has none."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def priced_without_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs are dispatched with no broker (unit tests run the lifecycle themselves); the opening rate card holds."""
    from billing.models import Price
    from billing.rates import ensure_opening_prices
    from inference import dispatch

    monkeypatch.setattr(dispatch, "send_run_message", lambda *args: True)
    monkeypatch.setattr(dispatch, "send_ahead_message", lambda *args: True)
    ensure_opening_prices(Price)


@pytest.fixture
def sent_tasks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[Any]]]:
    """Messages handed to the broker (none really sent: unit tests call the task functions themselves)."""
    from celery import current_app

    sent: list[tuple[str, list[Any]]] = []

    def send_task(name: str, args: list[Any] | None = None, **options: Any) -> None:
        sent.append((name, list(args or [])))

    monkeypatch.setattr(current_app, "send_task", send_task)
    return sent


@pytest.fixture
def make_user(db: None) -> Callable[..., User]:
    from accounts.services import sign_up

    def make(email: str | None = None, password: str = TEST_PASSWORD, **kwargs: Any) -> User:
        return sign_up(email=email or f"user-{uuid.uuid4().hex[:10]}@example.com", password=password, **kwargs)

    return make


def personal_organization(user: User) -> Organization:
    from accounts.models import Organization

    return Organization.objects.get(memberships__user=user, is_personal=True)


@pytest.fixture
def make_key(db: None) -> Callable[..., tuple[ApiKey, str]]:
    from accounts.models import Scope
    from accounts.services import create_api_key

    def make(organization: Organization, scopes: list[str] | None = None, **kwargs: Any) -> tuple[ApiKey, str]:
        kwargs.setdefault("name", "test key")
        kwargs.setdefault("created_by", None)
        return create_api_key(organization=organization, scopes=scopes or [Scope.ADMIN], **kwargs)

    return make


@pytest.fixture
def tenant(make_user: Callable[..., User], make_key: Callable[..., tuple[ApiKey, str]]) -> dict[str, Any]:
    """A person, their organization and an admin-scoped key with a ready client."""
    return _new_tenant(make_user, make_key)


@pytest.fixture
def other_tenant(
    tenant: dict[str, Any], make_user: Callable[..., User], make_key: Callable[..., Any]
) -> dict[str, Any]:
    return _new_tenant(make_user, make_key)


def _new_tenant(make_user: Callable[..., User], make_key: Callable[..., tuple[ApiKey, str]]) -> dict[str, Any]:
    from rest_framework.test import APIClient

    user = make_user()
    organization = personal_organization(user)
    api_key, token = make_key(organization, created_by=user)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {token}")
    return {"user": user, "organization": organization, "api_key": api_key, "token": token, "client": client}


@pytest.fixture
def builtin_endpoint(db: None) -> Any:
    """The built-in tiny text-to-image endpoint (a transactional test before this one may have emptied
    the tables that migration inference/0002 filled)."""
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint

    ensure_builtin_endpoints(Endpoint)
    return Endpoint.objects.get(owner="platform", name="tiny-sd", path="")


@pytest.fixture(scope="session")
def stack(django_db_setup: None, django_db_blocker: Any) -> Iterator[Stack]:
    """The platform as it runs (tests/e2e/conftest.py): one server and its workers for the session,
    shared by the e2e and the browser tests. Imported here, when first used, so unit-test runs never
    make its certificates."""
    from tests.e2e.conftest import running_stack

    with running_stack(django_db_blocker) as running:
        yield running
