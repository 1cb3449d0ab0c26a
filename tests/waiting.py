"""Waiting in tests: poll for the condition a test needs, up to a deadline, never a fixed sleep.

This is the one place in the suite that sleeps: between two looks at a condition (``wait_until``), or for a span
that is itself the point (``pace``: a benchmark's measurement window or the rhythm of its simulated clients).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float,
    message: str | Callable[[], str],
    interval: float | Callable[[], float] = 0.05,
    ignoring: tuple[type[Exception], ...] = (),
    failure: Callable[[str], BaseException] = AssertionError,
) -> T:
    """Calls ``condition`` every ``interval`` seconds until it returns something truthy, and returns that.

    After ``timeout`` seconds raises ``failure`` (an AssertionError unless told: a benchmark's command line gives
    ``SystemExit``) saying what it waited for: ``message``, or what ``message()`` returns then (a log tail, the state
    last seen). ``interval`` may be a function, asked before each pause (a pace that changes, a random one). An
    exception of a type in ``ignoring`` means "not yet" (a server still starting); the last one is chained to the
    error. Any other exception ends the wait: a condition raises to give up early, e.g. when the process it waits
    for has exited.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
        except ignoring as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            waited_for = message() if callable(message) else message
            raise failure(f"waited {timeout:g} s for {waited_for}") from last_error
        time.sleep(interval() if callable(interval) else interval)


async def wait_until_async(condition: Callable[[], T], *, timeout: float, message: str, interval: float = 0.01) -> T:
    """``wait_until`` for a coroutine: the event loop goes on running (background tasks) between two looks."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {message}")
        await asyncio.sleep(interval)


def pace(seconds: float) -> None:
    """Lets ``seconds`` pass on purpose (none if not positive): a span that is what is measured (a benchmark's idle
    window), a sampler's or a simulated client's rhythm, a start line shared by processes. Never use it to wait for
    something to happen: that is ``wait_until``'s, with a deadline."""
    if seconds > 0:
        time.sleep(seconds)
