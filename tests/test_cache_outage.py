"""Redis down: every cache operation on the request path still answers, the readiness probe
says so, and a submit is accepted. The cache is the real backend pointed at a closed port, or at a
server that hangs up on every connection (a Redis that is restarting), never a mock.
"""

from __future__ import annotations

import logging
import shutil
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from django.core.cache import caches
from kombu.exceptions import OperationalError

from accounts.authentication import authenticate_token
from accounts.limits import check_rate
from accounts.models import ApiKey
from billing import topups
from billing.pricing import ms_per_work_unit
from config import cache as config_cache
from config.cache import FailSoftRedisCache
from inference.models import Endpoint, Job, JobStatus
from tests.waiting import wait_until

CLOSED_PORT = "redis://127.0.0.1:1/0"


class HangingUp:
    """A TCP server that accepts and at once closes every connection, counting them."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            self.accepted += 1
            connection.close()

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def hanging_up() -> Iterator[HangingUp]:
    server = HangingUp()
    yield server
    server.close()


@pytest.fixture(autouse=True)
def _fresh_redis_health(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a process knows of a Redis is kept per location for the process' life: each test starts fresh.
    monkeypatch.setattr(config_cache, "_health", {})


def fail_soft_cache(location: str, **options: Any) -> FailSoftRedisCache:
    options.setdefault("socket_connect_timeout", 0.5)
    options.setdefault("socket_timeout", 0.5)
    params = {"KEY_PREFIX": f"outage-{uuid.uuid4().hex[:8]}", "OPTIONS": options}
    return FailSoftRedisCache(location, params)


@pytest.fixture
def redis_down(settings: Any) -> FailSoftRedisCache:
    """The platform's cache, as settings.py builds it for REDIS_URL, with nothing listening."""
    settings.CACHES = {
        "default": {
            "BACKEND": "config.cache.FailSoftRedisCache",
            "LOCATION": CLOSED_PORT,
            "KEY_PREFIX": f"outage-{uuid.uuid4().hex[:8]}",
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "BREAKER_SECONDS": 1.5},
        }
    }
    cache = caches["default"]
    assert isinstance(cache, FailSoftRedisCache)
    return cache


def cache_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "config.cache"]


# The backend on its own.


def test_every_operation_answers_from_process_memory_while_redis_is_down() -> None:
    cache = fail_soft_cache(CLOSED_PORT)
    assert cache.get("price", "from the database") == "from the database"
    # add: a per-process guard, neither always True (duplicates) nor always False (never first).
    assert cache.add("guard", 1, timeout=60) is True
    assert cache.add("guard", 1, timeout=60) is False
    assert cache.incr("guard") == 2
    assert cache.decr("guard") == 1
    cache.set("price", 1.5, 300)
    assert cache.get("price") == 1.5
    assert cache.get_many(["price", "nothing"]) == {"price": 1.5}
    assert cache.has_key("price")
    assert cache.touch("price", 60)
    assert cache.delete("price") is True
    assert cache.get("price") is None
    assert cache.set_many({"a": 1, "b": 2}) == []
    cache.delete_many(["a", "b"])
    assert cache.get_many(["a", "b"]) == {}
    assert cache.get_or_set("computed", 7) == 7
    with pytest.raises(ValueError, match="not found"):  # a miss is still a miss for incr
        cache.incr("missing")


def test_after_a_failure_redis_is_skipped_then_probed_by_one_call(hanging_up: HangingUp) -> None:
    cache = fail_soft_cache(hanging_up.url, BREAKER_SECONDS=0.3)
    for _ in range(50):
        assert cache.get("k", "default") == "default"
    assert hanging_up.accepted == 1  # one failed call; the 49 others never waited on Redis

    def probed() -> bool:
        cache.get("k")
        return hanging_up.accepted > 1

    wait_until(probed, timeout=10, interval=0.01, message="the breaker to let a call probe Redis")
    assert hanging_up.accepted == 2  # the breaker let exactly one call probe, and it failed again
    # The readiness probe asks Redis itself whatever the breaker says.
    with pytest.raises(redis.exceptions.ConnectionError):
        cache.check_reachable()
    assert hanging_up.accepted == 3


def test_an_outage_is_logged_once_not_per_call(hanging_up: HangingUp, caplog: pytest.LogCaptureFixture) -> None:
    cache = fail_soft_cache(hanging_up.url, BREAKER_SECONDS=0)
    with caplog.at_level(logging.INFO, logger="config.cache"):
        for _ in range(20):
            cache.set("k", 1)
    assert hanging_up.accepted == 20  # no breaker: every call tried Redis and failed
    assert len(cache_log(caplog)) == 1
    assert "cache unavailable" in cache_log(caplog)[0]


def test_a_redis_that_hangs_is_given_up_on_after_the_short_socket_timeout() -> None:
    """A Redis that accepts and never answers (stopped, swapping): the short socket timeout, not
    redis-py's 5 s, and then no more waiting until the breaker lets a probe through."""
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        cache = fail_soft_cache(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", socket_timeout=0.2)
        assert cache.get("k", "default") == "default"  # waited for the socket timeout, once
        assert cache.redis_unavailable
        for number in range(20):
            assert cache.add(f"k{number}", 1) is True  # answered at once from process memory
    finally:
        silent.close()


# Each caller on the request path, through the platform's own cache settings.


@pytest.mark.django_db
def test_an_authenticated_submit_is_accepted_while_redis_is_down(
    tenant: dict[str, Any],
    builtin_endpoint: Endpoint,
    priced_without_broker: None,
    redis_down: FailSoftRedisCache,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="config.cache"):
        # Key lookup and last-used touch, the rate limit, the price estimate (pricing.ms_per_work_unit).
        response = tenant["client"].post("/queue/platform/tiny-sd", data={"prompt": "x"}, format="json")
        assert response.status_code == 200, response.content
        job = Job.objects.get(pk=response.json()["request_id"])
        assert job.status in (JobStatus.QUEUED, JobStatus.DISPATCHED)
        # Idempotency lives in the database: a replay finds the same job with Redis down.
        first = tenant["client"].post(
            "/queue/platform/tiny-sd", data={"prompt": "y"}, format="json", HTTP_IDEMPOTENCY_KEY="outage-1"
        )
        again = tenant["client"].post(
            "/queue/platform/tiny-sd", data={"prompt": "y"}, format="json", HTTP_IDEMPOTENCY_KEY="outage-1"
        )
        assert (first.status_code, again.status_code) == (200, 200)
        assert again.json()["request_id"] == first.json()["request_id"]
        assert again["Idempotent-Replayed"] == "true"
        assert tenant["client"].get(f"/queue/platform/tiny-sd/requests/{job.pk}/status").status_code == 200
    assert redis_down.redis_unavailable
    assert len(cache_log(caplog)) == 1  # the outage is in the log, once


@pytest.mark.django_db
def test_readiness_reports_the_outage_that_requests_no_longer_see(redis_down: FailSoftRedisCache) -> None:
    from django.test import Client

    redis_down.set("k", 1)  # served from process memory
    response = Client().get("/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["cache"] == "error: ConnectionError"


def test_the_rate_limit_still_holds_per_process_while_redis_is_down(redis_down: FailSoftRedisCache) -> None:
    bucket = f"key:{uuid.uuid4()}"
    now = 600.0  # the start of a window: no earlier window weighs in
    assert [check_rate(bucket=bucket, limit=3, now=now) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert check_rate(bucket=bucket, limit=3, now=now) > 0  # counted in process memory, not waved through


@pytest.mark.django_db
def test_last_used_is_touched_once_a_period_while_redis_is_down(
    tenant: dict[str, Any], redis_down: FailSoftRedisCache
) -> None:
    ApiKey.objects.filter(pk=tenant["api_key"].pk).update(last_used_at=None)
    authenticate_token(tenant["token"])
    assert ApiKey.objects.get(pk=tenant["api_key"].pk).last_used_at is not None
    ApiKey.objects.filter(pk=tenant["api_key"].pk).update(last_used_at=None)
    authenticate_token(tenant["token"])  # within the period: no second write
    assert ApiKey.objects.get(pk=tenant["api_key"].pk).last_used_at is None


def test_auto_top_ups_are_queued_once_a_period_and_again_after_a_refusal(
    redis_down: FailSoftRedisCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import current_app

    sent: list[list[Any]] = []

    def refuse(name: str, args: list[Any] | None = None, **options: Any) -> None:
        raise ConnectionRefusedError("the broker is down too")

    def accept(name: str, args: list[Any] | None = None, **options: Any) -> None:
        sent.append(list(args or []))

    organization_id = str(uuid.uuid4())
    monkeypatch.setattr(current_app, "send_task", refuse)
    assert topups.enqueue_top_up(organization_id) is False
    monkeypatch.setattr(current_app, "send_task", accept)
    assert topups.enqueue_top_up(organization_id) is True  # the refusal freed the guard
    assert topups.enqueue_top_up(organization_id) is False  # and now it holds
    assert sent == [[organization_id]]


@pytest.mark.django_db
def test_the_price_estimate_reads_the_database_while_redis_is_down(
    builtin_endpoint: Endpoint, redis_down: FailSoftRedisCache, settings: Any
) -> None:
    while_down = ms_per_work_unit(builtin_endpoint)
    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "up"}}
    assert while_down == ms_per_work_unit(builtin_endpoint) > 0


# The broker half: a publish with the broker down gives up at once.


def test_a_publish_with_the_broker_down_tries_once_and_gives_up(hanging_up: HangingUp) -> None:
    """The platform's Celery settings (config/settings.py) against a broker that hangs up: one
    connection attempt, not kombu's default reconnect loop inside the request (~6 s)."""
    app = Celery("outage-probe", set_as_current=False)
    app.config_from_object("django.conf:settings", namespace="CELERY")
    app.conf.update(broker_url=hanging_up.url)
    with pytest.raises(OperationalError):
        app.send_task("inference.run", args=["x", 1], queue="cpu", retry=False)
    assert hanging_up.accepted == 1


# A real redis-server, killed and restarted.


@pytest.fixture
def redis_server() -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        processes.append(process)
        client = redis.Redis(port=port)
        wait_until(
            client.ping,
            timeout=10,
            interval=0.02,
            ignoring=(redis.exceptions.ConnectionError,),
            message=f"redis-server to answer on port {port}",
        )
        return process

    start.port = port  # type: ignore[attr-defined]
    yield start
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_the_cache_goes_back_to_redis_once_it_restarts(redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server()
    cache = fail_soft_cache(f"redis://127.0.0.1:{redis_server.port}/0", BREAKER_SECONDS=0.2)
    direct = redis.Redis(port=redis_server.port)
    with caplog.at_level(logging.INFO, logger="config.cache"):
        cache.set("before", 1)
        assert direct.get(cache.make_key("before")) == b"1"
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert cache.get("before", "miss") == "miss"
        cache.set("during", 2)  # process memory
        with pytest.raises(redis.exceptions.ConnectionError):
            cache.check_reachable()
        redis_server()
        direct.set(cache.make_key("after"), 3)
        wait_until(lambda: cache.get("after") == 3, timeout=10, interval=0.02, message="the cache to go back to Redis")
        cache.check_reachable()
        assert cache.get("during") is None  # what the outage kept locally is dropped, Redis is the truth
        cache.set("later", 4)
        assert direct.get(cache.make_key("later")) == b"4"
    unavailable, available = cache_log(caplog)  # one line each, however many calls failed
    assert unavailable.startswith("cache unavailable (ConnectionError")
    assert available.startswith("cache available again after")
