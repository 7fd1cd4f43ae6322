"""Anthropic: OpenAI chat completions <-> the Messages API (`POST /v1/messages`).

Request rules (OpenAI -> Anthropic):
- `system` and `developer` messages, wherever they stand, become top-level
  `system` text blocks; consecutive turns of one role merge into one turn;
  empty or whitespace-only text is never sent.
- `max_tokens` is always sent: `max_completion_tokens` or `max_tokens`, else a
  per-model default (`DEFAULT_MAX_TOKENS`), else `ANTHROPIC_DEFAULT_MAX_TOKENS`.
- `stop` -> `stop_sequences` (whitespace-only ones dropped: refused upstream); a final
  assistant (prefill) turn loses its trailing whitespace (refused too); tools -> `{name, description, input_schema}`;
  `tool_choice` auto/required/none/named -> auto/any/none/tool;
  `parallel_tool_calls: false` -> `disable_parallel_tool_use`.
- assistant `tool_calls` -> `tool_use` blocks with parsed `input` ("" is {});
  `tool` messages -> `tool_result` blocks in one user turn after the assistant's.
- `image_url` parts -> image blocks (data URIs as base64, other URLs as url).
- `user` -> `metadata.user_id`; `response_format` json_schema/json_object ->
  `output_config.format`; `reasoning_effort` -> `output_config.effort`.
- Dropped: `temperature`, `top_p` (the current Messages API no longer takes
  sampling parameters), and parameters with no Anthropic meaning
  (`frequency_penalty`, `presence_penalty`, `seed`, `logit_bias`, `store`,
  `service_tier`, `metadata`, `prediction`, ...).
- Rejected with 400: `n` > 1, `logprobs`, audio output, non-text/non-image parts.

Response rules: text blocks join into `content`; `tool_use` -> `tool_calls`;
`stop_reason` end_turn/stop_sequence/pause_turn -> stop, max_tokens and
model_context_window_exceeded -> length, tool_use -> tool_calls, refusal ->
content_filter; prompt tokens = input + cache creation + cache read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from httpx_sse import ServerSentEvent

from starlette.responses import Response

from router.errors import RouterError
from router.providers.base import ChatCall
from router.providers.translate import (
    JSON, ChunkWriter, TranslatingProvider, append_turn, bad_request, choice, completion, data_uri, function_tools,
    max_tokens_of, named_tool_choice, parse_arguments, reject_unsupported, stop_list, text_of, tool_call,
    usage_block,
)
from router.providers.anthropic_messages import error_event
from router.upstream import JSONAnswer, SSEResponse, close_source, pass_headers

# Model-name prefixes and the max_tokens sent when the client gives none.
DEFAULT_MAX_TOKENS: tuple[tuple[str, int], ...] = (
    ("claude-3-5", 8192), ("claude-3-7", 8192), ("claude-3", 4096),
    ("claude-haiku", 8192), ("claude-sonnet", 16384), ("claude-opus", 16384),
)

STOP_REASONS = {
    "end_turn": "stop", "stop_sequence": "stop", "pause_turn": "stop",
    "max_tokens": "length", "model_context_window_exceeded": "length",
    "tool_use": "tool_calls", "refusal": "content_filter",
}

# Error `type`s of Anthropic's error events and the HTTP status they stand for.
ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403,
    "not_found_error": 404, "request_too_large": 413, "rate_limit_error": 429,
    "api_error": 500, "overloaded_error": 503,
}

EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh"}


class AnthropicProvider(TranslatingProvider):
    type = "anthropic"
    url_var = "ANTHROPIC_BASE_URL"
    key_var = "EXTERNAL_ANTHROPIC_KEY"
    key_header = "x-api-key"
    key_scheme = ""

    def extra_headers(self) -> dict[str, str]:
        return {"anthropic-version": self.settings.anthropic_version if self.settings else "2023-06-01"}

    def build_request(self, call: ChatCall) -> tuple[str, bytes, dict[str, str]]:
        default = self.settings.anthropic_default_max_tokens if self.settings else 4096
        body = to_anthropic(call.payload, call.model, default)
        return self.base_url + "/v1/messages", orjson.dumps(body), self.headers()

    def build_completion(self, data: JSON, call: ChatCall) -> bytes:
        return from_anthropic(data, call.model)

    def build_error(self, status: int, body: bytes, headers: dict[str, str]) -> RouterError:
        err = super().build_error(status, body, headers)
        if status == 529:  # Anthropic's "overloaded"
            err.status, err.type = 503, "server_error"
        return err

    async def messages(self, call: ChatCall) -> Response | SSEResponse:
        """Anthropic's own Messages API, passed through: the client's bytes (the model renamed by the
        dispatcher when needed) and Anthropic's answer or events as they come."""
        url = self.base_url + "/v1/messages"
        resp = await self.http.open(self.type, url, call.body, self.headers())
        if resp.status >= 400:
            data = await self.http.read(self.type, url, resp)
            raise self.build_error(resp.status, data, pass_headers(resp))
        if call.stream:
            relayed = self.http.relay(self.type, url, resp, self.http.lines(self.type, resp, b"message_stop"))
            relayed.body_iterator = _anthropic_errors(relayed.body_iterator, relayed)
            return relayed
        data = await self.http.read(self.type, url, resp)
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = None
        if not (isinstance(answer, dict) and isinstance(answer.get("content"), list)):
            raise RouterError(502, f"upstream {self.type} answered with a body that is not a message",
                              code="upstream_bad_response")
        out = JSONAnswer(data, resp.status, pass_headers(resp, self.http.scrub))
        out.usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else None
        return out

    async def translate_stream(self, events: AsyncIterator[ServerSentEvent], call: ChatCall,
                               out: ChunkWriter) -> AsyncIterator[bytes]:
        tool_index: dict[int, int] = {}  # Anthropic content-block index -> OpenAI tool-call index
        no_args: set[int] = set()  # tool calls whose arguments have not started yet
        usage: JSON = {}
        finished = False
        async for event in events:
            if not event.data:
                continue
            data = orjson.loads(event.data)
            kind = data.get("type") or event.event
            if kind == "message_start":
                message = data["message"]
                usage = dict(message.get("usage") or {})
                out.base["id"] = "chatcmpl-" + message["id"]
                out.base["model"] = message.get("model") or call.model
                yield out.delta({"role": "assistant"})
            elif kind == "content_block_start":
                block = data["content_block"]
                if block["type"] == "tool_use":
                    index = tool_index[data["index"]] = len(tool_index)
                    no_args.add(index)
                    yield out.delta({"tool_calls": [{"index": index, "id": block["id"], "type": "function",
                                                     "function": {"name": block["name"], "arguments": ""}}]})
                elif block["type"] == "text" and block.get("text"):
                    yield out.delta({"content": block["text"]})
            elif kind == "content_block_delta":
                delta = data["delta"]
                if delta["type"] == "text_delta" and delta.get("text"):
                    yield out.delta({"content": delta["text"]})
                elif delta["type"] == "input_json_delta" and delta.get("partial_json"):
                    call_index = tool_index.get(data["index"])
                    if call_index is not None:
                        no_args.discard(call_index)
                        yield out.delta({"tool_calls": [{"index": call_index,
                                                         "function": {"arguments": delta["partial_json"]}}]})
            elif kind == "content_block_stop":
                index = tool_index.get(data["index"], -1)
                if index in no_args:  # a call without input: "{}", as the non-streaming answer has
                    no_args.discard(index)
                    yield out.delta({"tool_calls": [{"index": index, "function": {"arguments": "{}"}}]})
            elif kind == "message_delta":
                # output_tokens here is cumulative: it replaces, never adds
                usage.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
                finished = True
                yield out.delta({}, STOP_REASONS.get(data["delta"].get("stop_reason"), "stop"))
            elif kind == "message_stop":
                if not finished:
                    yield out.delta({}, "stop")
                if out.include_usage:
                    yield out.usage(usage_of(usage))
                yield out.done()
                return
            elif kind == "error":
                err = data.get("error") or {}
                etype = err.get("type", "api_error")
                raise RouterError(ERROR_STATUS.get(etype, 502), self.http.scrub(str(err.get("message") or etype)),
                                  type=etype, code=etype)
            # ping, thinking and signature deltas: nothing to send
        raise RouterError(502, "upstream anthropic closed the stream before message_stop",
                          code="upstream_stream_truncated")


async def _anthropic_errors(source: AsyncIterator[bytes], response: SSEResponse) -> AsyncIterator[bytes]:
    """A passed-through Messages stream whose failure midway (the relay's own final event, in OpenAI's shape)
    is told as Anthropic's `event: error`."""
    try:
        async for chunk in source:
            failure = response.failure
            if failure is not None and (at := chunk.find(b'data: {"error"')) >= 0:
                chunk = chunk[:at] + error_event(failure.status, failure.message)
            yield chunk
    finally:
        await close_source(source)


# -- requests --------------------------------------------------------------------


def default_max_tokens(model: str, fallback: int) -> int:
    for prefix, tokens in DEFAULT_MAX_TOKENS:
        if model.startswith(prefix):
            return tokens
    return fallback


def user_blocks(content: Any, param: str) -> list[JSON]:
    if isinstance(content, str) or content is None:
        return [{"type": "text", "text": content}] if content and content.strip() else []
    if not isinstance(content, list):
        raise bad_request(f"Invalid type for {param}: expected a string or an array of parts.", param)
    blocks: list[JSON] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"].strip():
                blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise bad_request("image_url.url is required.", f"{param}[{i}].image_url")
            inline = data_uri(url)
            source = ({"type": "base64", "media_type": inline[0], "data": inline[1]} if inline
                      else {"type": "url", "url": url})
            blocks.append({"type": "image", "source": source})
        else:
            raise bad_request(f"Content parts of type {kind!r} are not supported by anthropic.", f"{param}[{i}]")
    return blocks


def trim_prefill(turns: list[JSON]) -> None:
    """Anthropic refuses a final assistant turn (a prefill) that ends in whitespace: strip its trailing
    whitespace, dropping text blocks, and the turn itself, left empty."""
    if not turns or turns[-1]["role"] != "assistant":
        return
    blocks = turns[-1]["content"]
    while blocks and blocks[-1].get("type") == "text":
        text = blocks[-1]["text"].rstrip()
        if text:
            blocks[-1] = {**blocks[-1], "text": text}
            break
        blocks.pop()
    if not blocks:
        turns.pop()


def to_anthropic(payload: JSON, model: str, fallback_max_tokens: int) -> JSON:
    reject_unsupported(payload, "anthropic")
    system: list[JSON] = []
    turns: list[JSON] = []

    def add(role: str, blocks: list[JSON]) -> None:
        append_turn(turns, role, blocks, "content")

    for i, message in enumerate(payload["messages"]):
        role, param = message["role"], f"messages[{i}]"
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content, f"{param}.content")
            if text.strip():
                system.append({"type": "text", "text": text})
        elif role == "user":
            add("user", user_blocks(content, f"{param}.content"))
        elif role == "assistant":
            text = text_of(content, f"{param}.content")
            blocks: list[JSON] = [{"type": "text", "text": text}] if text.strip() else []
            for j, call in enumerate(message.get("tool_calls") or []):
                fn = call.get("function") or {}
                blocks.append({"type": "tool_use", "id": call.get("id"), "name": fn.get("name"),
                               "input": parse_arguments(fn.get("arguments"),
                                                        f"{param}.tool_calls[{j}].function.arguments")})
            add("assistant", blocks)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise bad_request("tool messages need a tool_call_id.", f"{param}.tool_call_id")
            result: JSON = {"type": "tool_result", "tool_use_id": call_id}
            text = text_of(content, f"{param}.content")
            if text.strip():
                result["content"] = text
            add("user", [result])
        else:
            raise bad_request(f"Messages with role {role!r} are not supported by anthropic; use 'tool'.",
                              f"{param}.role")

    trim_prefill(turns)
    body: JSON = {"model": model, "messages": turns,
                  "max_tokens": max_tokens_of(payload) or default_max_tokens(model, fallback_max_tokens)}
    if system:
        body["system"] = system
    stops = [s for s in stop_list(payload.get("stop")) or () if s.strip()]  # whitespace-only ones: refused
    if stops:
        body["stop_sequences"] = stops
    tools = function_tools(payload)
    if tools:
        body["tools"] = [anthropic_tool(fn) for fn in tools]
        choice_ = tool_choice(payload.get("tool_choice"), payload.get("parallel_tool_calls"))
        if choice_:
            body["tool_choice"] = choice_
    user = payload.get("user") or payload.get("safety_identifier")
    if isinstance(user, str) and user:
        body["metadata"] = {"user_id": user}
    output = output_config(payload)
    if output:
        body["output_config"] = output
    if payload.get("stream"):
        body["stream"] = True
    return body


def anthropic_tool(fn: JSON) -> JSON:
    tool: JSON = {"name": fn["name"],
                  "input_schema": fn.get("parameters") or {"type": "object", "properties": {}}}
    if isinstance(fn.get("description"), str) and fn["description"]:
        tool["description"] = fn["description"]
    if isinstance(fn.get("strict"), bool):
        tool["strict"] = fn["strict"]
    return tool


def tool_choice(choice_: Any, parallel: Any) -> JSON | None:
    name = named_tool_choice(choice_)
    if name is not None:
        out: JSON = {"type": "tool", "name": name}
    elif choice_ == "required":
        out = {"type": "any"}
    elif choice_ == "none":
        return {"type": "none"}
    elif choice_ in (None, "auto"):
        out = {"type": "auto"}
        if parallel is not False and choice_ is None:
            return None
    else:
        raise bad_request("tool_choice must be 'auto', 'required', 'none' or a named function.", "tool_choice")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


def output_config(payload: JSON) -> JSON:
    out: JSON = {}
    fmt = payload.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if not isinstance(schema, dict):
                raise bad_request("response_format.json_schema.schema is required.", "response_format")
            out["format"] = {"type": "json_schema", "schema": schema}
        elif fmt.get("type") == "json_object":
            out["format"] = {"type": "json_schema", "schema": {"type": "object"}}
    effort = EFFORT.get(payload.get("reasoning_effort"))  # type: ignore[arg-type]
    if effort:
        out["effort"] = effort
    return out


# -- responses -------------------------------------------------------------------


def usage_of(usage: JSON) -> JSON:
    cached = usage.get("cache_read_input_tokens") or 0
    prompt = (usage.get("input_tokens") or 0) + (usage.get("cache_creation_input_tokens") or 0) + cached
    return usage_block(prompt, usage.get("output_tokens") or 0, cached=cached)


def from_anthropic(data: JSON, model: str) -> bytes:
    texts: list[str] = []
    calls: list[JSON] = []
    for block in data.get("content") or []:
        if block.get("type") == "text":
            texts.append(block.get("text") or "")
        elif block.get("type") == "tool_use":
            calls.append(tool_call(block["id"], block["name"], block.get("input")))
    content = "".join(texts) or None  # no text at all is null, as in the stream (tool-only turns)
    finish = STOP_REASONS.get(str(data.get("stop_reason")), "stop")
    return completion("chatcmpl-" + data["id"], data.get("model") or model,
                      [choice(0, content, calls, finish)], usage_of(data.get("usage") or {}))
