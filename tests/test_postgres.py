"""The registry in Postgres (DATABASE_URL) for several replicas: `router migrate`, changes seen by every
router within 2 s (LISTEN/NOTIFY), Postgres restarted under load (requests served from the snapshot, writes
refused with 503, automatic recovery), and `/ready` answering from what the watch and the Redis link keep."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psycopg
import pytest

from router.registry.postgres import SCHEMA_VERSION
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.postgres_server import PASSWORD, PostgresServer
from tests.support.processes import clean_env, free_port, run_cli
from tests.test_liveness import metric, post, register

CHAT = {"messages": [{"role": "user", "content": "x"}]}


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def model_ids(port: int) -> set[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/v1/models")
        return {m["id"] for m in orjson.loads(conn.getresponse().read())["data"]}
    finally:
        conn.close()


def ready(port: int) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/ready")
        resp = conn.getresponse()
        return resp.status, orjson.loads(resp.read())
    finally:
        conn.close()


# -- router migrate --------------------------------------------------------------------------------------

def test_migrate_creates_the_schema_and_is_idempotent(tmp_path: Path, postgres_url: str) -> None:
    env = {"DATABASE_URL": postgres_url}
    for _ in range(2):
        r = run_cli(tmp_path, "migrate", env=env)
        assert r.returncode == 0, r.stderr
        assert "schema up to date" in r.stdout and PASSWORD not in r.stdout + r.stderr
    with psycopg.connect(postgres_url) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        assert {"model_groups", "deployments", "aliases", "agents", "client_keys", "agent_tokens", "schema_version",
                "registry_version"} <= tables
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        cols = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'deployments'")}
        assert {"model_group", "name", "type", "endpoint", "kind", "upstream_model", "key_env", "input_price",
                "output_price", "context_window", "weight", "rpm", "tpm", "timeout", "enabled", "max_tokens_param",
                "created_at", "updated_at"} <= cols
    # the SQLite file as well, when DATABASE_URL is unset
    assert run_cli(tmp_path, "migrate").returncode == 0 and (tmp_path / "data" / "models.db").exists()


def test_migrate_fails_loudly_and_fast_when_unreachable(tmp_path: Path) -> None:
    port = free_port()
    env = {"DATABASE_URL": f"postgresql://router:pw-never-shown@127.0.0.1:{port}/registry"}
    started = time.monotonic()
    line = one_line_error(run_cli(tmp_path, "migrate", "--wait", "1.5", env=env))
    assert time.monotonic() - started < 15
    assert f"cannot reach registry postgresql://127.0.0.1:{port}/registry within 1.5s" in line
    assert "pw-never-shown" not in line
    # the other commands say so in one line too
    line = one_line_error(run_cli(tmp_path, "list-models", env=env))
    assert f"postgresql://127.0.0.1:{port}/registry" in line and "pw-never-shown" not in line


def test_migrate_waits_for_the_database_to_start(tmp_path: Path) -> None:
    server = PostgresServer()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "router.cli", "migrate", "--wait", "30"], cwd=tmp_path,
                                env=clean_env(tmp_path, {"DATABASE_URL": server.url()}),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None  # still waiting
        server.start()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "schema up to date" in out
    finally:
        server.destroy()


# -- several replicas --------------------------------------------------------------------------------------

def test_two_routers_see_each_others_changes_within_2s(start_router, tmp_path: Path, postgres_url: str) -> None:
    """A poll interval of 30 s: only the notification can bring a change within 2 s."""
    upstream = OpenAIStub(name="shared").start()
    env = {"DATABASE_URL": postgres_url, "REGISTRY_POLL_INTERVAL": "30", "LOCAL_AGENT_URL": ""}
    try:
        a = start_router(env, workdir=tmp_path / "a")
        b = start_router(env, workdir=tmp_path / "b")
        assert run_cli(tmp_path, "add-model", "shared-model", "openai", upstream.url, "api", env=env).returncode == 0
        started = time.monotonic()
        assert wait_for(lambda: all("shared-model" in model_ids(r.port) for r in (a, b)), 2)
        assert time.monotonic() - started <= 2
        for router in (a, b):
            answer = router.client().chat.completions.create(model="shared-model", **CHAT)  # type: ignore[arg-type]
            assert answer.choices[0].message.content == "Hello from shared"
        assert run_cli(tmp_path, "add-alias", "shared-alias", "shared-model", env=env).returncode == 0
        assert wait_for(lambda: all("shared-alias" in model_ids(r.port) for r in (a, b)), 2)
        assert run_cli(tmp_path, "remove-model", "shared-model", env=env).returncode == 0
        assert wait_for(lambda: all("shared-model" not in model_ids(r.port) for r in (a, b)), 2)
        # the first key created by the CLI turns keys on in both
        key = run_cli(tmp_path, "create-key", "--name", "ci", env=env).stdout.strip()

        def keys_on(port: int) -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/v1/chat/completions", orjson.dumps({"model": "dummy", **CHAT}))
            unauthenticated = conn.getresponse().status
            conn.close()
            return unauthenticated == 401

        assert wait_for(lambda: all(keys_on(r.port) for r in (a, b)), 2)
        for router in (a, b):
            with router.http() as client:
                resp = client.post("/v1/chat/completions", json={"model": "dummy", **CHAT},
                                   headers={"Authorization": f"Bearer {key}"})
                assert resp.status_code == 200, resp.text
        for router in (a, b):
            assert PASSWORD not in router.output()
    finally:
        upstream.stop()


def test_an_agent_registered_on_one_replica_is_routable_on_the_other(start_router, tmp_path: Path,
                                                                     postgres_url: str) -> None:
    env = {"DATABASE_URL": postgres_url, "REGISTRY_POLL_INTERVAL": "0.5"}
    a = start_router(env, workdir=tmp_path / "a")
    b = start_router(env, workdir=tmp_path / "b")
    conn = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    register(conn, "gpu-1", ["agent-model"])
    assert wait_for(lambda: "agent-model" in model_ids(b.port), 2)


def test_own_heartbeats_rebuild_no_routes(start_router, postgres_url: str) -> None:
    """AGENT_TTL 0.6 s without Redis: a heartbeat goes to Postgres every 0.2 s; the agents-only change
    counter moves, yet no route table is rebuilt (only agents are read again)."""
    router = start_router({"DATABASE_URL": postgres_url, "AGENT_TTL": "0.6", "LOCAL_AGENT_URL": ""})
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    register(conn, "gpu-hb", ["hb-model"])
    time.sleep(0.5)  # the registration's own change read back
    rebuilds = metric(router, "router_route_rebuilds_total")
    with psycopg.connect(postgres_url) as db:
        before = db.execute("SELECT version FROM registry_version WHERE part = 'agents'").fetchone()
        for _ in range(15):
            assert post(conn, "/heartbeat", {"name": "gpu-hb"}) == 200
            time.sleep(0.1)
        after = db.execute("SELECT version FROM registry_version WHERE part = 'agents'").fetchone()
    assert before is not None and after is not None and after[0] > before[0]  # heartbeats were written
    assert metric(router, "router_route_rebuilds_total") == rebuilds
    assert "hb-model" in model_ids(router.port)


# -- Postgres down ----------------------------------------------------------------------------------------

def test_postgres_restarted_under_load(start_router, tmp_path: Path) -> None:
    server = PostgresServer().start()
    upstream = OpenAIStub(name="steady").start()
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
        for _ in range(3000):  # bounded in count and (below) in time
            if stop.is_set():
                break
            conn.request("POST", "/v1/chat/completions", orjson.dumps({"model": "steady", **CHAT}),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
            time.sleep(0.01)

    try:
        env = {"DATABASE_URL": server.create_database(), "LOCAL_AGENT_URL": ""}
        assert run_cli(tmp_path, "add-model", "steady", "openai", upstream.url, "api", env=env).returncode == 0
        router = start_router(env)
        assert ready(router.port)[0] == 200
        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        time.sleep(0.5)
        server.stop()
        # not ready (the registry cannot be read), writes refused with 503, the CLI says so in one line
        assert wait_for(lambda: ready(router.port)[0] == 503, 15)
        status, body = ready(router.port)
        assert "registry" in str(body["error"]["message"]) and body["error"]["code"] == "not_ready"  # type: ignore[index]
        with router.http() as client:
            resp = client.post("/register", json={"name": "gpu", "endpoint": "http://127.0.0.1:9", "models": ["x"]})
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "registry_unavailable"
            assert resp.headers["Retry-After"]
        line = one_line_error(run_cli(tmp_path, "add-model", "later", "openai", upstream.url, "api", env=env))
        assert "cannot use registry postgresql://127.0.0.1" in line and PASSWORD not in line
        served_while_down = len(statuses)
        server.start()
        assert wait_for(lambda: ready(router.port)[0] == 200, 15)
        assert run_cli(tmp_path, "add-model", "later", "openai", upstream.url, "api", env=env).returncode == 0
        assert wait_for(lambda: "later" in model_ids(router.port), 5)
        stop.set()
        worker.join(15)
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert served_while_down > 0
        assert PASSWORD not in router.output()
    finally:
        stop.set()
        upstream.stop()
        server.destroy()


# -- /ready with Redis --------------------------------------------------------------------------------------

def test_ready_follows_a_configured_redis(start_router, redis_server) -> None:
    router = start_router({"REDIS_URL": redis_server.url, "REDIS_RETRY_AFTER": "0.5"})
    assert ready(router.port)[0] == 200
    redis_server.stop()
    assert wait_for(lambda: ready(router.port)[0] == 503, 10)
    assert "redis" in str(ready(router.port)[1]["error"]["message"])  # type: ignore[index]
    with router.http() as client:  # still serving
        assert client.post("/v1/chat/completions", json={"model": "dummy", **CHAT}).status_code == 200
    redis_server.start()
    assert wait_for(lambda: ready(router.port)[0] == 200, 10)


def test_ready_is_503_when_redis_is_down_from_the_start(start_router) -> None:
    router = start_router({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert wait_for(lambda: ready(router.port)[0] == 503, 10)


@pytest.mark.parametrize("value", ["mysql://x@y/z", "data/models.db"])
def test_database_url_must_be_postgres(tmp_path: Path, value: str) -> None:
    line = one_line_error(run_cli(tmp_path, "list-models", env={"DATABASE_URL": value}))
    assert "DATABASE_URL" in line and "postgresql://" in line
