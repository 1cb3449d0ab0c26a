"""The threads that run requests' sync code under ASGI, kept from one request to the next.

Django's ASGI handler runs a request's sync calls (its signals, the sync middleware and views, closing the response)
on a thread of the request's own: asgiref's ``ThreadSensitiveContext`` starts a ``ThreadPoolExecutor(max_workers=1)``
at the request's first sync call and, when the request ends, shuts it down from yet another thread started to join
it. Two threads started and joined per request: measured at 16 concurrent requests on this 2-core machine, about
0.45 ms of CPU per request for one sync call, most of what a small request costs (``/healthz``'s whole answer is
about 1.2 ms), and the GIL handed between a crowd of short-lived threads.

``RequestThreads`` (in front of Django, config/asgi.py) gives each HTTP request a ``RequestThread`` instead, through
asgiref's own hook for it (``ThreadSensitiveContext(executor=...)``): the same one-thread-per-request contract (every
thread-sensitive call of a request runs on one thread, one at a time, and no other request's call runs there
meanwhile), but the thread comes from a pool of idle ones and goes back to it when the request ends. That is how a
WSGI server's threads serve one request after another; Django's per-thread state (the database connection, closed or
given back to its pool at each request's end by ``request_finished``) is made for it.

A thread goes back to the pool only once everything the request sent it has finished (a request cancelled while its
sync call still runs, a client gone, does not hand on a busy thread), and with its database connections given back
(one left inside a transaction ends the thread instead). A waiting view hands its thread back before it
waits (``hand_back``), so a waiting request holds no thread; a later sync call of that request takes one again.

``RequestThreads`` also sees every HTTP request end, however it ends: what a request holds beyond it (a stream's slot
under its caller's cap) is given back then through ``at_request_end``. Django's handler closes the responses it gets,
but a response can be lost before it gets it: its view's task cancelled by a client gone while the response passes
back through a middleware's thread hop (``ASGIHandler.handle`` then only sends ``request_finished``), a middleware
that raises on it (an error page answered in its place), the application's task itself cancelled.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
import types
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import django.core.handlers.asgi
from asgiref.sync import SyncToAsync, ThreadSensitiveContext, iscoroutinefunction, sync_to_async
from django.db import connections

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

Scope = dict[str, Any]

# Idle threads kept for the next requests; above it, a thread handed back exits. A burst of more concurrent requests
# than this starts threads as Django would, and keeps this many of them afterwards. Sixteen requests running sync code
# at once is more than a web process's GIL can serve in parallel; waiting requests hold none (``hand_back``).
MAX_IDLE = 16


class ThreadPool:
    """Idle single-thread executors, taken by one request at a time."""

    def __init__(self, max_idle: int = MAX_IDLE) -> None:
        self.max_idle = max_idle
        self._idle: list[ThreadPoolExecutor] = []
        self._lock = threading.Lock()
        self.started = 0  # threads this pool has made, for tests and the curious
        self.ended = 0  # and those it has let go (beyond the bound, or not fit to serve again)

    def take(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.started += 1
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="request")

    def give_back(self, worker: ThreadPoolExecutor, reusable: bool = True) -> None:
        with self._lock:
            if reusable and len(self._idle) < self.max_idle:
                self._idle.append(worker)
                return
            self.ended += 1
        worker.shutdown(wait=False)  # its thread exits once idle; nothing waits for it

    @property
    def idle(self) -> int:
        return len(self._idle)


def _tidy() -> bool:
    """Run on a cancelled request's thread after its last call: whether the thread may serve another request.

    Django gives the thread's database connections back at the request's end (``request_finished``); a cancelled
    request leaves them here, and they are given back now (a request that ended otherwise without it, an exception
    out of a streaming body, leaves them to the next request's ``request_started``, which closes them first thing).
    One still inside a transaction (its request cancelled in the middle of it) is closed, which rolls the transaction
    back, and the thread, whose Django state still says it is inside one, serves no other request."""
    reusable = True
    try:
        for connection in connections.all(initialized_only=True):
            if connection.in_atomic_block:
                reusable = False
                connection.close()
            else:
                connection.close_if_unusable_or_obsolete()
    except Exception:  # a connection that cannot even be closed: this thread serves no one else
        logger.exception("a request thread's database connection could not be given back")
        return False
    return reusable


class RequestThread(Executor):
    """One request's thread for its thread-sensitive calls: taken from the pool at the first call, given back by
    ``release`` once every call sent to it has finished."""

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool
        self._worker: ThreadPoolExecutor | None = None
        self._sent: list[Future[Any]] = []

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._worker is None:
            self._worker = self._pool.take()
        future = self._worker.submit(fn, *args, **kwargs)
        self._sent.append(future)
        return future

    def release(self) -> None:
        """Gives the thread back. Where every call sent to it ran to its end (Django's ``request_finished`` among
        them, which gives the database connections back), at once. Otherwise (the request was cancelled: a call
        still runs, or was cancelled while queued) once ``_tidy``, queued behind them, has run."""
        worker, sent = self._worker, self._sent
        self._worker, self._sent = None, []
        if worker is None:
            return
        if all(future.done() and not future.cancelled() for future in sent):
            self._pool.give_back(worker)
            return
        worker.submit(_tidy).add_done_callback(lambda tidied: self._pool.give_back(worker, tidied.result()))

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.release()  # the pool owns the thread


class RequestThreads:
    """ASGI middleware: each HTTP request's thread-sensitive calls run on a pooled thread (see the module's doc)."""

    def __init__(self, app: Any, pool: ThreadPool | None = None) -> None:
        self.app = app
        self.pool = pool or ThreadPool()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        thread = RequestThread(self.pool)
        end = RequestEnd()
        ending = _request_end.set(end)
        try:
            # Django's handler enters its own ThreadSensitiveContext inside this one, which then changes nothing.
            async with ThreadSensitiveContext(executor=thread):
                await self.app(scope, receive, send)
        finally:
            _request_end.reset(ending)
            thread.release()
            await end.run()


class RequestEnd:
    """What is to be done once an HTTP request has ended (``at_request_end``), done by ``RequestThreads`` as it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], object]] = []
        self._ended = False

    def add(self, callback: Callable[[], object]) -> bool:
        """Keeps ``callback`` for the request's end; False if the request has ended already."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
            return not self._ended

    async def run(self) -> None:
        with self._lock:
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        if callbacks:
            # In a thread: a callback may wait on the network. Shielded: a cancellation of the request's task while
            # they run cancels only the wait for them.
            await asyncio.shield(sync_to_async(_call_each, thread_sensitive=False)(callbacks))


def _call_each(callbacks: list[Callable[[], object]]) -> None:
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("a request's end could not do %r", callback)


_request_end: contextvars.ContextVar[RequestEnd | None] = contextvars.ContextVar("request_end", default=None)


def at_request_end(callback: Callable[[], object]) -> None:
    """Has ``callback`` called, once, when the HTTP request in progress ends, however it ends (see the module's doc),
    in a thread: for what a request holds that must not outlive it, whether or not anything gets to close its
    response. Called where the request has already ended (a thread it no longer waits for: its view was cancelled
    meanwhile), it calls ``callback`` at once, here; so call it from sync code.

    Outside a request served behind ``RequestThreads`` (Django's test clients, WSGI) it does nothing: the caller's own
    way of letting go (closing the response) is then the only one.
    """
    end = _request_end.get()
    if end is not None and not end.add(callback):
        _call_each([callback])


def hand_back() -> None:
    """Gives the thread of the request in progress back before it waits, so the waiting holds no thread: what the
    request ran there has finished (its database connection given back). A later thread-sensitive call of the
    request takes a thread again. Outside a request (a sync test client) it does nothing.

    Under Django's own handler (no ``RequestThreads`` in front), the request's thread is ended instead.
    """
    try:
        context = SyncToAsync.thread_sensitive_context.get()
    except LookupError:
        return
    executor = SyncToAsync.context_to_thread_executor.get(context)
    if isinstance(executor, RequestThread):
        executor.release()
    elif executor is not None and getattr(context, "_executor", None) is None:
        # asgiref's per-request executor: it starts a new one for a later call, and shuts that one down at the end.
        SyncToAsync.context_to_thread_executor.pop(context, None)
        executor.shutdown(wait=False)


class RenderingHandler(django.core.handlers.asgi.ASGIHandler):
    """Django's ASGI handler, rendering a sync view's deferred response on the view's own call.

    A DRF ``Response`` (every API answer) and a ``TemplateResponse`` (the dashboard's pages) are rendered after the view
    returns: Django's async handler awaits ``render()`` if it is a coroutine function, and otherwise hops back to the
    request's thread to call it, one more round trip between the event loop and the thread per request (about 0.1 ms
    of the process's CPU). Rendered at the end of the view's call instead, on the same thread, in the same order
    (Django renders right after the view, and no template-response middleware is installed; with one, this does
    nothing), the handler finds a response already rendered whose ``render`` only returns it. A rendering error is
    the view's, handled as Django handles either.
    """

    async def get_response_async(self, request: Any) -> Any:
        response = await super().get_response_async(request)
        # Rendered and past the middleware: a plain response again (its class's render, pickled as Django's).
        response.__dict__.pop("render", None)
        return response

    def make_view_atomic(self, view: Callable[..., Any]) -> Callable[..., Any]:
        view = super().make_view_atomic(view)
        if iscoroutinefunction(view) or self._template_response_middleware:  # type: ignore[attr-defined]
            return view

        @functools.wraps(view)
        def rendering(request: Any, *args: Any, **kwargs: Any) -> Any:
            response = view(request, *args, **kwargs)
            render = getattr(response, "render", None)
            if callable(render) and not iscoroutinefunction(render):
                response = render()
                if callable(getattr(response, "render", None)):
                    response.render = types.MethodType(_rendered, response)
            return response

        return rendering


async def _rendered(response: Any) -> Any:
    return response
