"""Requests' sync calls under ASGI run on pooled threads (config/request_threads.py): one thread per request at a time,
kept from one request to the next, never handed on busy."""

from __future__ import annotations

import asyncio
import pickle
import threading
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async

from config.request_threads import RequestThread, RequestThreads, ThreadPool, at_request_end, hand_back
from tests.waiting import wait_until


def ident() -> int:
    return threading.get_ident()


class SyncCalls:
    """An ASGI app that makes ``calls`` thread-sensitive sync calls and records the threads they ran on."""

    def __init__(self, calls: int = 3, hand_back_after: int | None = None) -> None:
        self.calls = calls
        self.hand_back_after = hand_back_after
        self.threads: list[list[int]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen: list[int] = []
        self.threads.append(seen)
        for number in range(self.calls):
            if number == self.hand_back_after:
                hand_back()
            seen.append(await sync_to_async(ident, thread_sensitive=True)())


def request(app: Any) -> Any:
    return app({"type": "http"}, None, None)


async def cancel_once_running(app: Any, running: threading.Event) -> None:
    """A request to ``app`` cancelled (its client gone) once its sync call has set ``running``."""
    task = asyncio.ensure_future(request(app))
    await asyncio.to_thread(running.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_every_call_of_a_request_runs_on_one_thread_and_the_next_request_reuses_it() -> None:
    inner = SyncCalls()
    app = RequestThreads(inner, ThreadPool())

    async def two_requests() -> None:
        await request(app)
        # The thread goes back once its last call (which gives its connections back) has run, just after the request.
        await asyncio.to_thread(wait_until, lambda: app.pool.idle == 1, timeout=30, message="the thread back")
        await request(app)

    asyncio.run(two_requests())
    first, second = inner.threads
    assert len(set(first)) == 1
    assert first == second
    assert first[0] != threading.get_ident()
    assert app.pool.started == 1
    wait_until(lambda: app.pool.idle == 1, timeout=30, message="the thread back in the pool")


def test_concurrent_requests_never_share_a_thread() -> None:
    inner = SyncCalls(calls=5)
    app = RequestThreads(inner, ThreadPool())

    async def together() -> None:
        await asyncio.gather(*(request(app) for _ in range(8)))

    asyncio.run(together())
    assert all(len(set(seen)) == 1 for seen in inner.threads)
    assert len({seen[0] for seen in inner.threads}) == 8
    assert app.pool.started == 8
    wait_until(lambda: app.pool.idle == 8, timeout=30, message="the threads back in the pool")
    asyncio.run(together())  # the same eight threads serve the next eight
    assert app.pool.started == 8
    assert len({seen[0] for seen in inner.threads}) == 8


def test_idle_threads_beyond_the_pools_bound_exit() -> None:
    inner = SyncCalls(calls=1)
    app = RequestThreads(inner, ThreadPool(max_idle=2))

    async def together() -> None:
        await asyncio.gather(*(request(app) for _ in range(6)))

    before = threading.active_count()
    asyncio.run(together())
    assert app.pool.started == 6
    wait_until(lambda: app.pool.ended == 4, timeout=30, message="the threads beyond the bound to be let go")
    assert app.pool.idle == 2
    wait_until(lambda: threading.active_count() <= before + 2, timeout=30, message="the extra threads to exit")


def test_hand_back_frees_the_thread_while_a_request_waits_and_a_later_call_takes_one_again() -> None:
    waiting = SyncCalls(calls=2, hand_back_after=1)
    app = RequestThreads(waiting, ThreadPool())
    other = SyncCalls(calls=1)
    app_other = RequestThreads(other, app.pool)
    holding: asyncio.Event

    class Waits:
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await sync_to_async(ident, thread_sensitive=True)()
            hand_back()
            await holding.wait()  # the waiting: no thread held
            await sync_to_async(ident, thread_sensitive=True)()

    waits = RequestThreads(Waits(), app.pool)

    async def scenario() -> None:
        nonlocal holding
        holding = asyncio.Event()
        task = asyncio.ensure_future(request(waits))
        while app.pool.started == 0 or app.pool.idle == 0:
            await asyncio.sleep(0.001)
        await request(app_other)  # served by the thread the waiting request gave back
        while app.pool.idle == 0:
            await asyncio.sleep(0.001)
        holding.set()
        await task

    asyncio.run(scenario())
    assert app.pool.started == 1
    asyncio.run(request(app))
    assert len(waiting.threads[0]) == 2


def test_without_the_pool_hand_back_ends_djangos_per_request_thread() -> None:
    seen: list[int] = []

    async def scenario() -> None:
        async with ThreadSensitiveContext():
            seen.append(await sync_to_async(ident, thread_sensitive=True)())
            hand_back()
            seen.append(await sync_to_async(ident, thread_sensitive=True)())

    asyncio.run(scenario())
    assert seen[0] != seen[1]  # a new thread for the call after the hand-back


def http_scope(path: str, headers: list[tuple[bytes, bytes]] | None = None, host: str = "localhost") -> dict[str, Any]:
    """An HTTP GET of ``path`` as an ASGI server hands it on."""
    return {
        "type": "http",
        "method": "GET",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"host", host.encode()), *(headers or [])],
        "server": (host, 80),
        "client": ("127.0.0.1", 1234),
        "scheme": "http",
        "root_path": "",
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }


async def serve(app: Any, path: str, sent: list[dict[str, Any]]) -> None:
    """One GET of ``path`` through ``app``, its messages appended to ``sent``; the client stays till the answer."""
    received: list[int] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        if len(received) == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays: Django stops listening once it has answered
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(http_scope(path), receive, send)


def test_the_asgi_application_serves_requests_on_pooled_threads() -> None:
    from config.asgi import application

    assert isinstance(application, RequestThreads)
    pool = application.pool
    sent: list[dict[str, Any]] = []

    async def three() -> None:
        for _ in range(3):
            await serve(application, "/healthz", sent)
            # Its thread goes back just after the request, once its last call has run there.
            await asyncio.to_thread(wait_until, lambda: pool.idle >= 1, timeout=30, message="the thread back")

    started = pool.started
    asyncio.run(three())
    assert [message["status"] for message in sent if message["type"] == "http.response.start"] == [200, 200, 200]
    assert pool.started - started <= 1  # one thread served the three requests


def test_an_api_answer_is_rendered_on_the_views_own_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same answer as Django's own handler gives, with one call on the request's thread fewer (the render)."""
    from django.core.handlers.asgi import ASGIHandler

    from config.asgi import django_application

    calls: list[str] = []
    submit = RequestThread.submit

    def counted(self: RequestThread, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(RequestThread, "submit", counted)
    answers: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    for name, handler in (("django", ASGIHandler()), ("ours", django_application)):
        calls.clear()
        sent: list[dict[str, Any]] = []
        asyncio.run(serve(RequestThreads(handler, ThreadPool()), "/v1/me", sent))
        answers[name] = (sent, list(calls))
    (django_sent, django_calls), (our_sent, our_calls) = answers["django"], answers["ours"]
    assert our_sent == django_sent  # the same status, headers and body (DRF's 401, rendered as JSON)
    assert django_sent[0]["status"] == 401
    assert b'"error_type"' in django_sent[1]["body"]
    assert len(our_calls) == len(django_calls) - 1


def test_a_response_rendered_on_the_views_call_leaves_the_handler_a_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.asgi import django_application
    from config.request_threads import RenderingHandler

    handed: list[Any] = []
    send_response = RenderingHandler.send_response

    async def recorded(self: RenderingHandler, response: Any, send: Any) -> None:
        handed.append(response)
        await send_response(self, response, send)

    monkeypatch.setattr(RenderingHandler, "send_response", recorded)
    asyncio.run(serve(RequestThreads(django_application, ThreadPool()), "/v1/me", []))
    [response] = handed
    assert "render" not in response.__dict__  # no coroutine for a later render(), nothing pickle cannot load
    assert response.render() is response
    assert pickle.loads(pickle.dumps(response)).content == response.content  # noqa: S301 - this test's own bytes


@pytest.mark.parametrize("queued", [False, True], ids=["a-call-running", "a-call-running-and-one-queued"])
def test_a_cancelled_requests_thread_is_handed_on_only_once_all_it_was_sent_has_run(queued: bool) -> None:
    started, release = threading.Event(), threading.Event()

    def blocking() -> int:
        started.set()
        release.wait(30)
        return threading.get_ident()

    class Cancelled:
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            running = asyncio.ensure_future(sync_to_async(blocking, thread_sensitive=True)())
            await asyncio.sleep(0)
            if queued:  # a second call waits behind the first; cancelled, it counts as "done"
                await asyncio.gather(running, sync_to_async(ident, thread_sensitive=True)())
            await running

    pool = ThreadPool()
    stuck, inner = RequestThreads(Cancelled(), pool), SyncCalls(calls=1)
    after = RequestThreads(inner, pool)

    async def scenario() -> None:
        await cancel_once_running(stuck, started)  # a client gone: the request ends while its sync call still runs
        assert pool.idle == 0  # the busy thread is not in the pool
        await request(after)  # on a thread of its own, not queued behind the running call
        release.set()

    asyncio.run(scenario())
    assert pool.started == 2
    wait_until(lambda: pool.idle == 2, timeout=30, message="the busy thread to come back once its call ended")


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_requests_thread_left_inside_a_transaction_serves_no_other_request() -> None:
    from django.db import connection, transaction

    inside, release = threading.Event(), threading.Event()

    def begin_and_leave_open() -> None:
        transaction.atomic().__enter__()  # never left: the thread's Django state says "in a transaction"
        connection.ensure_connection()
        inside.set()
        release.wait(30)

    class LeavesATransaction:
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await sync_to_async(begin_and_leave_open, thread_sensitive=True)()

    pool = ThreadPool()
    leaves, inner = RequestThreads(LeavesATransaction(), pool), SyncCalls(calls=1)
    after = RequestThreads(inner, pool)

    async def cancelled() -> None:
        await cancel_once_running(leaves, inside)
        release.set()

    asyncio.run(cancelled())
    wait_until(lambda: pool.ended == 1, timeout=30, message="the thread to be let go")
    assert pool.idle == 0
    with connection.cursor() as cursor:  # its connection closed, its transaction rolled back: nothing is locked
        cursor.execute("SELECT 1")
    asyncio.run(request(after))
    assert pool.started == 2  # a new thread, with no transaction in it
    wait_until(lambda: pool.idle == 1, timeout=30, message="the clean thread to be pooled")


def test_what_a_request_leaves_for_its_end_is_done_once_as_it_ends_however_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``at_request_end``: done, in a thread, once the request has ended, answered or cancelled; a callback that fails
    is logged and the next still runs; one left after the request's end (by a thread it no longer waits for) is done
    at once; outside a request nothing is kept."""
    done: list[str] = []
    running, late = threading.Event(), threading.Event()

    def fails() -> None:
        raise RuntimeError("this one fails")

    def leave(what: str) -> None:
        at_request_end(fails)
        at_request_end(lambda: done.append(what))

    class Leaves:
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            await sync_to_async(leave, thread_sensitive=True)("answered")
            assert done == []  # not before the request's end

    class LeavesLate:
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            def leave_once_cancelled() -> None:
                running.set()
                assert late.wait(30)
                leave("late")

            await sync_to_async(leave_once_cancelled, thread_sensitive=False)()

    async def requests() -> None:
        await request(RequestThreads(Leaves(), ThreadPool()))
        assert done == ["answered"]
        await cancel_once_running(RequestThreads(LeavesLate(), ThreadPool()), running)
        late.set()
        await asyncio.to_thread(wait_until, lambda: "late" in done, timeout=30, message="the late one done")

    asyncio.run(requests())
    assert done == ["answered", "late"]
    failed = [record for record in caplog.records if record.exc_info and "this one fails" in str(record.exc_info[1])]
    assert len(failed) == 2
    at_request_end(lambda: done.append("outside"))
    assert done == ["answered", "late"]
