"""A real OpenAI-compatible HTTP server on loopback, run in a background thread.

It stands for what lives outside (api.openai.com, a vLLM server behind an
agent). What it answers is built from the `openai` SDK's own response types;
what it receives is checked against the official spec's
`CreateChatCompletionRequest` and recorded for the test to inspect.

Behaviour is chosen by the requested model name:
  gpt-error-NNN      answer HTTP NNN with an OpenAI error that echoes the key it got
  gpt-slow           sleep `slow_seconds` before answering
  gpt-midstream-fail stream two chunks, then drop the connection
  gpt-truncated      stream two chunks, then end cleanly without [DONE]
  gpt-drip           stream a chunk every 50 ms (up to 200) and notice a client leaving
  gpt-gated          stream the role chunk and the first content, then wait for `gate` before the rest
  gpt-tools          answer with a tool call
  gpt-huge           50 MB: a JSON body sent chunked, or a stream event that never ends its line
  gpt-huge-length    a 50 MB JSON body with its Content-Length
  gpt-bad-json       200 with a body that is not JSON
  gpt-not-completion 200 with JSON that is not a completion
  gpt-html           200 with an HTML page, streaming or not
  gpt-json-only      a JSON completion even when a stream was asked for
  gpt-leak           echo the key it got in x-request-id, retry-after, openai-processing-ms, and (streaming)
                     in a mid-stream error event written in two pieces that split the key
  gpt-leak-error     429 whose error type, param, code, message and headers echo the key it got
  gpt-upstream-limits  a normal answer with the upstream's own x-ratelimit-* headers
  gpt-no-usage       an answer, or a stream, without usage even when asked (as some servers do)
  anything else      "Hello from <name>", streaming or not
"""

from __future__ import annotations

import asyncio
import base64
import struct
import threading
import time
from typing import Any

import orjson
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall, ChoiceDeltaToolCallFunction
from openai.types.chat.chat_completion_message import ChatCompletionMessage
from openai.types.chat.chat_completion_message_tool_call import ChatCompletionMessageToolCall, Function
from openai.types import Completion, CompletionChoice, CreateEmbeddingResponse, Embedding
from openai.types.completion_usage import CompletionUsage
from openai.types.create_embedding_response import Usage as EmbeddingUsage
from openai.types.model import Model

from tests.support.schema import errors as spec_errors
from tests.support.server import ThreadedServer, sse_response
from tests.support.schema import validator


class OpenAIStub(ThreadedServer):
    def __init__(self, name: str = "stub", key: str | None = None, model_ids: list[str] | None = None,
                 slow_seconds: float = 3.0, extra_fields: dict[str, Any] | None = None,
                 keepalive_timeout: float | None = None) -> None:
        super().__init__()
        if keepalive_timeout is not None:
            self.keepalive_timeout = keepalive_timeout
        self.name = name
        self.key = key
        self.model_ids = model_ids if model_ids is not None else ["gpt-4o", "gpt-4o-mini"]
        self.slow_seconds = slow_seconds
        self.extra_fields = extra_fields or {}  # provider-specific fields added to every answer
        self.gate = threading.Event()
        self.client_gone = threading.Event()
        self.chunks_sent = 0

    @property
    def spec_violations(self) -> list[str]:
        return self.violations

    def start(self) -> OpenAIStub:
        validator("CreateChatCompletionRequest")  # load the spec now, not inside the first timed request
        return super().start()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/openai/v1/chat/completions", self._chat)  # Groq's layout
        app.router.add_post("/api/v1/chat/completions", self._chat)  # OpenRouter's and Venice's layout
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/api/v1/models", self._models)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/responses", self._responses)

    def reset(self) -> None:
        super().reset()
        self.gate.clear()
        self.client_gone.clear()
        self.chunks_sent = 0

    # -- handlers --------------------------------------------------------------------

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        if self.key is None:
            return None
        given = request.headers.get("Authorization", "")
        if given == f"Bearer {self.key}":
            return None
        return web.json_response(
            {"error": {"message": f"Incorrect API key provided: {given.removeprefix('Bearer ')}.",
                       "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}},
            status=401)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self.record(request, b"")
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        data = [Model(id=m, created=1700000000, object="model", owned_by="openai").model_dump(mode="json")
                for m in self.model_ids]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.record(request, body)
        payload = orjson.loads(body)
        found = spec_errors("CreateChatCompletionRequest", payload)
        if found:
            self.spec_violations.extend(found)
            return web.json_response({"error": {"message": "; ".join(found), "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        model = payload["model"]
        if model.startswith("gpt-error-"):
            status = int(model.rsplit("-", 1)[1])
            given = request.headers.get("Authorization", "")
            headers = {"Retry-After": "7"} if status == 429 else None
            return web.json_response(
                {"error": {"message": f"Upstream refused (key used: {given.removeprefix('Bearer ')})",
                           "type": "invalid_request_error", "param": "model", "code": "upstream_says_no"}},
                status=status, headers=headers)
        denied = self._unauthorized(request)
        if denied is not None:
            return denied
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if model in MISBEHAVING:
            return await MISBEHAVING[model](self, request, payload, given)
        if model == "gpt-slow":
            await asyncio.sleep(self.slow_seconds)
        if payload.get("stream"):
            return await self._stream(request, payload)
        body = {**self.completion(payload).model_dump(mode="json", exclude_unset=True), **self.extra_fields}
        return web.Response(body=orjson.dumps(body), content_type="application/json",
                            headers={"x-request-id": "req_stub"})

    async def _checked(self, request: web.Request, schema: str) -> dict[str, Any] | web.Response:
        body = await request.read()
        self.record(request, body)
        payload = orjson.loads(body)
        found = spec_errors(schema, payload)
        if found:
            self.spec_violations.extend(found)
            return web.json_response({"error": {"message": "; ".join(found), "type": "invalid_request_error",
                                                "param": None, "code": None}}, status=400)
        denied = self._unauthorized(request)
        return denied if denied is not None else payload

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        """Deterministic vectors (`dimensions` long, else 8) from each input's text, as OpenAI answers them."""
        payload = await self._checked(request, "CreateEmbeddingRequest")
        if isinstance(payload, web.Response):
            return payload
        value = payload["input"]
        inputs = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        size = payload.get("dimensions") or 8
        data = []
        for i, item in enumerate(inputs):
            seed = sum(map(ord, item)) if isinstance(item, str) else sum(item)
            vector = [((seed * (k + 1)) % 97) / 97.0 for k in range(size)]
            data.append(Embedding(object="embedding", index=i, embedding=vector).model_dump(mode="json"))
        tokens = sum(len(x.split()) if isinstance(x, str) else len(x) for x in inputs)
        answer = CreateEmbeddingResponse(object="list", data=[Embedding(**d) for d in data], model=payload["model"],
                                         usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))
        body = answer.model_dump(mode="json")
        if payload.get("encoding_format") == "base64":
            for entry in body["data"]:
                entry["embedding"] = base64.b64encode(struct.pack(f"<{size}f", *entry["embedding"])).decode()
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's own Responses API (what the router passes through to OpenAI): a text answer."""
        payload = await self._checked(request, "CreateResponse")
        if isinstance(payload, web.Response):
            return payload
        answer = {"id": "resp_stub", "object": "response", "created_at": 1700000000, "status": "completed",
                  "model": payload["model"], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                  "output": [{"id": "msg_stub", "type": "message", "role": "assistant", "status": "completed",
                              "content": [{"type": "output_text", "text": self.reply_text(), "annotations": []}]}],
                  "usage": {"input_tokens": 4, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 3,
                            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}}
        return web.json_response(answer)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        """The legacy completions API: "Hello from <name>" as text, streaming or not."""
        payload = await self._checked(request, "CreateCompletionRequest")
        if isinstance(payload, web.Response):
            return payload
        asked = bool((payload.get("stream_options") or {}).get("include_usage"))
        usage = CompletionUsage(prompt_tokens=5, completion_tokens=3, total_tokens=8)
        if not payload.get("stream"):
            answer = Completion(id="cmpl-stub", object="text_completion", created=1700000000, model=payload["model"],
                                choices=[CompletionChoice(index=0, text=self.reply_text(), finish_reason="stop",
                                                          logprobs=None)], usage=usage)
            return web.Response(body=orjson.dumps(answer.model_dump(mode="json", exclude_unset=True)),
                                content_type="application/json")
        words = self.reply_text().split(" ")
        events = []
        for i, word in enumerate(words):
            # mid-stream choices have no finish_reason yet, which the SDK's type does not allow: as OpenAI sends
            chunk = Completion(id="cmpl-stub", object="text_completion", created=1700000000, model=payload["model"],
                               choices=[CompletionChoice.model_construct(
                                   index=0, text=word if i == 0 else " " + word, logprobs=None,
                                   finish_reason="stop" if i == len(words) - 1 else None)])
            if asked:
                chunk.usage = None
            events.append(b"data: " + orjson.dumps(chunk.model_dump(mode="json", exclude_unset=True)) + b"\n\n")
        if asked:
            last = Completion(id="cmpl-stub", object="text_completion", created=1700000000, model=payload["model"],
                              choices=[], usage=usage)
            events.append(b"data: " + orjson.dumps(last.model_dump(mode="json", exclude_unset=True)) + b"\n\n")
        return await sse_response(request, [*events, b"data: [DONE]\n\n"])

    # -- canned answers from the SDK's types --------------------------------------------

    def reply_text(self) -> str:
        return f"Hello from {self.name}"

    def completion(self, payload: dict[str, Any]) -> ChatCompletion:
        if payload["model"] == "gpt-tools":
            message = ChatCompletionMessage(role="assistant", content=None, refusal=None, tool_calls=[
                ChatCompletionMessageToolCall(id="call_1", type="function",
                                              function=Function(name="get_weather", arguments='{"city":"Paris"}'))])
            finish = "tool_calls"
        else:
            message = ChatCompletionMessage(role="assistant", content=self.reply_text(), refusal=None)
            finish = "stop"
        return ChatCompletion(
            id="chatcmpl-stub", object="chat.completion", created=1700000000, model=payload["model"],
            choices=[Choice(index=0, message=message, finish_reason=finish, logprobs=None)],
            usage=None if payload["model"] == "gpt-no-usage" else CompletionUsage(prompt_tokens=9, completion_tokens=3,
                                                                                 total_tokens=12))

    def chunks(self, payload: dict[str, Any]) -> list[ChatCompletionChunk]:
        # as OpenAI does: asked for usage, every chunk carries `"usage": null` until the usage chunk at the end
        asked = bool((payload.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: ChoiceDelta, finish: str | None = None) -> ChatCompletionChunk:
            made = ChatCompletionChunk(id="chatcmpl-stub", object="chat.completion.chunk", created=1700000000,
                                       model=payload["model"],
                                       choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish, logprobs=None)])
            if asked:
                made.usage = None
            return made

        out = [chunk(ChoiceDelta(role="assistant", content=""))]
        if payload["model"] == "gpt-tools":
            out.append(chunk(ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                index=0, id="call_1", type="function",
                function=ChoiceDeltaToolCallFunction(name="get_weather", arguments=""))])))
            for part in ('{"city"', ':"Paris"}'):
                out.append(chunk(ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
                    index=0, function=ChoiceDeltaToolCallFunction(arguments=part))])))
            out.append(chunk(ChoiceDelta(), "tool_calls"))
        else:
            for word in self.reply_text().split(" "):
                out.append(chunk(ChoiceDelta(content=word if not out[1:] else " " + word)))
            out.append(chunk(ChoiceDelta(), "stop"))
        if asked and payload["model"] != "gpt-no-usage":
            out.append(ChatCompletionChunk(id="chatcmpl-stub", object="chat.completion.chunk", created=1700000000,
                                           model=payload["model"], choices=[],
                                           usage=CompletionUsage(prompt_tokens=9, completion_tokens=3,
                                                                 total_tokens=12)))
        return out

    async def _stream(self, request: web.Request, payload: dict[str, Any],
                      headers: dict[str, str] | None = None) -> web.StreamResponse:
        model = payload["model"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           **(headers or {})})
        await resp.prepare(request)
        events = [b"data: " + orjson.dumps({**c.model_dump(mode="json", exclude_unset=True), **self.extra_fields})
                  + b"\n\n" for c in self.chunks(payload)]
        if model == "gpt-drip":
            events = events[:1] + [events[1]] * 200 + events[-1:]
        try:
            for i, event in enumerate(events):
                if model in ("gpt-midstream-fail", "gpt-truncated") and i == 2:
                    if model == "gpt-midstream-fail":
                        request.transport.abort()  # type: ignore[union-attr]
                        return resp
                    await resp.write_eof()
                    return resp
                if model == "gpt-gated" and i == 2:
                    await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 10)
                if model == "gpt-drip" and i > 0:
                    await asyncio.sleep(0.05)
                self.chunks_sent += 1  # counted before the write, so a client never sees a chunk not yet counted
                await resp.write(event)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            self.client_gone.set()
            raise
        return resp


    # -- upstreams misbehaving ----------------------------------------------------------

    async def _huge(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        stream = bool(payload.get("stream"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream" if stream else "application/json"})
        await resp.prepare(request)
        piece = b"x" * (1024 * 1024)
        try:
            await resp.write(b'data: {"choices": [{"index": 0, "delta": {"content": "' if stream
                             else b'{"choices": [{"index": 0, "message": {"content": "')
            for _ in range(HUGE_MB):
                self.chunks_sent += 1
                await resp.write(piece)
            await resp.write(b'"}}]}\n\ndata: [DONE]\n\n' if stream else b'"}}]}')
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            self.client_gone.set()
        return resp

    async def _huge_length(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        body = b'{"choices": [{"index": 0, "message": {"content": "' + b"x" * (HUGE_MB << 20) + b'"}}]}'
        return web.Response(body=body, content_type="application/json")

    async def _bad_json(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        return web.Response(body=b'{"id": "chatcmpl-1", "choices": [', content_type="application/json")

    async def _not_completion(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": []})

    async def _html(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        return web.Response(text="<html><body>Welcome to nginx!</body></html>", content_type="text/html")

    async def _json_only(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        return web.json_response(self.completion(payload).model_dump(mode="json", exclude_unset=True))

    async def _leak(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        headers = {"x-request-id": f"req_{key}", "retry-after": key, "openai-processing-ms": key}
        if not payload.get("stream"):
            return web.json_response(self.completion(payload).model_dump(mode="json", exclude_unset=True),
                                     headers=headers)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", **headers})
        await resp.prepare(request)
        for chunk in self.chunks(payload)[:2]:  # the role, then the first content: the error comes mid-stream
            await resp.write(b"data: " + orjson.dumps(chunk.model_dump(mode="json")) + b"\n\n")
        event = b"data: " + orjson.dumps({"error": {"message": f"key {key} was refused", "type": key,
                                                    "param": key, "code": key}}) + b"\n\n"
        cut = event.index(key.encode()) + len(key) // 2  # the key arrives in two pieces
        await resp.write(event[:cut])
        await asyncio.sleep(0.05)
        await resp.write(event[cut:])
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _leak_error(self, request: web.Request, payload: dict[str, Any], key: str) -> web.StreamResponse:
        return web.json_response(
            {"error": {"message": f"Rate limited for {key}", "type": f"tier_{key}", "param": key, "code": key}},
            status=429, headers={"x-request-id": f"req_{key}", "retry-after": key, "openai-processing-ms": key})

    async def _upstream_limits(self, request: web.Request, payload: dict[str, Any],
                               key: str) -> web.StreamResponse:
        headers = {"x-ratelimit-limit-requests": "999", "x-ratelimit-remaining-requests": "998",
                   "x-ratelimit-reset-requests": "17s"}
        if payload.get("stream"):
            return await self._stream(request, payload, headers)
        return web.json_response(self.completion(payload).model_dump(mode="json", exclude_unset=True),
                                 headers=headers)


HUGE_MB = 50
MISBEHAVING = {
    "gpt-huge": OpenAIStub._huge,
    "gpt-huge-length": OpenAIStub._huge_length,
    "gpt-bad-json": OpenAIStub._bad_json,
    "gpt-not-completion": OpenAIStub._not_completion,
    "gpt-html": OpenAIStub._html,
    "gpt-json-only": OpenAIStub._json_only,
    "gpt-leak": OpenAIStub._leak,
    "gpt-leak-error": OpenAIStub._leak_error,
    "gpt-upstream-limits": OpenAIStub._upstream_limits,
}


def wait_for(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
