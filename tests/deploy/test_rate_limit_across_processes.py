"""A key's rate limit across web processes, as production runs them: two web pods behind a round-robin balancer,
one of them with two gunicorn workers, three processes sharing one Redis counter through leases
(accounts/limits.py).

Checked: a client sending half again its limit within the minute gets exactly its limit (no process lets it past, and
leases held unspent by the others never cost it a request), every refusal a 429 with its Retry-After; then, with
Redis stopped, every request is still answered (each process counts in its own memory, never a 5xx), and once Redis
is back (empty) the shared count goes on.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from django.db import connection

from config.embedded_redis import EmbeddedRedis
from tests.deploy.processes import RoundRobinProxy, base_env, database_url, free_port, platform
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

# Large enough that leases grow (up to 16 while more than 1,024 are left: here up to 4), small enough to send quickly.
LIMIT = 300
SENT = LIMIT * 3 // 2
# The burst must not straddle a minute's end, where the sliding window lets the previous minute's count weigh less.
LATEST_SECOND_TO_START = 30
ATTEMPTS = 3


def statuses(api: httpx.Client, key: str, count: int) -> Counter[int]:
    answers: Counter[int] = Counter()
    for _ in range(count):
        answer = api.get("/v1/me", headers={"Authorization": f"Key {key}"})
        answers[answer.status_code] += 1
        if answer.status_code == 429:
            assert int(answer.headers["Retry-After"]) >= 1
            assert answer.json()["error_type"] == "rate_limited"
    return answers


def test_a_keys_limit_holds_across_processes_and_through_a_redis_outage(tmp_path: Path) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the processes share PostgreSQL: run with DATABASE_URL=postgres://...")
    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up

    user = sign_up(email="limited@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)

    def new_key() -> str:
        _, key = create_api_key(
            organization=organization,
            name="limited",
            scopes=[Scope.INFERENCE],
            created_by=user,
            requests_per_minute=LIMIT,
        )
        return key

    with EmbeddedRedis(tmp_path / "redis") as redis:
        env = base_env(SECRET_KEY="rate-limits-" + "s" * 40, DATABASE_URL=database_url(), REDIS_URL=redis.url)
        with platform(tmp_path / "machines", env) as machines:
            webs = [
                machines.start_web("web1", free_port(), WEB_CONCURRENCY="2"),
                machines.start_web("web2", free_port()),
            ]
            backends = [("127.0.0.1", int(base.rsplit(":", 1)[1])) for base in webs]
            with (
                RoundRobinProxy(backends) as balancer,
                # A new connection per request, so the balancer spreads requests over the pods, and gunicorn's
                # workers take connections in turn.
                httpx.Client(
                    base_url=balancer.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
                ) as api,
            ):
                for _ in range(ATTEMPTS):
                    wait_until(
                        lambda: time.time() % 60 < LATEST_SECOND_TO_START,
                        timeout=61,
                        message="the start of a minute's first half",
                    )
                    key, window = new_key(), int(time.time() // 60)
                    answers = statuses(api, key, SENT)
                    if int(time.time() // 60) == window:
                        break
                    # The burst ran past the minute's end (a slow machine): again, with a key of its own.
                else:
                    pytest.fail(f"no burst of {SENT} requests fitted in {60 - LATEST_SECOND_TO_START} s: {answers}")
                assert answers == {200: LIMIT, 429: SENT - LIMIT}, machines.all_logs()

                # Redis stops: every process answers from its own count (the key is let through again, at most
                # LIMIT per process until Redis is back), never a 5xx.
                assert redis.process is not None
                redis.process.send_signal(signal.SIGKILL)
                redis.process.wait(10)
                during = statuses(api, key, 30)
                assert set(during) <= {200, 429}, during
                assert during[200] > 0, during  # not failed closed
                redis.start()  # same port, empty
                wait_until(
                    lambda: statuses(api, key, 1)[200] == 1,
                    timeout=60,
                    message="requests answered once Redis is back",
                )
                assert machines.all_running()
