"""The OpenAI-compatible family: OpenRouter, Grok, Groq, Venice, llm-d.

Each goes to its own base URL with its own key variable, passes the body through
untouched, and relays provider-specific response fields unchanged."""

from __future__ import annotations

import orjson
import pytest

from tests.providers.conformance import assert_stream_matches
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess

X = [{"role": "user", "content": "x"}]
EXTRA = {"provider": "SomeUpstream", "x_groq": {"id": "req_01"}, "system_fingerprint": "fp_x"}
KEYS = {"openrouter": "sk-or-test-0123456789", "grok": "xai-test-0123456789", "groq": "gsk_test_0123456789",
        "venice": "venice-test-0123456789", "llm-d": "llmd-test-0123456789"}


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    stubs = {name: OpenAIStub(name=name, key=KEYS[name], extra_fields=EXTRA).start() for name in KEYS}
    groq_as_grok = OpenAIStub(name="groq-behind-grok", key=KEYS["grok"]).start()
    proc = RouterProcess(tmp_path_factory.mktemp("family"), {
        "OPENROUTER_BASE_URL": stubs["openrouter"].url + "/api", "EXTERNAL_OPENROUTER_KEY": KEYS["openrouter"],
        "OPENROUTER_REFERER": "https://myapp.example", "OPENROUTER_TITLE": "My App",
        "GROK_BASE_URL": stubs["grok"].url, "EXTERNAL_GROK_KEY": KEYS["grok"],
        "GROQ_BASE_URL": stubs["groq"].url + "/openai/v1", "EXTERNAL_GROQ_KEY": KEYS["groq"],
        "VENICE_BASE_URL": stubs["venice"].url + "/api", "EXTERNAL_VENICE_KEY": KEYS["venice"],
        "LLMD_ENDPOINT": stubs["llm-d"].url, "LLMD_API_KEY": KEYS["llm-d"],
    }).start()
    assert proc.cli("add-model", "llama-3.3-70b", "groq", stubs["groq"].url + "/openai", "api").returncode == 0
    assert wait_for(lambda: "llama-3.3-70b" in {m.id for m in proc.client().models.list().data})
    yield proc, stubs, groq_as_grok
    proc.stop()
    for s in [*stubs.values(), groq_as_grok]:
        s.stop()


@pytest.mark.parametrize("model, name, path", [
    ("openrouter/anthropic/claude-sonnet", "openrouter", "/api/v1/chat/completions"),
    ("grok-4", "grok", "/v1/chat/completions"),
    ("llama-3.3-70b", "groq", "/openai/v1/chat/completions"),
    ("venice-uncensored", "venice", "/api/v1/chat/completions"),
    ("llmd-llama-8b", "llm-d", "/v1/chat/completions"),
])
def test_each_provider_forwards_with_its_key(family, model: str, name: str, path: str) -> None:
    proc, stubs, _ = family
    stub = stubs[name]
    stub.reset()
    body = orjson.dumps({"model": model, "messages": X, "temperature": 0.7, "custom_vendor_param": {"a": 1}})
    with proc.http() as http:
        resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    req = stub.last()
    assert req.path == path and req.body == body  # untouched, vendor parameters included
    assert req.headers["Authorization"] == f"Bearer {KEYS[name]}"
    data = resp.json()
    assert data["choices"][0]["message"]["content"] == f"Hello from {name}"
    # provider-specific extra fields pass through unchanged
    assert {k: data[k] for k in EXTRA} == EXTRA
    assert stub.spec_violations == []


def test_openrouter_attribution_headers(family) -> None:
    proc, stubs, _ = family
    proc.client().chat.completions.create(model="openrouter/auto", messages=X)
    headers = stubs["openrouter"].last().headers
    assert headers["HTTP-Referer"] == "https://myapp.example" and headers["X-Title"] == "My App"


def test_extra_fields_pass_through_in_streams_and_the_sdk_accepts_them(family) -> None:
    proc, stubs, _ = family
    with proc.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "grok-4", "messages": X, "stream": True})
    events = [orjson.loads(e.removeprefix(b"data: ")) for e in resp.content.split(b"\n\n")
              if e.strip() and e != b"data: [DONE]"]
    assert all(e["provider"] == "SomeUpstream" for e in events)
    assert_stream_matches(proc, model="grok-4", messages=X)


def test_grok_base_url_pointing_at_groq_bare_host_works(start_router, tmp_path) -> None:
    """The design's sample sets GROK_BASE_URL=https://api.groq.com: Groq's API lives under /openai."""
    from router.providers.grok import groq_api_base

    assert groq_api_base("https://api.groq.com") == "https://api.groq.com/openai"
    assert groq_api_base("https://api.groq.com/openai") == "https://api.groq.com/openai"
    assert groq_api_base("https://api.x.ai") == "https://api.x.ai"


def test_grok_base_url_with_groq_layout(start_router) -> None:
    stub = OpenAIStub(name="groq-layout", key="gsk_abcdefgh12345").start()
    try:
        router = start_router({"GROK_BASE_URL": stub.url + "/openai", "EXTERNAL_GROK_KEY": "gsk_abcdefgh12345"})
        answer = router.client().chat.completions.create(model="grok-beta", messages=X)
        assert answer.choices[0].message.content == "Hello from groq-layout"
        assert stub.last().path == "/openai/v1/chat/completions"
    finally:
        stub.stop()


def test_llmd_needs_no_key(start_router) -> None:
    stub = OpenAIStub(name="llmd-open").start()
    try:
        router = start_router({"LLMD_ENDPOINT": stub.url})
        answer = router.client().chat.completions.create(model="llmd-mistral", messages=X)
        assert answer.choices[0].message.content == "Hello from llmd-open"
        assert "Authorization" not in stub.last().headers
    finally:
        stub.stop()


def test_family_errors_keep_status_and_scrub_keys(family) -> None:
    proc, stubs, _ = family
    with proc.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-error-429", "messages": X})
        # gpt-* goes to OpenAI (not configured here): the family stubs are reached by their own names
        assert resp.status_code == 500 and "EXTERNAL_OPENAI_KEY" in resp.json()["error"]["message"]
    assert proc.cli("add-model", "gpt-error-429", "openrouter", stubs["openrouter"].url + "/api", "api").returncode == 0
    assert wait_for(lambda: "gpt-error-429" in {m.id for m in proc.client().models.list().data})
    with proc.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-error-429", "messages": X})
    assert resp.status_code == 429 and resp.headers["retry-after"] == "7"
    assert KEYS["openrouter"] not in resp.text
