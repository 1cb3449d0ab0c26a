"""The embedded run: migrate, create the demo account, then serve the ASGI app (and the worker).

One command on a fresh machine, no services: SQLite, Celery's filesystem transport, local cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Set up and run the whole platform in the foreground (web server and worker)."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--no-worker", action="store_true", help="Serve the web process only.")
        parser.add_argument(
            "--tls-port",
            type=int,
            default=int(os.environ.get("TLS_PORT", "8443")),
            help="Also serve HTTPS here, with a local CA kept in the data directory (0: off). fal's clients "
            "speak only HTTPS.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        call_command("bootstrap_demo")
        # The demo organization starts with enough credit to try everything (granted once).
        demo = json.loads((settings.DATA_DIR / "demo_credentials.json").read_text())["organization"]
        call_command("grant_credits", demo, "25", reason="Demo credits", idempotency_key=f"demo-{demo}", verbosity=0)
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

        commands = [web(options["port"])]
        if options["tls_port"]:
            ca, cert, key = local_tls_files(Path(settings.DATA_DIR) / "tls", options["host"])
            commands.append(web(options["tls_port"], "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)))
            self.stdout.write(
                f"HTTPS for fal's clients: https://{options['host']}:{options['tls_port']}"
                f" (trust it with SSL_CERT_FILE={ca})\n"
            )
        if not options["no_worker"]:
            # DESIGN §2 embedded: a GPU worker on the cpu queue (concurrency 1, prefetch 1), and the
            # scheduler (-B) in a second small worker for the housekeeping queue, so a sweep or a
            # webhook never waits behind a long generation.
            celery = [sys.executable, "-m", "celery", "--app", "config", "worker", "--loglevel", "INFO"]
            commands.append(
                [*celery, "--queues", "cpu", "--concurrency", "1", "--prefetch-multiplier", "1", "-n", "gpu@%h"]
            )
            commands.append(
                [
                    *celery,
                    "--queues",
                    "default",
                    "--concurrency",
                    "1",
                    "-n",
                    "housekeeping@%h",
                    "--beat",
                    "--schedule",
                    str(settings.DATA_DIR / "celerybeat-schedule"),
                ]
            )
        # Webhooks and other links the workers write point back at this server.
        env = {**os.environ, "PUBLIC_BASE_URL": os.environ.get("PUBLIC_BASE_URL", base)}
        processes = [subprocess.Popen(command, env=env) for command in commands]

        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            if stopping:
                return
            stopping = True
            for process in processes:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        try:
            while all(process.poll() is None for process in processes):
                time.sleep(0.5)
        finally:
            stop()
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
        codes = [process.returncode for process in processes]
        if any(code not in (0, -signal.SIGTERM, -signal.SIGINT) for code in codes):
            raise SystemExit(1)


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
