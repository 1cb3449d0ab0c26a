"""Row locks in one order, and transactions that survive losing a lock race.

**The lock order.** A transaction that locks more than one kind of row takes them in this order, and never
goes back to an earlier kind once it holds a later one:

1. the Stripe event being applied (``billing.locks.locked_stripe_event``),
2. the organization (``lock_organization``: dispatch, limits, the making of an API key, and a change of a member's
   spend limit before it locks the member's keys, step 5; share-locked, ``FOR KEY SHARE``, by the admission of a
   request tagged with an end user before it reads the tag's limit, and locked ``FOR UPDATE`` by a new end user
   limit: ``billing.end_users``),
3. jobs, in ``created_at, id`` order when several (``inference.locks.lock_job``),
4. the job's attempt (``inference.locks.lock_attempt``, or ``close_attempt``: one UPDATE that locks and closes it;
   ``lock_and_close_attempt`` takes steps 3 and 4 in one statement, the job's lock a subquery the UPDATE waits for),
5. the job's API key, shared (``billing.locks.share_key``: admission, before it reads the key's spending limit and
   its maker's), or the keys whose limits change (``billing.locks.lock_key``, ``billing.locks.lock_member_keys``),
6. the job's hold (written by admission, released by settlement, locked by a reservation:
   ``billing.locks.locked_open_hold``), the job's own row that no other job's transaction waits for,
7. the organization's billing account (``billing.locks.locked_account``, or the conditional UPDATE that admission
   and settlement take it with, the last statement they send on it; a change of the alert settings locks their row
   first, ``billing.controls.set_alert_settings``),
8. then the organization's usage rollups and its end users' day rows (settlement's upserts, in that order), or
   payments (``billing.locks.locked_payment``).
9. an issuer's series of document numbers (``billing.documents.allocate_number``: a receipt or statement is
   numbered last in the transaction that creates it).

Inference's rows come before billing's because billing's hooks run inside inference's transactions, after the
job is locked (inference knows nothing of money, so it cannot lock an account first: docs/architecture.md). Within
billing the account comes after the job's own rows because it is the one row every admission and settlement of an
organization writes: a transaction holds it from the statement that takes it to COMMIT, so it takes it last.

Every lock names what it locks (``of=("self",)``: no join drags another table's rows in) and is ``FOR NO KEY UPDATE``:
none of these transactions changes a primary key, and a plain ``FOR UPDATE`` would also wait on (and make wait) every
insert of a row that points at the locked one, such as a job's log line or an organization's usage record, whose foreign
key check takes ``FOR KEY SHARE``. Two locks on an API key are the exception, on purpose: admission share-locks the key
(``FOR KEY SHARE``) before reading its spending limit and that of the member who made it, and a new limit on the key
(``billing.locks.lock_key``, which locks nothing else) takes it with a plain ``FOR UPDATE`` so that it waits for exactly
those admissions; a new limit on a member takes every key the member made so (``billing.locks.lock_member_keys``), after
the organization's ``FOR NO KEY UPDATE``, which the making of a key also takes, so that no key of the member is made
unseen meanwhile. Neither waits for anything a settlement holds: a settlement's deferred foreign key checks at COMMIT
share-lock the key and the organization, which conflicts with the key's lock only, so the limit waits for the settlement
and never the other way round. A new end user's limit takes the organization's row with a plain ``FOR UPDATE`` for the
same reason as a key's limit takes the key, having no row of its own to share
(``billing.locks.lock_organization_exclusively``).

**Retries.** A top-level action runs in ``retrying_atomic``: when PostgreSQL kills its transaction to break a
deadlock or a serialization conflict (or SQLite finds its database locked), the whole transaction is run again,
so the finished work it carried (a job's output and usage) is never dropped. Nested in a caller's transaction
it is a plain savepoint: only the outermost transaction can be retried, and the caller's own retry covers it.

**The COMMIT along with the last statement.** At the top of an action (no caller's transaction around it) on
PostgreSQL, the statement that takes a transaction's most contended lock last (settlement's debit of the account,
7 above) may carry the COMMIT in its own query (``accounts.statements.commits_along``): that lock is then held to
the end of the statement and the COMMIT, for no round trip of the client's. Such a statement fails where its
condition is unmet rather than commit a transaction that had more to decide, and ``retrying_atomic`` runs the
transaction again the way it went before, deciding under the locks it takes.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from django.db import DatabaseError, OperationalError, connection, transaction
from django.db.models import Model, QuerySet

from accounts import statements
from accounts.models import Organization

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")
M = TypeVar("M", bound=Model)

# SQLSTATE of the errors that mean "run the transaction again": deadlock_detected, serialization_failure.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
MAX_ATTEMPTS = 8


def locked(queryset: QuerySet[M]) -> QuerySet[M]:
    """The rows of ``queryset`` locked for this transaction: its own table only, in primary-key order."""
    return queryset.select_for_update(of=("self",), no_key=True).order_by("pk")


def lock_organization(organization_id: Any) -> Organization | None:
    return locked(Organization.objects.filter(pk=organization_id)).first()


def is_retryable(error: BaseException) -> bool:
    """A lost lock race (PostgreSQL's deadlock or serialization failure, SQLite's busy database)."""
    if not isinstance(error, OperationalError):
        return False
    cause = error.__cause__
    sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    return connection.vendor == "sqlite" and "database is locked" in str(error)


def retrying_atomic(function: Callable[P, R]) -> Callable[P, R]:
    """Runs ``function`` in a transaction, again (a few times, with jittered backoff) if it loses a lock race."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if connection.in_atomic_block:
            with transaction.atomic():
                return function(*args, **kwargs)

        def in_a_transaction() -> R:
            committed: list[Callable[[], Any]] = []
            try:
                with transaction.atomic(), statements.at_the_top():
                    statements.forget_along(connection)
                    try:
                        return function(*args, **kwargs)
                    except BaseException:
                        if statements.along(connection) == statements.COMMITTED:
                            # Raised after a statement committed the transaction (a time limit, a signal): Django's
                            # rollback would find nothing to undo and drop what waits for the commit. Each entry:
                            # its savepoints, the callback, whether it is robust.
                            committed = [entry[1] for entry in connection.run_on_commit]
                        raise
            finally:
                _run_committed(function.__qualname__, committed)

        try:
            return _again_after_a_lost_race(function.__qualname__, in_a_transaction)
        except DatabaseError as error:
            if not (statements.was_unmet(error) and statements.along(connection) == statements.SENT):
                raise
        # The statement that was to carry the COMMIT found its condition unmet (``statements.commits_along``): the
        # transaction was rolled back whole, and runs again deciding under its locks.
        with statements.no_commit_along():
            return _again_after_a_lost_race(function.__qualname__, in_a_transaction)

    return run


def _run_committed(name: str, callbacks: list[Callable[[], Any]]) -> None:
    """The ``on_commit`` callbacks of a transaction that committed before its function raised: run, each on its own."""
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("%s: a callback of its committed transaction failed", name)


def retrying(function: Callable[P, R]) -> Callable[P, R]:
    """Runs ``function`` again (as ``retrying_atomic`` does) if it loses a lock race, in no transaction of Django's:
    for a function that sends one query of several statements with no transaction open, which PostgreSQL runs as a
    transaction of its own, committed when the query ends and rolled back whole when a statement of it fails (one
    round trip instead of BEGIN, the query and COMMIT)."""

    @functools.wraps(function)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return _again_after_a_lost_race(function.__qualname__, lambda: function(*args, **kwargs))

    return run


def _again_after_a_lost_race(name: str, call: Callable[[], R]) -> R:
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return call()
        except OperationalError as error:
            if attempt == MAX_ATTEMPTS or not is_retryable(error):
                raise
            logger.warning("%s lost a lock race (%s); running it again (%d)", name, error, attempt)
            time.sleep(random.uniform(0, 0.01 * 2**attempt))  # noqa: S311 - jitter, not a secret
    raise AssertionError("unreachable")
