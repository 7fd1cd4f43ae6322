"""`router apply FILE` and `router export`: the registry made to match a file, idempotent, with a diff,
in one transaction, --dry-run writing nothing; export -> apply to an empty registry -> export round trips.
On SQLite and on Postgres (`registry_backend`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.processes import run_cli
from tests.support.registry_db import db_digest, execute

FILE = """\
models:
  gpt-4o:
    strategy: cost-latency
    rpm: 500
    aliases: [gpt4, gpt-4-omni]
    deployments:
      - name: openai-main
        type: openai
        endpoint: https://api.openai.com
        upstream_model: gpt-4o-2024-08-06
        key_env: APPLY_TEST_KEY
        input_price: 2.5
        output_price: 10
        context_window: 128000
        weight: 2
        rpm: 100
        tpm: 10000
        timeout: 30
        max_tokens_param: max_tokens
      - type: openrouter
        endpoint: https://openrouter.ai/api
        upstream_model: openai/gpt-4o
        enabled: false
  llama:
    deployments:
      - type: local
        endpoint: http://127.0.0.1:5000
      - type: local
        endpoint: http://127.0.0.1:5001
"""
ENV = {"APPLY_TEST_KEY": "sk-apply-secret"}


def apply(workdir: Path, text: str, *flags: str, env: dict[str, str] | None = ENV):  # type: ignore[no-untyped-def]
    workdir.mkdir(exist_ok=True)
    path = workdir / "models.yaml"
    path.write_text(text)
    return run_cli(workdir, "apply", str(path), *flags, env=env)


@pytest.mark.usefixtures("registry_backend")
def test_apply_is_idempotent_and_export_round_trips(tmp_path: Path) -> None:
    r = apply(tmp_path, FILE, "--dry-run")
    assert r.returncode == 0 and "+ deployment gpt-4o/openai-main" in r.stdout and "dry run" in r.stdout
    assert run_cli(tmp_path, "export").stdout == "models: {}\n"  # nothing written
    r = apply(tmp_path, FILE)
    assert r.returncode == 0, r.stderr
    for line in ("+ model gpt-4o", "+ deployment gpt-4o/openai-main", "+ deployment gpt-4o/openrouter-openrouter.ai",
                 "+ deployment llama/local-127.0.0.1", "+ deployment llama/local-127.0.0.1-2",
                 "+ alias gpt4 -> gpt-4o"):
        assert line in r.stdout
    assert "8 added, 0 changed, 0 removed" in r.stdout
    before = db_digest(tmp_path)
    again = apply(tmp_path, FILE)
    assert again.returncode == 0 and "no changes" in again.stdout and db_digest(tmp_path) == before
    exported = run_cli(tmp_path, "export").stdout
    assert "sk-apply-secret" not in exported and "key_env: APPLY_TEST_KEY" in exported
    other = tmp_path / "other"
    assert apply(other, exported).returncode == 0
    assert run_cli(other, "export").stdout == exported
    # the export file form, applied back to the source: nothing to do
    assert run_cli(tmp_path, "export", str(tmp_path / "out.yaml")).returncode == 0
    assert (tmp_path / "out.yaml").read_text() == exported
    assert "no changes" in apply(tmp_path, exported).stdout


@pytest.mark.usefixtures("registry_backend")
def test_changes_are_shown_per_field_and_removals_applied(tmp_path: Path) -> None:
    assert apply(tmp_path, FILE).returncode == 0
    assert run_cli(tmp_path, "add-model", "extra", "local", "http://127.0.0.1:7", "weight").returncode == 0
    changed = (FILE.replace("input_price: 2.5", "input_price: 3").replace("rpm: 500", "rpm: 400")
               .replace("aliases: [gpt4, gpt-4-omni]", "aliases: [gpt4]")
               .replace("      - type: local\n        endpoint: http://127.0.0.1:5001\n", ""))
    dry = apply(tmp_path, changed, "--dry-run")
    before = db_digest(tmp_path)
    for line in ("~ model gpt-4o: rpm 500 -> 400", "~ deployment gpt-4o/openai-main: input_price 2.5 -> 3",
                 "- alias gpt-4-omni -> gpt-4o", "- deployment llama/local-127.0.0.1-2", "- model extra"):
        assert line in dry.stdout, dry.stdout
    assert db_digest(tmp_path) == before
    r = apply(tmp_path, changed)
    assert r.returncode == 0 and "0 added, 2 changed, 3 removed" in r.stdout, r.stdout
    exported = run_cli(tmp_path, "export").stdout
    assert "extra" not in exported and "gpt-4-omni" not in exported and "input_price: 3.0" in exported


@pytest.mark.usefixtures("registry_backend")
def test_agents_are_not_part_of_the_file(tmp_path: Path) -> None:
    assert apply(tmp_path, FILE).returncode == 0
    execute(tmp_path, "INSERT INTO agents (name, endpoint, models, registered_at, last_heartbeat) "
            "VALUES ('gpu', 'http://127.0.0.1:9', '[\"llama\"]', 1, 1)")
    assert "gpu" not in run_cli(tmp_path, "export").stdout
    assert apply(tmp_path, "models: {}\n").returncode == 0
    assert execute(tmp_path, "SELECT name FROM agents") == [("gpu",)]


@pytest.mark.usefixtures("registry_backend")
@pytest.mark.parametrize("text, fragment", [
    (FILE.replace("strategy: cost-latency", "strategy: fastest"), "unknown strategy 'fastest'"),
    (FILE.replace("input_price: 2.5", "input_price: -2.5"), "input price must be at least 0"),
    (FILE.replace("weight: 2", "weight: -1"), "weight"),
    (FILE.replace("context_window: 128000", "context_window: 0"), "context window"),
    (FILE.replace("type: openrouter", "type: openrouterx"), "unknown type"),
    (FILE.replace("upstream_model: openai/gpt-4o", "kind: weight"), "contradicts type"),
    (FILE.replace("timeout: 30", "timeut: 30"), "unknown deployment field"),
    (FILE.replace("rpm: 500", "rmp: 500"), "unknown key"),
    (FILE.replace("aliases: [gpt4, gpt-4-omni]", "aliases: [llama]"), "also a model name"),
    (FILE.replace("endpoint: http://127.0.0.1:5001", "endpoint: http://127.0.0.1:5000"), "two deployments of local"),
    (FILE.replace("- type: openrouter", "- name: openai-main\n        type: openrouter"), "two deployments named"),
    ("models: [1, 2]", "must map model names"),
    ("models:\n  a: {deployments: [}\n", "not valid YAML"),
])
def test_bad_files_are_one_line_and_change_nothing(tmp_path: Path, text: str, fragment: str) -> None:
    assert apply(tmp_path, FILE).returncode == 0
    before = db_digest(tmp_path)
    r = apply(tmp_path, text)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr
    assert db_digest(tmp_path) == before


@pytest.mark.usefixtures("registry_backend")
def test_a_missing_key_variable_fails_the_whole_file(tmp_path: Path) -> None:
    r = apply(tmp_path, FILE, env={})
    assert r.returncode != 0 and "APPLY_TEST_KEY" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert run_cli(tmp_path, "export").stdout == "models: {}\n"  # one transaction: nothing from the file
