"""A cancelled waiter or job events listener ends, wherever the cancellation lands (inference/job_events.py).

On Python 3.11, ``asyncio.wait_for`` loses a cancellation that arrives once the awaitable it wraps has finished but
before the waiting task has run again (CPython gh-86296, fixed in 3.12 only). redis-py 8 wraps every write in it
(``Connection.send_packed_command`` under its default 5 s ``socket_timeout``), so a listener cancelled while it
connected went on to subscribe and read for ever: ``asyncio.run``, which cancels the tasks left once, never returned,
and a web process could not stop. A waiter's own ``wait_for`` lost its request's cancellation the same way.

Each scenario runs in a thread of its own under a deadline, so a task that ignores its cancellation fails the test
instead of hanging it; the loop it holds is then cancelled again until the thread ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from inference import job_events
from tests.waiting import wait_until, wait_until_async

pytestmark = pytest.mark.skipif(not django_settings.REDIS_URL, reason="the listener subscribes through Redis")

DEADLINE_SECONDS = 5.0


def run_or_report_stuck(scenario: Callable[[], Coroutine[Any, Any, None]]) -> str | None:
    """``asyncio.run(scenario())`` in a thread: None once it has returned within the deadline, otherwise the stacks of
    the tasks still running (after which they are cancelled until they end, so the next scenario starts clean)."""
    loops: list[asyncio.AbstractEventLoop] = []
    errors: list[BaseException] = []

    async def main() -> None:
        loops.append(asyncio.get_running_loop())
        await scenario()

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(DEADLINE_SECONDS)
    stuck = None
    if thread.is_alive():
        stuck = "; ".join(_stacks_of(loops[0]))
        while thread.is_alive():
            loops[0].call_soon_threadsafe(_cancel_all, loops[0])
            thread.join(0.1)
    if errors:
        raise errors[0]
    return stuck


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


def _stacks_of(loop: asyncio.AbstractEventLoop) -> list[str]:
    stacks = []
    for task in list(asyncio.all_tasks(loop)):
        frames = []
        awaited: Any = task.get_coro()
        while awaited is not None and getattr(awaited, "cr_frame", None) is not None:
            frames.append(f"{awaited.cr_code.co_name}:{awaited.cr_frame.f_lineno}")
            awaited = awaited.cr_await
        stacks.append(" > ".join(frames))
    return stacks


def listener_connections() -> list[dict[str, Any]]:
    """This process's listener connections, as the Redis server sees them (named by ``job_events``)."""
    client = redis.Redis.from_url(str(django_settings.REDIS_URL))
    try:
        return [entry for entry in client.client_list() if entry.get("name") == job_events.listener_client_name()]
    finally:
        client.close()


def test_the_listener_ends_and_lets_go_of_redis_wherever_its_cancellation_lands() -> None:
    """A scenario starts the listener and returns after ``steps`` turns of the loop; ``asyncio.run`` then cancels the
    listener wherever it is: connecting, subscribing, reading, or not yet started. Every run returns, and leaves no
    connection of the listener's behind."""

    async def steps_to_subscribe() -> int:
        async with job_events.watching("job-steps") as watch:
            await watch.changed(0.001)
            assert watch.listener is not None
            listener = watch.listener
            steps = 0
            while not listener.live:
                await asyncio.sleep(0)
                steps += 1
                assert steps < 100_000, "the listener never subscribed"
            assert await asyncio.to_thread(listener_connections), "the listener's connection, by its name"
            return steps

    measured: list[int] = []

    async def measure() -> None:
        measured.append(await steps_to_subscribe())

    assert run_or_report_stuck(measure) is None
    # The listener waits on Redis for many turns of the loop at each of its points, so a few hundred runs spread over
    # the turns it took here (however many that was) meet each point.
    span = range(0, measured[0] + 10, max(1, measured[0] // 300))

    stuck: dict[int, str] = {}
    for steps in span:

        async def scenario(steps: int = steps) -> None:
            async with job_events.watching("job-cancelled") as watch:
                await watch.changed(0.001)  # starts the listener
                for _ in range(steps):
                    await asyncio.sleep(0)

        where = run_or_report_stuck(scenario)
        if where is not None:
            stuck[steps] = where
        wait_until(
            lambda: not listener_connections(),
            timeout=DEADLINE_SECONDS,
            message=f"the listener's connection to close, cancelled after {steps} turns of the loop",
        )
    assert not stuck, f"{len(stuck)} of {len(span)} runs never returned; still running: {stuck}"


def test_a_waiter_cancelled_as_its_job_moves_is_cancelled() -> None:
    """The job's move wakes the waiter, and its request is cancelled (the client hung up) before the waiter has run
    again: the cancellation wins, so the stream ends instead of looking at the job and waiting on."""
    outcomes: list[tuple[int, bool, bool]] = []

    async def scenario() -> None:
        async with job_events.watching("job-moving") as watch:
            assert watch.listener is not None
            watch.listener.start()
            listener = watch.listener
            await wait_until_async(lambda: listener.live, timeout=DEADLINE_SECONDS, message="the listener to subscribe")
            for steps in range(4):
                watch.event.clear()
                waiting = asyncio.create_task(watch.changed(60.0))
                for _ in range(3):  # into its wait
                    await asyncio.sleep(0)
                assert not waiting.done()
                watch.event.set()
                for _ in range(steps):
                    await asyncio.sleep(0)
                accepted = waiting.cancel()  # False once it has already returned: then there is nothing to cancel
                await asyncio.wait([waiting], timeout=DEADLINE_SECONDS)
                assert waiting.done(), f"the waiter still waits after step {steps}"
                outcomes.append((steps, accepted, waiting.cancelled()))

    assert run_or_report_stuck(scenario) is None
    assert outcomes[0][1], "a cancellation in the same turn as the move reaches a waiter that has not run yet"
    lost = [steps for steps, accepted, cancelled in outcomes if accepted and not cancelled]
    assert not lost, f"cancellations lost after {lost} turns of the loop: {outcomes}"
