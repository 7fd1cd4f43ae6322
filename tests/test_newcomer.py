"""A fresh clone is enough: nothing outside the repository is read, and the spec the tests use is in it."""

from __future__ import annotations

import re
from pathlib import Path

from tests.support import schema

ROOT = Path(__file__).resolve().parents[1]
# what a clone does not have: build outputs, virtualenvs, run data (as .gitignore says)
NOT_IN_A_CLONE = {".git", ".venv", ".venv-vllm", "build", "data", "logs", "__pycache__", ".pytest_cache",
                  ".mypy_cache", ".ruff_cache", "results"}
TEXT = {".py", ".md", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".sh", ".txt", ".example", ""}
# a path into the sibling folder `shared` next to the clone: written relative, or joined onto a parent
OUTSIDE = re.compile(r"\.\./" + r"shared|parents\[\d+\]\s*/\s*[\"']" + "shared")


def repository_files() -> list[Path]:
    return [p for p in ROOT.rglob("*")
            if p.is_file() and p.suffix in TEXT and p.parent != ROOT / "tests" / "fixtures"
            and not NOT_IN_A_CLONE.intersection(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def test_nothing_reads_outside_the_repository() -> None:
    files = repository_files()
    assert ROOT / "tests" / "support" / "schema.py" in files and ROOT / "Makefile" in files
    found = [f"{p.relative_to(ROOT)}:{n}" for p in files
             for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not found


def test_the_openai_spec_is_a_fixture_with_its_source_noted() -> None:
    assert schema.SPEC_PATH.is_relative_to(ROOT / "tests" / "fixtures") and schema.SPEC_PATH.is_file()
    assert "openai/openai-openapi" in (ROOT / "tests" / "fixtures" / "README.md").read_text()
    schema.assert_valid("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": None}})
