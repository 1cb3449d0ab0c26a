"""deploy/Dockerfile, linted and kept honest without Docker.

No base image can be pulled here, so the image is never built in CI. Instead the file is parsed (tests/deploy/
dockerfile.py) and held to the rules that matter (hadolint's, where they apply: pinned bases, no ADD, a numeric
non-root USER, pinned apt packages without recommends and with the lists removed, pip without its cache), and
**every RUN command in it runs here too**, with the container's paths mapped into a temporary folder: the venv is
created, collectstatic collects, the directories are made. Installs run as dry runs against what `make install`
installed (``pip install --dry-run --no-index``, ``apt-get install --simulate``), so a pin the lock file or Debian
cannot satisfy fails here. A RUN command no runner below knows fails the test until one is written for it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.deploy.dockerfile import Stage, commands, exec_form, parse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
IMAGE = parse(DOCKERFILE)
# The stages someone builds: the default (last) one, and the PgBouncer image (`--target pgbouncer`).
TARGETS = ("runtime", "pgbouncer")
TORCH_PIN = next(
    requirement
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    if requirement.startswith("torch==")
)
# Commands a RUN may hold that cannot run on a test machine, and why that is fine.
NOT_RUN = {
    ("apt-get", "update"): "refreshes the package lists from the network; the install after it is simulated",
    ("rm", "-rf", "/var/lib/apt/lists/*"): "removes the lists the update fetched, in the same layer",
}
# Settings the test process has set (tests/conftest.py) that a command run "as in the image" must not see.
TEST_VARIABLES = ("DATABASE_URL", "REDIS_URL", "STATIC_MANIFEST", "PLATFORM_DATA_DIR", "SECRET_KEY", "DEBUG")


def stage_variables(stage: Stage) -> dict[str, str]:
    return {**IMAGE.global_args, **stage.args}


# Each RUN instruction: its stage, line and commands.
RUNS = [(stage.name, run.line, commands(run, stage_variables(stage))) for stage, run in IMAGE.instructions("RUN")]


def env_instruction(stage: Stage) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.arguments):
            name, _, value = word.partition("=")
            values[name] = value
    return values


# The rules.


def test_every_stage_is_built_from_a_pinned_base_or_another_stage() -> None:
    names = {stage.name for stage in IMAGE.stages}
    for variant in ("cpu", "cuda"):
        assert f"torch-{variant}" in names  # FROM torch-${VARIANT}: both variants exist
    for stage in IMAGE.stages:
        base = stage.base.replace(f"torch-{IMAGE.global_args['VARIANT']}", "torch-cpu")
        if base in names:
            assert [each.name for each in IMAGE.stages].index(base) < IMAGE.stages.index(stage)
            continue
        repository, _, tag = base.partition(":")
        assert "@sha256:" in base or (tag and tag != "latest" and "/" not in tag), f"{stage.name}: {base} unpinned"
        assert repository in ("python", "debian"), f"{stage.name}: an official image, not {repository}"


def test_the_python_base_is_the_python_the_suite_runs_on() -> None:
    tag = IMAGE.global_args["PYTHON_IMAGE"].partition(":")[2]
    assert tag.startswith(f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}-")
    assert "bookworm" in tag  # the Debian release the apt pins below are simulated against


def test_nothing_is_added_from_a_url_or_an_archive() -> None:
    assert not IMAGE.instructions("ADD")


def test_the_images_run_as_a_numeric_non_root_user() -> None:
    assert IMAGE.stages[-1].name == "runtime"  # the default target
    for name in TARGETS:
        users = IMAGE.stage(name).all("USER")
        assert users, f"{name} runs as root"
        match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].arguments)
        assert match, f"{name}: USER {users[-1].arguments} is not numeric (runAsNonRoot cannot check a name)"
        assert int(match.group(1)) != 0
        assert int(match.group(2) or 1) != 0


def test_one_entrypoint_in_exec_form_picks_the_process() -> None:
    runtime = IMAGE.stage("runtime")
    [entrypoint] = runtime.all("ENTRYPOINT")
    [command] = runtime.all("CMD")
    assert exec_form(entrypoint.arguments) == ["/app/deploy/entrypoint.sh"]
    assert exec_form(command.arguments) == ["web"]
    assert os.access(ENTRYPOINT, os.X_OK)
    assert [each.arguments for each in IMAGE.stage("base").all("WORKDIR")] == ["/app"]
    environment = env_instruction(runtime)
    assert environment["STATIC_ROOT"] == "/app/static"
    assert environment["PLATFORM_DATA_DIR"] == "/var/lib/platform"


def test_apt_installs_are_pinned_without_recommends_and_leave_no_lists() -> None:
    for stage, run in IMAGE.instructions("RUN"):
        argvs = commands(run, stage_variables(stage))
        for argv in argvs:
            if argv[:2] == ["apt-get", "install"]:
                assert "--no-install-recommends" in argv
                assert "-y" in argv
                packages = [word for word in argv[2:] if not word.startswith("-")]
                assert packages
                assert all("=" in package for package in packages), f"line {run.line}: unpinned"
                assert ["rm", "-rf", "/var/lib/apt/lists/*"] in argvs, f"line {run.line}: lists left in the layer"
                assert ["apt-get", "update"] in argvs, f"line {run.line}: installs from stale lists"


def test_pip_keeps_no_cache_and_both_variants_install_the_pinned_torch() -> None:
    for stage, run in IMAGE.instructions("RUN"):
        for argv in commands(run, stage_variables(stage)):
            if argv[:2] == ["pip", "install"]:
                assert "--no-cache-dir" in argv, f"line {run.line}"
    for variant, index in (("cpu", r"https://download\.pytorch\.org/whl/cpu"), ("cuda", r".*/whl/cu\d+")):
        stage = IMAGE.stage(f"torch-{variant}")
        [argv] = [argv for run in stage.all("RUN") for argv in commands(run, stage_variables(stage))]
        assert argv[-1] == TORCH_PIN
        assert re.fullmatch(index, argv[argv.index("--index-url") + 1])


def test_every_copied_source_exists_and_is_in_the_build_context() -> None:
    allowed = {line[1:] for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    for _stage, copy in IMAGE.instructions("COPY"):
        words = [word for word in copy.arguments.split() if not word.startswith("--")]
        if "--from=" in copy.arguments:
            continue
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"line {copy.line}: {source} is not in the repository"
            assert source.split("/")[0] in allowed, f"line {copy.line}: {source} is left out of the build context"


def test_collectstatic_writes_where_the_runtime_serves_from() -> None:
    [collect] = [argv for _, _, argvs in RUNS for argv in argvs if "collectstatic" in argv]
    assert "STATIC_ROOT=/app/static" in collect
    assert env_instruction(IMAGE.stage("runtime"))["STATIC_ROOT"] == "/app/static"


# Every RUN command, run here.


class Sandbox:
    """The container's paths mapped into a temporary folder, and the environment of a process in the image."""

    PATHS = ("/opt/venv", "/var/lib/platform", "/app/static", "/tmp/collectstatic")  # noqa: S108 - the image's

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.workdir = folder / "app"
        self.workdir.mkdir()

    def path(self, word: str) -> str:
        for container_path in self.PATHS:
            if word == container_path or word.startswith(container_path + "/"):
                return str(self.folder / container_path.strip("/").replace("/", "-")) + word[len(container_path) :]
        return word

    def env(self, assignments: dict[str, str]) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if name not in TEST_VARIABLES}
        env.update({name: self.path(value) for name, value in assignments.items()})
        return env

    def copy_sources(self, stage: Stage) -> None:
        """The build stage's COPY instructions, done into the work directory."""
        for copy in stage.all("COPY"):
            words = copy.arguments.split()
            sources, target = words[:-1], words[-1]
            for source in sources:
                destination = self.workdir / (source if target.endswith("/") or target == "./" else target)
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, destination, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(ROOT / source, destination)


def run(argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{' '.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def run_apt_install(argv: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    debian = Path("/etc/debian_version")
    if not shutil.which("apt-get") or not debian.exists() or not debian.read_text().startswith("12."):
        pytest.skip("apt-get install --simulate needs Debian 12 (bookworm), the image's release")
    run(["apt-get", "install", "--simulate", *argv[2:]], env)


def run_venv(argv: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    assert argv[:3] == ["python", "-m", "venv"]
    target = sandbox.path(argv[3])
    run([sys.executable, "-m", "venv", target], env)
    run([str(Path(target) / "bin" / "pip"), "--version"], env)


def run_pip_install(argv: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    """A dry run against the suite's virtualenv, offline: the pins must be satisfiable by what `make install` put
    there. The index URL is for the image's network; the torch stages' URLs are checked by the rules above."""
    options = list(argv[2:])
    if "--index-url" in options:
        at = options.index("--index-url")
        del options[at : at + 2]
    extra = ["--no-build-isolation"] if "--editable" in options else []
    if "--editable" in options:
        sandbox.copy_sources(IMAGE.stage("build"))
    result = run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", *extra, *options], env, sandbox.workdir
    )
    if "--editable" in options:
        assert "Would install genmedia-platform" in result.stdout


def run_collectstatic(argv: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    run([sys.executable, *argv[1:]], env)
    static = Path(env["STATIC_ROOT"])
    assert (static / "staticfiles.json").exists()  # hashed names: STATIC_MANIFEST's default in production
    assert any(static.rglob("*.css.gz")) or any(static.rglob("*.css.br"))  # compressed by servestatic


def run_mkdir(argv: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    run([argv[0], *map(sandbox.path, argv[1:])], env)
    assert Path(sandbox.path(argv[-1])).is_dir()


def run_chown(argv: list[str], env: dict[str, str], sandbox: Sandbox) -> None:
    owner, path = argv[1], sandbox.path(argv[2])
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", owner)  # numeric, not root
    assert owner == IMAGE.stage("runtime").all("USER")[-1].arguments  # the user the image runs as
    run(["chown", f"{os.getuid()}:{os.getgid()}", path], env)  # the same command, as whoever runs the tests


RUNNERS: list[tuple[Callable[[list[str]], bool], Callable[[list[str], dict[str, str], Sandbox], None]]] = [
    (lambda argv: argv[:2] == ["apt-get", "install"], run_apt_install),
    (lambda argv: argv[:3] == ["python", "-m", "venv"], run_venv),
    (lambda argv: argv[:2] == ["pip", "install"], run_pip_install),
    (lambda argv: argv[:3] == ["python", "manage.py", "collectstatic"], run_collectstatic),
    (lambda argv: argv[:2] == ["mkdir", "-p"], run_mkdir),
    (lambda argv: argv[0] == "chown", run_chown),
]


def split_assignments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    assignments: dict[str, str] = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        name, _, value = argv[0].partition("=")
        assignments[name] = value
        argv = argv[1:]
    return assignments, argv


@pytest.mark.parametrize(("stage", "line", "argvs"), RUNS, ids=[f"{stage}:{line}" for stage, line, _ in RUNS])
def test_every_run_command_runs_here(stage: str, line: int, argvs: list[list[str]], tmp_path: Path) -> None:
    """The commands of one RUN, in order, in one sandbox (a later one may use what an earlier one made)."""
    sandbox = Sandbox(tmp_path)
    for command in argvs:
        assignments, argv = split_assignments(command)
        if tuple(argv) in NOT_RUN:
            assert not assignments
            continue
        runner = next((runner for matches, runner in RUNNERS if matches(argv)), None)
        if runner is None:
            pytest.fail(f"line {line} ({stage}): no test runs `{' '.join(argv)}`; teach tests/deploy/test_image.py to")
        runner(argv, sandbox.env(assignments), sandbox)
