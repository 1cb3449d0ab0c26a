"""The broker publishes through one Redis client per channel, not one per message (config/broker.py).

Each test runs the platform's Celery settings and its broker connection class against a private redis-server, and reads
what arrived with a plain LRANGE of the queue's list (kombu LPUSHes, a worker takes from the right: the list reversed is
the order of sending).
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import signal
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kombu.transport.memory
import kombu.transport.redis
import pytest
import redis
import trustme
from celery import Celery
from kombu import Producer, Queue
from kombu.exceptions import OperationalError

from config import broker
from config.celery import app as platform_app
from config.embedded_process import free_port
from config.embedded_redis import EmbeddedRedis, redis_server_executable
from inference import dispatch
from tests.waiting import wait_until

QUEUE = "broker-publish-test"
TASK = "inference.run_job"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def make_app() -> Iterator[Callable[..., Celery]]:
    """A Celery app as config/celery.py makes it (the platform's AMQP class, its settings), for another broker."""
    apps: list[Celery] = []

    def make(broker_url: str, **transport_options: Any) -> Celery:
        app = Celery("broker-publish-test", set_as_current=False, amqp=platform_app.amqp_cls)
        app.config_from_object("django.conf:settings", namespace="CELERY")
        options = {**app.conf.broker_transport_options, **transport_options}
        app.conf.update(broker_url=broker_url, broker_transport_options=options)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def send(app: Celery, number: int) -> None:
    """Publishes task ``number`` as inference/dispatch.py does."""
    dispatch.publish_run(f"job-{number}", number, QUEUE, app=app)


def publishing_client(app: Celery) -> Any:
    """The Redis client the channel of the app's pooled broker connection publishes through (the one just used)."""
    with app.producer_or_acquire() as producer:
        return producer.channel._pool_client


def waiting_bodies(client: redis.Redis, key: str = QUEUE) -> list[Any]:
    """The bodies of the messages waiting in the queue's list, in the order they were sent."""
    return [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in reversed(client.lrange(key, 0, -1))]


def sent_numbers(client: redis.Redis, key: str = QUEUE) -> list[int]:
    """The numbers of the tasks waiting in the queue's list (a task's body: args, kwargs, embed)."""
    return [args[1] for args, _kwargs, _embed in waiting_bodies(client, key)]


@pytest.fixture
def redis_inits(monkeypatch: pytest.MonkeyPatch) -> list[redis.Redis]:
    """Every redis.Redis (and subclass, such as kombu's prefixed one) constructed from now on by the test's thread,
    which is the one that publishes: a daemon thread another test left behind (the API key cache's subscription,
    reconnecting to a Redis that test stopped) makes clients of its own at any moment."""
    made: list[redis.Redis] = []
    constructor = redis.Redis.__init__
    publisher = threading.get_ident()

    def counting(self: redis.Redis, *args: Any, **kwargs: Any) -> None:
        if threading.get_ident() == publisher:
            made.append(self)
        constructor(self, *args, **kwargs)

    monkeypatch.setattr(redis.Redis, "__init__", counting)
    return made


@pytest.mark.parametrize("ahead", [False, True])
def test_a_job_message_is_the_one_send_task_makes(
    redis_server: EmbeddedRedis, make_app: Callable[..., Celery], ahead: bool
) -> None:
    """``inference.dispatch.publish_run`` leaves out ``send_task``'s routing and settings lookups, not anything a worker
    reads: the same envelope, headers, properties and body, but for the ids every message has of its own and the reply
    queue. A message sent ahead of its job's commit says when it was sent."""
    app = make_app(redis_server.url)
    reader = redis.Redis.from_url(redis_server.url)
    before = time.time()
    dispatch.publish_run("job-1", 2, QUEUE, ahead=ahead, app=app)
    (arguments, keywords, _embed) = waiting_bodies(reader)[0]
    assert arguments == ["job-1", 2]
    if ahead:
        assert list(keywords) == ["ahead"]
        assert before <= keywords["ahead"] <= time.time()
    else:
        assert keywords == {}
    app.send_task(TASK, args=arguments, kwargs=keywords, queue=QUEUE, retry=False, ignore_result=True)
    published, sent = (json.loads(raw) for raw in reversed(reader.lrange(QUEUE, 0, -1)))
    for message in (published, sent):
        message_id = message["headers"]["id"]
        assert message["headers"]["root_id"] == message["properties"]["correlation_id"] == message_id
        message["headers"].update(id="an id", root_id="an id")
        message["properties"].update(correlation_id="an id", delivery_tag="a tag")
    # No reply queue named: no result is asked for (send_task names the app's, results or not).
    assert published["properties"].pop("reply_to") == ""
    sent["properties"].pop("reply_to")
    assert published == sent


def test_the_platform_app_takes_the_shared_client_transport_for_redis_urls_only() -> None:
    """Chosen from the URL each connection is made from (so a ``memory://`` or ``-b`` override is kombu's own)."""
    transports = {
        url: platform_app.connection_for_write(url).get_transport_cls()
        for url in ("redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0", "memory://", "sentinel://127.0.0.1:1")
    }
    assert transports == {
        "redis://127.0.0.1:1/0": broker.Transport,
        "rediss://127.0.0.1:1/0": broker.Transport,
        "memory://": kombu.transport.memory.Transport,
        "sentinel://127.0.0.1:1": kombu.transport.redis.SentinelTransport,
    }
    # The connections Celery's pools make from it copy the transport, not the URL.
    with platform_app.connection_for_write("redis://127.0.0.1:1/0").Pool(limit=1).acquire() as pooled:
        assert pooled.get_transport_cls() is broker.Transport


@pytest.mark.parametrize("global_keyprefix", ["", "gm-broker-test:"])
def test_publishing_makes_no_redis_client_per_message_and_every_message_arrives_in_order(
    redis_server: EmbeddedRedis,
    make_app: Callable[..., Celery],
    redis_inits: list[redis.Redis],
    global_keyprefix: str,
) -> None:
    app = make_app(redis_server.url, global_keyprefix=global_keyprefix)
    send(app, 0)  # the connection, its channel and their clients are made here, once
    made_before = len(redis_inits)
    for number in range(1, 51):
        send(app, number)
    assert len(redis_inits) == made_before  # kombu's stock channel makes one redis.Redis per message: 50 here
    client = publishing_client(app)
    assert getattr(client, "global_keyprefix", "") == global_keyprefix  # kombu's prefixing client, when asked for

    reader = redis.Redis.from_url(redis_server.url)
    assert sent_numbers(reader, global_keyprefix + QUEUE) == list(range(51))
    if global_keyprefix:
        assert not reader.exists(QUEUE)


@pytest.mark.slow
@pytest.mark.parametrize("publish_while_down", [False, True], ids=["restarted-between", "publish-while-down"])
def test_a_killed_and_restarted_redis_takes_the_next_publish(
    redis_server: EmbeddedRedis, make_app: Callable[..., Celery], publish_while_down: bool
) -> None:
    """The reused client reconnects through its pool; a publish while Redis is down fails at once, as before
    (inference/dispatch.py then leaves the job QUEUED for the sweep), and the next one after it is back works."""
    app = make_app(redis_server.url)
    send(app, 0)
    client = publishing_client(app)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGKILL)
    redis_server.process.wait(10)
    if publish_while_down:
        with pytest.raises(OperationalError):
            send(app, 1)
    redis_server.start()  # same port and password, empty: message 0 is lost with it

    send(app, 2)
    if not publish_while_down:
        assert publishing_client(app) is client  # the same channel and client, over a new connection from its pool
    assert sent_numbers(redis.Redis.from_url(redis_server.url)) == [2]


def _publish_in_forked_child(channel: Any, parent_client: Any, report: Any) -> None:
    # multiprocessing has run kombu's after-fork hook (Channel._after_fork) before this target.
    dropped = channel._pool_client is None and channel._pool is None
    Producer(channel).publish({"from": "child"}, routing_key=QUEUE, exchange="", serializer="json", retry=False)
    child_client = channel._pool_client
    report.put(
        {
            "dropped": dropped,
            "new_client": child_client is not None and child_client is not parent_client,
            "over_its_pool": child_client.connection_pool is channel._pool,
        }
    )


def test_a_forked_child_publishes_through_a_client_of_its_own(
    redis_server: EmbeddedRedis, make_app: Callable[..., Celery]
) -> None:
    """kombu disconnects a channel's pool in a forked child (its after-fork hook); the client over it goes too."""
    app = make_app(redis_server.url)
    reader = redis.Redis.from_url(redis_server.url)
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        producer = Producer(channel)
        publish = {"routing_key": QUEUE, "exchange": "", "serializer": "json", "retry": False}
        producer.publish({"from": "parent"}, declare=[Queue(QUEUE)], **publish)
        parent_client = channel._pool_client
        assert parent_client is not None

        context = multiprocessing.get_context("fork")
        report = context.Queue()
        child = context.Process(target=_publish_in_forked_child, args=(channel, parent_client, report))
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert report.get(timeout=5) == {"dropped": True, "new_client": True, "over_its_pool": True}

        # The child closed its copies of the parent's sockets, not the parent's connections.
        producer.publish({"from": "parent again"}, **publish)
        assert channel._pool_client is parent_client
    assert waiting_bodies(reader) == [{"from": "parent"}, {"from": "child"}, {"from": "parent again"}]


# TLS: kombu reads a rediss:// URL's TLS options (or gives a bare one its default) before the transport is chosen.


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS on loopback, with a certificate from a CA of the test's own."""
    ca = trustme.CA()
    certificate = ca.issue_cert("127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_file))
    certificate.cert_chain_pems[0].write_to_path(str(cert_file))
    certificate.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    log_file = tmp_path / "redis.log"
    with log_file.open("wb") as log:
        process = subprocess.Popen(
            [redis_server_executable(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
             "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file), "--tls-ca-cert-file", str(ca_file),
             "--tls-auth-clients", "no", "--save", "", "--appendonly", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca_file))
    try:

        def answers() -> bool:
            if process.poll() is not None:
                pytest.skip(f"this redis-server does not serve TLS: {log_file.read_text(errors='replace')[-300:]}")
            return bool(client.ping())

        wait_until(answers, timeout=15, interval=0.02, ignoring=(redis.RedisError,), message="redis-server over TLS")
        yield port, ca_file
    finally:
        client.close()
        process.kill()
        process.wait(10)


@pytest.mark.parametrize("verified", [False, True], ids=["bare-rediss", "rediss-with-ca"])
def test_a_rediss_url_still_publishes_over_tls(
    tls_redis: tuple[int, Path], make_app: Callable[..., Celery], redis_inits: list[redis.Redis], verified: bool
) -> None:
    port, ca_file = tls_redis
    url = f"rediss://127.0.0.1:{port}/0"
    if verified:
        url += f"?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"
    app = make_app(url)
    send(app, 0)
    made_before = len(redis_inits)
    for number in range(1, 11):
        send(app, number)
    assert len(redis_inits) == made_before
    client = publishing_client(app)
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    expected = ssl.CERT_REQUIRED if verified else ssl.CERT_NONE  # a bare rediss:// gets kombu's own default
    assert pool.connection_kwargs["ssl_cert_reqs"] == expected
    reader = redis.Redis(host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=str(ca_file))
    assert sent_numbers(reader) == list(range(11))
