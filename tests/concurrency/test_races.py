"""Races of the job lifecycle and the credit ledger on real PostgreSQL (docs/lifecycle.md, docs/money.md).

Each test runs its race ``RACE_REPETITIONS`` times (5 unless set; ``python -m tests.concurrency.run`` runs 100) with
actors in separate processes released together, and fails with the tally of every round that broke the contract
(``tests/concurrency/races.py`` states it). SQLite serializes every writer, so these races cannot happen there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.concurrency.races import (
    AHEAD_CASES,
    CANCEL_RIVALS,
    RACE_MARKS,
    admission_round,
    ahead_round,
    alert_round,
    cancel_round,
    end_user_admission_round,
    lifecycle_actors,
    lifecycle_round,
    member_admission_round,
    refund_round,
)
from tests.inference.local_http import local_server

pytestmark = RACE_MARKS


@pytest.mark.parametrize("rival", CANCEL_RIVALS)
def test_an_answered_cancel_is_never_lost_to_a_concurrent_finish_retry_or_reap(
    rival: str, race: Callable[..., None]
) -> None:
    # Every other round the cancels start inside the rival's open transaction; the rest are free-for-all.
    race(f"cancel vs {rival}", cancel_round, rival=rival, every_other="inside_rival")


def test_submit_dispatch_finish_and_cancel_on_one_organization_never_deadlock_lose_work_or_exceed_the_limit(
    race: Callable[..., None],
) -> None:
    actors = lifecycle_actors()
    race(f"submit/dispatch/finish/cancel x{actors}", lifecycle_round, actors=actors)


def test_a_refund_racing_settlements_and_a_grant_is_made_once_and_the_books_agree(race: Callable[..., None]) -> None:
    race("refund vs settle and grant", refund_round)


def test_admissions_at_the_edge_of_the_credit_and_of_a_new_key_limit_never_hold_more_than_they_may(
    race: Callable[..., None],
) -> None:
    # Every other round the submissions start once the new limit has locked the key; the rest are free-for-all.
    race("admissions vs credit and a key limit", admission_round, every_other="limit_first")


def test_admissions_at_the_edge_of_an_end_users_new_limit_never_hold_more_than_it_allows(
    race: Callable[..., None],
) -> None:
    race("tagged admissions vs an end user's new limit", end_user_admission_round, every_other="limit_first")


def test_admissions_under_several_keys_of_a_member_and_a_new_key_never_pass_the_member_s_new_limit(
    race: Callable[..., None],
) -> None:
    # Every other round the submissions and the new key start once the new limit has locked the member's keys.
    race(
        "admissions under a member's keys vs the member's new limit", member_admission_round, every_other="limit_first"
    )


def test_settlements_crossing_alert_thresholds_together_tell_each_one_once(
    race: Callable[..., None], settings: Any
) -> None:
    settings.OUTBOUND_ALLOW_PRIVATE = True  # the receiver is on 127.0.0.1
    with local_server() as receiver:
        race("settlements crossing spend alert thresholds", alert_round, receiver=receiver)


@pytest.mark.parametrize("case", AHEAD_CASES)
def test_a_message_sent_ahead_of_its_commit_runs_its_job_once_and_only_if_it_was_dispatched(
    case: str, race: Callable[..., None]
) -> None:
    race(f"message ahead, {case}", ahead_round, case=case)
