"""deploy/environment.md names every environment variable the settings module reads.

The names are taken from the source with ``ast`` (no settings are loaded, no database is needed): the first
argument of each call to a typed helper from config/env.py (``env_str``, ``env_int``, ``env_bool``, ...), and
each ``os.environ.get("X")``, ``os.environ["X"]`` and ``os.getenv("X")``. A variable counts as documented when
the reference shows it in backticks, as its tables do.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ROOT / "platform" / "config" / "settings.py"
REFERENCE = ROOT / "deploy" / "environment.md"


def _string(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _is_os_environ(node: ast.expr) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "environ"
        and isinstance(node.value, ast.Name)
        and node.value.id == "os"
    )


def _reads_environment(function: ast.expr) -> bool:
    """``env_x(...)``, ``env.env_x(...)``, ``os.environ.get(...)`` or ``os.getenv(...)``."""
    if isinstance(function, ast.Name):
        return function.id.startswith("env_")
    if not isinstance(function, ast.Attribute):
        return False
    if function.attr.startswith("env_"):
        return True
    if function.attr == "get":
        return _is_os_environ(function.value)
    return function.attr == "getenv" and isinstance(function.value, ast.Name) and function.value.id == "os"


def variables_read(source: str) -> set[str]:
    """Every environment variable name a module reads by a string literal."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Call) and node.args and _reads_environment(node.func):
            name = _string(node.args[0])
        elif isinstance(node, ast.Subscript) and _is_os_environ(node.value):
            name = _string(node.slice)
        if name:
            names.add(name)
    return names


def documented(reference: str) -> set[str]:
    return set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", reference))


def test_the_extraction_sees_every_form() -> None:
    source = (
        "import os\n"
        "from config import env\n"
        'A = env_int("A_INT", 1, minimum=0)\n'
        'B = env.env_bool("B_BOOL", False)\n'
        'C = os.environ.get("C_GET")\n'
        'D = os.environ["D_ITEM"]\n'
        'E = os.getenv("E_GETENV", "x")\n'
        'F = other("NOT_ME")\n'
        'G = {"k": "NOR_ME"}["k"]\n'
    )
    assert variables_read(source) == {"A_INT", "B_BOOL", "C_GET", "D_ITEM", "E_GETENV"}


def test_settings_reads_variables() -> None:
    # A guard against an extraction that silently finds nothing.
    assert {"SECRET_KEY", "REDIS_URL", "API_KEY_CACHE_SECONDS"} <= variables_read(SETTINGS.read_text())


def test_every_variable_settings_reads_is_in_the_reference() -> None:
    missing = sorted(variables_read(SETTINGS.read_text()) - documented(REFERENCE.read_text()))
    assert not missing, f"deploy/environment.md does not document: {', '.join(missing)}"
