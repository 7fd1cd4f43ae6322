"""Agent registration security: credentials and name binding, hosted names, SSRF, flood control, retention,
a locked registry, the CLI's errors, and the registry file replaced while the router runs."""

from __future__ import annotations

import ipaddress
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from router.agent_policy import forbidden_reason, hosted_provider, ip_of
from router.agents import AgentDirectory
from router.config import Settings
from router.registry import AgentEntry, RegistryError, validate_url
from router.routing import RouteTable
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess, run_cli

MSG = [{"role": "user", "content": "hi"}]
SHARED = "shared-agent-token-0123456789"
OUTSIDE = "203.0.113.7"  # a documentation address, as seen through the trusted proxy (X-Forwarded-For)


def register(http: httpx.Client, name: str, endpoint: str, models: list[str], token: str | None = None,
             client: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if client:
        headers["X-Forwarded-For"] = client
    return http.post("/register", json={"name": name, "endpoint": endpoint, "models": models}, headers=headers)


def heartbeat(http: httpx.Client, name: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.post("/heartbeat", json={"name": name}, headers=headers)


def error(resp: httpx.Response) -> dict[str, Any]:
    return resp.json()["error"]  # type: ignore[no-any-return]


def db_rows(router: RouterProcess, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(router.workdir / "data" / "models.db", timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture()
def agent_stub():
    stub = OpenAIStub(name="agent").start()
    yield stub
    stub.stop()


# -- pure logic ----------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:99999", "http://[fe80::1%", 12, None])
def test_validate_url_refuses_malformed_urls_with_a_registry_error(url: object) -> None:
    with pytest.raises(RegistryError):
        validate_url(url)  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["169.254.169.254", "169.254.1.1", "fe80::1", "fe80::1%eth0", "fd00:ec2::254",
                                     "0.0.0.0", "::", "224.0.0.1", "ff02::1", "255.255.255.255",
                                     "::ffff:169.254.169.254"])
def test_forbidden_addresses(address: str) -> None:
    parsed = ip_of(address)
    assert parsed is not None and forbidden_reason(parsed) is not None


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "192.168.1.5", "2001:db8::1"])
def test_ordinary_addresses_are_allowed(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_hosted_provider_names() -> None:
    assert hosted_provider("gpt-oss-20b") == "openai"
    assert hosted_provider("claude-3-haiku") == "anthropic"
    assert hosted_provider("gemini-2.0") == "google"
    assert hosted_provider("local-gpt-4o") is None  # `local` comes first
    assert hosted_provider("mistral-7b") is None


def test_route_updates_touch_only_the_models_an_agent_changed() -> None:
    directory = AgentDirectory(ttl=30)
    routes = RouteTable(Settings(local_agent_url=None), None, directory, None)  # type: ignore[arg-type]
    routes.rebuild(None)
    now = time.time()

    def announce(name: str, *models: str) -> None:
        old = directory.upsert(AgentEntry(name, f"http://127.0.0.1:1/{name}", models, now, now))
        routes.agent_changed(name, old.models if old is not None else (), models)

    def ids(model: str) -> list[str]:
        return [d.id for d in routes.agent_groups[model].deployments]

    announce("a1", "m1", "shared")
    group_m1, deployments_m1 = routes.agent_groups["m1"], routes.agent_groups["m1"].deployments
    announce("a2", "m2", "shared")
    assert routes.agent_groups["m1"] is group_m1 and group_m1.deployments is deployments_m1  # untouched
    assert ids("shared") == ["agent-a1", "agent-a2"]
    announce("a1", "m3", "shared")  # drops m1, adds m3
    assert "m1" not in routes.agent_groups
    assert [d.id for d in routes.resolve("m3").deployments] == ["agent-a1"]
    assert ids("shared") == ["agent-a1", "agent-a2"]
    directory.remove("a2")
    routes.agent_changed("a2", ("m2", "shared"), ())
    assert "m2" not in routes.agent_groups and ids("shared") == ["agent-a1"]


# -- credentials -----------------------------------------------------------------------------

def test_without_credentials_only_loopback_clients_may_register(start_router, agent_stub) -> None:
    router = start_router({"ROUTER_TRUSTED_PROXIES": "127.0.0.1", "LOCAL_AGENT_URL": ""})
    with router.http() as http:
        assert register(http, "gpu-1", agent_stub.url, ["mistral-7b"]).status_code == 200
        outside = register(http, "gpu-2", agent_stub.url, ["mistral-7b"], client=OUTSIDE)
        assert outside.status_code == 401 and "create-agent-token" in error(outside)["message"]
        assert heartbeat(http, "gpu-1").status_code == 200
    assert "only loopback clients may register" in router.output()
    assert db_rows(router, "SELECT name, token_name FROM agents") == [("gpu-1", "loopback")]


def test_agent_tokens_from_the_cli_bind_names(start_router, agent_stub) -> None:
    router = start_router({"ROUTER_TRUSTED_PROXIES": "127.0.0.1", "LOCAL_AGENT_URL": ""})
    made = router.cli("create-agent-token", "rack-a")
    assert made.returncode == 0, made.stderr
    token_a = made.stdout.strip()
    token_b = router.cli("create-agent-token", "rack-b").stdout.strip()
    assert token_a.startswith("sk-agent-") and token_a != token_b
    stored = db_rows(router, "SELECT name, token_hash FROM agent_tokens ORDER BY name")
    assert [name for name, _ in stored] == ["rack-a", "rack-b"]
    assert all(token_a not in h and token_b not in h for _, h in stored)  # only hashes are stored
    listing = router.cli("list-agent-tokens").stdout
    assert "rack-a" in listing and token_a not in listing
    with router.http() as http:
        # the router picks the tokens up from the registry; from then on loopback needs one too
        assert wait_for(lambda: register(http, "node-1", agent_stub.url, ["m"]).status_code == 401, 5)
        wrong = register(http, "node-1", agent_stub.url, ["m"], token="sk-agent-wrong", client=OUTSIDE)
        assert wrong.status_code == 401
        assert register(http, "node-1", agent_stub.url, ["m"], token=token_a, client=OUTSIDE).status_code == 200
        assert heartbeat(http, "node-1", token_a).status_code == 200
        # another credential may neither take the name over nor heartbeat it
        taken = register(http, "node-1", "http://127.0.0.1:9", ["m"], token=token_b, client=OUTSIDE)
        assert taken.status_code == 403 and error(taken)["code"] == "agent_name_taken"
        assert heartbeat(http, "node-1", token_b).status_code == 403
        answer = http.post("/v1/chat/completions", json={"model": "m", "messages": MSG})
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from agent"
        # revoked: refused within a poll
        assert router.cli("revoke-agent-token", "rack-a").returncode == 0
        assert wait_for(lambda: heartbeat(http, "node-1", token_a).status_code == 401, 5)
    assert token_a not in router.output() and token_b not in router.output()


def test_hosted_model_names_need_permission(start_router, agent_stub) -> None:
    router = start_router({"ROUTER_AGENT_TOKEN": SHARED, "ROUTER_AGENT_ALLOWED_MODELS": "gpt-oss-20b",
                           "LOCAL_AGENT_URL": ""})
    token = router.cli("create-agent-token", "claude-box", "--models", "claude-local").stdout.strip()
    assert router.cli("add-model", "gemini-on-prem", "local", "http://127.0.0.1:9", "weight").returncode == 0
    with router.http() as http:
        refused = register(http, "thief", agent_stub.url, ["gpt-4o", "my-model", "claude-3-opus"], token=SHARED)
        assert refused.status_code == 403
        message = error(refused)["message"]
        assert "gpt-4o" in message and "claude-3-opus" in message and "my-model" not in message
        assert "ROUTER_AGENT_ALLOWED_MODELS" in message and "create-agent-token" in message
        assert http.post("/v1/chat/completions", json={"model": "my-model", "messages": MSG}).status_code == 404
        # allowed by ROUTER_AGENT_ALLOWED_MODELS, by the token's --models, or by a registry entry of type local
        assert register(http, "oss", agent_stub.url, ["gpt-oss-20b"], token=SHARED).status_code == 200
        answer = http.post("/v1/chat/completions", json={"model": "gpt-oss-20b", "messages": MSG})
        assert answer.json()["choices"][0]["message"]["content"] == "Hello from agent"
        assert wait_for(lambda: register(http, "box", agent_stub.url, ["claude-local", "gpt-oss-20b"],
                                         token=token).status_code == 200, 5)
        assert register(http, "box2", agent_stub.url, ["claude-other"], token=token).status_code == 403
        assert wait_for(lambda: register(http, "onprem", agent_stub.url, ["gemini-on-prem"],
                                         token=SHARED).status_code == 200, 5)  # once the poll has the entry


# -- where agents may be ---------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", [
    "http://169.254.169.254/latest/meta-data", "http://[fe80::1]:8000", "http://metadata.google.internal",
    "http://metadata/computeMetadata/v1", "http://0.0.0.0:8000", "http://[::]:8000", "http://224.0.0.1:80",
    "http://255.255.255.255:80", "http://[fd00:ec2::254]", "http://[::ffff:169.254.169.254]:80",
    "http://user:secret@127.0.0.1:9", "http://[::1", "http://[::1]:99999",
])
def test_dangerous_endpoints_are_refused(router: RouterProcess, endpoint: str) -> None:
    with router.http() as http:
        resp = register(http, "ssrf", endpoint, ["ssrf-model"])
    assert resp.status_code == 422, resp.text
    assert error(resp)["param"] == "endpoint"
    assert "secret" not in resp.text


def test_loopback_endpoints_and_names_resolving_to_them_are_allowed(router: RouterProcess) -> None:
    with router.http() as http:
        assert register(http, "same-host", "http://localhost:9", ["loop-ok"]).status_code == 200
        assert register(http, "same-host", "http://[::1]:9", ["loop-ok"]).status_code == 200


def test_agent_networks_restrict_clients_and_endpoints(start_router) -> None:
    router = start_router({"ROUTER_AGENT_NETWORKS": "10.0.0.0/8, 192.0.2.0/24", "ROUTER_TRUSTED_PROXIES": "127.0.0.1",
                           "ROUTER_AGENT_TOKEN": SHARED})
    with router.http() as http:
        from_loopback = register(http, "a", "http://10.1.2.4:8000", ["m"], token=SHARED)
        assert from_loopback.status_code == 403 and "ROUTER_AGENT_NETWORKS" in error(from_loopback)["message"]
        assert register(http, "a", "http://10.1.2.4:8000", ["m"], token=SHARED, client=OUTSIDE).status_code == 403
        outside = register(http, "a", "http://127.0.0.1:8000", ["m"], token=SHARED, client="10.9.9.9")
        assert outside.status_code == 422 and "ROUTER_AGENT_NETWORKS" in error(outside)["message"]
        assert register(http, "a", "http://10.1.2.4:8000", ["m"], token=SHARED, client="10.9.9.9").status_code == 200
        assert register(http, "b", "http://192.0.2.10:8000", ["m"], token=SHARED, client="192.0.2.1").status_code == 200


# -- flood ------------------------------------------------------------------------------------

def test_registrations_are_rate_limited_per_address(start_router) -> None:
    router = start_router({"AGENT_REGISTER_RPM": "3", "ROUTER_TRUSTED_PROXIES": "127.0.0.1",
                           "ROUTER_AGENT_TOKEN": SHARED})
    with router.http() as http:
        for i in range(3):
            resp = register(http, f"a{i}", "http://127.0.0.1:9", ["m"], token=SHARED, client="10.0.0.1")
            assert resp.status_code == 200
        limited = register(http, "a9", "http://127.0.0.1:9", ["m"], token=SHARED, client="10.0.0.1")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert error(limited)["code"] == "rate_limit_exceeded"
        # another address has its own budget, and heartbeats are not registrations
        assert register(http, "b0", "http://127.0.0.1:9", ["m"], token=SHARED, client="10.0.0.2").status_code == 200
        assert heartbeat(http, "a0", SHARED).status_code == 200


def test_dead_agents_are_deleted_after_the_retention(start_router) -> None:
    router = start_router({"AGENT_TTL": "0.5", "AGENT_RETENTION": "0.5", "LOCAL_AGENT_URL": ""})
    with router.http() as http:
        assert register(http, "short-lived", "http://127.0.0.1:9", ["gone-soon"]).status_code == 200
        assert register(http, "kept", "http://127.0.0.1:9", ["stays"]).status_code == 200
        for _ in range(12):  # `kept` heartbeats past TTL + retention; `short-lived` does not
            time.sleep(0.25)
            assert heartbeat(http, "kept").status_code == 200
        assert wait_for(lambda: db_rows(router, "SELECT name FROM agents") == [("kept",)], 5)
        assert heartbeat(http, "short-lived").status_code == 404
        assert http.post("/v1/chat/completions", json={"model": "gone-soon", "messages": MSG}).status_code == 404


# -- locks and the CLI -------------------------------------------------------------------------

def test_locked_registry_answers_503_quickly_and_the_cli_one_line(start_router) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""})
    lock = sqlite3.connect(router.workdir / "data" / "models.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with router.http() as http:
            started = time.monotonic()
            resp = register(http, "gpu", "http://127.0.0.1:9", ["m"])
            assert resp.status_code == 503 and time.monotonic() - started < 3, resp.text
            assert resp.headers["retry-after"] and error(resp)["code"] == "registry_busy"
            cli = router.cli("add-model", "m2", "openai", "http://127.0.0.1:9", "api")
            assert cli.returncode != 0 and "Traceback" not in cli.stderr
            assert len(cli.stderr.strip().splitlines()) == 1 and "locked" in cli.stderr, cli.stderr
            assert http.get("/ready").status_code == 200  # readers are not blocked in WAL mode
        lock.execute("ROLLBACK")
        with router.http() as http:
            assert register(http, "gpu", "http://127.0.0.1:9", ["m"]).status_code == 200
    finally:
        lock.close()


@pytest.mark.parametrize("args", [
    ("add-model", "m", "openai", "http://[::1", "api"),
    ("create-agent-token", "shared"),
    ("create-agent-token", "x", "--models", ","),
    ("revoke-agent-token", "nobody"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    r = run_cli(tmp_path, *args)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr


def test_cli_on_an_unusable_database_path_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "data" / "models.db").mkdir(parents=True)  # a folder where the database should be
    for args in (("list-models",), ("add-model", "m", "openai", "http://127.0.0.1:9", "api"), ("list-agent-tokens",)):
        r = run_cli(tmp_path, *args)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "registry" in r.stderr, r.stderr


# -- the registry file replaced ------------------------------------------------------------------

def test_registry_file_deleted_or_replaced_is_reopened(start_router, agent_stub: OpenAIStub) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""})
    db = router.workdir / "data" / "models.db"
    client = router.client()
    with router.http() as http:
        os.unlink(db)  # as `rm data/models.db` would
        assert wait_for(lambda: "deleted or replaced" in router.output(), 5)
        assert router.cli("add-model", "after-rm", "openai", agent_stub.url, "api").returncode == 0
        assert wait_for(lambda: "after-rm" in {m.id for m in client.models.list().data}, 5)
        answer = client.chat.completions.create(model="after-rm", messages=MSG)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "Hello from agent"
        assert http.get("/ready").status_code == 200
        # a path that cannot be opened: not ready (and says so) until it can again
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        db.mkdir()
        assert wait_for(lambda: http.get("/ready").status_code == 503, 5)
        assert "unavailable" in router.output()
        shutil.rmtree(db)
        assert wait_for(lambda: http.get("/ready").status_code == 200, 5)
        assert router.cli("add-model", "after-dir", "openai", agent_stub.url, "api").returncode == 0
        assert wait_for(lambda: "after-dir" in {m.id for m in client.models.list().data}, 5)
