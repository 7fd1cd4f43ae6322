"""Anthropic translation: what the router sends (checked by the stub against the
SDK's request types) and what the client gets back (checked against the spec)."""

from __future__ import annotations

from typing import Any

import openai
import orjson
import pytest

from tests.conftest import ANTHROPIC_KEY
from tests.providers.conformance import assert_stream_matches, non_stream, raw_stream
from tests.support.anthropic_stub import AnthropicStub
from tests.support.processes import RouterProcess

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather by city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.fixture()
def upstream(anthropic_upstream: AnthropicStub) -> AnthropicStub:
    anthropic_upstream.reset()
    return anthropic_upstream


def sent(upstream: AnthropicStub) -> dict[str, Any]:
    assert upstream.violations == [], upstream.violations
    return upstream.last().json()


def test_request_translation(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    non_stream(hosted, {
        "model": "claude-text", "max_completion_tokens": 300, "stop": "END", "user": "user-42",
        "temperature": 0.3, "top_p": 0.9, "seed": 7, "presence_penalty": 0.5,
        "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "   "},
                                         {"type": "text", "text": "Weather in Paris?"},
                                         {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "toolu_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "toolu_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "toolu_a", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_b", "content": [{"type": "text", "text": "12:00"}]},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "   "},
            {"role": "user", "content": "Bye"},
        ]})
    body = sent(upstream)
    assert upstream.last().headers["x-api-key"] == ANTHROPIC_KEY
    assert upstream.last().headers["anthropic-version"] == "2023-06-01"
    assert body == {
        "model": "claude-text",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "You are terse."}, {"type": "text", "text": "Use tools."}],
        "stop_sequences": ["END"],
        "metadata": {"user_id": "user-42"},
        "tools": [
            {"name": "get_weather", "description": "Weather by city",
             "input_schema": TOOLS[0]["function"]["parameters"]},
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}]},
            # the whitespace-only assistant turn vanished, so everything after the tool results is one user turn
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": "18C"},
                {"type": "tool_result", "tool_use_id": "toolu_b", "content": "12:00"},
                {"type": "text", "text": "Thanks"},
                {"type": "text", "text": "Bye"}]},
        ],
    }


@pytest.mark.parametrize("model, request_extra, expected", [
    ("claude-text", {"max_tokens": 77}, 77),
    ("claude-text", {}, 1234),  # ANTHROPIC_DEFAULT_MAX_TOKENS of this router
    ("claude-3-5-sonnet-latest", {}, 8192),  # per-model default
    ("claude-3-haiku-20240307", {}, 4096),
])
def test_max_tokens_is_always_sent(hosted: RouterProcess, upstream: AnthropicStub, model: str,
                                   request_extra: dict, expected: int) -> None:
    non_stream(hosted, {"model": model, "messages": [{"role": "user", "content": "x"}], **request_extra})
    assert sent(upstream)["max_tokens"] == expected


@pytest.mark.parametrize("tool_choice, parallel, expected", [
    ("auto", None, {"type": "auto"}),
    ("required", None, {"type": "any"}),
    ("none", None, {"type": "none"}),
    ({"type": "function", "function": {"name": "get_time"}}, None, {"type": "tool", "name": "get_time"}),
    (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
    (None, None, None),
])
def test_tool_choice(hosted: RouterProcess, upstream: AnthropicStub, tool_choice: Any, parallel: Any,
                     expected: Any) -> None:
    body: dict[str, Any] = {"model": "claude-text", "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    non_stream(hosted, body)
    assert sent(upstream).get("tool_choice") == expected


def test_response_format_and_effort(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    non_stream(hosted, {"model": "claude-text", "messages": [{"role": "user", "content": "x"}],
                        "reasoning_effort": "high",
                        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert sent(upstream)["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": "high"}


@pytest.mark.parametrize("extra, param", [({"n": 2}, "n"), ({"logprobs": True}, "logprobs")])
def test_unsupported_parameters_are_rejected(hosted: RouterProcess, upstream: AnthropicStub, extra: dict,
                                             param: str) -> None:
    with hosted.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "claude-text",
                                                       "messages": [{"role": "user", "content": "x"}], **extra})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    assert upstream.requests == []


def test_text_response_and_usage(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    data = non_stream(hosted, {"model": "claude-two-texts", "messages": [{"role": "user", "content": "x"}]})
    assert data["choices"][0]["message"]["content"] == "Hello again"
    assert data["choices"][0]["finish_reason"] == "stop"
    # prompt tokens: input 11 + cache creation 3 + cache read 5
    assert data["usage"]["prompt_tokens"] == 19 and data["usage"]["completion_tokens"] == 7
    assert data["usage"]["total_tokens"] == 26
    assert data["usage"]["prompt_tokens_details"]["cached_tokens"] == 5


@pytest.mark.parametrize("model, finish", [
    ("claude-text", "stop"), ("claude-stopseq", "stop"), ("claude-pause", "stop"), ("claude-max", "length"),
    ("claude-context", "length"), ("claude-tools", "tool_calls"), ("claude-refusal", "content_filter"),
])
def test_finish_reasons_in_both_modes(hosted: RouterProcess, upstream: AnthropicStub, model: str,
                                      finish: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "tools": TOOLS}
    assert non_stream(hosted, body)["choices"][0]["finish_reason"] == finish
    chunks, _ = raw_stream(hosted, body)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == [finish]


def test_tool_calls_non_streaming(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    data = non_stream(hosted, {"model": "claude-tools", "messages": [{"role": "user", "content": "x"}],
                               "tools": TOOLS})
    message = data["choices"][0]["message"]
    assert message["content"] == "Let me check."
    assert [(c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"]))
            for c in message["tool_calls"]] == [("toolu_1", "get_weather", {"city": "Paris"}),
                                                ("toolu_2", "get_time", {"tz": "CET", "fmt": 24})]
    assert all(isinstance(c["function"]["arguments"], str) for c in message["tool_calls"])


def test_stream_shape(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    chunks, raw = raw_stream(hosted, {"model": "claude-tools", "messages": [{"role": "user", "content": "x"}],
                                      "tools": TOOLS, "stream_options": {"include_usage": True}})
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in chunks}) == 1
    # tool-call indexes count tool calls from 0, although Anthropic's blocks 1 and 2 carry them
    opened = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls") or []
              if "id" in tc]
    assert [(tc["index"], tc["id"], tc["function"]["name"]) for tc in opened] == \
        [(0, "toolu_1", "get_weather"), (1, "toolu_2", "get_time")]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] == 19
    # message_delta's output_tokens is cumulative: 7, not 1 + 7
    assert chunks[-1]["usage"]["completion_tokens"] == 7
    assert all(c["usage"] is None for c in chunks[:-1])


# (finish_reason "length" is covered above: the SDK's stream helper raises on it by design)
@pytest.mark.parametrize("model", ["claude-text", "claude-tools", "claude-empty-args"])
def test_sdk_stream_equals_non_stream(hosted: RouterProcess, upstream: AnthropicStub, model: str) -> None:
    plain = assert_stream_matches(hosted, model=model, messages=[{"role": "user", "content": "x"}], tools=TOOLS)
    if model == "claude-empty-args":
        assert orjson.loads(plain.choices[0].message.tool_calls[0].function.arguments) == {}


def test_streamed_request_is_valid_too(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    raw_stream(hosted, {"model": "claude-text", "messages": [{"role": "system", "content": "s"},
                                                             {"role": "user", "content": "x"}]})
    body = sent(upstream)
    assert body["stream"] is True and body["system"] == [{"type": "text", "text": "s"}]


@pytest.mark.parametrize("status, expected", [(400, 400), (429, 429), (529, 503), (500, 500)])
def test_error_statuses(hosted: RouterProcess, upstream: AnthropicStub, status: int, expected: int) -> None:
    with hosted.http() as http:
        for stream in (False, True):
            resp = http.post("/v1/chat/completions", json={
                "model": f"claude-error-{status}", "messages": [{"role": "user", "content": "x"}], "stream": stream})
            assert resp.status_code == expected
            err = resp.json()["error"]
            assert err["message"].startswith(f"stub says {status}")
            assert ANTHROPIC_KEY not in resp.text
            if status == 429:
                assert resp.headers["retry-after"] == "11" and err["type"] == "rate_limit_error"


def test_sdk_sees_overloaded_as_503(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        hosted.client().chat.completions.create(model="claude-error-529", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 503


@pytest.mark.parametrize("model, code", [("claude-midstream-error", "overloaded_error"),
                                         ("claude-truncated", "upstream_stream_truncated")])
def test_mid_stream_failures_end_with_an_error_event(hosted: RouterProcess, upstream: AnthropicStub,
                                                     model: str, code: str) -> None:
    chunks, raw = raw_stream(hosted, {"model": model, "messages": [{"role": "user", "content": "x"}]})
    assert "error" in chunks[-1] and chunks[-1]["error"]["code"] == code
    assert b"[DONE]" not in raw
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


def test_whitespace_stops_and_prefill_whitespace_are_not_sent(hosted: RouterProcess, upstream: AnthropicStub) -> None:
    """Anthropic refuses whitespace-only stop sequences and a final assistant turn ending in whitespace (the
    stub as well): the first are dropped, the second trimmed, or dropped when nothing remains."""
    with hosted.http() as http:
        resp = http.post("/v1/chat/completions", json={
            "model": "claude-text", "stop": ["\n", "END", " \t"],
            "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Sure: \n"}]})
        assert resp.status_code == 200, resp.text
        body = sent(upstream)
        assert body["stop_sequences"] == ["END"]
        assert body["messages"][-1] == {"role": "assistant", "content": [{"type": "text", "text": "Sure:"}]}

        resp = http.post("/v1/chat/completions", json={
            "model": "claude-text", "stop": "\n\n",
            "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "  \n"}]})
        assert resp.status_code == 200, resp.text
        body = sent(upstream)
        assert "stop_sequences" not in body and body["messages"][-1]["role"] == "user"
