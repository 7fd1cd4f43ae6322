"""The `local` provider when nothing can serve: 503 `no_live_agent` with Retry-After, naming what was tried."""

from __future__ import annotations

import httpx

from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import free_port

MSG = [{"role": "user", "content": "hi"}]


def no_live_agent(resp: httpx.Response) -> str:
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "5"
    error = resp.json()["error"]
    assert error["code"] == "no_live_agent"
    return str(error["message"])


def test_unreachable_local_agent_url_is_503_naming_it(start_router) -> None:
    port = free_port()
    router = start_router({"LOCAL_AGENT_URL": f"http://127.0.0.1:{port}"})
    with router.http() as http:
        for stream in (False, True):
            resp = http.post("/v1/chat/completions", json={"model": "local-llama", "messages": MSG, "stream": stream})
            message = no_live_agent(resp)
            assert f"127.0.0.1:{port}" in message and "localhost:5000" not in message


def test_every_one_tried_is_named_and_the_registry_endpoint_comes_last(start_router) -> None:
    stub = OpenAIStub(name="endpoint").start()
    try:
        _every_one_tried(start_router, stub)
    finally:
        stub.stop()


def _every_one_tried(start_router, stub: OpenAIStub) -> None:  # type: ignore[no-untyped-def]
    dead_agent, dead_endpoint = free_port(), free_port()
    router = start_router({"LOCAL_AGENT_URL": ""})
    assert router.cli("add-model", "local-x", "local", f"http://127.0.0.1:{dead_endpoint}", "api").returncode == 0
    assert router.cli("add-model", "local-y", "local", stub.url, "api").returncode == 0
    with router.http() as http:
        def listed() -> bool:
            return {"local-x", "local-y"} <= {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert wait_for(listed)  # the router has read the CLI's entries
        for name in ("local-x", "local-y", "agent-only"):
            assert http.post("/register", json={"name": f"gpu-{name}", "endpoint": f"http://127.0.0.1:{dead_agent}",
                                                "models": [name]}).status_code == 200
        for stream in (False, True):
            resp = http.post("/v1/chat/completions", json={"model": "local-x", "messages": MSG, "stream": stream})
            message = no_live_agent(resp)
            assert f"agent gpu-local-x: could not connect to upstream local at 127.0.0.1:{dead_agent}" in message
            assert f"127.0.0.1:{dead_endpoint}" in message
        message = no_live_agent(http.post("/v1/chat/completions", json={"model": "agent-only", "messages": MSG}))
        assert f"agent gpu-agent-only: could not connect to upstream local at 127.0.0.1:{dead_agent}" in message
        # an endpoint that answers: the unreachable live agent costs the client nothing
        resp = http.post("/v1/chat/completions", json={"model": "local-y", "messages": MSG})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "Hello from endpoint"


def test_no_fallback_configured_says_so(start_router) -> None:
    router = start_router({"LOCAL_AGENT_URL": ""})
    with router.http() as http:
        message = no_live_agent(http.post("/v1/chat/completions", json={"model": "local-llama", "messages": MSG}))
    assert "LOCAL_AGENT_URL is not set" in message
