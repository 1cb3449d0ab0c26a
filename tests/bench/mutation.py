"""Mutation testing of the money modules: does a test fail when the code that decides what a customer pays changes?

    python -m tests.bench.mutation [--module billing/money.py[:LINE,...] ...] [--tests PATH_OR_NODE_ID ...]
                                   [--new-tests PATH ...] [--jobs 1] [--list] [--json var/mutation.json]

Run like a benchmark (``make mutation``), never in CI: it takes a while (about an hour for the six money modules on
two busy cores). It never writes to this working tree:

1. The repository is copied (without .venv, .git and caches) to ``--workdir`` (/tmp/mutation-work/<n>), and every
   test runs there on SQLite (no DATABASE_URL/REDIS_URL), with ``PYTHONPATH`` putting the copy's packages ahead of
   this checkout's editable install. Before any mutant, a probe checks that each target module is imported from the
   copy, and a canary (a target module that raises on import) checks that the tests do load the copy's code.
2. A baseline run of the test subset, traced line by line, records which tests execute each line of the targets (and
   how long each test takes). Each test starts with an empty process-local cache, so any subset passes in any order;
   a test that fails in the baseline judges no mutant (it is listed: it depends on the tests run before it).
3. Each mutant (one small change to the AST: an operator swapped, a comparison's boundary moved, an integer off by
   one, ``and``/``or`` swapped, a ``not`` or a minus dropped, ``min``/``max`` or ``floor``/``ceil`` swapped, one
   keyword dropped from a ``.filter``/``.exclude``/``.get``, one statement replaced by ``pass``) is written into the
   copy, and only the tests that executed its lines run, with ``pytest -x`` and a timeout: first those that killed
   most mutants of the module so far, then the fastest. Killed: a test failed (or timed out). Survived: every test
   passed, or no test reaches the line.

``--new-tests``: these run only against the mutants the other tests leave alive, and are scored apart, so one run
gives the score with and without them. Docstrings, annotations, log calls and f-strings are not mutated.

Each mutant runs in a child forked from a server process that has the test run's third-party imports loaded
(pytest, Django, DRF, torch...) but none of the project's, so a mutant costs the collection of its tests, not an
interpreter start (``--no-fork``: a fresh ``python -m pytest`` per mutant). Hypothesis runs with a fixed seed, so a
mutant is killed or not the same way every time.

Per module it prints mutants, killed, survived and the score, then each survivor: file:line, what changed, and how
many tests ran against it (0: no test reaches that line).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import functools
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
MONEY_MODULES = (
    "billing/money.py",
    "billing/holds.py",
    "billing/ledger.py",
    "billing/metering.py",
    "billing/admission.py",
    "billing/locks.py",
    "inference/engine/batch_shares.py",
)
# The fast tests that pin what a customer pays (the engine's own suite imports torch: its meter tests are mirrored,
# without it, in test_batch_shares.py).
MONEY_TESTS = (
    "tests/billing/test_money.py",
    "tests/billing/test_money_cases.py",
    "tests/billing/test_reservations.py",
    "tests/billing/test_core.py",
    "tests/billing/test_requeue.py",
    "tests/billing/test_ledger_properties.py",
    "tests/inference/test_batch_shares.py",
    # The Stripe event's and a payment's locks (billing/locks.py) are taken only on these paths.
    "tests/billing/test_stripe.py",
    "tests/billing/test_payment_transactions.py",
    "tests/billing/test_stripe_properties.py",
)
PROJECT_PACKAGES = ("accounts", "billing", "config", "dashboard", "inference", "tests")
COPY_IGNORE = shutil.ignore_patterns(
    ".venv", ".git", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis", "__pycache__", "var", "node_modules"
)
HYPOTHESIS_SEED = "20261121"
TRACE_ENV = "MUTATION_TRACE"  # baseline: where the tracing plugin writes what each test executed
ISOLATE_ENV = "MUTATION_ISOLATE"  # every run: each test starts with an empty (process-local) cache
# Every run: quiet, no cache written into the copy, this module as a plugin, tables made from the models (faster than
# migrating), Hypothesis seeded.
PYTEST_OPTIONS = ("-q", "-p", "no:cacheprovider", "-p", "tests.bench.mutation", "--nomigrations")
PYTEST_OPTIONS += (f"--hypothesis-seed={HYPOTHESIS_SEED}",)
CANARY = "raise RuntimeError('mutation canary: the copy is what the tests import')\n"


# --- Mutants ---------------------------------------------------------------------------------------------------------

BINARY_SWAPS: dict[type[ast.operator], type[ast.operator]] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.FloorDiv,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
}
COMPARE_SWAPS: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
QUERY_METHODS = {"filter", "exclude", "get"}
SWAPPED_NAMES = {"min": "max", "max": "min"}
SWAPPED_MATH = {"floor": "ceil", "ceil": "floor"}
REMOVABLE_STATEMENTS = (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Raise, ast.If, ast.For)

Path_ = tuple[tuple[str, int | None], ...]  # from the module node: (field, index in a list field or None)


@dataclass(frozen=True)
class Mutant:
    module: str  # repository-relative path
    path: Path_  # the node to change
    kind: str
    variant: int  # which of the node's changes (a comparison's operator, a call's keyword)
    lineno: int
    end_lineno: int
    in_function: bool
    before: str
    after: str

    @property
    def label(self) -> str:
        return f"{self.module}:{self.lineno} {self.kind}: `{self.before}` -> `{self.after}`"


def _follow(tree: ast.AST, path: Path_) -> tuple[Any, str, int | None]:
    """The parent of the node at ``path``, the field holding it and its index there."""
    node: Any = tree
    for name, index in path[:-1]:
        node = getattr(node, name) if index is None else getattr(node, name)[index]
    name, index = path[-1]
    return node, name, index


def _get(tree: ast.AST, path: Path_) -> Any:
    parent, name, index = _follow(tree, path)
    return getattr(parent, name) if index is None else getattr(parent, name)[index]


def _put(tree: ast.AST, path: Path_, new: ast.AST) -> None:
    parent, name, index = _follow(tree, path)
    if index is None:
        setattr(parent, name, new)
    else:
        getattr(parent, name)[index] = new


def _is_docstring(node: ast.AST, parent: ast.AST | None, name: str, index: int | None) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and index == 0
        and name == "body"
        and isinstance(parent, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    )


def _is_logging(node: ast.AST) -> bool:
    """``logger.warning(...)`` and the like: what they change is a log line, not money."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id in {"logger", "logging", "log"}
    )


def _walk(
    node: ast.AST, path: Path_, in_function: bool
) -> Iterator[tuple[ast.AST, Path_, bool, ast.AST, str, int | None]]:
    """Every node worth mutating: (node, path, inside a function body, parent, field, index).

    Annotations, decorators, docstrings, log calls, imports and the insides of f-strings are skipped. A function's
    default values count as module level: they are evaluated when the module is imported.
    """
    for name, value in ast.iter_fields(node):
        if name in {"annotation", "returns", "type_comment", "decorator_list"}:
            continue
        children = [(child, index) for index, child in enumerate(value)] if isinstance(value, list) else [(value, None)]
        inside = in_function or (
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) and name != "args"
        )
        for child, index in children:
            if not isinstance(child, ast.AST) or isinstance(child, ast.Import | ast.ImportFrom | ast.JoinedStr):
                continue
            if _is_docstring(child, node, name, index) or _is_logging(child):
                continue
            if isinstance(child, ast.Expr) and _is_logging(child.value):
                continue
            child_path = (*path, (name, index))
            yield child, child_path, inside, node, name, index
            yield from _walk(child, child_path, inside)


def _is_text(node: ast.AST) -> bool:
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))


def _changes(
    node: ast.AST, parent: ast.AST, name: str, index: int | None, in_function: bool
) -> Iterator[tuple[str, int]]:
    """(kind, variant) of each mutant this node makes."""
    if (
        isinstance(node, ast.BinOp)
        and type(node.op) in BINARY_SWAPS
        and not (_is_text(node.left) or _is_text(node.right))
    ):
        yield "binary operator", 0
    if isinstance(node, ast.AugAssign) and type(node.op) in (ast.Add, ast.Sub):
        yield "augmented assignment", 0
    if isinstance(node, ast.Compare):
        for variant, op in enumerate(node.ops):
            if type(op) in COMPARE_SWAPS:
                yield "comparison", variant
    if isinstance(node, ast.BoolOp):
        yield "boolean operator", 0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        yield "unary operator dropped", 0
    if isinstance(node, ast.Constant) and type(node.value) is int:
        yield "constant", +1
        yield "constant", -1
    if isinstance(node, ast.Constant) and type(node.value) is bool:
        yield "constant", 0
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in QUERY_METHODS:
        for variant, keyword in enumerate(node.keywords):
            if keyword.arg is not None:
                yield "query keyword dropped", variant
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in SWAPPED_NAMES:
        yield "min/max", 0
    if isinstance(node, ast.Attribute) and node.attr in SWAPPED_MATH and isinstance(node.value, ast.Name):
        yield "floor/ceil", 0
    if (
        in_function
        and index is not None
        and isinstance(node, REMOVABLE_STATEMENTS)
        and not isinstance(parent, ast.Module)
    ):
        yield "statement removed", 0


def _mutated(node: ast.AST, kind: str, variant: int) -> ast.AST:
    """A changed copy of ``node``."""
    new: Any = copy.deepcopy(node)
    if kind == "binary operator":
        new.op = BINARY_SWAPS[type(new.op)]()
    elif kind == "augmented assignment":
        new.op = ast.Sub() if isinstance(new.op, ast.Add) else ast.Add()
    elif kind == "comparison":
        new.ops[variant] = COMPARE_SWAPS[type(new.ops[variant])]()
    elif kind == "boolean operator":
        new.op = ast.Or() if isinstance(new.op, ast.And) else ast.And()
    elif kind == "unary operator dropped":
        new = new.operand
    elif kind == "constant":
        new.value = (not new.value) if isinstance(new.value, bool) else new.value + variant
    elif kind == "query keyword dropped":
        del new.keywords[variant]
    elif kind == "min/max":
        new.func.id = SWAPPED_NAMES[new.func.id]
    elif kind == "floor/ceil":
        new.attr = SWAPPED_MATH[new.attr]
    elif kind == "statement removed":
        new = ast.Pass()
    else:
        raise ValueError(kind)
    return ast.copy_location(new, node)


def _short(text: str, limit: int = 90) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mutants_of(module: str, root: Path = ROOT) -> list[Mutant]:
    tree = ast.parse((root / module).read_text(), filename=module)
    found: list[Mutant] = []
    for node, path, in_function, parent, name, index in _walk(tree, (), False):
        for kind, variant in _changes(node, parent, name, index, in_function):
            changed = _mutated(node, kind, variant)
            before = ast.unparse(node).splitlines()[0] if kind == "statement removed" else ast.unparse(node)
            if ast.unparse(changed) == ast.unparse(node):
                continue
            found.append(
                Mutant(
                    module=module,
                    path=path,
                    kind=kind,
                    variant=variant,
                    lineno=getattr(node, "lineno", 0),
                    end_lineno=getattr(node, "end_lineno", None) or getattr(node, "lineno", 0),
                    in_function=in_function,
                    before=_short(before),
                    after=_short(ast.unparse(changed)),
                )
            )
    return found


def mutated_source(mutant: Mutant, root: Path = ROOT) -> str:
    tree = ast.parse((root / mutant.module).read_text(), filename=mutant.module)
    node = _get(tree, mutant.path)
    _put(tree, mutant.path, _mutated(node, mutant.kind, mutant.variant))
    return ast.unparse(ast.fix_missing_locations(tree)) + "\n"


# --- The baseline's line tracer (a pytest plugin: ``-p tests.bench.mutation`` with MUTATION_TRACE set) ------------


class _LineTracer:
    def __init__(self, files: Sequence[str]) -> None:
        self.files = {str(Path(name).resolve()) for name in files}
        self.current = "<collection>"
        self.lines: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
        self.seconds: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}

    def trace(self, frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename not in self.files:
            return None
        self.lines[self.current][frame.f_code.co_filename].add(frame.f_lineno)
        return self._local

    def _local(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines[self.current][frame.f_code.co_filename].add(frame.f_lineno)
        return self._local


_tracer: _LineTracer | None = None


def pytest_configure(config: Any) -> None:
    global _tracer
    target = os.environ.get(TRACE_ENV)
    if not target:
        return
    files = json.loads(Path(target).read_text())["files"]
    _tracer = _LineTracer(files)
    sys.settrace(_tracer.trace)
    threading.settrace(_tracer.trace)


def pytest_runtest_setup(item: Any) -> None:
    """Each test starts with an empty cache, so that a subset of the tests passes in any order.

    The suite relies on test order otherwise: ``billing.pricing`` caches a measured GPU time per work unit for a
    minute, and a test that measured some leaves its estimate to the tests after it (a smaller hold).
    """
    if not os.environ.get(ISOLATE_ENV):
        return
    from django.core.cache import caches
    from django.core.cache.backends.locmem import LocMemCache

    for cache in caches.all():
        if not isinstance(cache, LocMemCache):
            raise RuntimeError("mutation runs use the process-local cache: never clear a shared one")
        cache.clear()


def pytest_runtest_protocol(item: Any, nextitem: Any) -> None:
    if _tracer is not None:
        _tracer.current = item.nodeid
        _tracer.seconds[item.nodeid] = time.perf_counter()


OUTCOME_RANK = {"passed": 0, "skipped": 1, "xfail": 2, "failed": 3}


def pytest_runtest_logreport(report: Any) -> None:
    if _tracer is None:
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfail"
    else:
        outcome = "failed" if report.failed else "skipped" if report.skipped else "passed"
    earlier = _tracer.outcomes.get(report.nodeid, "passed")
    _tracer.outcomes[report.nodeid] = max(earlier, outcome, key=OUTCOME_RANK.__getitem__)
    if report.when == "teardown":
        _tracer.seconds[report.nodeid] = time.perf_counter() - _tracer.seconds[report.nodeid]
        _tracer.current = "<between tests>"


def pytest_unconfigure(config: Any) -> None:
    if _tracer is None:
        return
    sys.settrace(None)
    threading.settrace(None)  # type: ignore[arg-type]
    target = Path(os.environ[TRACE_ENV])
    written = json.loads(target.read_text())
    written["tests"] = {
        nodeid: {"seconds": _tracer.seconds.get(nodeid, 0.0), "outcome": outcome}
        for nodeid, outcome in _tracer.outcomes.items()
    }
    written["lines"] = {
        nodeid: {name: sorted(lines) for name, lines in by_file.items()} for nodeid, by_file in _tracer.lines.items()
    }
    target.write_text(json.dumps(written))


# --- The fork server: one per copy, run as ``python -m tests.bench.mutation --serve`` inside it -------------------

PRELOAD = (
    "pytest", "_pytest.python", "_pytest.fixtures", "hypothesis",
    "hypothesis.stateful", "django", "django.db", "django.db.models", "django.test",
    "django.conf", "django.utils.timezone", "rest_framework", "rest_framework.fields", "rest_framework.serializers",
    "rest_framework.test", "drf_spectacular", "drf_spectacular.plumbing", "celery", "kombu", "stripe", "psycopg",
    "redis", "requests", "urllib3", "httpx", "numpy", "PIL.Image", "torch", "diffusers",
)  # fmt: skip


def _reaped(pid: int) -> tuple[int, int] | None:
    """``os.waitpid``'s answer once the child ``pid`` has ended (its zombie reaped), None while it runs."""
    done, status = os.waitpid(pid, os.WNOHANG)
    return (done, status) if done else None


def serve() -> None:
    """Reads one JSON command a line on stdin; forks a child that runs pytest.main on it; answers rc and time."""
    for name in PRELOAD:
        with contextlib.suppress(Exception):
            __import__(name)
    loaded = sorted({name.split(".")[0] for name in sys.modules} & set(PROJECT_PACKAGES) - {"tests"})
    if loaded:
        raise SystemExit(f"the server must not have imported the project: {loaded}")
    running: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        for child in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child, signal.SIGKILL)
        os._exit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # Ctrl-C reaches the server too: the test run it waits for goes with it
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        command = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child: a fresh pytest session with the mutant on disk
            os.setpgid(0, 0)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            sys.dont_write_bytecode = True
            code = 70
            try:
                with open(command["log"], "w") as log:
                    os.dup2(log.fileno(), 1)
                    os.dup2(log.fileno(), 2)
                    if command.get("probe"):
                        import importlib.util

                        print(json.dumps({name: importlib.util.find_spec(name).origin for name in command["probe"]}))  # type: ignore[union-attr]
                        code = 0
                    else:
                        import pytest

                        code = int(pytest.main(command["args"]))
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        running[:] = [pid]
        timed_out = False
        try:
            _, status = wait_until(
                functools.partial(_reaped, pid),
                timeout=started + command["timeout"] - time.monotonic(),
                message=f"the test run (process {pid}) to end",
                interval=0.02,
                failure=TimeoutError,
            )
        except TimeoutError:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = -1
        rc = os.waitstatus_to_exitcode(status) if status != -1 else -9
        sys.stdout.write(json.dumps({"rc": rc, "timed_out": timed_out, "seconds": time.monotonic() - started}) + "\n")
        sys.stdout.flush()


# --- The orchestrator --------------------------------------------------------------------------------------------


@dataclass
class Result:
    mutant: Mutant
    status: str  # killed, timeout, survived
    tests: int  # how many tests ran against it
    seconds: float
    killer: str = ""  # the first test that failed
    by_new_tests: bool = False  # killed only by the --new-tests
    log: str = ""

    @property
    def killed(self) -> bool:
        return self.status in {"killed", "timeout"}


def child_environment(work: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in {"DATABASE_URL", "REDIS_URL", "PYTHONPATH"}}
    env["PYTHONPATH"] = f"{work}{os.pathsep}{work / 'platform'}"
    env["PYTHONHASHSEED"] = "0"
    env[ISOLATE_ENV] = "1"
    return env


class Worker:
    """One copy of the repository and the way its mutants run there (a fork server, or a subprocess each)."""

    def __init__(self, work: Path, *, fork: bool) -> None:
        self.work = work
        self.fork = fork
        self.logs = work / "mutation-logs"
        self.server: subprocess.Popen[str] | None = None
        self.runs = 0

    def prepare(self, modules: Sequence[str]) -> None:
        if self.work.exists():
            if not (self.work / ".mutation-copy").exists():
                raise SystemExit(f"{self.work} exists and is not a copy this command made: choose another --workdir")
            shutil.rmtree(self.work)
        shutil.copytree(ROOT, self.work, ignore=COPY_IGNORE, symlinks=True)
        (self.work / ".mutation-copy").write_text("made by tests.bench.mutation; deleted at each run\n")
        self.logs.mkdir()
        self.originals = {module: (self.work / module).read_text() for module in modules}
        if self.fork:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "tests.bench.mutation", "--serve"],
                cwd=self.work,
                env=child_environment(self.work),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.server.stdout is not None
            ready = self.server.stdout.readline()
            if not ready.strip():
                raise SystemExit("the mutation fork server did not start")

    def close(self) -> None:
        if self.server is None:
            return
        assert self.server.stdin is not None
        with contextlib.suppress(OSError):
            self.server.stdin.close()
        try:
            self.server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.server.terminate()  # it kills the mutant's test run it is waiting for, then exits
            self.server.wait(timeout=30)
        self.server = None

    def pytest(
        self, args: Sequence[str], *, timeout: float, env: dict[str, str] | None = None
    ) -> tuple[int, bool, str]:
        """Runs pytest in the copy: (exit code, timed out, log file)."""
        self.runs += 1
        log = self.logs / f"run-{self.runs}.log"
        if self.server is not None and env is None:
            reply = self._ask({"args": list(args), "log": str(log), "timeout": timeout})
            return reply["rc"], reply["timed_out"], str(log)
        environment = child_environment(self.work) | (env or {})
        if env is None:
            environment["PYTHONDONTWRITEBYTECODE"] = "1"  # the baseline compiles everything once; mutants never
        with open(log, "w") as output:
            try:
                completed = subprocess.run(
                    [sys.executable, "-m", "pytest", *args], cwd=self.work, env=environment, stdout=output,
                    stderr=subprocess.STDOUT, timeout=timeout, check=False, start_new_session=True,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                return -9, True, str(log)
        return completed.returncode, False, str(log)

    def probe(self, modules: Sequence[str]) -> dict[str, str]:
        names = [module.removesuffix(".py").replace("/", ".") for module in modules]
        log = self.logs / "probe.log"
        if self.server is not None:
            self._ask({"probe": names, "log": str(log), "timeout": 60})
        else:
            code = (
                "import importlib.util, json, sys; "
                "print(json.dumps({n: importlib.util.find_spec(n).origin for n in sys.argv[1:]}))"
            )
            log.write_text(
                subprocess.run(
                    [sys.executable, "-c", code, *names], cwd=self.work, env=child_environment(self.work),
                    capture_output=True, text=True, check=True,
                ).stdout
            )  # fmt: skip
        return json.loads(log.read_text().strip().splitlines()[-1])

    def _ask(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.server is not None
        assert self.server.stdin is not None
        assert self.server.stdout is not None
        self.server.stdin.write(json.dumps(command) + "\n")
        self.server.stdin.flush()
        reply = self.server.stdout.readline()
        if not reply:
            raise SystemExit("the mutation fork server died")
        return json.loads(reply)

    def write(self, module: str, source: str) -> None:
        target = self.work / module
        target.write_text(source)
        cache = target.parent / "__pycache__"
        for stale in cache.glob(f"{target.stem}.*.pyc") if cache.exists() else ():
            stale.unlink()  # a same-size mutant written within the same second would otherwise load the old bytecode

    def restore(self, module: str) -> None:
        self.write(module, self.originals[module])


def command_for(nodeids: Sequence[str]) -> list[str]:
    return ["-x", *PYTEST_OPTIONS, *nodeids]


@dataclass
class Baseline:
    seconds: dict[str, float]
    runnable: list[str]  # passed in the baseline (xfail and skipped tests never judge a mutant)
    covering: dict[str, dict[int, set[str]]] = field(default_factory=dict)  # module -> line -> node ids

    def tests_for(self, mutant: Mutant, kills: dict[str, int]) -> list[str]:
        """The tests that execute the mutant's lines: those that killed most mutants so far first, then the fastest."""
        if not mutant.in_function:
            chosen = set(self.runnable)  # module level: runs at import, for every test
        else:
            lines = self.covering.get(mutant.module, {})
            chosen = set().union(*(lines.get(line, set()) for line in range(mutant.lineno, mutant.end_lineno + 1)))
            chosen &= set(self.runnable)
        return sorted(chosen, key=lambda nodeid: (-kills.get(nodeid, 0), self.seconds.get(nodeid, 0.0), nodeid))


def run_baseline(worker: Worker, modules: Sequence[str], tests: Sequence[str]) -> Baseline:
    trace_file = worker.logs / "baseline-trace.json"
    trace_file.write_text(json.dumps({"files": [str(worker.work / module) for module in modules]}))
    rc, timed_out, log = worker.pytest([*PYTEST_OPTIONS, *tests], timeout=3600, env={TRACE_ENV: str(trace_file)})
    traced = json.loads(trace_file.read_text())
    if timed_out or "tests" not in traced:
        raise SystemExit(f"the baseline run did not finish (exit {rc}); see {log}:\n{Path(log).read_text()[-4000:]}")
    tests_seen = traced["tests"]
    baseline = Baseline(
        seconds={nodeid: info["seconds"] for nodeid, info in tests_seen.items()},
        runnable=[nodeid for nodeid, info in tests_seen.items() if info["outcome"] == "passed"],
    )
    failing = sorted(nodeid for nodeid, info in tests_seen.items() if info["outcome"] == "failed")
    if failing:
        # A red test would "kill" every mutant it reaches. Left out, and said: a test that passes in the full suite but
        # fails here depends on the tests before it (each test here starts with an empty cache).
        print(f"baseline: {len(failing)} tests fail on unchanged code and judge no mutant (see {log}):", flush=True)
        for nodeid in failing:
            print(f"  {nodeid}", flush=True)
        if len(failing) * 2 > len(tests_seen):
            raise SystemExit("most of the baseline is red: fix the tests first")
    by_path = {str(worker.work / module): module for module in modules}
    for nodeid, by_file in traced["lines"].items():
        if nodeid not in tests_seen:
            continue
        for name, lines in by_file.items():
            for line in lines:
                baseline.covering.setdefault(by_path[name], {}).setdefault(line, set()).add(nodeid)
    return baseline


def check_isolation(worker: Worker, modules: Sequence[str], baseline: Baseline) -> None:
    """The tests must import the copy's modules, never this checkout's: a probe, then a canary in each module."""
    origins = worker.probe(modules)
    for name, origin in origins.items():
        if not origin or not Path(origin).resolve().is_relative_to(worker.work.resolve()):
            raise SystemExit(f"{name} is imported from {origin}, not from the copy {worker.work}")
    fastest = sorted(baseline.runnable, key=lambda nodeid: baseline.seconds.get(nodeid, 0.0))
    for module in modules:
        covering = set().union(*baseline.covering.get(module, {}).values()) & set(fastest)
        if not covering:
            continue
        one = min(covering, key=lambda nodeid: baseline.seconds.get(nodeid, 0.0))
        worker.write(module, worker.originals[module] + CANARY)
        try:
            rc, _, log = worker.pytest(command_for([one]), timeout=300)
        finally:
            worker.restore(module)
        if rc == 0 or "mutation canary" not in Path(log).read_text():
            raise SystemExit(f"a canary in {module} went unnoticed by {one}: the tests do not run the copy's code")
    rc, _, log = worker.pytest(command_for(fastest), timeout=3600)
    if rc != 0:
        raise SystemExit(f"the tests fail on unchanged code when run fastest first; see {log}")


class KillHistory:
    """Which tests killed mutants so far, per module: tried first on the next mutant (with -x, one failure ends it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kills: dict[str, dict[str, int]] = defaultdict(dict)

    def of(self, module: str) -> dict[str, int]:
        with self._lock:
            return dict(self._kills[module])

    def add(self, module: str, nodeid: str) -> None:
        with self._lock:
            self._kills[module][nodeid] = self._kills[module].get(nodeid, 0) + 1


def first_failure(log: str) -> str:
    for line in Path(log).read_text(errors="replace").splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0].strip()
    return ""


def run_mutant(
    worker: Worker, mutant: Mutant, baseline: Baseline, history: KillHistory, new_tests: Sequence[str]
) -> Result:
    """Runs the tests that reach the mutant, the others before the ``new_tests``, which run only if it survives them."""
    nodeids = baseline.tests_for(mutant, history.of(mutant.module))
    is_new = [any(nodeid == new or nodeid.startswith(new.rstrip("/") + ("::" if new.endswith(".py") else "/"))
                  for new in new_tests) for nodeid in nodeids]  # fmt: skip
    phases = [[n for n, new in zip(nodeids, is_new, strict=True) if not new]]
    phases.append([n for n, new in zip(nodeids, is_new, strict=True) if new])
    started = time.monotonic()
    ran = 0
    worker.write(mutant.module, mutated_source(mutant, worker.work))
    try:
        for phase, tests in enumerate(phases):
            if not tests:
                continue
            timeout = 60 + 3 * sum(baseline.seconds.get(nodeid, 1.0) for nodeid in tests)
            rc, timed_out, log = worker.pytest(command_for(tests), timeout=timeout)
            ran += len(tests)
            if rc != 0 or timed_out:
                # 1: a test failed; 2-4: collection failed or pytest stopped (the mutant broke an import).
                killer = first_failure(log)
                if killer:
                    history.add(mutant.module, killer)
                status = "timeout" if timed_out else "killed"
                return Result(mutant, status, ran, time.monotonic() - started, killer, phase == 1, log)
    finally:
        worker.restore(mutant.module)
    return Result(mutant, "survived", ran, time.monotonic() - started)


def parse_targets(values: Sequence[str]) -> dict[str, set[int] | None]:
    targets: dict[str, set[int] | None] = {}
    for value in values:
        module, _, lines = value.partition(":")
        if not (ROOT / module).is_file():
            raise SystemExit(f"no such module: {module}")
        targets[module] = {int(line) for line in lines.split(",")} if lines else None
    return targets


def report(results: Sequence[Result], modules: Sequence[str], *, with_new_tests: bool) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    extra = f" {'without new tests':>18}" if with_new_tests else ""
    print(f"\n{'module':30} {'mutants':>8} {'killed':>7} {'survived':>9} {'score':>7}{extra}")
    for module in modules:
        mine = [result for result in results if result.mutant.module == module]
        killed = sum(result.killed for result in mine)
        before = sum(result.killed and not result.by_new_tests for result in mine)
        score = 100.0 * killed / len(mine) if mine else 100.0
        score_before = 100.0 * before / len(mine) if mine else 100.0
        summary[module] = {
            "mutants": len(mine),
            "killed": killed,
            "survived": len(mine) - killed,
            "score": round(score, 1),
            "killed_without_new_tests": before,
            "score_without_new_tests": round(score_before, 1),
            "survivors": [
                {"line": result.mutant.lineno, "kind": result.mutant.kind, "before": result.mutant.before,
                 "after": result.mutant.after, "tests_run": result.tests}
                for result in mine if not result.killed
            ],
        }  # fmt: skip
        extra = f" {before:>8} = {score_before:5.1f}%" if with_new_tests else ""
        print(f"{module:30} {len(mine):>8} {killed:>7} {len(mine) - killed:>9} {score:>6.1f}%{extra}")
    survivors = [result for result in results if not result.killed]
    if survivors:
        print("\nSurvivors (tests run against each; 0: no test reaches the line):")
        for result in sorted(survivors, key=lambda result: (result.mutant.module, result.mutant.lineno)):
            print(f"  {result.mutant.label}  [{result.tests} tests]")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", default=[], help="a module to mutate (PATH or PATH:LINE,LINE)")
    parser.add_argument(
        "--tests", action="append", default=[], help="test files or node ids (default: the money tests)"
    )
    parser.add_argument(
        "--new-tests",
        action="append",
        default=[],
        help="test files (or node ids) run only against the mutants the other tests leave alive, and scored apart: "
        "one run says what the suite kills with and without them",
    )
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each in its own copy")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "mutation-work"))
    parser.add_argument("--no-fork", action="store_true", help="a fresh interpreter per mutant instead of a fork")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--json", help="also write the summary to this file")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.serve:
        serve()
        return 0

    # Ctrl-C, or a TERM, stops the run and prints what it has (a shell's background job starts with SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    targets = parse_targets(options.module or MONEY_MODULES)
    modules = list(targets)
    mutants = [
        mutant
        for module, lines in targets.items()
        for mutant in mutants_of(module)
        if lines is None or mutant.lineno in lines
    ]
    if options.list:
        for mutant in mutants:
            print(mutant.label)
        print(f"{len(mutants)} mutants")
        return 0
    tests = options.tests or [path for path in MONEY_TESTS if (ROOT / path.split("::")[0]).exists()]
    tests += [path for path in options.new_tests if path not in tests]
    print(f"{len(mutants)} mutants in {len(modules)} modules; tests: {' '.join(tests)}", flush=True)

    workers = [
        Worker(Path(options.workdir) / str(number), fork=not options.no_fork) for number in range(max(1, options.jobs))
    ]
    started = time.monotonic()
    results: list[Result] = []
    try:
        for worker in workers:
            worker.prepare(modules)
        baseline = run_baseline(workers[0], modules, tests)
        print(
            f"baseline: {len(baseline.runnable)} tests pass in {sum(baseline.seconds.values()):.0f} s "
            f"({time.monotonic() - started:.0f} s with tracing)",
            flush=True,
        )
        for worker in workers:
            check_isolation(worker, modules, baseline)
        idle: queue.Queue[Worker] = queue.Queue()
        for worker in workers:
            idle.put(worker)
        history = KillHistory()

        def one(mutant: Mutant) -> Result:
            worker = idle.get()
            try:
                return run_mutant(worker, mutant, baseline, history, options.new_tests)
            finally:
                idle.put(worker)

        pool = ThreadPoolExecutor(max_workers=len(workers))
        try:
            futures = [pool.submit(one, mutant) for mutant in mutants]
            for number, future in enumerate(as_completed(futures), start=1):
                result = future.result()
                results.append(result)
                how = f"{result.status}{' (new tests)' if result.by_new_tests else ''}"
                print(f"[{number}/{len(mutants)}] {how:20} {result.seconds:5.1f}s {result.mutant.label}", flush=True)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    except KeyboardInterrupt:
        print("\ninterrupted: the working tree was never touched; partial results follow", flush=True)
    finally:
        for worker in workers:
            worker.close()
    summary = report(results, modules, with_new_tests=bool(options.new_tests))
    print(
        f"\n{len(results)} mutants in {time.monotonic() - started:.0f} s; copies left in {options.workdir} for the logs"
    )
    if options.json:
        Path(options.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
