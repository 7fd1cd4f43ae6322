"""A worker that knows its model by another name (`upstream_model`): through the agent and the router, clients
see only the name they asked for, in JSON and in every stream event; `/workers` says what each worker really is."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import AgentProcess

PUBLIC, UPSTREAM = "team-model", "gpt-4o-mini"  # the stub answers with the name it was sent
MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def worker() -> Iterator[OpenAIStub]:
    stub = OpenAIStub(name="worker").start()
    yield stub
    stub.stop()


def events(raw: bytes) -> list[dict[str, object]]:
    lines = [line[6:] for line in raw.splitlines() if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    return [orjson.loads(line) for line in lines[:-1]]


def test_clients_see_the_public_name_through_agent_and_router(start_router, worker: OpenAIStub,
                                                               tmp_path: Path) -> None:
    router = start_router({"LOCAL_AGENT_URL": "", "CACHE_MODE": "off"}, workdir=tmp_path / "router")
    agent = AgentProcess(tmp_path / "agent", {"name": "agent-1", "router_url": router.url, "heartbeat_interval": 0.5,
                                              "workers": [{"model": PUBLIC, "launcher": "external", "url": worker.url,
                                                           "upstream_model": UPSTREAM, "health_interval": 0.5}]})
    try:
        agent.start()
        with router.http() as http:
            assert wait_for(lambda: http.post("/v1/chat/completions", json={"model": PUBLIC, "messages": MSG})
                            .status_code == 200, timeout=15)
            for base in (router.url, agent.url):  # through the router, and from the agent directly
                answer = http.post(base + "/v1/chat/completions", json={"model": PUBLIC, "messages": MSG})
                assert answer.status_code == 200
                assert answer.json()["model"] == PUBLIC
                assert answer.json()["choices"][0]["message"]["content"] == "Hello from worker"
                assert worker.last().json()["model"] == UPSTREAM  # the worker got its own name
                assert int(answer.headers["content-length"]) == len(answer.content)

                raw = http.post(base + "/v1/chat/completions", json={"model": PUBLIC, "messages": MSG,
                                                                     "stream": True}).content
                chunks = events(raw)
                assert len(chunks) >= 4 and {c["model"] for c in chunks} == {PUBLIC}
                assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks  # type: ignore[index,union-attr]
                               ) == "Hello from worker"
                assert UPSTREAM.encode() not in raw
            # the openai SDK, streaming, through the router
            stream = router.client().chat.completions.create(model=PUBLIC, messages=MSG, stream=True)  # type: ignore[arg-type]
            assert {c.model for c in stream} == {PUBLIC}
    finally:
        agent.stop()


def test_workers_reports_what_an_external_server_is(worker: OpenAIStub, tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path, {"name": "agent-1", "router_url": "", "workers": [
        {"model": PUBLIC, "launcher": "external", "url": worker.url + "/v1", "upstream_model": UPSTREAM,
         "health_interval": 0.5}]})
    try:
        agent.start()
        assert wait_for(lambda: agent.workers()["healthy_models"] == [PUBLIC], timeout=15)
        (state,) = agent.workers()["workers"]  # type: ignore[misc]
        # not "vllm": the agent launched nothing; the server's own /v1/models says who it is
        assert state["engine"] == "external"
        assert state["owned_by"] == "openai" and state["upstream_model"] == UPSTREAM
        assert httpx.get(agent.url + "/v1/models").json()["data"][0]["id"] == PUBLIC
    finally:
        agent.stop()
