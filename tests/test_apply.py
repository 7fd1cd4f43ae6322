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


FALLBACK_FILE = """\
models:
  gpt-4o:
    fallbacks: [sonnet, llama]
    content_policy_fallbacks: true
    deployments:
      - name: main
        type: openai
        endpoint: https://api.openai.com
        connect_timeout: 2
        first_token_timeout: 15
        idle_timeout: 30
  sonnet:
    fallbacks: [local]
    deployments:
      - type: anthropic
        endpoint: https://api.anthropic.com
  llama:
    aliases: [local]
    deployments:
      - type: local
        endpoint: http://127.0.0.1:5000
"""


@pytest.mark.usefixtures("registry_backend")
def test_fallbacks_and_timeouts_apply_diff_and_round_trip(tmp_path: Path) -> None:
    # fallbacks naming groups (and an alias) that the file defines further down
    r = apply(tmp_path, FALLBACK_FILE)
    assert r.returncode == 0, r.stderr
    assert "+ model gpt-4o (strategy default, rpm -, tpm -, fallbacks [sonnet, llama], content-policy fallbacks)" \
        in r.stdout, r.stdout
    assert execute(tmp_path, "SELECT name, fallbacks, content_policy_fallbacks FROM model_groups ORDER BY name") == [
        ("gpt-4o", '["sonnet","llama"]', True), ("llama", None, False), ("sonnet", '["local"]', False)]
    assert execute(tmp_path, "SELECT connect_timeout, first_token_timeout, idle_timeout FROM deployments "
                   "WHERE name = 'main'") == [(2.0, 15.0, 30.0)]
    before = db_digest(tmp_path)
    assert "no changes" in apply(tmp_path, FALLBACK_FILE).stdout and db_digest(tmp_path) == before
    exported = run_cli(tmp_path, "export").stdout
    for text in ("fallbacks:\n    - sonnet\n    - llama\n", "content_policy_fallbacks: true", "connect_timeout: 2.0",
                 "first_token_timeout: 15.0", "idle_timeout: 30.0"):
        assert text in exported, exported
    assert exported.count("fallbacks") == 3  # only where set: not llama's, not sonnet's content-policy switch
    assert "timeout" not in exported.split("sonnet:")[1]
    other = tmp_path / "other"
    assert apply(other, exported).returncode == 0
    assert run_cli(other, "export").stdout == exported
    # changes are shown per field, and a group dropped from the file and from the fallbacks goes in one apply
    changed = (FALLBACK_FILE.replace("fallbacks: [sonnet, llama]", "fallbacks: [llama]")
               .replace("content_policy_fallbacks: true", "content_policy_fallbacks: false")
               .replace("connect_timeout: 2", "connect_timeout: 3").replace("        idle_timeout: 30\n", ""))
    changed = changed[:changed.index("  sonnet:")] + changed[changed.index("  llama:"):]  # sonnet removed
    dry = apply(tmp_path, changed, "--dry-run")
    for line in ("~ model gpt-4o: fallbacks [sonnet, llama] -> [llama], content_policy_fallbacks True -> False",
                 "~ deployment gpt-4o/main: connect_timeout 2 -> 3, idle_timeout 30 -> -", "- model sonnet"):
        assert line in dry.stdout, dry.stdout
    assert db_digest(tmp_path) == before
    r = apply(tmp_path, changed)
    assert r.returncode == 0 and "0 added, 2 changed, 1 removed" in r.stdout, r.stdout + r.stderr
    assert execute(tmp_path, "SELECT name, fallbacks, content_policy_fallbacks FROM model_groups ORDER BY name") == [
        ("gpt-4o", '["llama"]', False), ("llama", None, False)]
    assert "no changes" in apply(tmp_path, changed).stdout


@pytest.mark.usefixtures("registry_backend")
@pytest.mark.parametrize("old, new, fragment", [
    ("[sonnet, llama]", "[sonnet, ghost]", "fallback 'ghost' of model 'gpt-4o' is not a model or alias"),
    ("[sonnet, llama]", "[gpt-4o]", "model 'gpt-4o' cannot fall back to itself"),
    ("[sonnet, llama]", "[llama, local]", "names fallback 'llama' twice ('llama' and 'local')"),
    ("[local]", "[gpt-4o]", "fallbacks would loop: gpt-4o -> sonnet -> gpt-4o"),
    ("[sonnet, llama]", "sonnet", "fallbacks must be a list of model names"),
    ("[sonnet, llama]", "[sonnet, 3]", "fallbacks must be a list of model names"),
    ("content_policy_fallbacks: true", "content_policy_fallbacks: 1", "content_policy_fallbacks must be true or false"),
    ("connect_timeout: 2", "connect_timeout: 0", "connect_timeout must be more than 0"),
    ("first_token_timeout: 15", "first_token_timeout: -1", "first_token_timeout must be more than 0"),
    ("idle_timeout: 30", "idle_timeout: fast", "idle_timeout must be a number"),
])
def test_bad_fallbacks_and_timeouts_are_refused(tmp_path: Path, old: str, new: str, fragment: str) -> None:
    assert apply(tmp_path, FALLBACK_FILE).returncode == 0
    before = db_digest(tmp_path)
    text = FALLBACK_FILE.replace(old, new, 1)
    assert text != FALLBACK_FILE
    r = apply(tmp_path, text)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, r.stderr
    assert db_digest(tmp_path) == before
