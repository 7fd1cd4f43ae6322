"""The registry CLI, run as a user runs it, and a running router seeing its changes (on SQLite and on Postgres:
`registry_backend`)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import free_port, run_cli
from tests.support.registry_db import db_digest




@pytest.mark.usefixtures("registry_backend")
def test_add_list_remove(tmp_path: Path) -> None:
    r = run_cli(tmp_path, "add-model", "local_mistral", "local", "http://localhost:5000", "weight")
    assert r.returncode == 0, r.stderr
    r = run_cli(tmp_path, "add-model", "meta-llama/Llama-3", "huggingface", "https://huggingface.co", "weight")
    assert r.returncode == 0, r.stderr
    listing = run_cli(tmp_path, "list-models")
    assert listing.returncode == 0
    for text in ("local_mistral", "meta-llama/Llama-3", "huggingface", "http://localhost:5000", "weight"):
        assert text in listing.stdout
    assert run_cli(tmp_path, "remove-model", "local_mistral").returncode == 0
    listing = run_cli(tmp_path, "list-models").stdout
    assert "local_mistral" not in listing and "meta-llama/Llama-3" in listing


def test_database_folder_is_created_and_schema_versioned(tmp_path: Path) -> None:
    assert not (tmp_path / "data").exists()
    assert run_cli(tmp_path, "list-models").returncode == 0
    conn = sqlite3.connect(tmp_path / "data" / "models.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"model_groups", "deployments", "aliases", "agents"} <= tables and "models" not in tables
    cols = {r[1] for r in conn.execute("PRAGMA table_info(deployments)")}
    assert {"model_group", "name", "type", "endpoint", "kind", "upstream_model", "key_env", "input_price",
            "output_price", "context_window", "weight", "rpm", "tpm", "timeout", "enabled", "max_tokens_param",
            "created_at", "updated_at"} <= cols
    cols = {r[1] for r in conn.execute("PRAGMA table_info(agents)")}
    assert {"name", "endpoint", "models", "registered_at", "last_heartbeat"} <= cols


@pytest.mark.usefixtures("registry_backend")
@pytest.mark.parametrize("args, fragment", [
    (("m1", "nosuchtype", "http://x:1", "api"), "unknown type"),
    (("m1", "openai", "http://x:1", "remote"), "kind must be"),
    (("m1", "openai", "not a url", "api"), "http(s) URL"),
    (("m1", "openai", "ftp://host/x", "api"), "http(s) URL"),
    (("m1", "openai", "http://host:99999", "api"), "port"),
    (("existing", "local", "http://localhost:5000", "weight"), "already exists"),
])
def test_bad_input_exits_nonzero_with_one_line_and_leaves_db_unchanged(tmp_path: Path, args, fragment) -> None:
    assert run_cli(tmp_path, "add-model", "existing", "local", "http://localhost:5000", "weight").returncode == 0
    before = db_digest(tmp_path)
    r = run_cli(tmp_path, "add-model", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert db_digest(tmp_path) == before


@pytest.mark.usefixtures("registry_backend")
def test_remove_unknown_model_fails(tmp_path: Path) -> None:
    r = run_cli(tmp_path, "remove-model", "ghost")
    assert r.returncode != 0 and "ghost" in r.stderr


@pytest.mark.usefixtures("registry_backend")
def test_refresh_openai_upserts_and_reports(tmp_path: Path) -> None:
    stub = OpenAIStub(name="refresh", key=UPSTREAM_KEY, model_ids=["gpt-4o", "gpt-4o-mini"]).start()
    env = {"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY}
    try:
        assert run_cli(tmp_path, "add-model", "gpt-4o-mini", "local", "http://localhost:5000", "api").returncode == 0
        r = run_cli(tmp_path, "refresh-openai", env=env)
        assert r.returncode == 0, r.stderr
        assert "added gpt-4o" in r.stdout and "skipped gpt-4o-mini" in r.stdout
        assert stub.last().headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        stub.model_ids.append("o3-mini")
        r = run_cli(tmp_path, "refresh-openai", env=env)
        assert "added o3-mini" in r.stdout and "1 unchanged" in r.stdout
        listing = run_cli(tmp_path, "list-models").stdout
        assert "o3-mini" in listing and "openai" in listing
        assert UPSTREAM_KEY not in r.stdout + r.stderr + listing
    finally:
        stub.stop()


@pytest.mark.usefixtures("registry_backend")
@pytest.mark.parametrize("case", ["unreachable", "bad-key", "no-key"])
def test_refresh_openai_failures_leave_db_unchanged(tmp_path: Path, case: str) -> None:
    stub = OpenAIStub(name="refresh", key=UPSTREAM_KEY).start()
    try:
        env = {"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": "sk-wrong-key-abcdefgh"}
        if case == "unreachable":
            env = {"OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}", "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY}
        elif case == "no-key":
            env = {"OPENAI_BASE_URL": stub.url}
        assert run_cli(tmp_path, "add-model", "keep-me", "openai", stub.url, "api").returncode == 0
        before = db_digest(tmp_path)
        r = run_cli(tmp_path, "refresh-openai", env=env)
        assert r.returncode != 0
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "sk-wrong-key-abcdefgh" not in r.stderr and UPSTREAM_KEY not in r.stderr
        if case == "no-key":
            assert "EXTERNAL_OPENAI_KEY" in r.stderr
        assert db_digest(tmp_path) == before
    finally:
        stub.stop()


@pytest.mark.usefixtures("registry_backend")
def test_running_router_sees_cli_changes_without_restart(start_router, openai_stub: OpenAIStub) -> None:
    vllm = OpenAIStub(name="hot").start()
    try:
        router = start_router({"REGISTRY_POLL_INTERVAL": "1"})
        client = router.client()
        with router.http() as http:
            assert http.post("/v1/chat/completions", json={
                "model": "hot-model", "messages": [{"role": "user", "content": "x"}]}).status_code == 404
        assert router.cli("add-model", "hot-model", "openai", vllm.url, "api").returncode == 0
        assert wait_for(lambda: "hot-model" in {m.id for m in client.models.list().data}, 5)
        answer = client.chat.completions.create(model="hot-model", messages=[{"role": "user", "content": "x"}])
        assert answer.choices[0].message.content == "Hello from hot"
        assert router.cli("remove-model", "hot-model").returncode == 0
        assert wait_for(lambda: "hot-model" not in {m.id for m in client.models.list().data}, 5)
    finally:
        vllm.stop()


@pytest.mark.usefixtures("registry_backend")
def test_refresh_anthropic_google_openrouter(tmp_path: Path) -> None:
    from tests.conftest import ANTHROPIC_KEY, GOOGLE_KEY
    from tests.support.anthropic_stub import AnthropicStub
    from tests.support.gemini_stub import GeminiStub

    anthropic = AnthropicStub(ANTHROPIC_KEY, ["claude-a", "claude-b", "claude-c"]).start()
    gemini = GeminiStub(GOOGLE_KEY, ["gemini-a", "text-embedding-x", "gemini-b"]).start()
    openrouter = OpenAIStub(name="or", model_ids=["anthropic/claude-x", "openai/gpt-y"]).start()
    try:
        env = {"ANTHROPIC_BASE_URL": anthropic.url, "EXTERNAL_ANTHROPIC_KEY": ANTHROPIC_KEY,
               "GOOGLE_BASE_URL": gemini.url, "EXTERNAL_GOOGLE_KEY": GOOGLE_KEY,
               "OPENROUTER_BASE_URL": openrouter.url + "/api"}
        r = run_cli(tmp_path, "refresh-anthropic", env=env)
        assert r.returncode == 0, r.stderr
        assert "3 added" in r.stdout  # across two pages
        assert anthropic.requests[-1].query.get("after_id") == "claude-b"
        r = run_cli(tmp_path, "refresh-google", env=env)
        assert r.returncode == 0, r.stderr
        assert "added gemini-a" in r.stdout and "added gemini-b" in r.stdout
        assert "text-embedding-x" not in r.stdout  # cannot generateContent
        assert all(req.headers.get("x-goog-api-key") == GOOGLE_KEY and "key" not in req.query
                   for req in gemini.requests)
        r = run_cli(tmp_path, "refresh-openrouter", env=env)  # OpenRouter lists models without a key
        assert r.returncode == 0, r.stderr
        listing = run_cli(tmp_path, "list-models").stdout
        for name, type_ in (("claude-c", "anthropic"), ("gemini-b", "google"), ("openai/gpt-y", "openrouter")):
            assert name in listing and type_ in listing
        # all or nothing: a failing provider changes nothing
        before = db_digest(tmp_path)
        bad = {**env, "EXTERNAL_GOOGLE_KEY": "AIzaWrongKey000000000"}
        r = run_cli(tmp_path, "refresh-google", env=bad)
        assert r.returncode != 0 and "AIzaWrongKey000000000" not in r.stderr
        assert db_digest(tmp_path) == before
    finally:
        for stub in (anthropic, gemini, openrouter):
            stub.stop()


def test_version_5_database_migrates_keeping_its_data(tmp_path: Path) -> None:
    """A registry written before fallbacks and per-deployment timeouts (schema 5) opens with every row kept;
    the new columns start empty (no fallbacks, the settings' timeouts) and take values."""
    from router.registry import MIGRATIONS, SCHEMA_VERSION

    (tmp_path / "data").mkdir()
    conn = sqlite3.connect(tmp_path / "data" / "models.db", isolation_level=None)
    for migration in MIGRATIONS[:5]:
        for stmt in migration:
            if callable(stmt):
                stmt(conn)
            else:
                conn.execute(stmt)
    conn.execute("INSERT INTO model_groups (name, strategy, rpm, tpm, created_at, updated_at) "
                 "VALUES ('old', 'latency', 60, NULL, 1, 2), ('spare', NULL, NULL, NULL, 3, 4)")
    conn.execute("INSERT INTO deployments (model_group, name, type, endpoint, kind, timeout, max_parallel, weight, "
                 "created_at, updated_at) VALUES ('old', 'gpu', 'local', 'http://127.0.0.1:5000', 'weight', 30, 4, "
                 "2, 1, 2), ('spare', 'cpu', 'local', 'http://127.0.0.1:5001', 'weight', NULL, NULL, 1, 3, 4)")
    conn.execute("INSERT INTO aliases (alias, model_group) VALUES ('o', 'old')")
    conn.execute("PRAGMA user_version = 5")
    conn.close()
    r = run_cli(tmp_path, "export")
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(tmp_path / "data" / "models.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT name, strategy, rpm, created_at, updated_at, fallbacks, content_policy_fallbacks "
                            "FROM model_groups ORDER BY name").fetchall() == [
            ("old", "latency", 60, 1.0, 2.0, None, 0), ("spare", None, None, 3.0, 4.0, None, 0)]
        assert conn.execute("SELECT name, timeout, max_parallel, weight, connect_timeout, first_token_timeout, "
                            "idle_timeout FROM deployments ORDER BY name").fetchall() == [
            ("cpu", None, None, 1.0, None, None, None), ("gpu", 30.0, 4, 2.0, None, None, None)]
        assert conn.execute("SELECT alias, model_group FROM aliases").fetchall() == [("o", "old")]
    finally:
        conn.close()
    assert "fallbacks" not in r.stdout and "strategy: latency" in r.stdout and "max_parallel: 4" in r.stdout
    assert run_cli(tmp_path, "set-fallbacks", "spare", "o").returncode == 0
    assert run_cli(tmp_path, "update-model", "old", "--idle-timeout", "9").returncode == 0
    exported = run_cli(tmp_path, "export").stdout
    assert "fallbacks:\n    - o\n" in exported and "idle_timeout: 9.0" in exported
