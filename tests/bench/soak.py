"""Soak test of the embedded run: ``make run`` under ordinary use, busy and idle, for N minutes.

    python -m tests.bench.soak [--minutes 30] [--clients 2] [--seed 1] [--repo PATH]

Starts ``manage.py runplatform`` as ``make run`` does (the embedded default: SQLite and its own
Redis; none of DATABASE_URL, REDIS_URL, BROKER_URL passed on) in a fresh data directory on free
ports, reads the demo key and the developer's password from ``demo_credentials.json``, then sends
mixed traffic from a few client threads: queue submits followed by status polls and the result,
sync runs through ``/run/``, cancels, ``GET /v1/me``, dashboard pages (logged in), and idle gaps,
short ones per client and, every few minutes, a minute or two with no traffic at all (the run used
to die idle). runplatform starts again any of its processes that exits (and says so in its log),
and stops when one exits too often, so both its log and runplatform itself are watched.

At the end it stops the run as a person would and prints the requests sent by kind, the answers by
status code, every request left unanswered or answered 5xx, the jobs completed, and whether any
process exited. Exit status 1 if the run died or stopped uncleanly, or a request went unanswered or
answered 5xx. ``--repo`` runs another checkout's code (e.g. an older commit from ``git archive``)
with this virtualenv, for comparison.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.waiting import pace, wait_until

REPO = Path(__file__).resolve().parents[2]
# What the caller's shell may have set: the soak runs the embedded default, as `make run` on a fresh machine.
SETTINGS_VARIABLES = (
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "DEBUG",
    "PLATFORM_DATA_DIR",
    "DATABASE_URL",
    "REDIS_URL",
    "BROKER_URL",
    "CELERY_BROKER_URL",
    "CELERY_RESULT_BACKEND",
    "ALLOWED_HOSTS",
    "CACHE_KEY_PREFIX",
    "STATIC_MANIFEST",
    "PUBLIC_BASE_URL",
    "HOST",
    "PORT",
    "TLS_PORT",
)
MODEL = "platform/tiny-sd"
QUICK_JOB = {"prompt": "a lighthouse at dusk", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}
# Long enough that a cancel usually lands while it runs (or waits).
LONG_JOB = {"prompt": "a slow harbour", "image_size": {"width": 256, "height": 256}, "num_inference_steps": 40}
DASHBOARD_PAGES = ("/dashboard/", "/dashboard/requests", "/dashboard/usage", "/dashboard/keys", "/dashboard/billing")
START_TIMEOUT_SECONDS = 180
STOP_TIMEOUT_SECONDS = 60
JOB_TIMEOUT_SECONDS = 300
# Log lines worth a count in the report: each is a process dying, or close to it.
ALARMS = {
    "unrecoverable": re.compile(r"Unrecoverable error"),
    "traceback": re.compile(r"^Traceback \(most recent call last\)", re.MULTILINE),
    "redis restarted": re.compile(r"Redis exited with"),
    # Any process of the run, Redis included, that exited and was started again: a death all the same.
    "process restarted": re.compile(r"^runplatform: .+ exited with \S+; starting it again", re.MULTILINE),
    "run stopped itself": re.compile(r"stopping the run"),
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Tally:
    """What was sent and what came back, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: collections.Counter[str] = collections.Counter()
        self.answers: collections.Counter[int] = collections.Counter()
        self.jobs: collections.Counter[str] = collections.Counter()
        self.unanswered: list[str] = []
        self.server_errors: list[str] = []
        self.unexpected: list[str] = []

    def count_job(self, outcome: str) -> None:
        with self.lock:
            self.jobs[outcome] += 1

    def note_unexpected(self, what: str) -> None:
        with self.lock:
            self.unexpected.append(what)


class Client:
    """One simulated developer: an API client with the demo key and a logged-in browser session."""

    def __init__(self, base_url: str, credentials: dict[str, str], tally: Tally, rng: random.Random) -> None:
        self.tally = tally
        self.rng = rng
        self.api = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Key {credentials['api_key']}"}, timeout=30
        )
        self.browser = httpx.Client(base_url=base_url, timeout=30, follow_redirects=True)
        self.credentials = credentials

    def close(self) -> None:
        self.api.close()
        self.browser.close()

    def call(self, kind: str, method: str, url: str, *, browser: bool = False, **options: Any) -> httpx.Response | None:
        """One request, counted; None when no answer came (refused, reset, timed out)."""
        with self.tally.lock:
            self.tally.sent[kind] += 1
        try:
            response = (self.browser if browser else self.api).request(method, url, **options)
        except httpx.HTTPError as exc:
            with self.tally.lock:
                self.tally.unanswered.append(f"{time.strftime('%H:%M:%S')} {kind} {method} {url}: {exc!r}")
            return None
        with self.tally.lock:
            self.tally.answers[response.status_code] += 1
            if response.status_code >= 500:
                self.tally.server_errors.append(
                    f"{time.strftime('%H:%M:%S')} {kind} {method} {url}: {response.status_code} {response.text[:300]}"
                )
        return response

    def log_in(self) -> None:
        page = self.call("dashboard login", "GET", "/auth/login", browser=True)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text) if page is not None else None
        if token is None:
            self.tally.note_unexpected("the login page had no CSRF token")
            return
        response = self.call(
            "dashboard login",
            "POST",
            "/auth/login",
            browser=True,
            data={
                "csrfmiddlewaretoken": token.group(1),
                "username": self.credentials["developer_email"],
                "password": self.credentials["developer_password"],
            },
            headers={"Referer": str(self.browser.base_url) + "/auth/login"},
        )
        if response is not None and not response.url.path.startswith("/dashboard"):
            self.tally.note_unexpected(f"logging in led to {response.url.path}, not the dashboard")

    # The actions, each an ordinary thing a developer does.

    def queue_flow(self, stop: threading.Event) -> None:
        submitted = self.call("queue submit", "POST", f"/queue/{MODEL}", json=QUICK_JOB)
        if submitted is not None and submitted.is_success:
            self.follow(submitted.json(), stop, expect="completed")

    def sync_run(self, stop: threading.Event) -> None:
        response = self.call("sync run", "POST", f"/run/{MODEL}", json=QUICK_JOB, timeout=120)
        if response is not None and response.is_success:
            self.tally.count_job("completed (sync)")

    def cancel_flow(self, stop: threading.Event) -> None:
        submitted = self.call("queue submit", "POST", f"/queue/{MODEL}", json=LONG_JOB)
        if submitted is None or not submitted.is_success:
            return
        handle = submitted.json()
        pace(self.rng.uniform(0, 2))  # a client cancels some time after it sent
        self.call("cancel", "PUT", handle["cancel_url"])
        self.follow(handle, stop, expect="cancelled")

    def follow(self, handle: dict[str, Any], stop: threading.Event, *, expect: str) -> None:
        """Poll the status, at a person's irregular pace, until the request is done, then read its result."""

        def done() -> bool:
            if stop.is_set():
                return True
            status = self.call("queue status", "GET", handle["status_url"], params={"logs": "1"})
            if status is None or status.status_code != 200:
                return False
            body = status.json()
            if body["status"] != "COMPLETED":
                return False
            result = self.call("queue result", "GET", handle["response_url"])
            error_type = body.get("error_type")
            if error_type is None and result is not None and result.status_code == 200:
                self.tally.count_job("completed (queue)")
            elif error_type == "cancelled":
                self.tally.count_job("cancelled")
            else:
                self.tally.count_job(f"ended {error_type or 'without a result'}")
            return True

        def between_looks() -> float:
            return self.rng.uniform(0.2, 1.0)

        pace(between_looks())  # the first look, too, comes a moment after the request was sent
        try:
            wait_until(
                done,
                timeout=JOB_TIMEOUT_SECONDS,
                message=f"{handle['request_id']} to end",
                interval=between_looks,
                failure=TimeoutError,
            )
        except TimeoutError:
            if not stop.is_set():
                self.tally.note_unexpected(f"{handle['request_id']} ({expect}) not done after {JOB_TIMEOUT_SECONDS} s")

    def me(self, stop: threading.Event) -> None:
        self.call("GET /v1/me", "GET", "/v1/me")

    def dashboard(self, stop: threading.Event) -> None:
        self.call("dashboard page", "GET", self.rng.choice(DASHBOARD_PAGES), browser=True)

    def idle(self, stop: threading.Event) -> None:
        stop.wait(self.rng.uniform(5, 45))


def client_loop(client: Client, traffic: threading.Event, stop: threading.Event) -> None:
    actions = [
        (client.queue_flow, 30),
        (client.sync_run, 15),
        (client.cancel_flow, 8),
        (client.me, 20),
        (client.dashboard, 17),
        (client.idle, 10),
    ]
    client.log_in()
    while not stop.is_set():
        while not traffic.is_set() and not stop.is_set():  # everyone's quiet spell
            traffic.wait(1)
        if stop.is_set():
            break
        action = client.rng.choices([action for action, _ in actions], weights=[weight for _, weight in actions])[0]
        action(stop)
        stop.wait(client.rng.uniform(0.2, 3))


def embedded_env(data_dir: Path, repo: Path) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS_VARIABLES}
    env.update(PLATFORM_EMBEDDED="1", PLATFORM_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1")
    if repo != REPO:
        # Its packages before the editable install's, which point at this checkout.
        env["PYTHONPATH"] = os.pathsep.join([str(repo / "platform"), str(repo)])
    return env


def wait_until_ready(run: subprocess.Popen[bytes], base_url: str, log: Path) -> None:
    def ready() -> bool:
        if run.poll() is not None:
            raise SystemExit(f"runplatform exited with {run.returncode} while starting:\n{tail(log)}")
        return httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200

    wait_until(
        ready,
        timeout=START_TIMEOUT_SECONDS,
        message=lambda: f"runplatform to be ready:\n{tail(log)}",
        interval=0.5,
        ignoring=(httpx.HTTPError,),
        failure=SystemExit,
    )


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def stop_run(run: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, as a service manager (or Ctrl-C) would; the whole group is killed if it hangs."""
    if run.poll() is None:
        run.send_signal(signal.SIGTERM)
        try:
            run.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(10)
            return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)  # anything it left behind
    return run.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=2, help="simulated developers sending traffic at once")
    parser.add_argument("--quiet-every", type=float, default=5, help="minutes between spells with no traffic at all")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose runplatform runs")
    args = parser.parse_args()

    repo = args.repo.resolve()
    data_dir = Path(tempfile.mkdtemp(prefix="soak-"))
    log = data_dir / "runplatform.log"
    port, tls_port = free_port(), free_port()
    base_url = f"http://127.0.0.1:{port}"
    with log.open("wb") as log_file:
        run = subprocess.Popen(
            [sys.executable, "manage.py", "runplatform", "--port", str(port), "--tls-port", str(tls_port)],
            cwd=repo,
            env=embedded_env(data_dir, repo),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    try:
        wait_until_ready(run, base_url, log)
    except BaseException:
        stop_run(run)
        raise
    credentials = json.loads((data_dir / "demo_credentials.json").read_text())
    broker = re.search(r"^Redis \(broker, cache, pub/sub\): (.*)$", log.read_text(errors="replace"), re.MULTILINE)
    print(
        f"soak: {args.minutes:g} min of mixed traffic from {args.clients} clients against runplatform in {repo}"
        f" (ready in {time.monotonic() - started:.0f} s); data and log in {data_dir}"
    )
    print(f"  broker: {broker.group(1) if broker else 'not the embedded Redis (see the log)'}", flush=True)

    tally = Tally()
    traffic, stop = threading.Event(), threading.Event()
    traffic.set()
    rng = random.Random(args.seed)
    clients = [Client(base_url, credentials, tally, random.Random(rng.random())) for _ in range(args.clients)]
    threads = [threading.Thread(target=client_loop, args=(c, traffic, stop), daemon=True) for c in clients]
    for thread in threads:
        thread.start()

    soak_started = time.monotonic()
    deadline = soak_started + args.minutes * 60
    next_quiet = soak_started + args.quiet_every * 60
    next_report = soak_started + 60
    quiet_until = 0.0
    died_at: float | None = None
    try:
        while time.monotonic() < deadline:
            if run.poll() is not None:
                died_at = time.monotonic() - soak_started
                break
            now = time.monotonic()
            if now >= next_quiet and traffic.is_set():
                traffic.clear()
                quiet_until = now + rng.uniform(60, 120)
            elif not traffic.is_set() and now >= quiet_until:
                traffic.set()
                next_quiet = now + args.quiet_every * 60
            if now >= next_report:
                next_report += 60
                with tally.lock:
                    sent, jobs = sum(tally.sent.values()), sum(tally.jobs.values())
                print(
                    f"  {(now - soak_started) / 60:5.1f} min: {sent} requests, {jobs} jobs done,"
                    f" {'traffic' if traffic.is_set() else 'quiet'}, runplatform up",
                    flush=True,
                )
            pace(1)  # the monitor's rhythm: a look at the run each second
    finally:
        stop.set()
        traffic.set()
        for thread in threads:
            thread.join(150)
        for client in clients:
            client.close()
        exit_code = stop_run(run) if died_at is None else run.returncode
    elapsed = time.monotonic() - soak_started

    log_text = log.read_text(errors="replace")
    print(f"\nran {elapsed / 60:.1f} min")
    print("requests sent by kind:")
    for kind, count in sorted(tally.sent.items()):
        print(f"  {kind:18} {count:7}")
    print(f"  {'total':18} {sum(tally.sent.values()):7}")
    print("answers by status code:")
    for status, count in sorted(tally.answers.items()):
        print(f"  {status:<18} {count:7}")
    print(f"unanswered: {len(tally.unanswered)}")
    for line in tally.unanswered[:20]:
        print(f"  {line}")
    print(f"5xx: {len(tally.server_errors)}")
    for line in tally.server_errors[:20]:
        print(f"  {line}")
    print("jobs: " + (", ".join(f"{outcome} {count}" for outcome, count in sorted(tally.jobs.items())) or "none"))
    for line in tally.unexpected[:20]:
        print(f"  unexpected: {line}")
    alarms = {name: len(pattern.findall(log_text)) for name, pattern in ALARMS.items()}
    print("in runplatform's log: " + ", ".join(f"{name} {count}" for name, count in alarms.items()))
    if died_at is not None:
        print(f"PROCESS DIED: runplatform exited with {exit_code} after {died_at / 60:.1f} min; its log ends:")
        print(tail(log))
    elif alarms["process restarted"]:
        print(f"PROCESS DIED: {alarms['process restarted']} of runplatform's processes exited and were started again")
    else:
        how = "cleanly (exit 0)" if exit_code == 0 else f"with {exit_code}"
        print(f"processes: none exited during the soak; runplatform stopped {how} when asked")
    failed = died_at is not None or exit_code != 0 or bool(tally.unanswered) or bool(tally.server_errors)
    failed = failed or bool(alarms["process restarted"])
    print(
        json.dumps(
            {
                "minutes": round(elapsed / 60, 2),
                "sent": dict(tally.sent),
                "answers": {str(status): count for status, count in tally.answers.items()},
                "unanswered": len(tally.unanswered),
                "server_errors": len(tally.server_errors),
                "jobs": dict(tally.jobs),
                "died_after_minutes": None if died_at is None else round(died_at / 60, 2),
                "exit_code": exit_code,
                "log_alarms": alarms,
                "passed": not failed,
            }
        )
    )
    print("PASS" if not failed else "FAIL")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
