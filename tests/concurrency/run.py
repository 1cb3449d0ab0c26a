"""Runs every race of tests/concurrency many times and prints what broke (``make race``).

    DATABASE_URL=postgres://... python -m tests.concurrency.run --repetitions 100 [--actors 8] [-k retry]

It runs the suite's own race tests under pytest (which makes the test database and the rows through the
fixtures) with ``RACE_REPETITIONS``, ``RACE_ACTORS`` and ``RACE_REPORT`` set, then prints one row per race from
the report the tests write. Exits non-zero when any race broke the contract or the tests could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
COLUMNS = (
    ("race", "race"),
    ("repetitions", "rounds"),
    ("deadlocks", "deadlocks"),
    ("lost_cancels", "lost cancels"),
    ("drift", "drift"),
    ("other_errors", "other errors"),
    ("lost_work", "lost work"),
    ("over_limit", "over limit"),
    ("serialization_failures", "40001"),
    ("retried", "retried"),
)
FINDINGS = [key for key, _ in COLUMNS[2:] if key != "retried"]


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for _, title in COLUMNS]] + [[str(row.get(key, "")) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[index]) for line in cells) for index in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) if index == 0 else cell.rjust(width) for index, (cell, width) in
                       enumerate(zip(line, widths, strict=True))) for line in cells]  # fmt: skip
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=100, help="rounds of each race (default 100)")
    parser.add_argument("--actors", type=int, default=8, help="processes in the one-organization race (default 8)")
    parser.add_argument("-k", dest="keyword", default="", help="only the races whose test matches (pytest's -k)")
    parser.add_argument("--examples", type=int, default=3, help="examples printed per race that broke (default 3)")
    args = parser.parse_args(argv)
    if not os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://")):
        print("DATABASE_URL must point to PostgreSQL: these races cannot happen on SQLite.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="races-") as folder:
        report = Path(folder) / "report.jsonl"
        env = {
            **os.environ,
            "RACE_REPETITIONS": str(args.repetitions),
            "RACE_ACTORS": str(args.actors),
            "RACE_REPORT": str(report),
        }
        command = [sys.executable, "-m", "pytest", "tests/concurrency/test_races.py", "-q", "-p", "no:cacheprovider"]
        if args.keyword:
            command += ["-k", args.keyword]
        # The tests fail when a race broke the contract; the table says how often, so their output is not needed.
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        rows = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    summary = finished.stdout.strip().splitlines()[-1] if finished.stdout.strip() else ""
    counts = {kind: int(number) for number, kind in re.findall(r"(\d+) (passed|failed|errors?)", summary)}
    ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    if rows:
        print(table(rows))
    broken = [row for row in rows if any(row[key] for key in FINDINGS)]
    for row in broken:
        print(f"\n{row['race']}:")
        for example in row["examples"][: args.examples]:
            print(f"  - {example}")
    # A race whose rounds could not run (an actor died, a round timed out) has no row: show pytest's own account.
    if not rows or ran > len(rows) or finished.returncode not in (0, 1):
        print(finished.stdout[-6000:] + finished.stderr[-2000:], file=sys.stderr)
        print(f"{ran - len(rows)} of {ran} race tests reported nothing (pytest: {summary!r})", file=sys.stderr)
        return 2
    print(f"\npytest: {summary}")
    return 1 if broken else 0


if __name__ == "__main__":
    raise SystemExit(main())
