"""Liveness is not configuration: heartbeats live in memory (and Redis), rebuild no route, and reach SQLite
only without Redis, at most once per AGENT_TTL/3 per agent; routers and workers still agree on who is alive."""

from __future__ import annotations

import http.client
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import orjson

from router.agents import AgentDirectory
from router.liveness import Liveness
from router.registry import AgentEntry
from tests.support.processes import RouterProcess, free_port


# -- helpers -------------------------------------------------------------------------------------------

def post(conn: http.client.HTTPConnection, path: str, payload: dict[str, object]) -> int:
    conn.request("POST", path, orjson.dumps(payload), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def register(conn: http.client.HTTPConnection, name: str, models: list[str]) -> None:
    assert post(conn, "/register", {"name": name, "endpoint": "http://127.0.0.1:9", "models": models}) == 200


def live_models(conn: http.client.HTTPConnection) -> set[str]:
    conn.request("GET", "/v1/models")
    resp = conn.getresponse()
    assert resp.status == 200
    return {m["id"] for m in orjson.loads(resp.read())["data"]}


def metric(router: RouterProcess, name: str) -> float:
    """A counter's value on /metrics (summed over workers by the multiprocess collector)."""
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert values, f"{name} not on /metrics"
    return sum(values)


def data_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA data_version").fetchone()[0])


def count_heartbeat_writes(db_path: Path) -> Callable[[], int]:
    """Install a trigger counting UPDATEs of agents.last_heartbeat (by any connection); a reader of the count."""
    db = sqlite3.connect(db_path, isolation_level=None)
    db.executescript("CREATE TABLE hb_writes (at REAL); CREATE TRIGGER hb_count AFTER UPDATE OF last_heartbeat "
                     "ON agents BEGIN INSERT INTO hb_writes VALUES (new.last_heartbeat); END;")
    return lambda: int(db.execute("SELECT count(*) FROM hb_writes").fetchone()[0])


def worker_pids(pid: int) -> list[int]:
    """The worker processes uvicorn spawned under `pid` (not multiprocessing's resource tracker)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                out.append(int(entry))
    return out


def worker_of(conn: http.client.HTTPConnection, server_port: int, workers: list[int]) -> int:
    """The worker process holding the server side of an open connection (from /proc/net/tcp and fds)."""
    assert conn.sock is not None
    client_port = conn.sock.getsockname()[1]
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)) == (server_port, client_port):
            inode = fields[9]
    assert inode is not None, "server side of the connection not found"
    for pid in workers:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


# -- unit -----------------------------------------------------------------------------------------------

def agent(name: str, beat: float) -> AgentEntry:
    return AgentEntry(name, "http://127.0.0.1:9", ("m",), beat, beat)


def test_directory_reload_keeps_heartbeats_heard_since() -> None:
    directory = AgentDirectory(ttl=10)
    directory.replace([agent("a", 100.0), agent("b", 100.0)])
    directory.beat("a", 150.0)
    directory.replace([agent("a", 120.0), agent("b", 130.0), agent("c", 90.0)])  # the registry's, older for a
    assert directory.heartbeats == {"a": 150.0, "b": 130.0, "c": 90.0}
    assert directory.is_live("a", 155.0) and not directory.is_live("b", 155.0)
    directory.replace([agent("b", 130.0)])
    assert set(directory.heartbeats) == {"b"}


def test_heartbeats_persist_at_most_once_per_third_of_the_ttl() -> None:
    liveness = Liveness(AgentDirectory(ttl=30), None, ttl=30)
    assert not liveness.persist_due(100.0, 109.9)
    assert liveness.persist_due(100.0, 110.0)
    assert liveness.trusted()  # without Redis the registry carries the heartbeats
    assert liveness.sync_interval == 1.0 and Liveness(AgentDirectory(ttl=1.5), None, ttl=1.5).sync_interval == 0.5


# -- with Redis -----------------------------------------------------------------------------------------

def test_heartbeats_with_redis_write_nothing_and_rebuild_nothing(start_router, redis_url: str) -> None:
    router = start_router({"REDIS_URL": redis_url, "AGENT_TTL": "1.5", "LOCAL_AGENT_URL": ""})
    name, model = f"gpu-{uuid.uuid4().hex[:8]}", f"live-{uuid.uuid4().hex[:8]}"
    conn = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
    register(conn, name, [model])
    db = sqlite3.connect(router.workdir / "data" / "models.db", isolation_level=None)
    version = data_version(db)
    rebuilds = metric(router, "router_route_rebuilds_total")
    updates = metric(router, "router_agent_route_updates_total")
    assert rebuilds >= 1 and updates >= 1  # the counters count: startup built routes, the registration joined
    started = time.monotonic()
    for _ in range(20):  # 3 s of heartbeats: twice the TTL, so only they keep the agent alive
        assert post(conn, "/heartbeat", {"name": name}) == 200
        time.sleep(0.15)
    assert time.monotonic() - started > 1.5 * 1.5
    assert model in live_models(conn)
    assert data_version(db) == version  # not one SQLite commit by anyone
    assert metric(router, "router_route_rebuilds_total") == rebuilds
    assert metric(router, "router_agent_route_updates_total") == updates
    register(conn, name, [model])  # the probe sees a commit when there is one
    assert data_version(db) != version


def test_two_routers_on_one_redis_agree_on_liveness(start_router, tmp_path: Path, redis_url: str) -> None:
    ttl = 2.0
    env = {"REDIS_URL": redis_url, "AGENT_TTL": str(ttl), "LOCAL_AGENT_URL": ""}
    a, b = start_router(env, workdir=tmp_path), start_router(env, workdir=tmp_path)  # one registry, one Redis
    name, model = f"gpu-{uuid.uuid4().hex[:8]}", f"shared-{uuid.uuid4().hex[:8]}"
    to_a = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    at_b = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
    register(to_a, name, [model])
    registered = time.monotonic()
    rebuilds_b = None
    while time.monotonic() - registered < ttl + 1.5:  # heartbeats to A only, well past the TTL
        assert post(to_a, "/heartbeat", {"name": name}) == 200
        last = time.monotonic()
        if time.monotonic() - registered > 0.5:
            rebuilds_b = rebuilds_b if rebuilds_b is not None else metric(b, "router_route_rebuilds_total")
            assert model in live_models(at_b)  # B heard of them only through Redis (SQLite has the registration)
        time.sleep(0.2)
    assert rebuilds_b is not None and metric(b, "router_route_rebuilds_total") == rebuilds_b
    dropped: dict[str, float] = {}
    deadline = last + ttl + 3
    while len(dropped) < 2 and time.monotonic() < deadline:
        for label, conn in (("a", to_a), ("b", at_b)):
            if label not in dropped and model not in live_models(conn):
                dropped[label] = time.monotonic() - last
        time.sleep(0.05)
    assert set(dropped) == {"a", "b"}, dropped
    for label, after in dropped.items():  # both drop it when the TTL runs out, not before, and together
        assert ttl - 0.3 <= after <= ttl + 1.0, (label, after)
    assert abs(dropped["a"] - dropped["b"]) < 0.6, dropped


def test_redis_down_falls_back_to_the_registry_rule(start_router, tmp_path: Path) -> None:
    ttl = 1.5
    env = {"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "AGENT_TTL": str(ttl), "LOCAL_AGENT_URL": ""}
    a = start_router(env, workdir=tmp_path)
    writes = count_heartbeat_writes(tmp_path / "data" / "models.db")
    b = start_router(env, workdir=tmp_path)
    to_a = http.client.HTTPConnection("127.0.0.1", a.port, timeout=10)
    at_b = http.client.HTTPConnection("127.0.0.1", b.port, timeout=10)
    register(to_a, "gpu-1", ["fallback"])
    started = time.monotonic()
    beats = 0
    while time.monotonic() - started < 2 * ttl:
        assert post(to_a, "/heartbeat", {"name": "gpu-1"}) == 200
        beats += 1
        time.sleep(0.1)
    assert "fallback" in live_models(at_b)  # the registry carried A's heartbeats to B
    elapsed = time.monotonic() - started
    assert 1 <= writes() <= elapsed / (ttl / 3) + 1 < beats, (writes(), beats)


# -- without Redis: workers of one server ------------------------------------------------------------------

def test_workers_without_redis_agree_within_one_ttl(start_router) -> None:
    ttl = 3.0
    router = start_router({"AGENT_TTL": str(ttl), "LOCAL_AGENT_URL": ""}, workers=2)
    assert router.proc is not None
    writes = count_heartbeat_writes(router.workdir / "data" / "models.db")
    deadline = time.monotonic() + 10
    while len(workers := worker_pids(router.proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    pinned = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)  # kept alive: always one worker
    register(pinned, "gpu-1", ["spread"])
    heard = worker_of(pinned, router.port, workers)
    time.sleep(0.5)  # the other worker's poll sees the registration
    rebuilds = metric(router, "router_route_rebuilds_total")
    updates = metric(router, "router_agent_route_updates_total")

    def probe() -> tuple[int, bool]:
        fresh = http.client.HTTPConnection("127.0.0.1", router.port, timeout=10)
        try:
            live = "spread" in live_models(fresh)
            return worker_of(fresh, router.port, workers), live
        finally:
            fresh.close()

    started = time.monotonic()
    seen: dict[int, int] = {}
    beats = 0
    while time.monotonic() - started < ttl + 1.5 or len(seen) < 2:  # past the TTL since registration
        assert time.monotonic() - started < 20, f"fresh connections reached only {seen}"
        assert post(pinned, "/heartbeat", {"name": "gpu-1"}) == 200
        beats += 1
        last = time.monotonic()
        for _ in range(3):
            pid, live = probe()
            assert live, f"worker {pid} ({'heard' if pid == heard else 'not heard'}) lost a live agent"
            seen[pid] = seen.get(pid, 0) + 1
        time.sleep(0.2)
    assert set(seen) == set(workers), seen
    elapsed = time.monotonic() - started
    assert 1 <= writes() <= elapsed / (ttl / 3) + 2 < beats, (writes(), beats)
    # the reloads those writes caused in the other worker touched no route
    assert metric(router, "router_route_rebuilds_total") == rebuilds
    assert metric(router, "router_agent_route_updates_total") == updates
    # heartbeats stop: every worker drops it within one TTL (plus a poll and this machine's slack)
    dropped: dict[int, float] = {}
    while len(dropped) < 2 and time.monotonic() < last + ttl + 5:
        pid, live = probe()
        if not live:
            dropped.setdefault(pid, time.monotonic() - last)
    assert set(dropped) == set(workers), dropped
    assert all(after <= ttl + 1.0 for after in dropped.values()), dropped
