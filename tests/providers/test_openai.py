"""The OpenAI provider: exact pass-through, chunk-by-chunk SSE, pooled connections, keys."""

from __future__ import annotations

import threading

import orjson

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess
from tests.support.schema import assert_valid

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def test_body_passes_through_byte_for_byte(router: RouterProcess, stub: OpenAIStub) -> None:
    # odd spacing, key order and an extension field: a re-serializing proxy would change these bytes
    body = b'{"messages": [{"role":"user","content":"hi \\u00e9"}],  "model":"gpt-4o", "temperature":0.2,' \
           b' "x_vendor_field": {"keep": true}}'
    with router.http() as http:
        resp = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert stub.last().body == body
    assert stub.last().headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert "client-key" not in str(stub.last().headers)
    assert resp.headers.get("x-upstream-request-id") == "req_stub"
    assert_valid("CreateChatCompletionResponse", resp.json())


def test_sdk_non_streaming_and_streaming_with_tools(router: RouterProcess, stub: OpenAIStub) -> None:
    client = router.client()
    plain = client.chat.completions.create(model="gpt-tools", messages=MESSAGES, tools=TOOLS)
    assert plain.choices[0].finish_reason == "tool_calls"
    call = plain.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == {"city": "Paris"}

    with client.chat.completions.stream(model="gpt-tools", messages=MESSAGES, tools=TOOLS,
                                        stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    fcall = final.choices[0].message.tool_calls[0]
    got = (fcall.id, fcall.function.name, fcall.function.arguments)
    assert got == (call.id, "get_weather", call.function.arguments)
    assert final.usage == plain.usage
    assert stub.spec_violations == []


def test_stream_chunks_validate_against_spec(router: RouterProcess, stub: OpenAIStub) -> None:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    events = [e.removeprefix(b"data: ") for e in resp.content.split(b"\n\n") if e.strip()]
    assert events[-1] == b"[DONE]"
    for event in events[:-1]:
        assert_valid("CreateChatCompletionStreamResponse", orjson.loads(event))
    assert orjson.loads(events[-2])["usage"]["total_tokens"] == 12


def test_sse_is_relayed_without_buffering(router: RouterProcess, stub: OpenAIStub) -> None:
    """The first content reaches the client while the upstream still holds back the rest. (The role-only
    chunk before it is read ahead with it: until content comes, a failure may still go to another deployment.)"""
    got_first = threading.Event()
    with router.http() as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-gated", "messages": MESSAGES, "stream": True}) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"content":""' not in line.replace(" ", ""):
                got_first.set()
                break
        assert got_first.is_set()
        assert stub.chunks_sent == 2  # upstream is blocked on the gate: nothing else was buffered for us
        stub.gate.set()
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"


def test_upstream_connections_are_pooled(router: RouterProcess, stub: OpenAIStub) -> None:
    client = router.client()
    for _ in range(20):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    peers = {r.peer for r in stub.requests}
    assert len(stub.requests) == 20
    assert len(peers) == 1, f"expected one keep-alive connection, saw {len(peers)}"


def test_registry_openai_compatible_endpoint_with_v1_suffix_and_no_key_leak(
        start_router, tmp_path) -> None:
    official = OpenAIStub(name="official", key=UPSTREAM_KEY).start()
    vllm = OpenAIStub(name="selfhosted").start()
    try:
        router = start_router({"OPENAI_BASE_URL": official.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY})
        for name, url in (("my-vllm", vllm.url + "/v1"), ("my-vllm-bare", vllm.url + "/"),
                          ("gpt-official", official.url + "/v1")):
            assert router.cli("add-model", name, "openai", url, "api").returncode == 0
        client = router.client()
        assert wait_for(lambda: "my-vllm" in {m.id for m in client.models.list().data}, 5)
        for name in ("my-vllm", "my-vllm-bare"):
            answer = client.chat.completions.create(model=name, messages=MESSAGES)
            assert answer.choices[0].message.content == "Hello from selfhosted"
        assert all("Authorization" not in r.headers for r in vllm.requests)
        assert [r.path for r in vllm.requests] == ["/v1/chat/completions"] * 2
        answer = client.chat.completions.create(model="gpt-official", messages=MESSAGES)
        assert answer.choices[0].message.content == "Hello from official"
        assert official.last().headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    finally:
        official.stop()
        vllm.stop()


def test_missing_key_names_the_variable(start_router, openai_stub: OpenAIStub) -> None:
    router = start_router({"OPENAI_BASE_URL": openai_stub.url})
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MESSAGES})
    assert resp.status_code == 500
    err = resp.json()["error"]
    assert "EXTERNAL_OPENAI_KEY" in err["message"] and err["code"] == "provider_not_configured"
