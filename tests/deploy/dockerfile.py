"""A small reader of deploy/Dockerfile for its tests: stages, their instructions, ARG values expanded.

No hadolint or Docker here, and the file uses a handful of instructions in their plain forms; what it does not
understand (a heredoc, a parser directive other than a comment) makes the reader fail rather than guess.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

INSTRUCTIONS = {
    "FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "WORKDIR", "USER", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL",
    "HEALTHCHECK", "SHELL", "VOLUME", "STOPSIGNAL", "ONBUILD",
}  # fmt: skip
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@dataclass
class Instruction:
    keyword: str
    arguments: str
    line: int


@dataclass
class Stage:
    base: str  # as written, ARGs expanded
    name: str
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)

    def all(self, keyword: str) -> list[Instruction]:
        return [instruction for instruction in self.instructions if instruction.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(stage for stage in self.stages if stage.name == name)

    def instructions(self, keyword: str) -> list[tuple[Stage, Instruction]]:
        return [(stage, each) for stage in self.stages for each in stage.all(keyword)]


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with their continuation lines joined, comments and blank lines left out."""
    lines: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        lines.append((start, " ".join(part for part in pending if part)))
        pending = []
    if pending:
        raise ValueError(f"line {start}: an instruction continues past the end of the file")
    return lines


def expand(value: str, variables: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in variables:
            raise KeyError(f"${name} is not a declared ARG or ENV")
        return variables[name]

    return VARIABLE.sub(replace, value)


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text()):
        keyword, _, arguments = text.partition(" ")
        keyword = keyword.upper()
        if keyword not in INSTRUCTIONS:
            raise ValueError(f"line {line}: unknown instruction {keyword}")
        if "<<" in arguments and keyword in ("RUN", "COPY"):
            raise ValueError(f"line {line}: heredocs are not read here")
        if keyword == "ARG" and not stages:
            name, _, default = arguments.partition("=")
            global_args[name] = default
            continue
        if keyword == "FROM":
            words = arguments.split()
            if len(words) != 3 or words[1].upper() != "AS":
                raise ValueError(f"line {line}: every stage is named (FROM image AS name)")
            stages.append(Stage(base=expand(words[0], global_args), name=words[2]))
            continue
        if not stages:
            raise ValueError(f"line {line}: {keyword} before the first FROM")
        stage = stages[-1]
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            stage.args[name] = default or global_args.get(name, "")
        stage.instructions.append(Instruction(keyword, arguments, line))
    return Dockerfile(global_args, stages)


def exec_form(arguments: str) -> list[str] | None:
    """The JSON (exec) form of ENTRYPOINT/CMD as a list, or None for the shell form."""
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(item, str) for item in value) else None


def commands(run: Instruction, variables: dict[str, str]) -> list[list[str]]:
    """A RUN's shell command split at ``&&`` into argument lists, ARGs expanded (the file uses no other operator)."""
    text = expand(run.arguments, variables)
    if re.search(r"[;|`]|\|\||\$\(", text):
        raise ValueError(f"line {run.line}: only `&&` joins commands here: {text}")
    return [shlex.split(part) for part in text.split("&&")]
