"""The demo account and the embedded run (README's first command): one machine, no services."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError
from django.test import Client
from rest_framework.test import APIClient

from accounts.management.commands import runplatform
from accounts.models import Organization, Scope, User
from config.embedded_process import free_port
from config.embedded_redis import EmbeddedRedis
from config.embedded_stripe import EmbeddedStripe
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
# What tests/conftest.py or CI may have set: the embedded run must work with none of it.
SETTINGS_VARIABLES = (
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "DEBUG",
    "PLATFORM_DATA_DIR",
    "DATABASE_URL",
    "REDIS_URL",
    "BROKER_URL",
    "ALLOWED_HOSTS",
    "CACHE_KEY_PREFIX",
    "STATIC_MANIFEST",
    "CELERY_BROKER_URL",
    "HOST",
    "PORT",
)
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 20


@pytest.fixture
def demo_data_dir(settings: Any, tmp_path: Path) -> Path:
    settings.DATA_DIR = tmp_path
    return tmp_path


def bootstrap_json() -> dict[str, str]:
    out = StringIO()
    call_command("bootstrap_demo", "--json", stdout=out)
    credentials: dict[str, str] = json.loads(out.getvalue())
    return credentials


@pytest.mark.django_db
def test_bootstrap_demo_prints_the_same_credentials_every_time(demo_data_dir: Path) -> None:
    first = bootstrap_json()
    assert set(first) == {
        "organization",
        "developer_email",
        "developer_password",
        "operator_email",
        "operator_password",
        "api_key",
    }
    assert bootstrap_json() == first
    assert User.objects.count() == 2
    assert Organization.objects.count() == 1
    stored = demo_data_dir / "demo_credentials.json"
    assert json.loads(stored.read_text()) == first
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600


@pytest.mark.django_db
def test_the_demo_key_acts_for_the_demo_organization_with_every_scope(demo_data_dir: Path) -> None:
    credentials = bootstrap_json()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {credentials['api_key']}")
    response = client.get("/v1/me")
    assert response.status_code == 200, response.content
    me = response.json()
    assert sorted(me["api_key"]["scopes"]) == sorted(Scope.values)
    assert me["organization"]["slug"] == credentials["organization"]
    assert me["user"]["email"] == credentials["developer_email"]
    assert client.get("/v1/keys").status_code == 200  # the admin scope works


@pytest.mark.django_db
def test_the_demo_people_log_in_with_the_printed_passwords(demo_data_dir: Path) -> None:
    credentials = bootstrap_json()
    assert Client().login(email=credentials["developer_email"], password=credentials["developer_password"])
    assert Client().login(email=credentials["operator_email"], password=credentials["operator_password"])
    developer = User.objects.get(email=credentials["developer_email"])
    assert not developer.is_staff
    assert not developer.is_superuser
    operator = User.objects.get(email=credentials["operator_email"])
    assert operator.is_superuser
    assert operator.is_staff


@pytest.mark.django_db
def test_bootstrap_demo_starts_over_when_the_database_lost_the_demo(demo_data_dir: Path) -> None:
    first = bootstrap_json()
    User.objects.filter(email=first["developer_email"]).delete()
    second = bootstrap_json()
    assert second["api_key"] != first["api_key"]
    assert Client().login(email=second["developer_email"], password=second["developer_password"])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Key {second['api_key']}")
    assert client.get("/v1/me").status_code == 200


@pytest.mark.django_db
def test_bootstrap_demo_prints_readable_credentials(demo_data_dir: Path) -> None:
    out = StringIO()
    call_command("bootstrap_demo", stdout=out)
    credentials = json.loads((demo_data_dir / "demo_credentials.json").read_text())
    text = out.getvalue()
    for value in credentials.values():
        assert value in text


# The real embedded run, as a subprocess.


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS_VARIABLES}
    env.update(PLATFORM_EMBEDDED="1", PLATFORM_DATA_DIR=str(data_dir))
    return env


def live_processes() -> Iterator[tuple[int, int, int, str]]:
    """pid, parent pid, process group and command line of every live process (Linux's /proc; no zombies)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it ended while we looked
        if fields[0] != "Z":
            yield int(entry.name), int(fields[1]), int(fields[2]), cmdline


def process_group(pgid: int) -> dict[int, str]:
    """Live members of a process group, pid to command line."""
    return {pid: cmdline for pid, _, group, cmdline in live_processes() if group == pgid}


def children(pid: int) -> dict[int, str]:
    return {child: cmdline for child, parent, _, cmdline in live_processes() if parent == pid}


def environment(pid: int) -> dict[str, str]:
    variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in variables if item)


def is_alive(pid: int) -> bool:
    return any(live == pid for live, _, _, _ in live_processes())


class EmbeddedRun:
    def __init__(self, process: subprocess.Popen[bytes], port: int, data_dir: Path, log: Path) -> None:
        self.process = process
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.data_dir = data_dir
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        """True while runplatform runs; fails the test at once if it has exited."""
        if self.process.poll() is not None:
            pytest.fail(f"runplatform exited with {self.process.returncode}:\n{self.log_text()}")
        return True

    def wait_until_ready(self) -> dict[str, Any]:
        def readiness() -> dict[str, Any] | None:
            self.running()
            response = httpx.get(f"{self.base_url}/readyz", timeout=2)
            return dict(response.json()) if response.status_code == 200 else None

        return wait_until(
            readiness,
            timeout=START_TIMEOUT_SECONDS,
            interval=0.25,
            ignoring=(httpx.TransportError,),
            message=lambda: f"/readyz to answer 200\n{self.log_text()}",
        )

    def api_client(self) -> httpx.Client:
        credentials = json.loads((self.data_dir / "demo_credentials.json").read_text())
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Key {credentials['api_key']}"}, timeout=10
        )

    def redis_server(self) -> int:
        """The pid of the redis-server the run started (in a session of its own, so not in its group)."""

        def server() -> int | None:
            self.running()
            servers = [pid for pid, command in children(self.process.pid).items() if "redis-server" in command]
            assert len(servers) <= 1, servers
            return servers[0] if servers else None

        return wait_until(
            server,
            timeout=START_TIMEOUT_SECONDS,
            message=lambda: f"a redis-server under runplatform\n{self.log_text()}",
        )

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT_SECONDS)


@pytest.fixture
def start_embedded(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(
        *extra: str,
        redis_url: str | None = None,
        port: int | None = None,
        data_dir: Path | None = None,
        **variables: str,
    ) -> EmbeddedRun:
        port = port or free_port()
        data_dir = data_dir or tmp_path
        env = embedded_env(data_dir)
        if redis_url:
            env["REDIS_URL"] = redis_url
        env.update(variables)
        log = tmp_path / f"runplatform-{len(started)}.log"
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "runplatform",
                    "--port",
                    str(port),
                    "--tls-port",
                    str(free_port()),
                    *extra,
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the cleanup below reaches the whole tree
            )
        started.append(process)
        return EmbeddedRun(process, port, data_dir, log)

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_SECONDS)


def assert_serves_the_api(run: EmbeddedRun) -> None:
    with run.api_client() as client:
        me = client.get("/v1/me")
        assert me.status_code == 200, me.text
        assert me.json()["api_key"]["scopes"] == sorted(Scope.values)
        docs = client.get("/v1/docs")
        assert docs.status_code == 200
        # The docs' scripts are served by the app itself from the collected, hashed static files.
        scripts = re.findall(r'<script[^>]+src="([^"]+)"', docs.text)
        assert scripts
        for src in scripts:
            assert client.get(src).status_code == 200, src


def assert_group_ends(pgid: int) -> None:
    wait_until(
        lambda: process_group(pgid) == {},
        timeout=5,
        message=lambda: f"process group {pgid} to end; still there: {process_group(pgid)}",
    )


def assert_ends(pid: int) -> None:
    wait_until(lambda: not is_alive(pid), timeout=5, message=f"process {pid} to end")


def assert_children_share_its_redis(run: EmbeddedRun, *, expected: int) -> str:
    """Every process the run started holds the URL of the run's own Redis, which answers there (with its
    password only) and holds the shared cache and, when there are workers, the queues."""
    redis_pid = run.redis_server()
    served = {
        pid: command
        for pid, command in children(run.process.pid).items()
        if pid != redis_pid and "config.fake_stripe" not in command  # the fake Stripe uses no Redis
    }
    assert len(served) == expected, served
    urls = {environment(pid).get("REDIS_URL") for pid in served}
    assert len(urls) == 1, urls
    url = urls.pop()
    assert url is not None
    port = url.rpartition(":")[2].partition("/")[0]
    assert f"127.0.0.1:{port}" in children(run.process.pid)[redis_pid]  # redis-server's process title
    with redis.Redis.from_url(url) as client:
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert httpx.get(f"{run.base_url}/readyz", timeout=10).status_code == 200
        assert client.keys("*readyz"), "the web process's cache is not the run's Redis"
    with pytest.raises(redis.AuthenticationError), redis.Redis(port=int(port)) as anonymous:
        anonymous.ping()
    return url


@pytest.mark.slow
def test_embedded_web_process_serves_the_api(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded("--no-worker")
    ready = run.wait_until_ready()
    assert ready == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "cache": "ok"}}
    assert_serves_the_api(run)
    assert not any("celery" in command for command in process_group(run.process.pid).values())
    assert_children_share_its_redis(run, expected=2)  # the plain and the TLS web servers
    redis_pid = run.redis_server()
    assert run.terminate() == 0, run.log_text()
    assert_group_ends(run.process.pid)
    assert_ends(redis_pid)


@pytest.mark.slow
def test_embedded_run_starts_the_worker_and_stops_cleanly(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded()
    assert run.wait_until_ready()["status"] == "ready"
    assert_serves_the_api(run)
    wait_until(
        lambda: run.running() and re.search(r"gpu@\S+ ready\.", run.log_text()),
        timeout=START_TIMEOUT_SECONDS,
        interval=0.25,
        message=lambda: f"the worker to say it is ready\n{run.log_text()}",
    )
    commands = process_group(run.process.pid).values()
    assert any("uvicorn" in command for command in commands)
    assert sum("celery" in command and " beat " in command for command in commands) == 1  # the scheduler, once
    url = assert_children_share_its_redis(run, expected=6)  # two web servers, three workers, the scheduler
    with redis.Redis.from_url(url) as client:
        # The three workers' queues: the GPU's, the safety nets', the long batch tasks'.
        assert client.exists("_kombu.binding.cpu", "_kombu.binding.default", "_kombu.binding.batch") == 3
    redis_pid = run.redis_server()
    assert run.terminate() == 0, run.log_text()
    assert_group_ends(run.process.pid)
    assert_ends(redis_pid)


@pytest.mark.slow
def test_embedded_run_brings_its_redis_back_and_never_leaves_it_behind(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded("--no-worker")
    run.wait_until_ready()
    url = assert_children_share_its_redis(run, expected=2)
    first = run.redis_server()
    os.kill(first, signal.SIGKILL)

    port = url.rpartition(":")[2].partition("/")[0]

    def restarted_server() -> int | None:
        """The new redis-server once it serves: it sets its process title (with its port) when it has started."""
        pid = run.redis_server()
        if pid == first:
            return None
        return pid if f"127.0.0.1:{port}" in children(run.process.pid).get(pid, "") else None

    second = wait_until(
        restarted_server,
        timeout=START_TIMEOUT_SECONDS,
        message=lambda: f"a new redis-server under runplatform\n{run.log_text()}",
    )
    # Back on the same port with the same password: the URL every process holds still works.
    assert assert_children_share_its_redis(run, expected=2) == url
    assert "Redis exited with -9; starting it again" in run.log_text()
    assert run.process.poll() is None
    # A run killed outright (no chance to stop anything) takes its Redis with it.
    os.killpg(run.process.pid, signal.SIGKILL)
    run.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    assert_ends(second)


def child_of(run: EmbeddedRun, role: str) -> int | None:
    """The pid of the run's own process whose command line holds ``role`` (one at most), None if there is none."""
    run.running()
    found = [pid for pid, command in children(run.process.pid).items() if role in command]
    assert len(found) <= 1, found
    return found[0] if found else None


def orphans(run: EmbeddedRun) -> dict[int, str]:
    """Members of the run's process group that lost their parent: left behind by a process that died."""
    members = {pid: parent for pid, parent, group, _ in live_processes() if group == run.process.pid}
    return {
        pid: command
        for pid, command in process_group(run.process.pid).items()
        if pid != run.process.pid and members.get(pid) not in members
    }


@pytest.mark.slow
def test_embedded_run_starts_again_a_process_killed_and_leaves_nothing_of_it_behind(start_embedded: Any) -> None:
    """A worker, the scheduler or the web server killed outright used to stop the whole run (and a housekeeping
    worker killed took its scheduler's parent away: that scheduler ran on beside the new one's, and after the run)."""
    run: EmbeddedRun = start_embedded()
    run.wait_until_ready()
    roles = {"gpu worker": "gpu@", "housekeeping worker": "housekeeping@", "beat": " beat "}
    roles["web"] = f"--port {run.port} "
    for name, role in roles.items():
        first = wait_until(
            lambda role=role: child_of(run, role), timeout=START_TIMEOUT_SECONDS, message=f"the run's {name}"
        )
        os.kill(first, signal.SIGKILL)
        wait_until(
            lambda role=role, first=first: child_of(run, role) not in (None, first),
            timeout=START_TIMEOUT_SECONDS,
            message=lambda name=name: f"the {name} to be started again\n{run.log_text()}",
        )
        assert f"runplatform: {name} exited with -9; starting it again" in run.log_text()
    run.wait_until_ready()
    with run.api_client() as client:
        assert client.get("/v1/me").status_code == 200
    wait_until(
        lambda: not orphans(run), timeout=STOP_TIMEOUT_SECONDS, message=lambda: f"no orphans; still: {orphans(run)}"
    )
    assert sum(" beat " in command for command in process_group(run.process.pid).values()) == 1
    assert run.terminate() == 0, run.log_text()
    assert_group_ends(run.process.pid)


@pytest.mark.slow
def test_a_second_run_on_the_same_data_directory_or_port_refuses_to_start(start_embedded: Any, tmp_path: Path) -> None:
    """A second run over the same SQLite file used to start: a second Redis, a second scheduler, rate limits and key
    revocations that one run's processes never heard of."""
    run: EmbeddedRun = start_embedded("--no-worker")
    run.wait_until_ready()
    same_data = start_embedded("--no-worker")
    assert same_data.process.wait(timeout=START_TIMEOUT_SECONDS) == 1
    assert f"another run (runplatform pid {run.process.pid}) is using the data directory" in same_data.log_text()
    same_port = start_embedded("--no-worker", port=run.port, data_dir=tmp_path / "other")
    assert same_port.process.wait(timeout=START_TIMEOUT_SECONDS) == 1
    assert f"port {run.port} on 127.0.0.1 is in use by another process" in same_port.log_text()
    assert httpx.get(f"{run.base_url}/readyz", timeout=10).status_code == 200
    assert run.terminate() == 0, run.log_text()


@pytest.mark.slow
def test_embedded_run_stops_everything_on_sighup_and_nothing_outlives_it_killed(start_embedded: Any) -> None:
    """SIGHUP (a closed terminal) used to end the run's own process only, and a run killed on its own left its web
    servers and the fake Stripe running, holding the port: the next start failed."""
    run: EmbeddedRun = start_embedded("--no-worker")
    run.wait_until_ready()
    redis_pid = run.redis_server()
    run.process.send_signal(signal.SIGHUP)
    assert run.process.wait(timeout=STOP_TIMEOUT_SECONDS) == 0, run.log_text()
    assert_group_ends(run.process.pid)
    assert_ends(redis_pid)
    # Again at once, on the same port and data directory; then the run alone killed outright.
    again: EmbeddedRun = start_embedded("--no-worker", port=run.port)
    again.wait_until_ready()
    started = children(again.process.pid)
    assert len(started) == 4, started  # Redis, the fake Stripe, the two web servers
    os.kill(again.process.pid, signal.SIGKILL)
    again.process.wait(timeout=STOP_TIMEOUT_SECONDS)
    for pid in started:
        assert_ends(pid)
    assert_group_ends(again.process.pid)


@pytest.mark.slow
def test_embedded_run_uses_a_redis_it_is_given_instead_of_starting_one(start_embedded: Any, tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "given") as given:
        run: EmbeddedRun = start_embedded("--no-worker", redis_url=given.url)
        run.wait_until_ready()
        assert_serves_the_api(run)
        started = children(run.process.pid)
        assert not any("redis-server" in command for command in started.values()), started
        assert {environment(pid).get("REDIS_URL") for pid in started} == {given.url}
        assert httpx.get(f"{run.base_url}/readyz", timeout=10).status_code == 200
        with redis.Redis.from_url(given.url) as client:
            assert client.keys("*readyz")  # the web process's cache
        assert run.terminate() == 0, run.log_text()
        assert given.alive()  # not the run's to stop


# Payments in the embedded run: a fake Stripe without a key, nothing fake with one.


@pytest.mark.slow
def test_embedded_run_without_a_stripe_key_pays_against_a_fake_stripe_in_test_mode(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded("--no-worker")
    run.wait_until_ready()
    [fake] = [pid for pid, command in children(run.process.pid).items() if "config.fake_stripe" in command]
    [web] = [
        pid for pid, command in children(run.process.pid).items() if "uvicorn" in command and "--ssl" not in command
    ]
    settings = environment(web)
    assert settings["STRIPE_FAKE"] == "1"
    assert settings["STRIPE_SECRET_KEY"].startswith("sk_test_fake_")
    assert settings["STRIPE_API_BASE"].startswith("http://127.0.0.1:")
    assert "Payments: TEST MODE, against a fake Stripe (localstripe)" in run.log_text()
    with run.api_client() as client:
        cards = client.get("/v1/billing/payment-methods")
        assert cards.status_code == 200, cards.text  # payments are on
        assert cards.json()["publishable_key"] == "pk_test_fake"
    assert "a fake Stripe running on this machine" in httpx.get(f"{run.base_url}/auth/login", timeout=10).text
    assert run.terminate() == 0, run.log_text()
    assert_ends(fake)


@pytest.mark.slow
def test_embedded_run_with_a_stripe_key_starts_nothing_fake(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded("--no-worker", STRIPE_SECRET_KEY="sk_test_given_by_the_developer")
    run.wait_until_ready()
    started = children(run.process.pid)
    assert not any("config.fake_stripe" in command for command in started.values()), started
    assert all("STRIPE_FAKE" not in environment(pid) for pid in started)
    assert "fake Stripe" not in run.log_text()
    login = httpx.get(f"{run.base_url}/auth/login", timeout=10).text
    assert "payments go to Stripe in test mode" in login
    assert "fake Stripe" not in login
    assert run.terminate() == 0, run.log_text()


@pytest.mark.slow
def test_the_fake_stripe_keeps_its_customers_when_it_is_started_again(tmp_path: Path) -> None:
    """A fake that came back empty (its process killed and started again, or the run restarted) forgot the customer
    the database names for the organization, and every purchase after that was refused (400 payment_refused)."""
    fake = EmbeddedStripe(tmp_path)
    with fake:
        customer = fake.request("POST", "/v1/customers")
        assert isinstance(customer, dict)
    with fake:
        again = fake.request("GET", f"/v1/customers/{customer['id']}")
        assert isinstance(again, dict)
        assert again["id"] == customer["id"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OperationalError("database or disk is full"),  # SQLite's words
    ],
    ids=["the file system", "SQLite"],
)
def test_a_full_disk_while_the_run_sets_up_is_one_line_saying_so(tmp_path: Path, error: Exception) -> None:
    """A full disk at the migrations (seen on a 2 MB tmpfs) was a traceback from deep in SQLite: the run now stops
    with one line naming the cause and the data directory. Any other error goes up as it is."""
    said = r"no room left to set up the platform .*" + re.escape(str(tmp_path))
    with pytest.raises(CommandError, match=said), runplatform.room_to_set_up(tmp_path):
        raise error
    with pytest.raises(OperationalError, match="no such table"), runplatform.room_to_set_up(tmp_path):
        raise OperationalError("no such table: inference_job")
