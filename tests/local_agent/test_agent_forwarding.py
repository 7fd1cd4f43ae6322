"""The agent's forwarding path against issue 9's findings: a router's hop header reaches the worker (a worker
that is a router sees the loop), an oversized body gets its 413, a body that repeats a key is refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import AgentProcess

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, OpenAIStub]]:
    worker = OpenAIStub(name="worker").start()
    process = AgentProcess(tmp_path, {"name": "agent-1", "router_url": "", "max_body_bytes": 4096, "workers": [
        {"model": "m", "launcher": "external", "url": worker.url, "health_interval": 0.5}]})
    try:
        process.start()
        assert wait_for(lambda: process.workers()["healthy_models"] == ["m"], timeout=15)
        yield process, worker
    finally:
        process.stop()
        worker.stop()


def test_hop_header_goes_on_to_the_worker(agent: tuple[AgentProcess, OpenAIStub]) -> None:
    process, worker = agent
    with process.http() as http:
        sent = http.post("/v1/chat/completions", json={"model": "m", "messages": MSG},
                         headers={"x-llm-router-hops": "router-a,router-b"})
        assert sent.status_code == 200
        assert worker.last().headers.get("x-llm-router-hops") == "router-a,router-b"
        assert http.post("/v1/chat/completions", json={"model": "m", "messages": MSG}).status_code == 200
        assert "x-llm-router-hops" not in worker.last().headers  # none received, none invented


def test_request_id_and_traceparent_go_on_to_the_worker(agent: tuple[AgentProcess, OpenAIStub]) -> None:
    process, worker = agent
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with process.http() as http:
        sent = http.post("/v1/chat/completions", json={"model": "m", "messages": MSG},
                         headers={"x-client-request-id": "req-from-router", "traceparent": parent})
        assert sent.status_code == 200
        assert worker.last().headers.get("x-client-request-id") == "req-from-router"
        assert worker.last().headers.get("traceparent") == parent
        assert http.post("/v1/chat/completions", json={"model": "m", "messages": MSG}).status_code == 200
        assert "traceparent" not in worker.last().headers and "x-client-request-id" not in worker.last().headers


def test_oversized_and_repeated_key_bodies_are_clear_4xx(agent: tuple[AgentProcess, OpenAIStub]) -> None:
    process, worker = agent
    with process.http() as http:
        big = http.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user",
                                                                                  "content": "x" * 100_000}]})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        repeated = http.post("/v1/chat/completions", headers={"content-type": "application/json"},
                             content=b'{"model":"m","messages":[],"model":"other"}')
        assert repeated.status_code == 400 and repeated.json()["error"]["param"] == "model"
    assert not [r for r in worker.requests if r.path.endswith("/chat/completions")]  # neither reached the worker
