"""One pool of actor processes per module, on the test database; organizations made as the suite makes them; a race
played with both."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from inference.models import Endpoint
from tests.concurrency.harness import ActorPool, database_url
from tests.concurrency.races import Books, RoundReport, lifecycle_actors, repetitions, run_race
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


@pytest.fixture
def race(actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint) -> Callable[..., None]:
    """Plays a race ``repetitions()`` times and fails with the tally of every round that broke the contract.

    ``race(name, round_, **options)`` calls ``round_(actor_pool, books, new_organization=..., endpoint=...,
    **options)`` each round: the module's actors, a new organization each round, the built-in endpoint.
    ``every_other`` names an option that is true in the even rounds only (the odd ones are free-for-all)."""

    def play(name: str, round_: Callable[..., RoundReport], *, every_other: str = "", **options: Any) -> None:
        def one_round(books: Books, round_number: int) -> RoundReport:
            this_round = {every_other: round_number % 2 == 0} if every_other else {}
            return round_(
                actor_pool, books, new_organization=new_organization, endpoint=builtin_endpoint, **options, **this_round
            )

        tally = run_race(name, repetitions(), one_round)
        assert tally.findings == 0, tally.summary()

    return play
