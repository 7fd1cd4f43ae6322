"""The cache never changes an answer: a stream replayed from it accumulates (with the official SDK) to the
same message, tool calls, finish reasons and usage as the live stream, whatever chunk shapes the upstream
used; and nothing that is not a completion is stored or served."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiohttp import web

from router.cache import MemoryBackend, ResponseCache, StreamAssembler, accumulate, replay_stream
from router.observability import Metrics
from router.providers.base import ChatCall
from tests.support.server import ThreadedServer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000, "model": "m"}


def chunk(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "finish_reason": finish, "logprobs": None, "delta": delta}]
    return {**HEAD, "choices": choices, **extra}


# Real chunks from llama.cpp's server as the tests run it (llama-cpp-python, SmolLM2, a forced tool call):
# every chunk repeats the call's id, type and name, and carries the legacy `function_call` too.
LLAMA_CPP_PYTHON = [orjson.loads(line) for line in (
    '{"id": "chatcmpl-15ac", "object": "chat.completion.chunk", "created": 1795457233, "model": "smol", "choices": [{"index": 0, "finish_reason": null, "logprobs": null, "delta": {"role": "assistant", "content": null, "function_call": null, "tool_calls": null}}]}',  # noqa: E501
    '{"id": "chatcmpl-15ac", "object": "chat.completion.chunk", "created": 1795457233, "model": "smol", "choices": [{"index": 0, "finish_reason": null, "logprobs": null, "delta": {"role": null, "content": null, "function_call": {"name": "get_weather", "arguments": "{"}, "tool_calls": [{"index": 0, "id": "call__0_get_weather_cmpl-15ac", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}]}}]}',  # noqa: E501
    '{"id": "chatcmpl-15ac", "object": "chat.completion.chunk", "created": 1795457233, "model": "smol", "choices": [{"index": 0, "finish_reason": null, "logprobs": null, "delta": {"role": null, "content": null, "function_call": {"name": "get_weather", "arguments": " \\"city\\": \\"Paris\\""}, "tool_calls": [{"index": 0, "id": "call__0_get_weather_cmpl-15ac", "type": "function", "function": {"name": "get_weather", "arguments": " \\"city\\": \\"Paris\\""}}]}}]}',  # noqa: E501
    '{"id": "chatcmpl-15ac", "object": "chat.completion.chunk", "created": 1795457233, "model": "smol", "choices": [{"index": 0, "finish_reason": null, "logprobs": null, "delta": {"role": null, "content": null, "function_call": {"name": "get_weather", "arguments": " }"}, "tool_calls": [{"index": 0, "id": "call__0_get_weather_cmpl-15ac", "type": "function", "function": {"name": "get_weather", "arguments": " }"}}]}}]}',  # noqa: E501
    '{"id": "chatcmpl-15ac", "object": "chat.completion.chunk", "created": 1795457233, "model": "smol", "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": null, "delta": {"role": null, "content": null, "function_call": null, "tool_calls": null}}]}',  # noqa: E501
)]

# llama.cpp's C++ server (llama-server): id, type and name in the first delta, then `index` and argument
# pieces only; reasoning in `reasoning_content`; two calls; usage (with timings) after the finish.
LLAMA_SERVER = [
    chunk({"role": "assistant", "content": None}, system_fingerprint="b5000-abc"),
    chunk({"reasoning_content": "The user wants "}, system_fingerprint="b5000-abc"),
    chunk({"reasoning_content": "weather."}, system_fingerprint="b5000-abc"),
    chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                           "function": {"name": "get_weather", "arguments": ""}}]}, system_fingerprint="b5000-abc"),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}, system_fingerprint="b5000-abc"),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}, system_fingerprint="b5000-abc"),
    chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                           "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
          system_fingerprint="b5000-abc"),
    chunk({}, "tool_calls", system_fingerprint="b5000-abc"),
    chunk(None, usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29},
          timings={"predicted_n": 9}, system_fingerprint="b5000-abc"),
]

# Ollama and others: the whole call in one chunk, with an empty content.
WHOLE_CALL = [
    chunk({"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_x", "index": 0, "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]}),
    chunk({"role": "assistant", "content": ""}, "tool_calls"),
]

# text with a refusal, split across chunks
TEXT = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Hel"}), chunk({"content": "lo"}),
        chunk({"refusal": "I can"}), chunk({"refusal": "not."}), chunk({}, "stop"),
        chunk(None, usage={"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})]

SHAPES = {"llama-cpp-python": LLAMA_CPP_PYTHON, "llama-server": LLAMA_SERVER, "whole-call": WHOLE_CALL,
          "text": TEXT}


class ShapeStub(ThreadedServer):
    """Streams the chunks of the shape named by the model (`gpt-shape-<name>`); `gpt-not-a-completion`
    answers 200 with a JSON object that is not a completion."""

    name = "shapes"

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.record(request, body)
        model = orjson.loads(body)["model"]
        if model == "gpt-not-a-completion":
            return web.json_response({"object": "thing", "data": []})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for c in SHAPES[model.removeprefix("gpt-shape-")]:
            await response.write(b"data: " + orjson.dumps(c) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture(scope="module")
def shapes() -> Any:
    stub = ShapeStub().start()
    yield stub
    stub.stop()


def streamed(client: Any, model: str) -> Any:
    with client.chat.completions.stream(model=model, messages=[{"role": "user", "content": "Weather?"}],
                                        temperature=0, tools=TOOLS,
                                        stream_options={"include_usage": True}) as s:
        for _ in s:
            pass
        return s.get_final_completion()


def dump(choice: Any) -> dict[str, Any]:
    """A choice as the SDK accumulated it, but for `role`: the SDK concatenates a role repeated in every chunk
    ("assistantassistant"), which the replay does not imitate."""
    out: dict[str, Any] = choice.model_dump()
    assert out["message"].pop("role").startswith("assistant")
    return out


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_replayed_stream_accumulates_to_the_live_one(start_router, shapes: ShapeStub, shape: str) -> None:
    router = start_router({"OPENAI_BASE_URL": shapes.url, "EXTERNAL_OPENAI_KEY": "sk-test-shapes"})
    client = router.client()
    model = f"gpt-shape-{shape}"
    shapes.reset()
    live = streamed(client, model)
    time.sleep(0.3)  # the recorded stream is stored right after it ends
    again = streamed(client, model)
    assert len(shapes.requests) == 1, "the second stream was not served from the cache"
    assert [dump(c) for c in again.choices] == [dump(c) for c in live.choices]
    assert again.usage == live.usage
    assert again.system_fingerprint == live.system_fingerprint
    if shape != "text":
        assert live.choices[0].message.tool_calls  # the shape did carry tool calls


def test_only_completions_are_stored(start_router, shapes: ShapeStub) -> None:
    router = start_router({"OPENAI_BASE_URL": shapes.url, "EXTERNAL_OPENAI_KEY": "sk-test-shapes"})
    shapes.reset()
    body = {"model": "gpt-not-a-completion", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    with router.http() as http:
        for _ in range(2):
            http.post("/v1/chat/completions", json=body)
            time.sleep(0.2)
        streamed_again = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert len(shapes.requests) == 3  # never answered from the cache
    assert streamed_again.headers.get("x-router-cache") != "hit"
    assert streamed_again.content.strip() != b"data: [DONE]"


def call(stream: bool) -> ChatCall:
    payload = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0, "stream": stream}
    return ChatCall("m", payload, orjson.dumps(payload), stream, False)


@pytest.mark.parametrize("stored", [b"not json", b'{"object":"list","data":[]}', b"[1,2]",
                                    b'{"choices":"nope"}', b'{"choices":[1]}'])
def test_a_stored_entry_that_is_not_a_completion_is_a_miss(stored: bytes) -> None:
    async def run() -> list[object]:
        metrics = Metrics()
        cache = ResponseCache("deterministic", 60, MemoryBackend(10, 1 << 20, metrics), metrics)
        await cache.backend.set("k", stored, 60)
        return [await cache.lookup("k", call(False)), await cache.lookup("k", call(True))]

    assert asyncio.run(run()) == [None, None]


def test_assembler_merges_deltas_as_the_sdk_does() -> None:
    acc: dict[str, Any] = {}
    for delta in ({"role": "assistant", "content": None},
                  {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                   "function": {"name": "f", "arguments": ""}},
                                  {"index": 0, "function": {"arguments": "{\"a\""}}]},  # two pieces in one chunk
                  {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]},
                  {"role": None, "content": None, "tool_calls": None}):
        accumulate(acc, delta)
    assert acc == {"role": "assistant", "tool_calls": [
        {"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}


def test_replay_of_an_assembled_stream_assembles_to_the_same_completion() -> None:
    for shape in SHAPES.values():
        first = StreamAssembler()
        first.feed(b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in shape) + b"data: [DONE]\n\n")
        completion = first.completion()
        assert completion is not None

        async def replay(c: dict[str, Any] = completion) -> bytes:
            return b"".join([part async for part in replay_stream(c, True)])

        second = StreamAssembler()
        second.feed(asyncio.run(replay()))
        assert second.completion() == completion
