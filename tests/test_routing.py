"""Registry first, then agents, then the design's prefix rules; 404 otherwise."""

from __future__ import annotations

import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def routed(tmp_path_factory, openai_stub: OpenAIStub):
    agent = OpenAIStub(name="local-agent").start()
    proc = RouterProcess(tmp_path_factory.mktemp("routing"), {
        "OPENAI_BASE_URL": openai_stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
        "LOCAL_AGENT_URL": agent.url, "LLMD_ENDPOINT": "http://127.0.0.1:9",
    }).start()
    yield proc, agent
    proc.stop()
    agent.stop()


def post(proc: RouterProcess, model: str):
    with proc.http() as http:
        return http.post("/v1/chat/completions", json={"model": model, "messages": MSG})


@pytest.mark.parametrize("model", ["gpt-4o", "chatgpt-4o-latest", "o1-mini", "o3", "o4-mini"])
def test_openai_prefixes(routed, stub: OpenAIStub, model: str) -> None:
    proc, _ = routed
    resp = post(proc, model)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "Hello from openai"
    assert stub.last().json()["model"] == model


def test_local_prefix_goes_to_local_agent_url(routed) -> None:
    proc, agent = routed
    agent.reset()
    resp = post(proc, "local_mistral-7b")
    assert resp.json()["choices"][0]["message"]["content"] == "Hello from local-agent"
    assert agent.last().json()["model"] == "local_mistral-7b"


@pytest.mark.parametrize("model, variable", [
    ("claude-3-5-sonnet", "EXTERNAL_ANTHROPIC_KEY"), ("google-palm", "EXTERNAL_GOOGLE_KEY"),
    ("gemini-2.0-flash", "EXTERNAL_GOOGLE_KEY"), ("openrouter/auto", "EXTERNAL_OPENROUTER_KEY"),
    ("grok-2", "EXTERNAL_GROK_KEY"), ("venice-uncensored", "EXTERNAL_VENICE_KEY"),
])
def test_other_prefixes_reach_their_provider(routed, model: str, variable: str) -> None:
    """No key is configured for these in this router: each provider names its own variable."""
    resp = post(routed[0], model)
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert err["code"] == "provider_not_configured" and variable in err["message"]


def test_llmd_prefix_reaches_llmd_endpoint(routed) -> None:
    resp = post(routed[0], "llmd-llama")  # LLMD_ENDPOINT is a closed port here
    assert resp.status_code == 502 and "llm-d" in resp.json()["error"]["message"]


@pytest.mark.parametrize("model", ["mistral-large", "llama3", "dummy-2", "xgpt-4"])
def test_unknown_model_is_404(routed, model: str) -> None:
    resp = post(routed[0], model)
    assert resp.status_code == 404
    assert resp.json()["error"] == {
        "message": f"The model '{model}' does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}


def test_llmd_prefix_needs_llmd_endpoint(start_router) -> None:
    proc = start_router()
    assert post(proc, "llmd-llama").status_code == 404


def test_registry_type_wins_over_prefix(routed, stub: OpenAIStub) -> None:
    proc, agent = routed
    # a gpt-looking name registered as local goes to the agent, a claude-looking one as openai to OpenAI
    assert proc.cli("add-model", "gpt-but-local", "local", agent.url, "api").returncode == 0
    assert proc.cli("add-model", "claude-via-openai", "openai", stub.url + "/v1", "api").returncode == 0
    gemini = proc.cli("add-model", "my-gemini", "google", "https://generativelanguage.googleapis.com", "api")
    assert gemini.returncode == 0
    client = proc.client()
    wanted = {"gpt-but-local", "claude-via-openai", "my-gemini"}
    assert wait_for(lambda: wanted <= {m.id for m in client.models.list().data})
    agent.reset()
    assert post(proc, "gpt-but-local").json()["choices"][0]["message"]["content"] == "Hello from local-agent"
    assert post(proc, "claude-via-openai").json()["choices"][0]["message"]["content"] == "Hello from openai"
    resp = post(proc, "my-gemini")  # registered as google: the google provider answers (no key set)
    assert resp.status_code == 500 and "EXTERNAL_GOOGLE_KEY" in resp.json()["error"]["message"]
