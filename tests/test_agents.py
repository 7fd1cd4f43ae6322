"""Agent registration and heartbeats, and forwarding to agents (the `local` provider)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def agents():
    started = [OpenAIStub(name=f"agent{i}").start() for i in range(2)]
    yield started
    for a in started:
        a.stop()


def register(http: httpx.Client, name: str, endpoint: str, models: list[str], token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return http.post("/register", json={"name": name, "endpoint": endpoint, "models": models}, headers=headers)


def model_ids(router: RouterProcess) -> set[str]:
    return {m.id for m in router.client().models.list().data}


def test_registered_models_are_routable_at_once_and_persisted(start_router, agents) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""})
    client = router.client()
    with router.http() as http:
        resp = register(http, "gpu-1", agents[0].url, ["mistral-7b", "qwen-7b"])
        assert resp.status_code == 200 and resp.json()["status"] == "registered"
    # no waiting for a registry poll: routable immediately
    answer = client.chat.completions.create(model="mistral-7b", messages=MSG)
    assert answer.choices[0].message.content == "Hello from agent0"
    assert {"mistral-7b", "qwen-7b"} <= model_ids(router)
    listing = router.cli("list-models").stdout
    assert "gpu-1" in listing and "mistral-7b" in listing


def test_streaming_through_an_agent(start_router, agents) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""})
    with router.http() as http:
        register(http, "gpu-1", agents[0].url, ["local-stream"])
    with router.client().chat.completions.stream(model="local-stream", messages=MSG) as stream:
        text = "".join(e.delta for e in stream if e.type == "content.delta")
    assert text == "Hello from agent0"


def test_reregistering_updates_in_place(start_router, agents) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""})
    with router.http() as http:
        register(http, "gpu-1", agents[0].url, ["m-old"])
        register(http, "gpu-1", agents[1].url, ["m-new"])
        assert http.post("/v1/chat/completions", json={"model": "m-old", "messages": MSG}).status_code == 404
        resp = http.post("/v1/chat/completions", json={"model": "m-new", "messages": MSG})
    assert resp.json()["choices"][0]["message"]["content"] == "Hello from agent1"
    assert router.cli("list-models").stdout.count("gpu-1") == 1


def test_requests_avoid_the_agent_with_requests_in_flight(start_router, agents) -> None:
    # the stub's gated model has a hosted-provider name (gpt-): agents may announce it once allowed
    router = start_router({"LOCAL_AGENT_URL": "", "ROUTER_AGENT_ALLOWED_MODELS": "gpt-gated"})
    with router.http() as http:
        # both agents serve the stub's gated model: a stream of it stays open until the gate opens
        register(http, "a0", agents[0].url, ["gpt-gated"])
        register(http, "a1", agents[1].url, ["gpt-gated"])
        with http.stream("POST", "/v1/chat/completions",
                         json={"model": "gpt-gated", "messages": MSG, "stream": True}) as held:
            lines = held.iter_lines()
            assert next(lines).startswith("data: ")
            holder = agents[0] if agents[0].requests else agents[1]
            other = agents[1] if holder is agents[0] else agents[0]
            with router.http() as http2:
                for _ in range(3):
                    answer = http2.post("/v1/chat/completions", json={"model": "gpt-gated", "messages": MSG})
                    assert answer.json()["choices"][0]["message"]["content"] == f"Hello from {other.name}"
            holder.gate.set()
            assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        assert len(other.requests) == 3 and len(holder.requests) == 1
        # with nothing in flight, either may serve: the group's strategy picks the one measured faster
        for a in agents:
            a.reset()
        for _ in range(4):
            assert http.post("/v1/chat/completions", json={"model": "gpt-gated", "messages": MSG}).status_code == 200
        assert len(agents[0].requests) + len(agents[1].requests) == 4


def test_heartbeat_unknown_agent_is_404(start_router) -> None:
    router = start_router()
    with router.http() as http:
        resp = http.post("/heartbeat", json={"name": "ghost"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "agent_not_found"


def test_lapsed_agent_is_not_routed_and_leaves_models(start_router, agents) -> None:
    router = start_router({"AGENT_TTL": "1.5", "LOCAL_AGENT_URL": ""})
    with router.http() as http:
        register(http, "gpu-1", agents[0].url, ["ephemeral"])
        assert "ephemeral" in model_ids(router)
        # heartbeats keep it alive past the TTL
        for _ in range(4):
            time.sleep(0.5)
            assert http.post("/heartbeat", json={"name": "gpu-1"}).status_code == 200
        assert http.post("/v1/chat/completions", json={"model": "ephemeral", "messages": MSG}).status_code == 200
        # then they stop
        assert wait_for(lambda: "ephemeral" not in model_ids(router), 5)
        resp = http.post("/v1/chat/completions", json={"model": "ephemeral", "messages": MSG})
        assert resp.status_code == 404
        # and a heartbeat brings it back
        assert http.post("/heartbeat", json={"name": "gpu-1"}).status_code == 200
        assert http.post("/v1/chat/completions", json={"model": "ephemeral", "messages": MSG}).status_code == 200


def test_local_model_with_no_live_agent_falls_back_to_local_agent_url(start_router, agents) -> None:
    router = start_router({"AGENT_TTL": "1", "LOCAL_AGENT_URL": agents[1].url})
    with router.http() as http:
        register(http, "gpu-1", agents[0].url, ["local-x"])
        first = http.post("/v1/chat/completions", json={"model": "local-x", "messages": MSG}).json()
        assert first["choices"][0]["message"]["content"] == "Hello from agent0"
        time.sleep(1.3)
        later = http.post("/v1/chat/completions", json={"model": "local-x", "messages": MSG}).json()
        assert later["choices"][0]["message"]["content"] == "Hello from agent1"


def test_token_is_required_when_configured(start_router, agents) -> None:
    router = start_router({"ROUTER_AGENT_TOKEN": "agent-secret-token"})
    with router.http() as http:
        assert register(http, "gpu-1", agents[0].url, ["m"]).status_code == 401
        assert register(http, "gpu-1", agents[0].url, ["m"], token="wrong").status_code == 401
        resp = http.post("/heartbeat", json={"name": "gpu-1"})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
        assert register(http, "gpu-1", agents[0].url, ["m"], token="agent-secret-token").status_code == 200
        assert http.post("/heartbeat", json={"name": "gpu-1"},
                         headers={"Authorization": "Bearer agent-secret-token"}).status_code == 200
    assert "agent-secret-token" not in router.output()


@pytest.mark.parametrize("payload, field", [
    ({"endpoint": "http://127.0.0.1:1", "models": ["m"]}, "name"),
    ({"name": "  ", "endpoint": "http://127.0.0.1:1", "models": ["m"]}, "name"),
    ({"name": "a", "endpoint": "ftp://127.0.0.1:1", "models": ["m"]}, "endpoint"),
    ({"name": "a", "models": ["m"]}, "endpoint"),
    ({"name": "a", "endpoint": "http://127.0.0.1:1", "models": "m"}, "models"),
    ({"name": "a", "endpoint": "http://127.0.0.1:1", "models": ["m", ""]}, "models"),
    ({"name": "a", "endpoint": "http://127.0.0.1:1", "models": [1]}, "models"),
])
def test_register_validation(router: RouterProcess, payload: dict, field: str) -> None:
    with router.http() as http:
        resp = http.post("/register", json=payload)
    assert resp.status_code == 422
    assert resp.json()["error"]["param"] == field


def test_agent_registered_on_one_worker_is_seen_by_all(start_router, agents) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""}, workers=2)
    with router.http() as http:
        assert register(http, "gpu-1", agents[0].url, ["multi"]).status_code == 200
        time.sleep(1.0)  # other worker's registry poll
        for _ in range(10):  # new connections land on either worker
            with router.http() as fresh:
                resp = fresh.post("/v1/chat/completions", json={"model": "multi", "messages": MSG})
                assert resp.status_code == 200
                assert fresh.post("/heartbeat", json={"name": "gpu-1"}).status_code == 200
