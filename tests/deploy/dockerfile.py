"""A small Dockerfile reader for the image tests: stages, their instructions, ENV, exec-form CMD/HEALTHCHECK."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, ENV ...
    args: str  # the rest of the (joined) line


@dataclass
class Stage:
    image: str  # the FROM argument with build-arg defaults substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for pair in shlex.split(args):
                key, sep, value = pair.partition("=")
                assert sep, f"ENV {args!r}: use the KEY=value form"
                values[key] = value
        return values

    def exec_form(self, keyword: str) -> list[str]:
        """CMD/ENTRYPOINT/HEALTHCHECK's command in JSON exec form (HEALTHCHECK's options skipped)."""
        args = self.last(keyword)
        assert args is not None, f"no {keyword} in the final stage"
        if keyword == "HEALTHCHECK":
            args = args[args.index("CMD") + len("CMD"):]
        command = json.loads(args)
        assert isinstance(command, list) and all(isinstance(a, str) for a in command), f"{keyword}: not exec form"
        return command


@dataclass
class Dockerfile:
    path: Path
    build_args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def ignore_pragmas(self) -> list[tuple[int, str]]:
        """(line number, the comment line above it) for each `# hadolint ignore=` line."""
        lines = self.path.read_text().splitlines()
        return [(n + 1, lines[n - 1] if n else "") for n, line in enumerate(lines)
                if re.match(r"\s*#\s*hadolint\s+ignore=", line)]


def logical_lines(text: str) -> list[str]:
    """Instructions with their continuation lines joined; comments and blank lines dropped."""
    out: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return out


def parse(path: Path) -> Dockerfile:
    build_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: build_args[m.group(1) or m.group(2)], parts[0])
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(image, name))
        elif not stages:
            assert keyword == "ARG", f"{path}: only ARG may come before the first FROM, not {keyword}"
            key, _, default = args.partition("=")
            build_args[key] = default
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return Dockerfile(path, build_args, stages)
