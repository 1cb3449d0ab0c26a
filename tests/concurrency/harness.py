"""Actors in separate OS processes, released together by a barrier, each reporting what it saw.

Each actor process is started with the "spawn" context, sets itself up as the platform's processes do
(``django.setup()`` with the same settings, connected to the test database through ``DATABASE_URL``) and then
serves rounds: the parent sends every process one call, each process prepares it (loads its rows), waits at the
barrier, makes the call and sends back an ``Outcome``: the call's answer, or the class of the exception it raised
and, for a database error, its SQLSTATE (40P01 deadlock_detected, 40001 serialization_failure...). Database errors
that a call caught and logged instead of raising (a robust on-commit hook, the reaper's per-row loop) come back too,
in ``swallowed``, and so does every statement PostgreSQL killed to break a deadlock or a serialization conflict
(``lock_races``), whether the call then raised it, dropped it or ran its transaction again.

The processes live as long as the pool (one ``django.setup()`` each, not one per round); the barrier is cyclic, so
every process takes part in every round, idle ones with the ``idle`` actor. Nothing here sleeps: the parent waits
on queues with deadlines, the actors on the barrier with a timeout.

Actor processes never reach a broker: ``inference.dispatch.send_run_message`` answers True without sending (as the
``priced_without_broker`` fixture does in the test process), and any other task goes to kombu's in-memory transport,
so nothing lands in a shared Redis.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.context import SpawnProcess
from typing import Any

DEADLOCK = "40P01"
SERIALIZATION_FAILURE = "40001"
CONCURRENCY_SQLSTATES = {DEADLOCK: "deadlock_detected", SERIALIZATION_FAILURE: "serialization_failure"}

Act = Callable[[], Any]


class HarnessError(Exception):
    """The actors could not be started or did not all report within the deadline."""


@dataclass(frozen=True)
class Call:
    """What one actor does in a round: ``actors.ACTORS[actor](**arguments)`` prepares it, the result is called.

    Released by the barrier, the actors run in whatever order the machine gives them. To make one interleaving
    certain rather than likely, one actor of the round ``signals_lock``: it signals once a statement of its
    transaction has locked rows, or a submission has taken its job's lock before sending the job's message ahead
    (and at the latest when its call returns); the actors that ``await_lock`` start only then, so their statements
    meet its open transaction (or, for the job's lock, the workers its message may reach from then on).
    """

    actor: str
    arguments: dict[str, Any] = field(default_factory=dict)
    signals_lock: bool = False
    awaits_lock: bool = False


@dataclass
class Outcome:
    """What one actor saw: its answer, or the exception its call raised."""

    slot: int
    actor: str
    arguments: dict[str, Any]
    answer: Any = None
    error: str = ""  # the exception's class name; empty when the call answered
    sqlstate: str = ""  # PostgreSQL's SQLSTATE when the exception was a database error
    detail: str = ""
    phase: str = "act"  # "prepare" when loading the actor's rows failed, before the barrier
    swallowed: list[dict[str, str]] = field(default_factory=list)  # errors logged at ERROR and dropped inside the call
    lock_races: list[str] = field(default_factory=list)  # SQLSTATE of each statement PostgreSQL killed (40P01, 40001)
    started: float = 0.0  # time.monotonic() when the call began and ended (one clock for every process on Linux)
    ended: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error

    def describe(self) -> str:
        if self.ok:
            return f"{self.actor}{self.arguments} -> {self.answer}"
        state = f" [{self.sqlstate} {CONCURRENCY_SQLSTATES.get(self.sqlstate, '')}]".rstrip() if self.sqlstate else ""
        return f"{self.actor}{self.arguments} raised {self.error}{state} in {self.phase}: {self.detail}"


def sqlstate_of(exc: BaseException | None) -> str:
    """The SQLSTATE of a database error (psycopg's ``sqlstate``, psycopg2's ``pgcode``), through Django's wrapper."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        state = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
        if state:
            return str(state)
        exc = exc.__cause__ or exc.__context__
    return ""


def database_url() -> str:
    """The test database as a URL for the actor processes (tests/e2e/conftest.py builds the same one; importing that
    module would start its TLS setup)."""
    from django.db import connection

    params = connection.settings_dict
    if params["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{params['NAME']}"
    user = params.get("USER") or "postgres"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    host = params.get("HOST") or "127.0.0.1"
    return f"postgres://{user}{password}@{host}:{params.get('PORT') or 5432}/{params['NAME']}"


# --- The actor process -------------------------------------------------------------------------------------


def _locks_rows(sql: str) -> bool:
    statement = sql.lstrip().upper()
    return statement.startswith(("UPDATE", "DELETE")) or " FOR UPDATE" in statement or " FOR NO KEY UPDATE" in statement


class _Statements:
    """A database execute wrapper: notes each statement killed by a deadlock or serialization failure and, given
    ``lock_signal``, sets it once a statement inside a transaction has locked rows."""

    def __init__(self, lock_signal: Any = None) -> None:
        self.sqlstates: list[str] = []
        self.lock_signal = lock_signal

    def signal(self) -> None:
        """The signal set now, once (a job's message sent ahead of its commit: from then on a worker may hold it)."""
        if self.lock_signal is not None:
            self.lock_signal.set()
            self.lock_signal = None

    def __call__(self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        try:
            result = execute(sql, params, many, context)
        except Exception as exc:
            state = sqlstate_of(exc)
            if state in CONCURRENCY_SQLSTATES:
                self.sqlstates.append(state)
            raise
        if context["connection"].in_atomic_block and _locks_rows(sql):
            self.signal()
        return result


class _SwallowedErrors(logging.Handler):
    """Collects the database errors a call logged at ERROR with a traceback instead of raising them."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.exc_info or record.exc_info[1] is None:
            return
        exc = record.exc_info[1]
        self.records.append(
            {
                "logger": record.name,
                "message": record.getMessage().strip().splitlines()[0][:200],
                "error": type(exc).__name__,
                "sqlstate": sqlstate_of(exc),
            }
        )


def _serve(
    slot: int, url: str, barrier: Any, lock_signal: Any, tasks: Any, results: Any, barrier_timeout: float
) -> None:
    """The body of one actor process: set up, then one call per round until told to stop (``None``)."""
    os.environ["DATABASE_URL"] = url
    os.environ["BROKER_URL"] = "memory://"  # nothing an actor queues may reach a shared broker
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.environ["DATABASE_POOL_MAX_SIZE"] = "2"
    try:
        import django

        django.setup()
        from django.db import close_old_connections, connection

        from inference import dispatch
        from tests.concurrency.actors import ACTORS

        dispatch.send_run_message = lambda *message: True
        current: list[_Statements] = []

        def send_ahead_message(job_id: str, queue: str) -> bool:
            """In place of the message sent ahead of its job's commit, the signal: from now on a worker may hold it."""
            current[-1].signal()
            return True

        dispatch.send_ahead_message = send_ahead_message
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)  # what matters comes back in the outcome, not as noise on stderr
        swallowed = _SwallowedErrors()
        root.addHandler(swallowed)
    except BaseException as exc:
        results.put(("failed", slot, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise
    results.put(("ready", slot, ""))
    while True:
        task = tasks.get()
        if task is None:
            return
        round_id, call = task
        outcome = Outcome(slot=slot, actor=call.actor, arguments=call.arguments)
        close_old_connections()
        act: Act | None = None
        try:
            act = ACTORS[call.actor](**call.arguments)
        except Exception as exc:
            _record_error(outcome, exc, phase="prepare")
        try:
            barrier.wait(barrier_timeout)
        except threading.BrokenBarrierError:
            outcome.error = outcome.error or "BrokenBarrierError"
            outcome.detail = outcome.detail or "the barrier broke: another actor did not arrive"
            act = None
        swallowed.records.clear()
        statements = _Statements(lock_signal if call.signals_lock else None)
        current[:] = [statements]
        if act is not None and call.awaits_lock and not lock_signal.wait(barrier_timeout):
            outcome.error, outcome.detail = "TimeoutError", "the actor that signals its lock never did"
            act = None
        if act is not None:
            outcome.started = time.monotonic()
            try:
                with connection.execute_wrapper(statements):
                    outcome.answer = act()
            except Exception as exc:
                _record_error(outcome, exc, phase="act")
            outcome.ended = time.monotonic()
        if call.signals_lock:
            lock_signal.set()  # it took no lock (or failed before): the others must not wait for ever
        outcome.swallowed = list(swallowed.records)
        outcome.lock_races = statements.sqlstates
        results.put(("outcome", round_id, asdict(outcome)))


def _record_error(outcome: Outcome, exc: BaseException, *, phase: str) -> None:
    outcome.error = type(exc).__name__
    outcome.sqlstate = sqlstate_of(exc)
    outcome.detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    outcome.phase = phase


# --- The parent's side -------------------------------------------------------------------------------------


class ActorPool:
    """``size`` actor processes on the database at ``url``; ``run_round`` releases one call on each together."""

    def __init__(self, size: int, url: str, *, round_timeout: float = 120.0, start_timeout: float = 120.0) -> None:
        self.size = size
        self.url = url
        self.round_timeout = round_timeout
        self.start_timeout = start_timeout
        self._context = multiprocessing.get_context("spawn")
        self._barrier = self._context.Barrier(size)
        self._lock_signal = self._context.Event()
        self._results: Any = self._context.Queue()
        self._tasks: list[Any] = [self._context.Queue() for _ in range(size)]
        self._processes: list[SpawnProcess] = []
        self._rounds = 0
        self.broken = False  # a round timed out or a process died: the barrier and queues are out of step

    def start(self) -> None:
        self.broken = True  # until every process has reported ready
        for slot in range(self.size):
            arguments = (slot, self.url, self._barrier, self._lock_signal, self._tasks[slot], self._results)
            process = self._context.Process(
                target=_serve, args=(*arguments, self.round_timeout), name=f"race-actor-{slot}", daemon=True
            )
            process.start()
            self._processes.append(process)
        ready: set[int] = set()
        deadline = time.monotonic() + self.start_timeout
        while len(ready) < self.size:
            kind, slot, detail = self._next_result(deadline, f"{self.size - len(ready)} actor processes to start")
            if kind == "failed":
                raise HarnessError(f"actor process {slot} could not set up: {detail}")
            if kind == "ready":
                ready.add(slot)
        self.broken = False

    def run_round(self, calls: list[Call]) -> list[Outcome]:
        """Each call on its own process, all released by the barrier; the outcomes in the order of ``calls``."""
        if len(calls) > self.size:
            raise HarnessError(f"{len(calls)} calls for {self.size} actor processes")
        if self.broken:
            raise HarnessError("the actor pool is broken by an earlier round")
        self._rounds += 1
        round_id = self._rounds
        padded = calls + [Call("idle")] * (self.size - len(calls))
        self._lock_signal.clear()  # every process of the last round has reported: none is waiting on it
        for slot, call in enumerate(padded):
            self._tasks[slot].put((round_id, call))
        outcomes: dict[int, Outcome] = {}
        deadline = time.monotonic() + self.round_timeout
        try:
            while len(outcomes) < self.size:
                kind, reported_round, payload = self._next_result(deadline, f"round {round_id}'s outcomes")
                if kind == "outcome" and reported_round == round_id:
                    outcome = Outcome(**payload)
                    outcomes[outcome.slot] = outcome
        except HarnessError:
            self.broken = True
            raise
        return [outcomes[slot] for slot in range(len(calls))]

    def _next_result(self, deadline: float, waiting_for: str) -> tuple[str, Any, Any]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HarnessError(f"timed out waiting for {waiting_for}")
            try:
                result: tuple[str, Any, Any] = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [process.name for process in self._processes if not process.is_alive()]
                if dead:
                    raise HarnessError(f"actor processes died while waiting for {waiting_for}: {dead}") from None
                continue
            return result

    def close(self) -> None:
        for slot, process in enumerate(self._processes):
            if process.is_alive():
                self._tasks[slot].put(None)
        deadline = time.monotonic() + 30
        for process in self._processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(10)
        self._processes.clear()
