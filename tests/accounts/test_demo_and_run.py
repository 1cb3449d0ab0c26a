"""The demo account and the embedded run (README's first command): one machine, no services."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from django.core.management import call_command
from django.test import Client
from rest_framework.test import APIClient

from accounts.models import Organization, Scope, User

REPO_ROOT = Path(__file__).resolve().parents[2]
# What tests/conftest.py or CI may have set: the embedded run must work with none of it.
SETTINGS_VARIABLES = (
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "DEBUG",
    "PLATFORM_DATA_DIR",
    "DATABASE_URL",
    "REDIS_URL",
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS_VARIABLES}
    env.update(PLATFORM_EMBEDDED="1", PLATFORM_DATA_DIR=str(data_dir))
    return env


def process_group(pgid: int) -> dict[int, str]:
    """Live members of a process group, pid to command line (Linux's /proc; zombies excluded)."""
    members: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # it ended while we looked
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members[int(entry.name)] = cmdline
    return members


class EmbeddedRun:
    def __init__(self, process: subprocess.Popen[bytes], port: int, data_dir: Path, log: Path) -> None:
        self.process = process
        self.base_url = f"http://127.0.0.1:{port}"
        self.data_dir = data_dir
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"runplatform exited with {self.process.returncode}:\n{self.log_text()}")
            try:
                response = httpx.get(f"{self.base_url}/readyz", timeout=2)
                if response.status_code == 200:
                    ready: dict[str, Any] = response.json()
                    return ready
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        pytest.fail(f"/readyz did not answer 200 within {START_TIMEOUT_SECONDS} s:\n{self.log_text()}")

    def api_client(self) -> httpx.Client:
        credentials = json.loads((self.data_dir / "demo_credentials.json").read_text())
        return httpx.Client(
            base_url=self.base_url, headers={"Authorization": f"Key {credentials['api_key']}"}, timeout=10
        )

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT_SECONDS)


@pytest.fixture
def start_embedded(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*extra: str) -> EmbeddedRun:
        port = free_port()
        log = tmp_path / "runplatform.log"
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
                env=embedded_env(tmp_path),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the cleanup below reaches the whole tree
            )
        started.append(process)
        return EmbeddedRun(process, port, tmp_path, log)

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
    deadline = time.monotonic() + 5
    while process_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process_group(pgid) == {}


@pytest.mark.slow
def test_embedded_web_process_serves_the_api(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded("--no-worker")
    ready = run.wait_until_ready()
    assert ready == {"status": "ready", "checks": {"database": "ok", "broker": "ok", "cache": "ok"}}
    assert_serves_the_api(run)
    assert not any("celery" in command for command in process_group(run.process.pid).values())
    assert run.terminate() == 0, run.log_text()
    assert_group_ends(run.process.pid)


@pytest.mark.slow
def test_embedded_run_starts_the_worker_and_stops_cleanly(start_embedded: Any) -> None:
    run: EmbeddedRun = start_embedded()
    assert run.wait_until_ready()["status"] == "ready"
    assert_serves_the_api(run)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not re.search(r"gpu@\S+ ready\.", run.log_text()):
        assert time.monotonic() < deadline, f"the worker never said it was ready:\n{run.log_text()}"
        assert run.process.poll() is None, run.log_text()
        time.sleep(0.25)
    commands = process_group(run.process.pid).values()
    assert any("uvicorn" in command for command in commands)
    assert any("celery" in command and " worker" in command and "--beat" in command for command in commands)
    assert run.terminate() == 0, run.log_text()
    assert_group_ends(run.process.pid)
