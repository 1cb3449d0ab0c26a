"""What the embedded run's private servers share: a free loopback port, and a child process stopped once.

``EmbeddedRedis`` (config/embedded_redis.py) and ``EmbeddedStripe`` (config/embedded_stripe.py) start one server
each for a run or a test; this holds their common ending, so a change to how a server is stopped (the grace
period, the kill after it) is made once.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

STOP_TIMEOUT_SECONDS = 10.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now (another process may still take it before the server binds it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def die_with_parent() -> Callable[[], None] | None:
    """On Linux, a ``preexec_fn`` that has the kernel stop the child (SIGTERM) when the process that started it
    dies: a run killed on its own (SIGKILL, or any signal it cannot catch) leaves no server or worker behind to
    hold its ports and its data directory, whatever process group or session the child sits in."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return hook


class EmbeddedProcess:
    """One server process of a run; a subclass starts it in ``start()`` and keeps it in ``process``."""

    process: subprocess.Popen[bytes] | None = None
    log_file: Path

    def start(self) -> None:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        """Terminates the server, then kills it if it is still there after ``timeout`` seconds."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)

    def log_since(self, offset: int = 0) -> str:
        """The server's log from byte ``offset``; empty when it cannot be read."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
