"""Model groups and their deployments through the CLI: several deployments per name, options, in-place
updates, aliases, prices in list-models, bad input refused in one line with the database unchanged, and
a database from before groups migrated.
On SQLite and on Postgres (`registry_backend`)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.support.openai_stub import OpenAIStub
from tests.support.processes import run_cli
from tests.support.registry_db import db_digest, rows, stored_text

OPENAI = "https://api.openai.com"




def ok(workdir: Path, *args: str, env: dict[str, str] | None = None) -> str:
    r = run_cli(workdir, *args, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.usefixtures("registry_backend")
def test_same_name_other_target_adds_a_deployment(tmp_path: Path) -> None:
    ok(tmp_path, "add-model", "gpt-4o", "openai", OPENAI, "api")
    ok(tmp_path, "add-model", "gpt-4o", "openai", OPENAI, "api", "--upstream-model", "gpt-4o-2024-08-06")
    ok(tmp_path, "add-model", "gpt-4o", "openrouter", "https://openrouter.ai/api", "api",
       "--name", "or", "--upstream-model", "openai/gpt-4o", "--input-price", "3", "--output-price", "12",
       "--context-window", "64000", "--weight", "2", "--rpm", "10", "--tpm", "1000", "--timeout", "30",
       "--disabled", "--strategy", "latency", "--max-tokens-param", "max_tokens", "--key-env", "OR_KEY_2",
       env={"OR_KEY_2": "sk-or-secret-value"})
    assert rows(tmp_path, "SELECT name, strategy FROM model_groups") == [("gpt-4o", "latency")]
    assert rows(tmp_path, "SELECT name, upstream_model FROM deployments ORDER BY id") == [
        ("openai-api.openai.com", None), ("openai-api.openai.com-2", "gpt-4o-2024-08-06"), ("or", "openai/gpt-4o")]
    assert rows(tmp_path, "SELECT key_env, input_price, output_price, context_window, weight, rpm, tpm, timeout, "
                "enabled, max_tokens_param FROM deployments WHERE name = 'or'") == [
        ("OR_KEY_2", 3.0, 12.0, 64000, 2.0, 10, 1000, 30.0, 0, "max_tokens")]
    assert "sk-or-secret-value" not in stored_text(tmp_path)  # only the variable's name is stored
    # the exact same deployment twice is an error (the upstream name defaulting to the group's included)
    before = db_digest(tmp_path)
    for extra in ((), ("--upstream-model", "gpt-4o")):
        r = run_cli(tmp_path, "add-model", "gpt-4o", "openai", OPENAI, "api", *extra)
        assert r.returncode != 0 and "already exists" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert db_digest(tmp_path) == before


@pytest.mark.usefixtures("registry_backend")
@pytest.mark.parametrize("args, fragment", [
    (("m", "nosuchtype", "http://x:1", "api"), "unknown type"),
    (("m", "openai", OPENAI, "weight"), "contradicts type"),
    (("m", "huggingface", "https://huggingface.co", "api"), "contradicts type"),
    (("m", "local", "http://x:1", "weight", "--input-price", "-1"), "input price must be at least 0"),
    (("m", "local", "http://x:1", "weight", "--output-price", "-0.5"), "output price"),
    (("m", "local", "http://x:1", "weight", "--weight", "-1"), "weight must be at least 0"),
    (("m", "local", "http://x:1", "weight", "--rpm", "-5"), "rpm"),
    (("m", "local", "http://x:1", "weight", "--tpm", "-5"), "tpm"),
    (("m", "local", "http://x:1", "weight", "--timeout", "0"), "timeout"),
    (("m", "local", "http://x:1", "weight", "--connect-timeout", "0"), "connect_timeout must be more than 0"),
    (("m", "local", "http://x:1", "weight", "--first-token-timeout", "-1"), "first_token_timeout must be more than 0"),
    (("m", "local", "http://x:1", "weight", "--idle-timeout", "0"), "idle_timeout must be more than 0"),
    (("m", "local", "http://x:1", "weight", "--context-window", "0"), "context window must be at least 1"),
    (("m", "local", "http://x:1", "weight", "--strategy", "fastest"), "unknown strategy 'fastest'"),
    (("m", "local", "http://x:1", "weight", "--key-env", "ROUTER_TEST_UNSET_KEY"), "ROUTER_TEST_UNSET_KEY"),
    (("m", "local", "http://x:1", "weight", "--key-env", "not a name"), "environment variable name"),
    (("m", "local", "http://x:1", "weight", "--max-tokens-param", "tokens"), "max_tokens_param"),
    (("m", "local", "http://x:1", "weight", "--name", "bad name!"), "deployment name"),
    (("existing", "local", "http://localhost:5000", "weight", "--name", "x2"), "already exists"),
    (("existing", "openai", "http://other:1", "api", "--name", "local-localhost"), "named 'local-localhost'"),
])
def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    ok(tmp_path, "add-model", "existing", "local", "http://localhost:5000", "weight")
    before = db_digest(tmp_path)
    r = run_cli(tmp_path, "add-model", *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert db_digest(tmp_path) == before


@pytest.mark.usefixtures("registry_backend")
def test_update_in_place_group_and_deployment_options(tmp_path: Path) -> None:
    ok(tmp_path, "add-model", "m", "openai", OPENAI, "api")
    (created, id_), = rows(tmp_path, "SELECT created_at, id FROM deployments")
    out = ok(tmp_path, "update-model", "m", "--input-price", "1.5", "--context-window", "8000")
    assert "deployment m/openai-api.openai.com" in out
    # one deployment: --rpm without --deployment is the group's limit
    assert "group m" in ok(tmp_path, "update-model", "m", "--rpm", "50", "--strategy", "cost")
    ok(tmp_path, "add-model", "m", "openai", "http://127.0.0.1:9", "api", "--name", "second")
    before = db_digest(tmp_path)
    r = run_cli(tmp_path, "update-model", "m", "--weight", "3")  # which one?
    assert r.returncode != 0 and "--deployment" in r.stderr and "second" in r.stderr
    for bad in (("--deployment", "second", "--strategy", "nope", "--weight", "2"),  # one transaction: nothing
                ("--deployment", "second", "--key-env", "ROUTER_TEST_UNSET_KEY"),
                ("--deployment", "ghost", "--weight", "2"), ("--deployment", "second"),
                ("--deployment", "second", "--kind", "weight")):
        r = run_cli(tmp_path, "update-model", "m", *bad)
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, (bad, r.stderr)
    assert db_digest(tmp_path) == before
    ok(tmp_path, "update-model", "m", "--deployment", "second", "--rpm", "7", "--disable", "--name", "backup")
    assert rows(tmp_path, "SELECT id, created_at, input_price, context_window FROM deployments WHERE name = "
                "'openai-api.openai.com'") == [(id_, created, 1.5, 8000)]
    assert rows(tmp_path, "SELECT rpm, enabled FROM deployments WHERE name = 'backup'") == [(7, 0)]
    assert rows(tmp_path, "SELECT strategy, rpm FROM model_groups") == [("cost", 50)]
    ok(tmp_path, "update-model", "m", "--deployment", "backup", "--enable")
    assert rows(tmp_path, "SELECT enabled FROM deployments WHERE name = 'backup'") == [(1,)]
    # the older commands act on the group and its deployments
    ok(tmp_path, "set-model-limits", "m", "--rpm", "9")
    ok(tmp_path, "set-model-option", "m", "--max-tokens-param", "max_tokens")
    assert rows(tmp_path, "SELECT rpm FROM model_groups") == [(9,)]
    assert rows(tmp_path, "SELECT DISTINCT max_tokens_param FROM deployments") == [("max_tokens",)]


@pytest.mark.usefixtures("registry_backend")
def test_remove_deployment_group_and_aliases(tmp_path: Path) -> None:
    ok(tmp_path, "add-model", "m", "local", "http://127.0.0.1:1", "weight")
    ok(tmp_path, "add-model", "m", "local", "http://127.0.0.1:2", "weight", "--name", "two")
    ok(tmp_path, "add-alias", "mm", "m")
    for bad, fragment in ((("add-alias", "m", "m"), "model name"), (("add-alias", "x", "ghost"), "ghost"),
                          (("remove-alias", "nope"), "nope"), (("remove-model", "m", "--deployment", "x"), "'x'")):
        r = run_cli(tmp_path, *bad)
        assert r.returncode != 0 and fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "aliases: mm" in ok(tmp_path, "list-models")
    ok(tmp_path, "remove-model", "m", "--deployment", "two")
    assert rows(tmp_path, "SELECT name FROM deployments") == [("local-127.0.0.1",)]
    ok(tmp_path, "remove-model", "m")
    assert rows(tmp_path, "SELECT count(*) FROM deployments") == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM aliases") == [(0,)]
    ok(tmp_path, "add-model", "m", "local", "http://127.0.0.1:1", "weight")
    ok(tmp_path, "add-alias", "mm", "m")
    ok(tmp_path, "remove-alias", "mm")
    assert rows(tmp_path, "SELECT count(*) FROM aliases") == [(0,)]


@pytest.mark.usefixtures("registry_backend")
def test_list_models_shows_prices_explicit_default_or_unknown(tmp_path: Path) -> None:
    ok(tmp_path, "add-model", "gpt-4o", "openai", OPENAI, "api")
    ok(tmp_path, "add-model", "gpt-4o", "local", "http://127.0.0.1:1", "weight", "--input-price", "0.5")
    listing = ok(tmp_path, "list-models")
    assert "2.5 (default)" in listing and "10 (default)" in listing and "128000 (default)" in listing
    line = next(li for li in listing.splitlines() if "local-127.0.0.1" in li)
    assert "0.5" in line and line.count("unknown") == 2  # output price and context window: unknown, not free


def test_database_from_before_groups_migrates_and_routes(tmp_path: Path, start_router) -> None:
    """A registry written by the previous release (schema 3) opens; each model becomes a group with one
    deployment keeping its type, endpoint, limits and options, and it routes as before."""
    from router.registry import MIGRATIONS

    stub = OpenAIStub(name="legacy").start()
    try:
        (tmp_path / "data").mkdir()
        conn = sqlite3.connect(tmp_path / "data" / "models.db")
        for migration in MIGRATIONS[:3]:
            for stmt in migration:
                assert isinstance(stmt, str)
                conn.execute(stmt)
        conn.execute("INSERT INTO models (name, type, endpoint, kind, created_at, updated_at, rpm, tpm, "
                     "max_tokens_param) VALUES ('old', 'openai', ?, 'api', 1, 2, 60, NULL, 'max_tokens')", (stub.url,))
        conn.execute("INSERT INTO models (name, type, endpoint, kind, created_at, updated_at) "
                     "VALUES ('mistral', 'local', 'http://localhost:5000', 'weight', 3, 4)")
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
        conn.close()
        router = start_router({"LOCAL_AGENT_URL": ""})
        assert rows(tmp_path, "SELECT name, strategy, rpm, tpm, created_at, updated_at FROM model_groups "
                    "ORDER BY name") == [
            ("mistral", None, None, None, 3.0, 4.0), ("old", None, 60, None, 1.0, 2.0)]
        assert rows(tmp_path, "SELECT model_group, name, type, endpoint, kind, upstream_model, max_tokens_param, "
                    "enabled, weight FROM deployments ORDER BY model_group") == [
            ("mistral", "local-localhost", "local", "http://localhost:5000", "weight", None, None, 1, 1.0),
            ("old", "openai-127.0.0.1", "openai", stub.url, "api", None, "max_tokens", 1, 1.0)]
        answer = router.client().chat.completions.create(model="old", messages=[{"role": "user", "content": "x"}])
        assert answer.choices[0].message.content == "Hello from legacy" and answer.model == "old"
    finally:
        stub.stop()


@pytest.mark.usefixtures("registry_backend")
def test_set_fallbacks_chain_and_refusals(tmp_path: Path) -> None:
    for name, port in (("a", 1), ("b", 2), ("c", 3)):
        ok(tmp_path, "add-model", name, "local", f"http://127.0.0.1:{port}", "weight")
    ok(tmp_path, "add-alias", "bb", "b")
    out = ok(tmp_path, "set-fallbacks", "a", "bb", "c", "--content-policy")
    assert "fallback chain: a -> b -> c" in out and "content-policy" in out
    assert "fallback chain: b -> c" in ok(tmp_path, "set-fallbacks", "b", "c")
    assert rows(tmp_path, "SELECT name, fallbacks, content_policy_fallbacks FROM model_groups ORDER BY name") == [
        ("a", '["bb","c"]', True), ("b", '["c"]', False), ("c", None, False)]  # 1/0 in SQLite compare equal
    assert "fallbacks: bb, c (content policy too)" in ok(tmp_path, "list-models")
    before = db_digest(tmp_path)
    for bad, fragment in (
            (("set-fallbacks", "c", "a"), "fallbacks would loop: a -> b -> c -> a"),
            (("set-fallbacks", "c", "c"), "cannot fall back to itself"),
            (("set-fallbacks", "b", "bb"), "cannot fall back to itself (alias 'bb')"),
            (("set-fallbacks", "c", "ghost"), "fallback 'ghost' of model 'c' is not a model or alias"),
            (("set-fallbacks", "c", "a", "a"), "names fallback 'a' twice"),
            (("set-fallbacks", "c", "b", "bb"), "names fallback 'b' twice ('b' and 'bb')"),
            (("set-fallbacks", "ghost", "a"), "model 'ghost' is not in the registry"),
            (("remove-model", "c"), "model 'c' is a fallback of 'a', 'b'"),  # like a foreign key
            (("remove-model", "c", "--deployment", "local-127.0.0.1"), "is a fallback of"),  # its last deployment
            (("remove-model", "b"), "model 'b' is a fallback of 'a'"),  # named through its alias
            (("remove-alias", "bb"), "alias 'bb' is a fallback of 'a'"),
            (("add-alias", "bb", "c"), "names fallback 'c' twice ('bb' and 'c')"),  # an alias moved
            (("add-alias", "bb", "a"), "cannot fall back to itself")):
        r = run_cli(tmp_path, *bad)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (bad, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and fragment in r.stderr, (bad, r.stderr)
    assert db_digest(tmp_path) == before
    # no names: cleared; the content-policy switch stays as it was unless given
    assert "a: no fallbacks" in ok(tmp_path, "set-fallbacks", "a")
    assert rows(tmp_path, "SELECT fallbacks, content_policy_fallbacks FROM model_groups WHERE name = 'a'") == [
        (None, True)]
    ok(tmp_path, "set-fallbacks", "a", "c", "--no-content-policy")
    assert rows(tmp_path, "SELECT fallbacks, content_policy_fallbacks FROM model_groups WHERE name = 'a'") == [
        ('["c"]', False)]
    ok(tmp_path, "remove-alias", "bb")  # no longer named by anyone
    ok(tmp_path, "set-fallbacks", "b")
    ok(tmp_path, "remove-model", "b")
    # the group's own fallbacks go with it; other commands on the group leave them alone
    ok(tmp_path, "update-model", "a", "--strategy", "cost", "--rpm", "5")
    ok(tmp_path, "add-model", "a", "local", "http://127.0.0.1:9", "weight", "--name", "two", "--strategy", "latency")
    assert rows(tmp_path, "SELECT fallbacks FROM model_groups WHERE name = 'a'") == [('["c"]',)]
    ok(tmp_path, "set-fallbacks", "c")
    ok(tmp_path, "remove-model", "a")
    ok(tmp_path, "remove-model", "c")
    assert rows(tmp_path, "SELECT count(*) FROM model_groups") == [(0,)]


@pytest.mark.usefixtures("registry_backend")
def test_timeouts_per_deployment_set_cleared_and_validated(tmp_path: Path) -> None:
    ok(tmp_path, "add-model", "m", "local", "http://127.0.0.1:1", "weight", "--timeout", "60",
       "--connect-timeout", "2.5", "--first-token-timeout", "10", "--idle-timeout", "30")
    query = "SELECT timeout, connect_timeout, first_token_timeout, idle_timeout FROM deployments"
    assert rows(tmp_path, query) == [(60.0, 2.5, 10.0, 30.0)]
    line = next(li for li in ok(tmp_path, "list-models").splitlines() if "local-127.0.0.1" in li)
    assert "total 60 connect 2.5 first token 10 idle 30" in line
    ok(tmp_path, "update-model", "m", "--connect-timeout", "0", "--idle-timeout", "5")  # 0: the setting's default
    assert rows(tmp_path, query) == [(60.0, None, 10.0, 5.0)]
    before = db_digest(tmp_path)
    for flag in ("--connect-timeout", "--first-token-timeout", "--idle-timeout"):
        r = run_cli(tmp_path, "update-model", "m", flag, "-1")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"{flag[2:].replace('-', '_')} must be more than 0" in r.stderr, r.stderr
    assert db_digest(tmp_path) == before
    ok(tmp_path, "add-model", "n", "local", "http://127.0.0.1:2", "weight")  # none given: all NULL (the settings)
    assert rows(tmp_path, query + " WHERE model_group = 'n'") == [(None, None, None, None)]


def test_fallbacks_set_on_the_cli_reach_a_running_router(tmp_path: Path, start_router) -> None:
    """The registry's fallbacks are what the router routes by: a group whose only deployment is down is
    answered by its fallback once `set-fallbacks` names it, without a restart."""
    from tests.support.processes import free_port

    stub = OpenAIStub(name="backup").start()
    try:
        ok(tmp_path, "add-model", "main", "openai", f"http://127.0.0.1:{free_port()}", "api")  # nothing listens
        ok(tmp_path, "add-model", "backup", "openai", stub.url, "api")
        router = start_router({"REGISTRY_POLL_INTERVAL": "1", "LOCAL_AGENT_URL": ""})
        body = {"model": "main", "messages": [{"role": "user", "content": "x"}]}
        with router.http() as http:
            assert http.post("/v1/chat/completions", json=body).status_code >= 500
            ok(tmp_path, "set-fallbacks", "main", "backup")
            deadline = time.monotonic() + 10
            while (r := http.post("/v1/chat/completions", json=body)).status_code != 200:
                assert time.monotonic() < deadline, r.text
                time.sleep(0.2)
        assert r.json()["choices"][0]["message"]["content"] == "Hello from backup"
    finally:
        stub.stop()
