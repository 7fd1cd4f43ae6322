"""Anthropic's Messages API spoken by a deployment that speaks OpenAI chat (the other way round from
`anthropic.py`): what lets the `anthropic` SDK and Claude Code use any model of the registry.

- `to_chat`: a Messages request -> a chat request. `system` (a string or text blocks) -> a system message;
  text and image blocks (base64 or URL) -> content parts; an assistant's `tool_use` -> `tool_calls`; a user's
  `tool_result` -> `tool` messages (an error result says so in its text); thinking blocks are dropped from
  history; `tools` (custom ones) -> function tools; `tool_choice` auto/any/tool/none -> auto/required/named/
  none (`disable_parallel_tool_use` -> `parallel_tool_calls: false`); `stop_sequences` -> `stop`;
  `metadata.user_id` -> `user`; `top_k` and `thinking` have no chat equivalent and are dropped. Anything the
  chat API cannot carry (documents, server tools) is a 400.
- `from_chat`: a chat completion -> a `Message` (stop reasons: stop -> end_turn, length -> max_tokens,
  tool_calls -> tool_use, content_filter -> refusal; `input_tokens` excludes cached tokens, which are
  `cache_read_input_tokens`, as Anthropic counts them).
- `StreamTranslator`: chat SSE bytes, however split, -> Anthropic's event sequence exactly: message_start, per
  block content_block_start / _delta (text_delta, input_json_delta, thinking_delta) / _stop, one message_delta
  (stop reason, usage), message_stop; an error event -> `event: error`.
- `error_body` / `error_event`: Anthropic's error shape by status.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from router.errors import RouterError
from router.providers.chat_stream import ChatStreamReader

JSON = dict[str, Any]

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
                "content_filter": "refusal"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
               403: "permission_error", 404: "not_found_error", 408: "timeout_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 502: "api_error", 503: "overloaded_error",
               504: "timeout_error", 529: "overloaded_error"}


def _bad(message: str, param: str | None = None) -> RouterError:
    return RouterError(400, message, param=param, code="invalid_request_error")


# -- requests ---------------------------------------------------------------------------------


def _text_of(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, block in enumerate(value):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                raise _bad(f"{param}[{i}] must be a text block.", f"{param}[{i}]")
            texts.append(block["text"])
        return "\n".join(texts)
    raise _bad(f"{param} must be a string or an array of text blocks.", param)


def _image(block: JSON, param: str) -> JSON:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{param}.source is required.", f"{param}.source")
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return {"type": "image_url",
                "image_url": {"url": f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"}}
    if source.get("type") == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _bad(f"{param}.source must be a base64 or url image source.", f"{param}.source")


def _message(message: Any, i: int) -> list[JSON]:
    """One Messages turn as chat messages (a user turn with tool results becomes `tool` messages first)."""
    param = f"messages[{i}]"
    if not isinstance(message, dict):
        raise _bad(f"{param} must be an object.", param)
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{param}.role must be 'user' or 'assistant'.", f"{param}.role")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{param}.content must be a string or an array of blocks.", f"{param}.content")
    parts: list[JSON] = []
    calls: list[JSON] = []
    results: list[JSON] = []
    for j, block in enumerate(content):
        where = f"{param}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image" and role == "user":
            parts.append(_image(block, where))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                raise _bad(f"{where} needs an id and a name.", where)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"], "arguments": orjson.dumps(block.get("input") or {})
                                       .decode()}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise _bad(f"{where}.tool_use_id is required.", f"{where}.tool_use_id")
            raw = block.get("content", "")
            text = raw if isinstance(raw, str) else "\n".join(
                b.get("text", "") for b in raw if isinstance(b, dict) and b.get("type") == "text") \
                if isinstance(raw, list) else ""
            if block.get("is_error"):
                text = f"Error: {text}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": text})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # reasoning from an earlier turn: nothing a chat upstream reads
        else:
            raise _bad(f"{where}: blocks of type {kind!r} are not supported for this model.", where)
    out: list[JSON] = list(results)
    if role == "assistant":
        text = "".join(p["text"] for p in parts)
        if text or calls:
            entry: JSON = {"role": "assistant", "content": text or None}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    elif parts:
        only_text = all(p["type"] == "text" for p in parts)
        out.append({"role": "user", "content": "".join(p["text"] for p in parts) if only_text and len(parts) == 1
                    else parts})
    return out


def _tools(tools: Any) -> list[JSON]:
    if not isinstance(tools, list):
        raise _bad("tools must be an array.", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad(f"tools[{i}] needs a name.", f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise _bad(f"tools[{i}]: server tools ({tool['type']}) are not supported for this model.", f"tools[{i}]")
        function: JSON = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any, chat: JSON) -> None:
    if not isinstance(choice, dict):
        raise _bad("tool_choice must be an object.", "tool_choice")
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise _bad("tool_choice.type must be auto, any, tool (with a name) or none.", "tool_choice")
    if choice.get("disable_parallel_tool_use") is True:
        chat["parallel_tool_calls"] = False


def check(payload: JSON) -> None:
    """What Anthropic itself refuses first: model, max_tokens, messages."""
    if not isinstance(payload.get("model"), str) or not payload["model"]:
        raise _bad("model: Field required" if "model" not in payload else "model must be a non-empty string.",
                   "model")
    max_tokens = payload.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens: Field required" if max_tokens is None else "max_tokens must be a positive integer.",
                   "max_tokens")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: at least one message is required.", "messages")
    stream = payload.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream must be a boolean.", "stream")


def to_chat(payload: JSON) -> JSON:
    check(payload)
    chat: JSON = {"model": payload["model"], "max_tokens": payload["max_tokens"]}
    messages: list[JSON] = []
    if payload.get("system") is not None:
        system = _text_of(payload["system"], "system")
        if system:
            messages.append({"role": "system", "content": system})
    for i, message in enumerate(payload["messages"]):
        messages += _message(message, i)
    chat["messages"] = messages
    if payload.get("tools"):
        chat["tools"] = _tools(payload["tools"])
    if payload.get("tool_choice") is not None:
        _tool_choice(payload["tool_choice"], chat)
    stops = payload.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences must be an array of strings.", "stop_sequences")
        if stops:
            chat["stop"] = stops
    for name in ("temperature", "top_p"):
        if payload.get(name) is not None:
            chat[name] = payload[name]
    metadata = payload.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    if payload.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def count_tokens(payload: JSON) -> int:
    """An estimate of a Messages request's input tokens (system, messages, tools), as `router.routing.estimate`
    counts (about 4 characters a token; no tokenizer)."""
    from router.routing.estimate import prompt_tokens  # (the routing package imports the providers)

    chat = to_chat({**payload, "max_tokens": 1, "stream": False})
    return prompt_tokens(chat)


# -- answers ----------------------------------------------------------------------------------


def _usage(usage: Any) -> JSON:
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = (details or {}).get("cached_tokens") or 0 if isinstance(details, dict) else 0
    return {"input_tokens": max(0, (usage.get("prompt_tokens") or 0) - cached),
            "output_tokens": usage.get("completion_tokens") or 0,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _arguments(text: str) -> JSON:
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        return {"_arguments": text}  # not JSON: kept whole rather than lost
    return value if isinstance(value, dict) else {"_arguments": value}


def message_id(completion_id: Any = None) -> str:
    return "msg_" + (str(completion_id).removeprefix("chatcmpl-") if completion_id else uuid.uuid4().hex[:24])


def from_chat(completion: JSON, model: str) -> JSON:
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content: list[JSON] = []
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        content.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": function.get("name", ""), "input": _arguments(function.get("arguments", ""))})
    return {"id": message_id(completion.get("id")), "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": STOP_REASONS.get(choice.get("finish_reason") or "stop", "end_turn"),
            "stop_sequence": None, "usage": _usage(completion.get("usage"))}


def event(kind: str, data: JSON) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})


def error_event(status: int, message: str) -> bytes:
    return event("error", {"error": {"type": error_type(status), "message": message}})


class StreamTranslator(ChatStreamReader):
    """OpenAI chat SSE -> Anthropic Messages events (see the module's docstring)."""

    def __init__(self, model: str) -> None:
        super().__init__()
        self.model = model
        self.started = False
        self.block: tuple[str, int] | None = None  # the open block: ("text" | "thinking" | "tool", chat index)
        self.index = -1  # Anthropic's block index
        self.stop: str | None = None
        self.usage: JSON | None = None

    def failed(self, error: JSON) -> bytes:
        code = str(error.get("code") or error.get("type") or "")
        status = 429 if "rate" in code else 503 if "overload" in code else 500
        return error_event(status, str(error.get("message") or "the upstream failed"))

    def done(self) -> bytes:
        return self._end()

    def chunk(self, chunk: JSON) -> bytes:
        out = self._start(chunk) if not self.started else b""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if isinstance(delta.get("reasoning_content"), str) and delta["reasoning_content"]:
                out += self._open("thinking", 0, {"type": "thinking", "thinking": "", "signature": ""})
                out += event("content_block_delta", {"index": self.index, "delta": {
                    "type": "thinking_delta", "thinking": delta["reasoning_content"]}})
            if isinstance(delta.get("content"), str) and delta["content"]:
                out += self._open("text", 0, {"type": "text", "text": ""})
                out += event("content_block_delta", {"index": self.index,
                                                     "delta": {"type": "text_delta", "text": delta["content"]}})
            for call in delta.get("tool_calls") or []:
                position = call.get("index", 0)
                function = call.get("function") or {}
                if call.get("id") or self.block != ("tool", position):
                    out += self._open("tool", position, {
                        "type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex[:24]}",
                        "name": function.get("name", ""), "input": {}}, force=bool(call.get("id")))
                if function.get("arguments"):
                    out += event("content_block_delta", {"index": self.index, "delta": {
                        "type": "input_json_delta", "partial_json": function["arguments"]}})
            if choice.get("finish_reason"):
                self.stop = STOP_REASONS.get(choice["finish_reason"], "end_turn")
        return out

    def _start(self, chunk: JSON) -> bytes:
        self.started = True
        return event("message_start", {"message": {
            "id": message_id(chunk.get("id")), "type": "message", "role": "assistant", "model": self.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _open(self, kind: str, position: int, block: JSON, force: bool = False) -> bytes:
        if self.block == (kind, position) and not force:
            return b""
        out = self._close_block()
        self.index += 1
        self.block = (kind, position)
        return out + event("content_block_start", {"index": self.index, "content_block": block})

    def _close_block(self) -> bytes:
        if self.block is None:
            return b""
        self.block = None
        return event("content_block_stop", {"index": self.index})

    def _end(self) -> bytes:
        out = b"" if self.started else self._start({})
        out += self._close_block()
        usage = _usage(self.usage)
        out += event("message_delta", {"delta": {"stop_reason": self.stop or "end_turn", "stop_sequence": None},
                                       "usage": {"output_tokens": usage["output_tokens"],
                                                 "input_tokens": usage["input_tokens"],
                                                 "cache_read_input_tokens": usage["cache_read_input_tokens"]}})
        return out + event("message_stop", {})
