"""The production process types as real processes on this machine, each started through the image's entrypoint
(deploy/entrypoint.sh) with its own data directory, as a container would be: the harness of the PgBouncer and the
multi-process tests. Also a PgBouncer of their own, from the configuration the Kubernetes component ships.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.rows import dict_row

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
PGBOUNCER_INI = ROOT / "deploy" / "k8s" / "components" / "pgbouncer" / "pgbouncer.ini"
# What the test process itself set (tests/conftest.py, the developer's shell) that a platform process must not
# inherit: each gets the environment a pod would.
INHERITED_SETTINGS = (
    "DATABASE_URL", "REDIS_URL", "BROKER_URL", "PLATFORM_DATA_DIR", "STATIC_MANIFEST", "CACHE_KEY_PREFIX",
    "DATABASE_TRANSACTION_POOLING", "PUBLIC_BASE_URL", "METRICS_TOKEN", "OUTPUT_BUCKET",
)  # fmt: skip
# Short leases and sweeps, so a test sees the lifecycle's timers act within seconds.
FAST_LIFECYCLE = {
    "JOB_LEASE_SECONDS": "5",
    "JOB_HEARTBEAT_MS": "500",
    "JOB_SWEEP_SECONDS": "2",
    "JOB_REDISPATCH_AFTER_SECONDS": "10",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def database_url(**overrides: Any) -> str:
    """The test database's URL (pytest-django's), with ``host``/``port``/``password`` replaced."""
    from django.db import connection

    params = {**connection.settings_dict}
    user = params.get("USER") or "postgres"
    password = overrides.get("password", params.get("PASSWORD") or "")
    host = overrides.get("host", params.get("HOST") or "127.0.0.1")
    port = overrides.get("port", params.get("PORT") or 5432)
    auth = f"{user}:{password}" if password else user
    return f"postgres://{auth}@{host}:{port}/{params['NAME']}"


@dataclass
class Platform:
    """Processes of the platform, each in its own data directory under ``folder``, logs beside them."""

    folder: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, *args: str, **env: str) -> None:
        """``deploy/entrypoint.sh args...`` as the pod ``name``, in its own data directory."""
        data_dir = self.folder / name
        data_dir.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{name}.log"
        self.logs[name] = log
        process_env = {**self.env, "PLATFORM_DATA_DIR": str(data_dir), **env}
        self.processes[name] = subprocess.Popen(
            [str(ENTRYPOINT), *args],
            env=process_env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_web(self, name: str, port: int, **env: str) -> str:
        """A web pod: gunicorn with one uvicorn worker (WEB_CONCURRENCY) on ``port``; returns its base URL."""
        self.start(name, "web", **{"BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1", **env})
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: self.running(name) and httpx.get(f"{base}/healthz", timeout=5).status_code == 200,
            timeout=90,
            message=lambda: f"{name} to answer /healthz\n{self.log_tail(name)}",
            ignoring=(httpx.TransportError,),
            interval=0.2,
        )
        return base

    def running(self, name: str) -> bool:
        """True while the process runs; fails the test at once, with its log, if it has exited."""
        code = self.processes[name].poll()
        assert code is None, f"{name} exited with {code}\n{self.log_tail(name)}"
        return True

    def all_running(self) -> bool:
        return all(self.running(name) for name in self.processes)

    def worker_ready(self, name: str) -> bool:
        """A Celery worker has connected and consumes (its log says `ready.`)."""
        return self.running(name) and " ready." in self.logs[name].read_text(errors="replace")

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    def stop_all(self) -> None:
        for name in reversed(list(self.processes)):
            self.stop(name)

    def log_tail(self, name: str, lines: int = 60) -> str:
        return f"--- {name} ---\n" + "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])

    def all_logs(self, lines: int = 30) -> str:
        return "\n".join(self.log_tail(name, lines) for name in self.logs)


def base_env(**settings: str) -> dict[str, str]:
    """The environment of a platform pod on this machine: the suite's PATH and PYTHONPATH (the image has
    /opt/venv/bin first), production defaults otherwise, and ``settings``."""
    env = {name: value for name, value in os.environ.items() if name not in INHERITED_SETTINGS}
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        STATIC_MANIFEST="0",  # no collectstatic in the tests (the image collects at build time)
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO",
        ALLOWED_HOSTS="127.0.0.1,localhost",
        SECURE_COOKIES="0",
        SECURE_HSTS_SECONDS="0",
        OUTBOUND_ALLOW_PRIVATE="1",
        **FAST_LIFECYCLE,
    )
    env.update(settings)
    return env


@contextmanager
def platform(folder: Path, env: dict[str, str]) -> Iterator[Platform]:
    running = Platform(folder=folder, env=env)
    try:
        yield running
    finally:
        running.stop_all()


# PgBouncer.


def pgbouncer_executable() -> str | None:
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )


@dataclass
class PgBouncer:
    port: int
    password: str
    process: subprocess.Popen[bytes]
    log: Path

    def admin(self, command: str) -> list[dict[str, Any]]:
        """A command of PgBouncer's admin console (SHOW POOLS, SHOW STATS...), as rows."""
        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            dbname="pgbouncer",
            user="postgres",
            password=self.password,
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,  # the console speaks the simple query protocol only
            row_factory=dict_row,
        ) as connection:
            return list(connection.execute(command).fetchall())


@contextmanager
def running_pgbouncer(folder: Path, *, upstream_port: int, pool_size: int) -> Iterator[PgBouncer]:
    """PgBouncer with the Kubernetes component's pgbouncer.ini (deploy/k8s/components/pgbouncer), changed only where
    this machine differs: loopback and a free port, the Secret's files in ``folder``, a pool of ``pool_size`` server
    connections per database (small, so the platform's clients keep changing server connections), and the test as a
    stats user of the admin console."""
    executable = pgbouncer_executable()
    assert executable, "pgbouncer is not installed"
    command, own_folder = [executable], False
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root (CI containers often are): it runs as nobody, which must read its files.
        command = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", executable]
        folder, own_folder = Path(tempfile.mkdtemp(prefix="pgbouncer-")), True
        folder.chmod(0o755)
    folder.mkdir(parents=True, exist_ok=True)
    port, password = free_port(), "pgbouncer-test"
    (folder / "databases.ini").write_text(f"[databases]\n* = host=127.0.0.1 port={upstream_port}\n")
    (folder / "userlist.txt").write_text(f'"postgres" "{password}"\n')
    ini = PGBOUNCER_INI.read_text().replace("/etc/pgbouncer/secret/", f"{folder}/")
    replacements = {
        "listen_addr": "127.0.0.1",
        "listen_port": str(port),
        "default_pool_size": str(pool_size),
        "min_pool_size": "0",
        "reserve_pool_size": "0",
    }
    for key, value in replacements.items():
        ini, count = re.subn(rf"^{key} = .*$", f"{key} = {value}", ini, flags=re.MULTILINE)
        assert count == 1, f"{key} is not in {PGBOUNCER_INI}"
    assert re.search(r"^pool_mode = transaction$", ini, re.MULTILINE)
    config = folder / "pgbouncer.ini"
    config.write_text(f"{ini}\nstats_users = postgres\n")
    for written in folder.iterdir():
        written.chmod(0o644)  # a test password, readable by the user PgBouncer runs as
    log = folder / "pgbouncer.log"
    process = subprocess.Popen([*command, str(config)], stdout=log.open("ab"), stderr=subprocess.STDOUT)
    bouncer = PgBouncer(port=port, password=password, process=process, log=log)
    try:

        def accepting() -> bool:
            assert process.poll() is None, f"pgbouncer exited:\n{log.read_text(errors='replace')}"
            return bool(bouncer.admin("SHOW VERSION"))

        wait_until(
            accepting,
            timeout=30,
            message=lambda: f"pgbouncer to accept connections\n{log.read_text(errors='replace')}",
            ignoring=(psycopg.OperationalError,),
            interval=0.1,
        )
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)


# A load balancer.


class RoundRobinProxy:
    """A TCP load balancer on loopback: each new connection goes to the next backend in turn (as a Service's
    kube-proxy or an ingress would spread them), bytes copied both ways. Counts the connections each backend got."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self.connections = [0] * len(backends)
        self._turn = itertools.cycle(range(len(backends)))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="round-robin-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    def __enter__(self) -> RoundRobinProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        index = next(self._turn)
        self.connections[index] += 1
        host, port = self.backends[index]
        try:
            backend_reader, backend_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, backend_writer), _pipe(backend_reader, client_writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
