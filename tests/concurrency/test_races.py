"""Races of the job lifecycle and the credit ledger on real PostgreSQL (docs/lifecycle.md, docs/money.md).

Each test runs its race ``RACE_REPETITIONS`` times (5 unless set; ``python -m tests.concurrency.run`` runs 100) with
actors in separate processes released together, and fails with the tally of every round that broke the contract
(``tests/concurrency/races.py`` states it). SQLite serializes every writer, so these races cannot happen there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.conf import settings

from inference.models import Endpoint
from tests.concurrency.harness import ActorPool
from tests.concurrency.races import (
    AHEAD_CASES,
    CANCEL_RIVALS,
    admission_round,
    ahead_round,
    alert_round,
    cancel_round,
    end_user_admission_round,
    lifecycle_actors,
    lifecycle_round,
    refund_round,
    repetitions,
    run_race,
)
from tests.inference.local_http import local_server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.usefixtures("priced_without_broker"),
    pytest.mark.skipif(
        settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql",
        reason="races need PostgreSQL (DATABASE_URL): SQLite runs one writer at a time, so they cannot happen there",
    ),
]


@pytest.mark.parametrize("rival", CANCEL_RIVALS)
def test_an_answered_cancel_is_never_lost_to_a_concurrent_finish_retry_or_reap(
    rival: str, actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    tally = run_race(
        f"cancel vs {rival}",
        repetitions(),
        # Every other round the cancels start inside the rival's open transaction; the rest are free-for-all.
        lambda books, round_number: cancel_round(
            actor_pool,
            books,
            new_organization=new_organization,
            endpoint=builtin_endpoint,
            rival=rival,
            inside_rival=round_number % 2 == 0,
        ),
    )
    assert tally.findings == 0, tally.summary()


def test_submit_dispatch_finish_and_cancel_on_one_organization_never_deadlock_lose_work_or_exceed_the_limit(
    actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    actors = lifecycle_actors()
    tally = run_race(
        f"submit/dispatch/finish/cancel x{actors}",
        repetitions(),
        lambda books, _: lifecycle_round(
            actor_pool, books, new_organization=new_organization, endpoint=builtin_endpoint, actors=actors
        ),
    )
    assert tally.findings == 0, tally.summary()


def test_a_refund_racing_settlements_and_a_grant_is_made_once_and_the_books_agree(
    actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    tally = run_race(
        "refund vs settle and grant",
        repetitions(),
        lambda books, _: refund_round(actor_pool, books, new_organization=new_organization, endpoint=builtin_endpoint),
    )
    assert tally.findings == 0, tally.summary()


def test_admissions_at_the_edge_of_the_credit_and_of_a_new_key_limit_never_hold_more_than_they_may(
    actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    tally = run_race(
        "admissions vs credit and a key limit",
        repetitions(),
        # Every other round the submissions start once the new limit has locked the key; the rest are free-for-all.
        lambda books, round_number: admission_round(
            actor_pool,
            books,
            new_organization=new_organization,
            endpoint=builtin_endpoint,
            limit_first=round_number % 2 == 0,
        ),
    )
    assert tally.findings == 0, tally.summary()


def test_admissions_at_the_edge_of_an_end_users_new_limit_never_hold_more_than_it_allows(
    actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    tally = run_race(
        "tagged admissions vs an end user's new limit",
        repetitions(),
        lambda books, round_number: end_user_admission_round(
            actor_pool,
            books,
            new_organization=new_organization,
            endpoint=builtin_endpoint,
            limit_first=round_number % 2 == 0,
        ),
    )
    assert tally.findings == 0, tally.summary()


def test_settlements_crossing_alert_thresholds_together_tell_each_one_once(
    actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint, settings: Any
) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = True  # the receiver is on 127.0.0.1
    with local_server() as receiver:
        tally = run_race(
            "settlements crossing spend alert thresholds",
            repetitions(),
            lambda books, _: alert_round(
                actor_pool, books, new_organization=new_organization, endpoint=builtin_endpoint, receiver=receiver
            ),
        )
    assert tally.findings == 0, tally.summary()


@pytest.mark.parametrize("case", AHEAD_CASES)
def test_a_message_sent_ahead_of_its_commit_runs_its_job_once_and_only_if_it_was_dispatched(
    case: str, actor_pool: ActorPool, new_organization: Callable[[], Any], builtin_endpoint: Endpoint
) -> None:
    tally = run_race(
        f"message ahead, {case}",
        repetitions(),
        lambda books, _: ahead_round(
            actor_pool, books, new_organization=new_organization, endpoint=builtin_endpoint, case=case
        ),
    )
    assert tally.findings == 0, tally.summary()
