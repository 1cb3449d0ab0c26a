"""One pool of actor processes per module, on the test database; organizations made as the suite makes them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.concurrency.harness import ActorPool, database_url
from tests.concurrency.races import lifecycle_actors
from tests.conftest import personal_organization

ROUND_TIMEOUT_SECONDS = 120


@pytest.fixture(scope="module")
def _pools(django_db_setup: None, django_db_blocker: Any) -> Iterator[list[ActorPool]]:
    """The module's pool (started on first use); a test that broke it gets it replaced by ``actor_pool``."""
    pools: list[ActorPool] = []
    yield pools
    for pool in pools:
        pool.close()


@pytest.fixture
def actor_pool(_pools: list[ActorPool], django_db_blocker: Any) -> ActorPool:
    """Enough actor processes for the largest round (the one-organization race's ``RACE_ACTORS``)."""
    if _pools and _pools[-1].broken:
        _pools.pop().close()
    if not _pools:
        with django_db_blocker.unblock():
            url = database_url()
        pool = ActorPool(lifecycle_actors(), url, round_timeout=ROUND_TIMEOUT_SECONDS)
        _pools.append(pool)
        pool.start()
    return _pools[-1]


@pytest.fixture
def new_organization(make_user: Callable[..., Any], settings: Any) -> Callable[[], Any]:
    """A new person's personal organization (signed up through the services, with the sign-up credits)."""
    settings.STRIPE_SECRET_KEY = ""  # reconciliation has no Stripe to compare with

    def make() -> Any:
        return personal_organization(make_user(password=None))

    return make
