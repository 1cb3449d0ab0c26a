"""The platform as it runs: an HTTPS ASGI server and real Celery workers, against the test database.

fal's official client reads its hosts from the environment when it is imported, so the port and
the trust store are chosen here, at collection time, before any test imports ``fal_client``.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from config.embedded_process import free_port
from config.embedded_redis import EmbeddedRedis
from tests.stack_processes import celery_processes
from tests.stripe_support import PUBLISHABLE_KEY, SECRET_KEY, WEBHOOK_SECRET, FakeStripe, running_fake_stripe
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]


PORT = free_port()
CERT_DIR = Path(tempfile.mkdtemp(prefix="e2e-tls-"))
_ca = trustme.CA()
_ca.cert_pem.write_to_path(str(CERT_DIR / "ca.pem"))
_server_cert = _ca.issue_cert("127.0.0.1", "localhost")
_server_cert.private_key_pem.write_to_path(str(CERT_DIR / "server.key"))
_server_cert.cert_chain_pems[0].write_to_path(str(CERT_DIR / "server.pem"))
for extra in _server_cert.cert_chain_pems[1:]:
    with open(CERT_DIR / "server.pem", "ab") as chain:
        chain.write(extra.bytes())

BASE_URL = f"https://127.0.0.1:{PORT}"
os.environ["FAL_RUN_HOST"] = f"127.0.0.1:{PORT}/run"
os.environ["FAL_QUEUE_RUN_HOST"] = f"127.0.0.1:{PORT}/queue"
os.environ["SSL_CERT_FILE"] = str(CERT_DIR / "ca.pem")


def database_url() -> str:
    from django.db import connection

    params = connection.settings_dict
    if params["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{params['NAME']}"
    user = params.get("USER") or "postgres"
    password = f":{params['PASSWORD']}" if params.get("PASSWORD") else ""
    return (
        f"postgres://{user}{password}@{params.get('HOST') or '127.0.0.1'}:{params.get('PORT') or 5432}/{params['NAME']}"
    )


@dataclass
class Stack:
    env: dict[str, str]
    data_dir: Path
    # A private redis-server, the one the embedded run starts (config/embedded_redis.py), as the broker:
    # a test can take it down and bring it back (same port, no persistence: its messages are lost).
    broker: EmbeddedRedis
    stripe: FakeStripe
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    base_url = BASE_URL
    ca_file = str(CERT_DIR / "ca.pem")

    def _start(self, name: str, argv: list[str]) -> None:
        log = self.data_dir / f"{name}.log"
        self.logs[name] = log
        self.processes[name] = subprocess.Popen(
            argv, cwd=REPO, env=self.env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_web(self) -> None:
        self._start(
            "web",
            [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(PORT),
             "--ssl-keyfile", str(CERT_DIR / "server.key"), "--ssl-certfile", str(CERT_DIR / "server.pem"),
             "--no-access-log"],
        )  # fmt: skip
        wait_until(
            lambda: self.running("web") and self.healthy(),
            timeout=60,
            message=lambda: f"the web server to answer /healthz\n{self.log_tail('web')}",
            ignoring=(httpx.TransportError,),
        )

    def healthy(self) -> bool:
        with self.client() as client:
            return client.get("/healthz").status_code == 200

    def running(self, name: str) -> bool:
        """True while the process runs; fails the test at once if it has exited."""
        returncode = self.processes[name].poll()
        assert returncode is None, f"{name} exited with {returncode}\n{self.log_tail(name)}"
        return True

    def start_gpu_worker(self) -> None:
        self._start("gpu", celery_processes(self.beat_schedule)["gpu"])

    def start_housekeeping(self) -> None:
        """The housekeeping worker with beat inside it, on a schedule of its own: a beat that starts sends every
        interval task at once, as production's (whose schedule file is lost with its pod)."""
        for stale in self.data_dir.glob(f"{self.beat_schedule.name}*"):
            stale.unlink()
        self._start("housekeeping", celery_processes(self.beat_schedule)["housekeeping"])

    @property
    def beat_schedule(self) -> Path:
        return self.data_dir / "beat-schedule"

    def kill(self, name: str) -> None:
        """SIGKILL the process and its children (the prefork pool), as a crashed machine would."""
        process = self.processes.pop(name)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None:
            return
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)

    @contextmanager
    def paused(self, name: str) -> Iterator[None]:
        """The process and its children stopped (SIGSTOP) until the block ends, then continued: a worker that
        takes no message meanwhile. Keep it shorter than a lease (JOB_LEASE_SECONDS) if it holds a job."""
        process = self.processes[name]
        os.killpg(process.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.killpg(process.pid, signal.SIGCONT)

    @contextmanager
    def restarted(self, *names: str, **env: str | None) -> Iterator[Stack]:
        """The processes ``names`` (the server and both workers if none) restarted with ``env`` over the stack's
        environment (None removes a variable), and restarted as they were afterwards: e.g.
        ``REDIS_URL=stack.broker.url`` runs the cache on the broker's Redis, as production does."""
        previous = {variable: self.env.get(variable) for variable in env}
        starts = {"web": self.start_web, "housekeeping": self.start_housekeeping, "gpu": self.start_gpu_worker}
        chosen = [name for name in starts if not names or name in names]

        def restart_with(values: dict[str, str | None]) -> None:
            for name in reversed(chosen):
                self.stop(name)
            for variable, value in values.items():
                if value is None:
                    self.env.pop(variable, None)
                else:
                    self.env[variable] = value
            for name in chosen:
                starts[name]()

        restart_with(env)
        try:
            yield self
        finally:
            restart_with(previous)

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Key {key}"} if key else {}
        return httpx.Client(base_url=BASE_URL, verify=self.ssl_context(), headers=headers, timeout=60)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)

    def log_tail(self, name: str, lines: int = 60) -> str:
        return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def running_stack(django_db_blocker: Any) -> Iterator[Stack]:
    """The server and both workers against the test database; the session's ``stack`` fixture
    (tests/conftest.py, so that the e2e and browser tests share one) holds it open."""
    data_dir = Path(os.environ["PLATFORM_DATA_DIR"])
    with django_db_blocker.unblock():
        url = database_url()
    broker = EmbeddedRedis(data_dir)
    with running_fake_stripe() as fake_stripe:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "PLATFORM_DATA_DIR": str(data_dir),
            "PUBLIC_BASE_URL": BASE_URL,
            "OUTBOUND_ALLOW_PRIVATE": "1",
            "JOB_LEASE_SECONDS": "3",
            "JOB_HEARTBEAT_MS": "200",
            "JOB_SWEEP_SECONDS": "1",
            "JOB_REDISPATCH_AFTER_SECONDS": "2",
            "SYNC_RUN_TIMEOUT_SECONDS": "300",
            "DATABASE_POOL_MAX_SIZE": "4",
            "LOG_LEVEL": "INFO",
            "PYTHONUNBUFFERED": "1",
            # Payments against the fake Stripe, whose webhooks the tests deliver to the server.
            "STRIPE_SECRET_KEY": SECRET_KEY,
            "STRIPE_PUBLISHABLE_KEY": PUBLISHABLE_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_API_BASE": fake_stripe.url,
        }
        broker.start()
        env["BROKER_URL"] = broker.url
        stack = Stack(env=env, data_dir=data_dir, broker=broker, stripe=fake_stripe)
        try:
            stack.start_web()
            stack.start_housekeeping()
            stack.start_gpu_worker()
            yield stack
        finally:
            for name in list(stack.processes):
                stack.stop(name)
            broker.stop()


@pytest.fixture
def e2e_tenant(stack: Stack, transactional_db: None) -> dict[str, Any]:
    """A developer, their organization and an inference key, committed so the server sees them."""
    from accounts.models import Organization, Scope
    from accounts.services import create_api_key, sign_up
    from inference.catalog import ensure_builtin_endpoints
    from inference.models import Endpoint

    ensure_builtin_endpoints(Endpoint)
    user = sign_up(email=f"e2e-{os.urandom(4).hex()}@example.com", password=None)
    organization = Organization.objects.get(memberships__user=user)
    _, key = create_api_key(
        organization=organization, name="e2e", scopes=[Scope.INFERENCE, Scope.USAGE_READ], created_by=user
    )
    return {"user": user, "organization": organization, "key": key}
