"""Node packages the tests run, each folder pinned by its package.json and package-lock.json and installed with
``npm ci`` from the lock file: fal's JavaScript client (tests/e2e/js) and KEDA's models with TypeScript
(tests/deploy/keda). Nothing from npm is kept in the repository: each folder is copied under ``var/npm/`` (ignored by
git) and installed there, so the packages' own code never lands among the tests.

Node.js 20 and npm are a requirement of the suite like PostgreSQL's client is: without them the tests that need them
fail, saying so, rather than skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

# Written into node_modules after a successful install: the digest of the package.json and lock it came from.
STAMP = ".installed-from"


def node_and_npm(needed_for: str) -> tuple[str, str]:
    """The paths of ``node`` and ``npm``; fails the test, naming what needs them, when either is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(f"Node.js 20 and npm are needed for {needed_for}: install them (CI machines have both).")
    return node, npm


def lock_digest(folder: Path) -> str:
    manifests = (folder / "package.json").read_bytes() + (folder / "package-lock.json").read_bytes()
    return hashlib.sha256(manifests).hexdigest()


ROOT = Path(__file__).resolve().parent.parent
INSTALLS = ROOT / "var" / "npm"


def npm_ci(source: Path, *, needed_for: str) -> Path:
    """A copy of ``source`` (its files, not its subfolders) under ``var/npm/`` with its node_modules installed from
    its lock file (``npm ci``), unless they already match it. Run the folder's scripts from the copy.

    One install at a time per folder, whatever runs the suite (two sessions at once): the others wait on a lock file
    beside package.json, then find the stamp and install nothing.
    """
    _, npm = node_and_npm(needed_for)
    folder = INSTALLS / source.resolve().relative_to(ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / "node_modules" / STAMP
    with (folder / ".npm-ci.lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for path in source.iterdir():
            copy = folder / path.name
            if path.is_file() and (not copy.exists() or copy.read_bytes() != path.read_bytes()):
                shutil.copyfile(path, copy)
        digest = lock_digest(folder)
        if not stamp.exists() or stamp.read_text() != digest:
            installed = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert installed.returncode == 0, (
                f"npm ci failed in {folder} ({needed_for}):\n{installed.stdout}\n{installed.stderr}"
            )
            stamp.write_text(digest)
    return folder
