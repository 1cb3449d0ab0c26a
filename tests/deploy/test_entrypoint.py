"""deploy/entrypoint.sh: the image's one entrypoint, each process type's command line.

Two ways: with stand-ins for gunicorn, celery and python on PATH that print the command line they were given (the
exact argv each process type runs), and with the real programs in their check modes (`--check-config`, `--help`,
`migrate --plan`), which load the configuration, the ASGI app or the Celery app and refuse an option they do not
know. The multi-process test (tests/deploy/test_many_machines.py) starts every process type through it for real.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
PROCFILE = ROOT / "deploy" / "Procfile"
BIN = Path(sys.executable).parent
TEST_VARIABLES = ("DATABASE_URL", "REDIS_URL", "BROKER_URL", "STATIC_MANIFEST", "PLATFORM_DATA_DIR")
# Prints its name and arguments as JSON, and exits with $STAND_IN_EXIT (0 unless set).
STAND_IN = """#!{python}
import json, os, sys
print(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]))
sys.exit(int(os.environ.get("STAND_IN_EXIT", "0")))
"""


def entrypoint(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
    )


@pytest.fixture
def real_env(tmp_path: Path) -> dict[str, str]:
    """The programs of the suite's virtualenv first on PATH, as /opt/venv/bin is in the image; SQLite in tmp."""
    env = {name: value for name, value in os.environ.items() if name not in TEST_VARIABLES}
    env.update(PATH=f"{BIN}:{env['PATH']}", PLATFORM_DATA_DIR=str(tmp_path), SECRET_KEY="entrypoint-test-key")
    return env


@pytest.fixture
def stand_in_env(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("gunicorn", "celery", "python"):
        path = folder / name
        path.write_text(STAND_IN.format(python=sys.executable))
        path.chmod(0o755)
    env = {name: value for name, value in os.environ.items() if name not in TEST_VARIABLES}
    env.update(PATH=f"{folder}:{env['PATH']}", PLATFORM_DATA_DIR="/var/lib/platform")
    return env


def command_line(*args: str, env: dict[str, str]) -> list[str]:
    result = entrypoint(*args, env=env)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


# The command line of each process type.


def test_web_is_gunicorn_with_the_deployments_configuration(stand_in_env: dict[str, str]) -> None:
    assert command_line("web", env=stand_in_env) == [
        "gunicorn", "--config", "deploy/gunicorn.conf.py", "config.asgi:application"
    ]  # fmt: skip
    # Extra arguments go before the application, where gunicorn reads options.
    assert command_line("web", "--workers", "3", env=stand_in_env)[3:5] == ["--workers", "3"]


def test_a_gpu_worker_serves_its_class_queue_one_job_at_a_time(stand_in_env: dict[str, str]) -> None:
    argv = command_line("worker", "gpu-h100", env=stand_in_env)
    assert argv[:4] == ["celery", "--app", "config", "worker"]
    options = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert options["--queues"] == "gpu-h100"
    assert options["--concurrency"] == "1"
    assert options["--prefetch-multiplier"] == "1"
    assert options["--hostname"] == "gpu-h100@%h"  # the pod's name after the class: unique per worker
    assert {"--without-gossip", "--without-mingle"} <= set(argv)


def test_housekeeping_serves_the_default_queue_and_takes_a_later_concurrency(stand_in_env: dict[str, str]) -> None:
    argv = command_line("housekeeping", "--concurrency", "4", env=stand_in_env)
    assert argv[argv.index("--queues") + 1] == "default"
    assert argv[-2:] == ["--concurrency", "4"]  # after the default 2: Click keeps the last


def test_batch_serves_the_batch_queue_one_task_at_a_time(stand_in_env: dict[str, str]) -> None:
    """The long periodic tasks (settings' CELERY_TASK_ROUTES, tests/test_beat_schedule.py), apart from housekeeping."""
    argv = command_line("batch", env=stand_in_env)
    assert argv[:4] == ["celery", "--app", "config", "worker"]
    options = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert options["--queues"] == "batch"
    assert options["--concurrency"] == "1"
    assert options["--prefetch-multiplier"] == "1"  # the next task waits in Redis, not behind a long one here
    assert options["--hostname"] == "batch@%h"
    assert {"--without-gossip", "--without-mingle"} <= set(argv)


def test_the_procfile_runs_every_long_running_process_type() -> None:
    lines = [line for line in PROCFILE.read_text().splitlines() if line and not line.startswith("#")]
    commands = dict(line.split(": ", 1) for line in lines)
    started = {command.split()[1] for command in commands.values()}
    assert {"web", "worker", "housekeeping", "batch", "beat", "migrate"} <= started
    assert commands["batch"] == "deploy/entrypoint.sh batch"


def test_beat_keeps_its_schedule_in_the_data_directory(stand_in_env: dict[str, str]) -> None:
    argv = command_line("beat", env=stand_in_env)
    assert argv[:4] == ["celery", "--app", "config", "beat"]
    assert argv[argv.index("--schedule") + 1] == "/var/lib/platform/celerybeat-schedule"


def test_migrate_and_manage(stand_in_env: dict[str, str]) -> None:
    assert command_line("migrate", env=stand_in_env) == ["python", "manage.py", "migrate", "--noinput"]
    assert command_line("manage", "reconcile", "--full", env=stand_in_env) == [
        "python", "manage.py", "reconcile", "--full"
    ]  # fmt: skip


@pytest.mark.parametrize(
    "args",
    [(), ("serve",), ("worker",), ("worker", "GPU_H100"), ("worker", "gpu h100"), ("worker", "--queues")],
    ids=["nothing", "unknown", "no-class", "upper-case", "space", "option"],
)
def test_a_wrong_process_type_or_class_is_refused(args: tuple[str, ...], stand_in_env: dict[str, str]) -> None:
    result = entrypoint(*args, env=stand_in_env)
    assert result.returncode == 64  # EX_USAGE
    assert result.stdout == ""  # nothing was started
    assert "usage:" in result.stderr or "is not a GPU class" in result.stderr


# The real programs, in their check modes.


def test_web_check_config_loads_the_asgi_application(real_env: dict[str, str]) -> None:
    result = entrypoint("web", "--check-config", env=real_env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("args", [("worker", "gpu-h100"), ("worker", "cpu"), ("housekeeping",), ("batch",), ("beat",)])
def test_celery_accepts_every_option_the_entrypoint_passes(args: tuple[str, ...], real_env: dict[str, str]) -> None:
    result = entrypoint(*args, "--help", env=real_env)
    assert result.returncode == 0, result.stderr
    assert "Usage: celery" in result.stdout
    refused = entrypoint(*args, "--no-such-option", "--help", env=real_env)
    assert refused.returncode == 2
    assert "No such option" in refused.stderr


def test_migrate_and_wait_for_migrations(real_env: dict[str, str]) -> None:
    """The init container's wait ends once `migrate` has run, and fails with the reason when it never does."""
    plan = entrypoint("migrate", "--plan", env=real_env)
    assert plan.returncode == 0, plan.stderr
    assert "inference." in plan.stdout  # a fresh database: every migration is planned

    gave_up = entrypoint("wait-for-migrations", env={**real_env, "MIGRATIONS_WAIT_SECONDS": "0"})
    assert gave_up.returncode == 1
    assert "migrations still unapplied" in gave_up.stderr

    migrated = entrypoint("migrate", env=real_env)
    assert migrated.returncode == 0, migrated.stderr
    waited = entrypoint("wait-for-migrations", env=real_env)
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "migrations applied"
