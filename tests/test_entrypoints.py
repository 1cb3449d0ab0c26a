"""``platform`` is the standard library's in every entry point (docs/architecture.md); settings fail loudly."""

from __future__ import annotations

import hashlib
import os
import platform
import stat
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import env_bool, env_int, env_list, env_required, env_str

REPO_ROOT = Path(__file__).resolve().parents[1]
STDLIB_PLATFORM = str(Path(sysconfig.get_paths()["stdlib"]) / "platform.py")
# Prints what `platform` is wherever it runs; the stdlib's answers system() with a name like "Linux".
SHOW_PLATFORM = "import platform; print(platform.system(), platform.__file__)"
# Everything the settings read that this test process (tests/conftest.py, CI) may have set.
SETTINGS_VARIABLES = (
    "DJANGO_SETTINGS_MODULE",
    "SECRET_KEY",
    "DEBUG",
    "PLATFORM_EMBEDDED",
    "PLATFORM_DATA_DIR",
    "DATABASE_URL",
    "REDIS_URL",
    "ALLOWED_HOSTS",
    "CACHE_KEY_PREFIX",
    "STATIC_MANIFEST",
    "SECURE_COOKIES",
    "MAX_REQUEST_BODY_BYTES",
    "API_KEY_DEFAULT_REQUESTS_PER_MINUTE",
    "CELERY_BROKER_URL",
)


def clean_env(data_dir: Path, **variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTINGS_VARIABLES}
    env.update(DJANGO_SETTINGS_MODULE="config.settings", PLATFORM_DATA_DIR=str(data_dir))
    env.update(variables)
    return env


def run_python(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def assert_stdlib_platform(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stderr
    system, _, module_file = result.stdout.strip().splitlines()[-1].partition(" ")
    assert system == platform.system()
    assert module_file == STDLIB_PLATFORM


# The standard library's `platform`, everywhere.


def test_pytest_itself_has_the_standard_librarys_platform() -> None:
    assert platform.__file__ == STDLIB_PLATFORM
    assert platform.system()


def test_platform_folder_is_not_a_package() -> None:
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()
    import accounts
    import config

    # The packages inside it import under their own names, from the folder, with no sys.path edits.
    assert Path(config.__file__).parent == REPO_ROOT / "platform" / "config"
    assert Path(accounts.__file__).parent == REPO_ROOT / "platform" / "accounts"


def test_ruff_guards_against_shadowing_the_standard_library() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    lint = pyproject["tool"]["ruff"]["lint"]
    assert "A" in lint["select"] or "A005" in lint["select"]
    assert not {"A", "A005"} & set(lint.get("ignore", []))


def test_python_from_the_repository_root(tmp_path: Path) -> None:
    assert_stdlib_platform(run_python("-c", SHOW_PLATFORM, env=clean_env(tmp_path)))


def test_manage_py(tmp_path: Path) -> None:
    env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key")
    assert_stdlib_platform(run_python("manage.py", "shell", "-c", SHOW_PLATFORM, env=env))


def test_asgi_application(tmp_path: Path) -> None:
    env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key")
    code = f"import config.asgi; assert callable(config.asgi.application); {SHOW_PLATFORM}"
    assert_stdlib_platform(run_python("-c", code, env=env))


def test_gunicorn_loads_the_asgi_application(tmp_path: Path) -> None:
    env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key")
    result = run_python("-m", "gunicorn", "--check-config", "config.asgi:application", env=env)
    assert result.returncode == 0, result.stderr


def test_celery_app(tmp_path: Path) -> None:
    env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key")
    code = f"from config.celery import app; assert app.main == 'platform'; {SHOW_PLATFORM}"
    assert_stdlib_platform(run_python("-c", code, env=env))


def test_celery_command_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key")
    assert run_python("-m", "celery", "--app", "config", "inspect", "--help", env=env).returncode == 0
    # `celery report` describes the machine through platform.system() from inside the Celery program.
    report = run_python("-m", "celery", "--app", "config", "report", env=env)
    assert report.returncode == 0, report.stderr
    assert f"system:{platform.system()}" in report.stdout
    assert "transport:memory" in report.stdout  # no REDIS_URL/BROKER_URL: messages stay in the process
    assert "entrypoint-test-key" not in report.stdout


# Settings fail loudly at start-up instead of running with a surprising configuration.


def test_no_secret_key_and_no_debug_refuses_to_start(tmp_path: Path) -> None:
    result = run_python("-c", "import django; django.setup()", env=clean_env(tmp_path))
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY" in result.stderr


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEBUG", "maybe"),
        ("PLATFORM_EMBEDDED", "sometimes"),
        ("API_KEY_DEFAULT_REQUESTS_PER_MINUTE", "abc"),
        ("API_KEY_DEFAULT_REQUESTS_PER_MINUTE", "0"),
        ("MAX_REQUEST_BODY_BYTES", "10"),
        ("ORGANIZATION_DEFAULT_CONCURRENCY", "two"),
    ],
)
def test_a_malformed_variable_refuses_to_start_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    env = clean_env(tmp_path, SECRET_KEY="entrypoint-test-key", **{variable: value})
    result = run_python("-c", "import django; django.setup()", env=env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert variable in result.stderr


SHOW_SECURITY = (
    "import django; django.setup(); from django.conf import settings; "
    "print(settings.DEBUG, settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE)"
)


def test_defaults_are_production_safe(tmp_path: Path) -> None:
    result = run_python("-c", SHOW_SECURITY, env=clean_env(tmp_path, SECRET_KEY="entrypoint-test-key"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]


def test_debug_runs_without_a_secret_key(tmp_path: Path) -> None:
    result = run_python("-c", SHOW_SECURITY, env=clean_env(tmp_path, DEBUG="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False", "False"]


def test_embedded_run_keeps_a_generated_secret_key_private_and_stable(tmp_path: Path) -> None:
    show_key_digest = (
        "import hashlib, django; django.setup(); from django.conf import settings; "
        "print(hashlib.sha256(settings.SECRET_KEY.encode()).hexdigest())"
    )
    env = clean_env(tmp_path, PLATFORM_EMBEDDED="1")
    first = run_python("-c", show_key_digest, env=env)
    second = run_python("-c", show_key_digest, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    key_file = tmp_path / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    stored = key_file.read_text().strip()
    assert len(stored) >= 50
    assert first.stdout.strip() == hashlib.sha256(stored.encode()).hexdigest()


def test_an_empty_key_file_left_by_a_full_disk_is_replaced(tmp_path: Path) -> None:
    """The key file was made, then written: a full disk left it empty, and every later start failed on an empty
    SECRET_KEY. It is written whole or not at all now, and an empty one left before is replaced."""
    (tmp_path / "secret_key").touch(mode=0o600)
    result = run_python("-c", SHOW_SECURITY, env=clean_env(tmp_path, PLATFORM_EMBEDDED="1"))
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "secret_key").read_text().strip()) >= 50
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".secret_key")] == []


# config.env, the readers behind every setting.


def test_env_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLATFORM_TEST_VALUE", raising=False)
    assert env_str("PLATFORM_TEST_VALUE") is None
    assert env_str("PLATFORM_TEST_VALUE", "fallback") == "fallback"
    monkeypatch.setenv("PLATFORM_TEST_VALUE", "")
    assert env_str("PLATFORM_TEST_VALUE", "fallback") == ""  # set-but-empty is a value
    monkeypatch.setenv("PLATFORM_TEST_VALUE", " spaced ")
    assert env_str("PLATFORM_TEST_VALUE") == " spaced "


def test_env_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLATFORM_TEST_VALUE", raising=False)
    with pytest.raises(ImproperlyConfigured, match="PLATFORM_TEST_VALUE"):
        env_required("PLATFORM_TEST_VALUE")
    monkeypatch.setenv("PLATFORM_TEST_VALUE", "")
    with pytest.raises(ImproperlyConfigured, match="PLATFORM_TEST_VALUE"):
        env_required("PLATFORM_TEST_VALUE")
    monkeypatch.setenv("PLATFORM_TEST_VALUE", "set")
    assert env_required("PLATFORM_TEST_VALUE") == "set"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        (" yes ", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("No", False),
        ("off", False),
        ("", False),
    ],
)
def test_env_bool_reads_the_usual_spellings(monkeypatch: pytest.MonkeyPatch, raw: str, expected: bool) -> None:
    monkeypatch.setenv("PLATFORM_TEST_FLAG", raw)
    assert env_bool("PLATFORM_TEST_FLAG", not expected) is expected


@pytest.mark.parametrize("raw", ["maybe", "2", "y", "enabled"])
def test_env_bool_refuses_anything_else(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("PLATFORM_TEST_FLAG", raw)
    with pytest.raises(ImproperlyConfigured, match="PLATFORM_TEST_FLAG"):
        env_bool("PLATFORM_TEST_FLAG")


def test_env_bool_default_applies_only_when_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLATFORM_TEST_FLAG", raising=False)
    assert env_bool("PLATFORM_TEST_FLAG") is False
    assert env_bool("PLATFORM_TEST_FLAG", True) is True


def test_env_int(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLATFORM_TEST_NUMBER", raising=False)
    assert env_int("PLATFORM_TEST_NUMBER", 7) == 7
    monkeypatch.setenv("PLATFORM_TEST_NUMBER", "  ")
    assert env_int("PLATFORM_TEST_NUMBER", 7) == 7
    monkeypatch.setenv("PLATFORM_TEST_NUMBER", "42")
    assert env_int("PLATFORM_TEST_NUMBER", 7, minimum=42) == 42
    monkeypatch.setenv("PLATFORM_TEST_NUMBER", "-3")
    assert env_int("PLATFORM_TEST_NUMBER", 7) == -3


@pytest.mark.parametrize(("raw", "minimum"), [("abc", None), ("1.5", None), ("0x10", None), ("41", 42), ("0", 1)])
def test_env_int_refuses_non_integers_and_values_below_the_minimum(
    monkeypatch: pytest.MonkeyPatch, raw: str, minimum: int | None
) -> None:
    monkeypatch.setenv("PLATFORM_TEST_NUMBER", raw)
    with pytest.raises(ImproperlyConfigured, match="PLATFORM_TEST_NUMBER"):
        env_int("PLATFORM_TEST_NUMBER", 7, minimum=minimum)


def test_env_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLATFORM_TEST_LIST", raising=False)
    assert env_list("PLATFORM_TEST_LIST", ["default"]) == ["default"]
    monkeypatch.setenv("PLATFORM_TEST_LIST", " a.example , b.example,,")
    assert env_list("PLATFORM_TEST_LIST", ["default"]) == ["a.example", "b.example"]
    monkeypatch.setenv("PLATFORM_TEST_LIST", "")
    assert env_list("PLATFORM_TEST_LIST", ["default"]) == []
