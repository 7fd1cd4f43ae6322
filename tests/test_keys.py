"""Client keys: created by the CLI (shown once, stored hashed), required once
they exist, limited to models, revocable, and never written anywhere."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import openai
import pytest

from tests.support.openai_stub import wait_for
from tests.support.processes import RouterProcess, run_cli
from tests.test_observability import sample

X = [{"role": "user", "content": "hi"}]


def post(router: RouterProcess, key: str | None, model: str = "dummy"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with router.http() as http:
        return http.post("/v1/chat/completions", json={"model": model, "messages": X}, headers=headers)


def test_create_key_shows_it_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    r = run_cli(tmp_path, "create-key", "--name", "ci", "--rpm", "5", "--models", "dummy,gpt-4o", "--expires", "30d")
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("sk-router-") and len(key) > 40 and "not be shown again" in r.stderr
    db = (tmp_path / "data" / "models.db").read_bytes()
    assert key.encode() not in db and key[10:].encode() not in db
    listing = run_cli(tmp_path, "list-keys").stdout
    assert "ci" in listing and "dummy, gpt-4o" in listing and "active" in listing and key not in listing
    assert run_cli(tmp_path, "create-key", "--name", "ci").returncode != 0  # names are unique
    bad = run_cli(tmp_path, "create-key", "--expires", "yesterday")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_keys_are_off_until_one_exists(start_router) -> None:
    router = start_router()
    assert post(router, None).status_code == 200  # make dev: no keys, open
    key = router.cli("create-key", "--name", "team").stdout.strip()
    assert wait_for(lambda: post(router, None).status_code == 401, 5)
    missing = post(router, None).json()["error"]
    assert missing["code"] == "invalid_api_key" and missing["type"] == "authentication_error"
    assert post(router, "sk-router-wrong").status_code == 401
    assert post(router, key).status_code == 200
    client = openai.OpenAI(base_url=router.url + "/v1", api_key=key, max_retries=0)
    assert client.chat.completions.create(model="dummy", messages=X).choices[0].message.content == "Hello world"
    with pytest.raises(openai.AuthenticationError):
        router.client().chat.completions.create(model="dummy", messages=X)


def keys_active(router: RouterProcess) -> bool:
    """The router has loaded its keys: a request without one is refused."""
    return wait_for(lambda: post(router, None).status_code == 401, 5)


def test_model_allow_list_is_403(start_router) -> None:
    router = start_router()
    key = router.cli("create-key", "--name", "narrow", "--models", "dummy").stdout.strip()
    assert keys_active(router) and post(router, key).status_code == 200
    refused = post(router, key, model="gpt-4o")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "model_not_allowed" and refused.json()["error"]["param"] == "model"


def test_revoked_and_expired_keys_are_refused(start_router, tmp_path: Path) -> None:
    router = start_router()
    gone = router.cli("create-key", "--name", "gone").stdout.strip()
    old = router.cli("create-key", "--name", "old", "--expires", "1d").stdout.strip()
    assert keys_active(router)
    assert wait_for(lambda: post(router, gone).status_code == 200 and post(router, old).status_code == 200, 5)
    assert router.cli("revoke-key", "gone").returncode == 0
    assert wait_for(lambda: post(router, gone).status_code == 401, 5)
    # a day passes for "old"
    conn = sqlite3.connect(tmp_path / "data" / "models.db")
    conn.execute("UPDATE client_keys SET expires_at = ? WHERE name = 'old'", (time.time() - 1,))
    conn.commit()
    conn.close()
    assert wait_for(lambda: post(router, old).status_code == 401, 5)
    assert "expired" in post(router, old).json()["error"]["message"]
    assert "revoked" in router.cli("list-keys").stdout and router.cli("revoke-key", "gone").returncode != 0


def test_master_key_administers(start_router) -> None:
    master = "sk-router-master-0123456789"
    router = start_router({"ROUTER_MASTER_KEY": master, "METRICS_REQUIRE_KEY": "true",
                           "ROUTER_AGENT_TOKEN": "agent-token-xyz", "RATE_LIMIT_REQUESTS": "1"})
    assert post(router, None).status_code == 401  # the master key alone switches keys on
    for _ in range(3):  # the master key is not rate limited
        assert post(router, master).status_code == 200
    with router.http() as http:
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"Authorization": f"Bearer {master}"}).status_code == 200
        assert http.post("/register", json={"name": "a", "endpoint": "http://127.0.0.1:1", "models": ["m"]},
                         headers={"Authorization": f"Bearer {master}"}).status_code == 200


def test_keys_never_reach_logs_or_metrics(start_router, tmp_path: Path) -> None:
    router = start_router({"LOG_LEVEL": "DEBUG", "METRICS_KEY_LABELS": "true"})  # key names as labels: asked for
    key = router.cli("create-key", "--name", "visible-name").stdout.strip()
    assert keys_active(router) and post(router, key).status_code == 200
    post(router, key + "x")
    post(router, key, model="nope")
    with router.http() as http:
        text = http.get("/metrics").text
    assert sample(text, "router_client_requests_total", client="visible-name") >= 1
    log = tmp_path / "logs" / "router.log"
    assert wait_for(lambda: "client=visible-name" in log.read_text(), 5)  # the access log names the key
    everything = text + log.read_text() + router.output()
    assert key not in everything and key[10:30] not in everything


def test_migration_from_schema_1_keeps_data(tmp_path: Path) -> None:
    """A registry created before keys and limits existed opens, migrates and keeps its models."""
    from router.registry import MIGRATIONS

    (tmp_path / "data").mkdir()
    conn = sqlite3.connect(tmp_path / "data" / "models.db")
    for stmt in MIGRATIONS[0]:
        conn.execute(stmt)
    conn.execute("INSERT INTO models (name, type, endpoint, kind, created_at, updated_at) "
                 "VALUES ('old-model', 'openai', 'http://x:1', 'api', 1, 1)")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    assert "old-model" in run_cli(tmp_path, "list-models").stdout
    assert run_cli(tmp_path, "set-model-limits", "old-model", "--rpm", "5").returncode == 0
    conn = sqlite3.connect(tmp_path / "data" / "models.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT rpm FROM model_groups WHERE name = 'old-model'").fetchone()[0] == 5
