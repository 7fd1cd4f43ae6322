"""Anthropic's Messages API at the router (issue 14 §3), driven by the official `anthropic` SDK: translated for
OpenAI-compatible deployments and the built-in dummy, passed through for Anthropic deployments; every answer and
event validated with the SDK's types, streams accumulated by the SDK's own helper; tools, images, system prompts,
stop reasons, count_tokens, errors in Anthropic's shape, and the same keys, routing, usage and request log."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from router.providers.anthropic_messages import StreamTranslator, from_chat, to_chat
from tests.conftest import ANTHROPIC_KEY, UPSTREAM_KEY
from tests.support.anthropic_stub import AnthropicStub
from tests.test_request_log import count
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.schema import assert_valid

EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
#: the wire's events (the SDK's stream helper adds derived ones: text, input_json, ...)
RAW = {"message_start", "content_block_start", "content_block_delta", "content_block_stop", "message_delta",
       "message_stop"}
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture()
def router(start_router, stub: OpenAIStub, anthropic_upstream: AnthropicStub):  # type: ignore[no-untyped-def]
    r = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
                      "ANTHROPIC_BASE_URL": anthropic_upstream.url, "EXTERNAL_ANTHROPIC_KEY": ANTHROPIC_KEY,
                      "ROUTER_MASTER_KEY": "master-secret"})
    key = r.cli("create-key", "--name", "claude-code").stdout.strip()
    r.key = key
    with r.http() as http:  # the router picks the new key up within a second
        assert wait_for(lambda: http.get("/v1/models", headers={"x-api-key": key}).status_code == 200, 5)
    return r


def sdk(router: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=router.url, api_key=router.key, max_retries=0, timeout=20)


def strict(message: Any) -> Message:
    data = message.model_dump(mode="json", exclude_unset=True) if not isinstance(message, dict) else message
    parsed = Message.model_validate(data)
    assert set(data) <= set(Message.model_fields), set(data) - set(Message.model_fields)
    return parsed


def test_translated_text_answer_and_stream_agree(router, stub: OpenAIStub) -> None:
    client = sdk(router)
    message = client.messages.create(model="gpt-4o", max_tokens=64, system="Be brief.",
                                     messages=[{"role": "user", "content": "Say hello"}])
    strict(message)
    assert message.content[0].type == "text" and message.content[0].text == stub.reply_text()
    assert message.stop_reason == "end_turn" and message.model == "gpt-4o"
    assert message.usage.input_tokens == 9 and message.usage.output_tokens == 3
    sent = stub.requests[-1].json()
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."} and sent["max_tokens"] == 64
    with client.messages.stream(model="gpt-4o", max_tokens=64, messages=[{"role": "user", "content": "hi"}]) as s:
        events = [EVENTS.validate_python(e.model_dump(mode="json")) for e in s if e.type in RAW]
        final = s.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 1
    assert final.content[0].text == message.content[0].text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3  # from the usage the router asked the chat upstream for
    assert stub.requests[-1].json()["stream_options"] == {"include_usage": True}


def test_translated_tools_images_and_stop_reasons(router, stub: OpenAIStub) -> None:
    client = sdk(router)
    message = client.messages.create(model="gpt-tools", max_tokens=64, tools=[WEATHER],
                                     tool_choice={"type": "tool", "name": "get_weather"},
                                     messages=[{"role": "user", "content": [
                                         {"type": "text", "text": "Weather here?"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": "iVBORw0KGgo="}}]}])
    strict(message)
    call = message.content[0]
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"
    sent = stub.requests[-1].json()
    assert sent["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    with client.messages.stream(model="gpt-tools", max_tokens=64, tools=[WEATHER],
                                messages=[{"role": "user", "content": "Weather?"}]) as s:
        events = list(s)
        final = s.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    assert final.content[0].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    # the conversation goes on: the tool's result, as the next turn sends it
    client.messages.create(model="gpt-4o", max_tokens=32, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]}])
    sent = stub.requests[-1].json()
    assert_valid("CreateChatCompletionRequest", sent)
    assert sent["messages"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}


def test_anthropic_deployments_pass_the_bytes_through(router, anthropic_upstream: AnthropicStub) -> None:
    body = {"model": "claude-tools", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}],
            "tools": [WEATHER], "stop_sequences": ["END"], "metadata": {"user_id": "u-1"}}
    raw = orjson.dumps(body)
    with httpx.Client(base_url=router.url, timeout=10) as http:
        resp = http.post("/v1/messages", content=raw, headers={"x-api-key": router.key,
                                                               "content-type": "application/json"})
    assert resp.status_code == 200, resp.text
    assert anthropic_upstream.requests[-1].body == raw  # untouched
    message = strict(resp.json())
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"] and resp.headers["x-router-deployment"]
    client = sdk(router)
    with client.messages.stream(model="claude-tools", max_tokens=50, tools=[WEATHER],
                                messages=[{"role": "user", "content": "hi"}]) as s:
        final = s.get_final_message()
    assert final.content[1].input == message.content[1].input and final.usage.output_tokens > 0


def test_errors_come_in_anthropics_shape(router) -> None:
    client = sdk(router)
    with pytest.raises(anthropic.BadRequestError) as bad:
        client.messages.create(model="gpt-4o", max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    wrong = anthropic.Anthropic(base_url=router.url, api_key="wrong-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as denied:
        wrong.messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert "request-id" in denied.value.response.headers or "x-request-id" in denied.value.response.headers
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}]}])


def test_count_tokens_and_the_request_log(router, tmp_path: Path, anthropic_upstream: AnthropicStub) -> None:
    client = sdk(router)
    estimate = client.messages.count_tokens(model="gpt-4o", messages=[{"role": "user", "content": "hello " * 40}])
    assert 50 < estimate.input_tokens < 90
    exact = client.messages.count_tokens(model="claude-text", messages=[{"role": "user", "content": "hello"}])
    assert anthropic_upstream.requests[-1].path == "/v1/messages/count_tokens" and exact.input_tokens > 0
    client.messages.create(model="dummy", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    path = tmp_path / "data" / "requests.db"
    assert wait_for(lambda: count(path, "endpoint = '/v1/messages'") == 1, 10)
    with sqlite3.connect(path) as conn:
        row = conn.execute("SELECT key_name, model, status, prompt_tokens, completion_tokens FROM request_log "
                           "WHERE endpoint = '/v1/messages'").fetchone()
    assert row[:3] == ("claude-code", "dummy", 200) and row[3] > 0 and row[4] > 0


# -- the format layer alone ----------------------------------------------------------------------

def chat_stream(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def test_a_stream_split_anywhere_translates_the_same() -> None:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    source = chat_stream(
        chunk({"role": "assistant", "content": ""}), chunk({"reasoning_content": "think"}),
        chunk({"content": "Hi "}), chunk({"content": "there"}),
        chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f", "arguments": '{"x"'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
        {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 5}})
    whole = StreamTranslator("m")
    expected = whole.feed(source) + whole.close()
    for size in (1, 7, 64):
        pieces = StreamTranslator("m")
        out = b"".join(pieces.feed(source[i:i + size]) for i in range(0, len(source), size)) + pieces.close()
        assert out == expected
    events = [orjson.loads(line[6:]) for line in expected.split(b"\n") if line.startswith(b"data: ")]
    for e in events:
        EVENTS.validate_python(e)
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == [
        "thinking", "text", "tool_use", "tool_use"]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] == 5


def test_from_chat_and_to_chat_round_trip_details() -> None:
    message = from_chat({"id": "chatcmpl-9", "choices": [{"index": 0, "finish_reason": "length", "message": {
        "role": "assistant", "content": "cut"}}], "usage": {"prompt_tokens": 100, "completion_tokens": 10,
                                                           "prompt_tokens_details": {"cached_tokens": 40}}}, "m")
    parsed = strict(message)
    assert parsed.stop_reason == "max_tokens" and parsed.id == "msg_9"
    assert (parsed.usage.input_tokens, parsed.usage.cache_read_input_tokens) == (60, 40)
    chat = to_chat({"model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                           "text": "b"}],
                    "stop_sequences": ["END"], "metadata": {"user_id": "u1"}, "top_k": 3,
                    "tool_choice": {"type": "any", "disable_parallel_tool_use": True}, "tools": [WEATHER],
                    "messages": [{"role": "user", "content": "hi"}]})
    assert_valid("CreateChatCompletionRequest", chat)
    assert chat["messages"][0] == {"role": "system", "content": "a\nb"} and chat["stop"] == ["END"]
    assert chat["tool_choice"] == "required" and chat["parallel_tool_calls"] is False and chat["user"] == "u1"
    assert "top_k" not in chat
