"""The Celery broker's connection: kombu's Redis transport, publishing through one Redis client per channel.

kombu's Redis channel (kombu 5.7, ``kombu/transport/redis.py``) builds a new ``redis.Redis`` for every command it sends
outside the consumer's poll loop: ``Channel.conn_or_acquire()`` yields ``self._create_client()`` when it is given no
client, and ``_put`` (each published message) calls it. The client is a thin object over the channel's connection pool
(``Channel.pool``), but redis-py's constructor fills a table of response callbacks each time: 85-110 µs of CPU per
client measured on its own, and on the web process's path (``send_task(..., retry=False)`` as inference/dispatch.py
sends it, blocks of 1000 under ``time.process_time``, local Redis, best block) a ``send_task`` went from 450-530 µs
to 340-370 µs. The same fix as the cache's (``config/cache.py``, ``ReusingRedisCache``).

``Channel`` keeps one client per pool instead. A ``redis.Redis`` over a pool is thread-safe: each command takes a
connection from the pool and gives it back, and a connection that failed is dropped and made again on the next
command, so after a Redis restart the next publish reconnects as before. The client goes with the pool: kombu
replaces a channel's pool only after ``_disconnect_pools`` (on close, on a failed connect, in a forked child), which
drops the client too, and a client whose pool is no longer the channel's is never used. The consumer's blocking
reads (BRPOP, pub/sub) keep kombu's own asynchronous client and pool.

How it is chosen: ``config/celery.py`` gives the app ``AMQP``, whose ``BrokerConnection`` names this ``Transport``
once kombu has read a ``redis://`` or ``rediss://`` URL and its options (a bare ``rediss://`` gets kombu's default TLS
options only while the transport is named ``rediss``); the connections Celery's pools and clones make from it copy
the name. Celery's ``broker_transport`` setting would name the class for every URL whatever its scheme (a
``memory://`` or ``celery -b`` override would still get Redis), and before that TLS default. Other schemes, Sentinel's
included, keep kombu's transports, and so does a connection that fails over to the next URL of a ``;`` list (kombu
reads that URL afresh: one client per message again). Logs and ``celery report`` name it ``config.broker:Transport``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import kombu
from celery.app.amqp import AMQP as CeleryAMQP
from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
    _pool_client: Any = None

    @contextmanager
    def conn_or_acquire(self, client: Any | None = None) -> Iterator[Any]:
        if client:  # kombu's test: a caller's client (or non-empty pipeline) is used as it is
            yield client
        else:
            yield self._client_over_pool()

    def _client_over_pool(self) -> Any:
        pool = self.pool
        client = self._pool_client
        if client is None or client.connection_pool is not pool:
            # kombu's private constructor, which its stubs leave out: the channel's client class (with
            # ``global_keyprefix`` when set) over ``self.pool``, with the pool's credential provider.
            client = self._pool_client = self._create_client()  # type: ignore[attr-defined]
        return client

    def _disconnect_pools(self) -> None:
        self._pool_client = None
        # kombu's private method (on close, on a failed connect, after a fork), which its stubs leave out.
        super()._disconnect_pools()  # type: ignore[misc]


class Transport(kombu_redis.Transport):
    Channel = Channel


TRANSPORT = f"{__name__}:{Transport.__qualname__}"
# The schemes kombu gives its stock Redis transport (Sentinel's has a class of its own, left as it is).
REDIS_SCHEMES = ("redis", "rediss")


class BrokerConnection(kombu.Connection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Once kombu has read the URL (and given ``rediss://`` its TLS options): the connections Celery's pools make
        # from this one, and its clones, copy the transport's name, not the URL.
        if self.transport_cls in REDIS_SCHEMES:
            self.transport_cls = TRANSPORT


class AMQP(CeleryAMQP):
    Connection = BrokerConnection
    BrokerConnection = BrokerConnection
