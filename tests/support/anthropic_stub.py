"""An Anthropic Messages API server on loopback, for tests.

Every request body is validated strictly (unknown keys, wrong types, wrong
roles rejected) against the official `anthropic` SDK's request types; answers
and stream events are built from the SDK's own response and event types.

What it answers depends on the model name (see SCRIPTS); `claude-error-NNN`
answers that HTTP status with an Anthropic error body, `claude-midstream-error`
sends an `error` event after some text, `claude-truncated` ends the stream
before `message_stop`.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import Any

import anthropic.types as at
import orjson
from aiohttp import web
from anthropic.types import (
    ErrorResponse, InputJSONDelta, Message, MessageDeltaUsage, OverloadedErrorObject, RateLimitErrorObject,
    RawContentBlockDeltaEvent, RawContentBlockStartEvent, RawContentBlockStopEvent, RawMessageDeltaEvent,
    RawMessageStartEvent, RawMessageStopEvent, TextBlock, TextDelta, ToolUseBlock, Usage,
)
from anthropic.types import InvalidRequestErrorObject
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming, MessageCreateParamsStreaming
from anthropic.types.raw_message_delta_event import Delta
from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import is_typeddict

from tests.support.server import ThreadedServer, sse_response

USAGE = Usage(input_tokens=11, output_tokens=7, cache_creation_input_tokens=3, cache_read_input_tokens=5)
# model name -> (content blocks, stop reason)
SCRIPTS: dict[str, tuple[list[Any], str]] = {
    "claude-text": ([TextBlock(type="text", text="Hello from claude")], "end_turn"),
    "claude-two-texts": ([TextBlock(type="text", text="Hello"), TextBlock(type="text", text=" again")], "end_turn"),
    "claude-tools": ([TextBlock(type="text", text="Let me check."),
                      ToolUseBlock(type="tool_use", id="toolu_1", name="get_weather", input={"city": "Paris"}),
                      ToolUseBlock(type="tool_use", id="toolu_2", name="get_time", input={"tz": "CET", "fmt": 24})],
                     "tool_use"),
    "claude-empty-args": ([ToolUseBlock(type="tool_use", id="toolu_9", name="ping", input={})], "tool_use"),
    "claude-max": ([TextBlock(type="text", text="Hello")], "max_tokens"),
    "claude-stopseq": ([TextBlock(type="text", text="Hello")], "stop_sequence"),
    "claude-refusal": ([], "refusal"),
    "claude-pause": ([TextBlock(type="text", text="Hm")], "pause_turn"),
    "claude-context": ([TextBlock(type="text", text="Hm")], "model_context_window_exceeded"),
}


@lru_cache(maxsize=1)
def _adapters() -> tuple[TypeAdapter[Any], TypeAdapter[Any]]:
    """The SDK's request TypedDicts, made strict: every one forbids unknown keys."""
    for info in pkgutil.walk_packages(at.__path__, at.__name__ + "."):
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and is_typeddict(value) and "__pydantic_config__" not in value.__dict__:
                value.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return TypeAdapter(MessageCreateParamsNonStreaming), TypeAdapter(MessageCreateParamsStreaming)


def _force(value: Any) -> Any:
    """Run pydantic's lazy validators of `Iterable[...]` fields."""
    if isinstance(value, dict):
        return {k: _force(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ValidatorIterator":
        return [_force(v) for v in value]
    return value


def request_errors(body: dict[str, Any]) -> list[str]:
    plain, streaming = _adapters()
    try:
        _force((streaming if body.get("stream") else plain).validate_python(body))
    except ValidationError as exc:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return semantic_errors(body)


def semantic_errors(body: dict[str, Any]) -> list[str]:
    """What the real API refuses beyond the schema: whitespace-only stop sequences, and a final assistant
    (prefill) turn whose content ends in whitespace."""
    errors = [f"stop_sequences.{i}: each stop sequence must contain non-whitespace"
              for i, s in enumerate(body.get("stop_sequences") or []) if isinstance(s, str) and not s.strip()]
    turns = body.get("messages") or []
    if turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
        content = turns[-1].get("content")
        last = content if isinstance(content, str) else (
            content[-1].get("text") if content and isinstance(content[-1], dict) else None)
        if isinstance(last, str) and last != last.rstrip():
            errors.append("messages: final assistant content cannot end with trailing whitespace")
    return errors


def event(ev: Any) -> bytes:
    data = ev.model_dump(mode="json", exclude_unset=True)
    return f"event: {data['type']}\n".encode() + b"data: " + orjson.dumps(data) + b"\n\n"


PING = b'event: ping\ndata: {"type": "ping"}\n\n'


class AnthropicStub(ThreadedServer):
    name = "anthropic"

    def __init__(self, key: str, model_ids: list[str] | None = None) -> None:
        super().__init__()
        self.key = key
        self.model_ids = model_ids or ["claude-sonnet-5-5", "claude-haiku-5-5"]

    def start(self) -> AnthropicStub:
        _adapters()
        return super().start()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_post("/v1/messages/count_tokens", self._count)
        app.router.add_get("/v1/models", self._models)

    def _error(self, status: int, etype: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
        objects = {"overloaded_error": OverloadedErrorObject, "rate_limit_error": RateLimitErrorObject}
        obj = objects.get(etype, InvalidRequestErrorObject)(type=etype, message=message)  # type: ignore[arg-type]
        body = ErrorResponse(type="error", error=obj).model_dump(mode="json", exclude_unset=True)
        return web.json_response(body, status=status, headers=headers)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("x-api-key") == self.key and "anthropic-version" in request.headers

    async def _models(self, request: web.Request) -> web.Response:
        self.record(request, b"")
        if not self._authorized(request):
            return self._error(401, "authentication_error", f"invalid x-api-key {request.headers.get('x-api-key')}")
        ids = self.model_ids
        if "after_id" in request.query:  # pages of two, as a long list would come
            ids = ids[ids.index(request.query["after_id"]) + 1:]
        page, more = ids[:2], len(ids) > 2
        data = [{"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"} for m in page]
        return web.json_response({"data": data, "has_more": more, "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def _count(self, request: web.Request) -> web.Response:
        """`count_tokens`: a count that tells it came from here (characters / 3, unlike the router's / 4)."""
        raw = await request.read()
        self.record(request, raw)
        if not self._authorized(request):
            return self._error(401, "authentication_error", "invalid x-api-key")
        body = orjson.loads(raw)
        text = orjson.dumps([body.get("system"), body.get("messages"), body.get("tools")])
        return web.json_response({"input_tokens": len(text) // 3})

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        self.record(request, raw)
        if not self._authorized(request):
            return self._error(401, "authentication_error",
                               f"invalid x-api-key: {request.headers.get('x-api-key')}")
        body = orjson.loads(raw)
        errors = request_errors(body)
        if errors:
            self.violations.extend(errors)
            return self._error(400, "invalid_request_error", "; ".join(errors))
        model = body["model"]
        if model.startswith("claude-error-"):
            status = int(model.rsplit("-", 1)[1])
            etype = {529: "overloaded_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
            headers = {"retry-after": "11"} if status == 429 else None
            return self._error(status, etype, f"stub says {status} (key {request.headers.get('x-api-key')})",
                               headers)
        blocks, stop = SCRIPTS.get(model, SCRIPTS["claude-text"])
        if model in ("claude-midstream-error", "claude-truncated"):
            blocks, stop = SCRIPTS["claude-text"]
        if not body.get("stream"):
            message = Message(id="msg_stub", type="message", role="assistant", model=model, content=blocks,
                              stop_reason=stop, stop_sequence=None, usage=USAGE)  # type: ignore[arg-type]
            return web.Response(body=message.model_dump_json(exclude_unset=True), content_type="application/json")
        return await sse_response(request, self.stream_events(model, blocks, stop))

    def stream_events(self, model: str, blocks: list[Any], stop: str) -> list[bytes]:
        start = Message(id="msg_stub", type="message", role="assistant", model=model, content=[], stop_reason=None,
                        stop_sequence=None, usage=Usage(input_tokens=11, output_tokens=1,
                                                        cache_creation_input_tokens=3, cache_read_input_tokens=5))
        out = [event(RawMessageStartEvent(type="message_start", message=start)), PING]
        for i, block in enumerate(blocks):
            if block.type == "text":
                out.append(event(RawContentBlockStartEvent(type="content_block_start", index=i,
                                                           content_block=TextBlock(type="text", text=""))))
                half = len(block.text) // 2
                for piece in (block.text[:half], block.text[half:]):
                    out.append(event(RawContentBlockDeltaEvent(type="content_block_delta", index=i,
                                                               delta=TextDelta(type="text_delta", text=piece))))
            else:
                out.append(event(RawContentBlockStartEvent(
                    type="content_block_start", index=i,
                    content_block=ToolUseBlock(type="tool_use", id=block.id, name=block.name, input={}))))
                args = orjson.dumps(block.input).decode()
                for piece in (args[:5], args[5:]) if args != "{}" else ():
                    out.append(event(RawContentBlockDeltaEvent(
                        type="content_block_delta", index=i,
                        delta=InputJSONDelta(type="input_json_delta", partial_json=piece))))
            out.append(event(RawContentBlockStopEvent(type="content_block_stop", index=i)))
            if model == "claude-midstream-error":
                err = ErrorResponse(type="error", error=OverloadedErrorObject(type="overloaded_error",
                                                                             message="Overloaded"))
                return out + [event(err)]
        out.append(event(RawMessageDeltaEvent(type="message_delta", delta=Delta(stop_reason=stop, stop_sequence=None),
                                              usage=MessageDeltaUsage(output_tokens=7))))
        if model == "claude-truncated":
            return out
        out.append(PING)
        out.append(event(RawMessageStopEvent(type="message_stop")))
        return out
