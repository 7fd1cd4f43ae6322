"""Gemini translation: what the router sends (checked by the stub against the
google-genai SDK's types) and what the client gets back (checked against the spec)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from tests.conftest import GOOGLE_KEY
from tests.providers.conformance import assert_stream_matches, non_stream, raw_stream
from tests.support.gemini_stub import GeminiStub
from tests.support.processes import RouterProcess

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
X = [{"role": "user", "content": "x"}]


@pytest.fixture()
def upstream(gemini_upstream: GeminiStub) -> GeminiStub:
    gemini_upstream.reset()
    return gemini_upstream


def sent(upstream: GeminiStub) -> dict[str, Any]:
    assert upstream.violations == [], upstream.violations
    return upstream.last().json()


def test_request_translation(hosted: RouterProcess, upstream: GeminiStub) -> None:
    non_stream(hosted, {
        "model": "gemini-text", "max_tokens": 200, "stop": ["END", "STOP"], "temperature": 0.2, "top_p": 0.8,
        "seed": 3, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_w", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
            {"role": "assistant", "content": "One moment."},  # a text-only turn between the call and its result
            {"role": "tool", "tool_call_id": "call_w", "content": '{"temp": 18}'},
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": "   "},
            {"role": "user", "content": "Merci"},
        ]})
    body = sent(upstream)
    req = upstream.last()
    assert req.path == "/v1beta/models/gemini-text:generateContent"
    assert req.headers["x-goog-api-key"] == GOOGLE_KEY and "key" not in req.query
    assert body == {
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "Weather?"}, {"inlineData": {"mimeType": "image/png", "data": PNG}}]},
            {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                                        {"text": "One moment."}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                                       {"text": "Merci"}]},
        ],
        "tools": [{"functionDeclarations": [
            {"name": "get_weather", "description": "Weather", "parametersJsonSchema": WEATHER},
            {"name": "get_time"}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {"maxOutputTokens": 200, "stopSequences": ["END", "STOP"], "temperature": 0.2,
                             "topP": 0.8, "seed": 3, "responseMimeType": "application/json",
                             "responseJsonSchema": WEATHER},
    }


def test_tool_response_is_always_an_object_and_named_by_lookup(hosted: RouterProcess, upstream: GeminiStub) -> None:
    non_stream(hosted, {"model": "gemini-text", "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "b", "content": "sunny"},
        {"role": "tool", "tool_call_id": "a", "content": "[1, 2]"},
    ]})
    contents = sent(upstream)["contents"]
    assert contents[1]["parts"][0] == {"functionCall": {"name": "get_time", "args": {}}}
    assert contents[2] == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}},
        {"functionResponse": {"name": "get_time", "response": {"result": [1, 2]}}}]}


def test_unknown_tool_call_id_is_a_400(hosted: RouterProcess, upstream: GeminiStub) -> None:
    with hosted.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gemini-text", "messages": [
            {"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": "nope", "content": "1"}]})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "messages[1].tool_call_id"
    assert upstream.requests == []


@pytest.mark.parametrize("tool_choice, expected", [
    ("auto", {"functionCallingConfig": {"mode": "AUTO"}}),
    ("none", {"functionCallingConfig": {"mode": "NONE"}}),
    ("required", {"functionCallingConfig": {"mode": "ANY"}}),
    ({"type": "function", "function": {"name": "get_time"}},
     {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}),
])
def test_tool_choice(hosted: RouterProcess, upstream: GeminiStub, tool_choice: Any, expected: Any) -> None:
    non_stream(hosted, {"model": "gemini-text", "messages": X, "tools": TOOLS, "tool_choice": tool_choice})
    assert sent(upstream)["toolConfig"] == expected


def test_text_answer_and_usage(hosted: RouterProcess, upstream: GeminiStub) -> None:
    data = non_stream(hosted, {"model": "gemini-text", "messages": X})
    assert data["choices"][0]["message"]["content"] == "Hello from gemini"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["model"] == "gemini-stub-001" and data["id"] == "chatcmpl-resp_stub"
    # completion counts the thinking tokens too, as OpenAI's reasoning tokens
    assert data["usage"] == {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20,
                             "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 2}}


def test_thought_parts_are_left_out(hosted: RouterProcess, upstream: GeminiStub) -> None:
    assert non_stream(hosted, {"model": "gemini-thinking", "messages": X})["choices"][0]["message"]["content"] == "42"
    chunks, _ = raw_stream(hosted, {"model": "gemini-thinking", "messages": X})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "42"


def test_function_calls_become_tool_calls(hosted: RouterProcess, upstream: GeminiStub) -> None:
    data = non_stream(hosted, {"model": "gemini-tools", "messages": X, "tools": TOOLS})
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)


def test_stream_call_and_stop_in_different_chunks(hosted: RouterProcess, upstream: GeminiStub) -> None:
    chunks, raw = raw_stream(hosted, {"model": "gemini-tools", "messages": X, "tools": TOOLS,
                                      "stream_options": {"include_usage": True}})
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["tool_calls"]
    indexes = [tc["index"] for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []]
    assert indexes == [0, 1]
    usage_chunks = [c for c in chunks if c.get("usage")]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]  # once, at the end
    assert raw.rstrip().endswith(b"data: [DONE]")


@pytest.mark.parametrize("model", ["gemini-text", "gemini-tools", "gemini-crlf"])
def test_sdk_stream_equals_non_stream(hosted: RouterProcess, upstream: GeminiStub, model: str) -> None:
    plain = assert_stream_matches(hosted, model=model, messages=X, tools=TOOLS)
    if model == "gemini-crlf":
        assert plain.choices[0].message.content == "Hello from gemini"


@pytest.mark.parametrize("model, finish", [
    ("gemini-max", "length"), ("gemini-filter-safety", "content_filter"),
    ("gemini-filter-recitation", "content_filter"), ("gemini-filter-blocklist", "content_filter"),
    ("gemini-filter-prohibited_content", "content_filter"), ("gemini-filter-spii", "content_filter"),
    ("gemini-filter-stop", "content_filter"),  # a candidate without content, even with STOP
    ("gemini-blocked", "content_filter"),  # no candidates: the prompt was blocked
])
def test_finish_reasons_in_both_modes(hosted: RouterProcess, upstream: GeminiStub, model: str, finish: str) -> None:
    data = non_stream(hosted, {"model": model, "messages": X})
    assert [c["finish_reason"] for c in data["choices"]] == [finish]
    chunks, raw = raw_stream(hosted, {"model": model, "messages": X})
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == [finish]
    assert raw.rstrip().endswith(b"data: [DONE]")


def test_several_candidates(hosted: RouterProcess, upstream: GeminiStub) -> None:
    data = non_stream(hosted, {"model": "gemini-text", "messages": X, "n": 2})
    assert sent(upstream)["generationConfig"]["candidateCount"] == 2
    assert [(c["index"], c["message"]["content"]) for c in data["choices"]] == [(0, "Answer 0"), (1, "Answer 1")]


@pytest.mark.parametrize("status, code, etype", [(400, "INVALID_ARGUMENT", "invalid_request_error"),
                                                 (429, "RESOURCE_EXHAUSTED", "rate_limit_error"),
                                                 (500, "INTERNAL", "server_error")])
def test_error_statuses(hosted: RouterProcess, upstream: GeminiStub, status: int, code: str, etype: str) -> None:
    with hosted.http() as http:
        for stream in (False, True):
            resp = http.post("/v1/chat/completions", json={"model": f"gemini-error-{status}", "messages": X,
                                                           "stream": stream})
            assert resp.status_code == status
            err = resp.json()["error"]
            assert (err["code"], err["type"], err["message"]) == (code, etype, f"stub says {status}")
            if status == 429:
                assert resp.headers["retry-after"] == "13"


@pytest.mark.parametrize("model, code", [("gemini-midstream-error", "INTERNAL"),
                                         ("gemini-truncated", "upstream_stream_truncated")])
def test_mid_stream_failures_end_with_an_error_event(hosted: RouterProcess, upstream: GeminiStub,
                                                     model: str, code: str) -> None:
    chunks, raw = raw_stream(hosted, {"model": model, "messages": X})
    assert chunks[-1]["error"]["code"] == code
    assert b"[DONE]" not in raw


def test_model_prefixes_are_stripped(hosted: RouterProcess, upstream: GeminiStub) -> None:
    assert hosted.cli("add-model", "google/gemini-text", "google", upstream.url, "api").returncode == 0
    from tests.support.openai_stub import wait_for
    assert wait_for(lambda: "google/gemini-text" in {m.id for m in hosted.client().models.list().data})
    non_stream(hosted, {"model": "google/gemini-text", "messages": X})
    assert upstream.last().path == "/v1beta/models/gemini-text:generateContent"
