"""The Celery processes of the end-to-end stack (tests/e2e/conftest.py), as command lines: kept apart from that module,
which makes certificates and sets fal's hosts when imported, so tests/test_beat_schedule.py can read which queues the
stack consumes without starting it."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def celery_processes(beat_schedule: Path) -> dict[str, list[str]]:
    """The GPU worker (the ``cpu`` class) and the housekeeping worker, which also runs beat and the ``batch`` queue:
    every queue the settings route a task to is consumed, as in production and the embedded run."""
    return {
        "gpu": [
            sys.executable, "-m", "celery", "--app", "config", "worker", "--queues", "cpu", "--concurrency", "1",
            "--prefetch-multiplier", "1", "-n", f"gpu-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
            "--loglevel", "INFO",
        ],
        "housekeeping": [
            sys.executable, "-m", "celery", "--app", "config", "worker", "--queues", "default,batch",
            "--concurrency", "1", "-n", f"housekeeping-{os.getpid()}@%h", "--without-gossip", "--without-mingle",
            "--beat", "--schedule", str(beat_schedule), "--loglevel", "INFO",
        ],
    }  # fmt: skip
