"""OpenAI's Responses API over a deployment that speaks chat completions: the request as a chat request
(`to_chat`), the chat answer as a `Response` (`from_chat`), a chat stream as the Responses events with their
sequence numbers (`StreamTranslator`), and the conversation a stored response continues (`conversation`).

Supported: `input` as a string or items (messages with input_text / input_image / output_text parts,
function_call and function_call_output items), `instructions`, function tools and `tool_choice`,
`text.format` (json_schema, json_object, text), `max_output_tokens`, `temperature`, `top_p`, `user`,
`parallel_tool_calls`, `reasoning.effort`, streaming, usage. Other tool types (web search, file search, ...)
and file inputs are a 400: a chat upstream cannot run them.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson

from router.errors import RouterError
from router.providers.chat_stream import ChatStreamReader

JSON = dict[str, Any]


def _bad(message: str, param: str) -> RouterError:
    return RouterError(400, message, param=param, code="invalid_value")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- requests ---------------------------------------------------------------------------------


def _parts(content: Any, param: str) -> str | list[JSON]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"'{param}' must be a string or an array of content parts.", param)
    parts: list[JSON] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: JSON = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            raise _bad(f"'{param}[{i}]': parts of type {kind!r} are not supported for this model.", f"{param}[{i}]")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(payload: JSON) -> list[JSON]:
    """The request's `input` as chat messages (instructions not included)."""
    value = payload.get("input")
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad("'input' must be a string or a non-empty array of input items.", "input")
    out: list[JSON] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(f"'{param}.role' must be user, assistant, system or developer.", f"{param}.role")
            out.append({"role": role, "content": _parts(item.get("content"), f"{param}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id") or item.get("id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and not isinstance(out[-1].get("content"), list):
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else orjson.dumps(output).decode()})
        elif kind == "reasoning":
            continue  # an earlier turn's reasoning: nothing a chat upstream reads
        else:
            raise _bad(f"'{param}': items of type {kind!r} are not supported for this model.", param)
    return out


def to_chat(payload: JSON, history: list[JSON] | None = None) -> JSON:
    chat: JSON = {"model": payload["model"]}
    messages: list[JSON] = []
    if isinstance(payload.get("instructions"), str) and payload["instructions"]:
        messages.append({"role": "system", "content": payload["instructions"]})
    chat["messages"] = messages + list(history or []) + input_messages(payload)
    tools = payload.get("tools")
    if tools:
        chat["tools"] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise _bad(f"'tools[{i}]': tools of type {kind!r} are not supported for this model.", f"tools[{i}]")
            function: JSON = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object"}}
            if tool.get("description"):
                function["description"] = tool["description"]
            if tool.get("strict") is not None:
                function["strict"] = tool["strict"]
            chat["tools"].append({"type": "function", "function": function})
    choice = payload.get("tool_choice")
    if choice in ("auto", "none", "required"):
        chat["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        chat["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    fmt = (payload.get("text") or {}).get("format") if isinstance(payload.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema: JSON = {"name": fmt.get("name") or "response", "schema": fmt.get("schema") or {}}
        if fmt.get("strict") is not None:
            schema["strict"] = fmt["strict"]
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        chat["response_format"] = {"type": "json_object"}
    if isinstance(payload.get("max_output_tokens"), int):
        chat["max_tokens"] = payload["max_output_tokens"]
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if payload.get(name) is not None:
            chat[name] = payload[name]
    reasoning = payload.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]
    if payload.get("stream"):
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


# -- answers ----------------------------------------------------------------------------------


def usage_of(usage: Any) -> JSON:
    usage = usage if isinstance(usage, dict) else {}
    prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": reasoning}, "total_tokens": prompt + completion}


def message_item(item_id: str, text: str, status: str = "completed") -> JSON:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> JSON:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def response_object(request: JSON, response_id: str, created_at: int, output: list[JSON], status: str,
                    usage: JSON | None, incomplete: str | None = None) -> JSON:
    text = request.get("text") if isinstance(request.get("text"), dict) else {"format": {"type": "text"}}
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "model": request.get("model"), "output": output, "error": None,
        "incomplete_details": {"reason": incomplete} if incomplete else None,
        "instructions": request.get("instructions"), "max_output_tokens": request.get("max_output_tokens"),
        "metadata": request.get("metadata") or {}, "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": request.get("previous_response_id"), "store": request.get("store", True),
        "temperature": request.get("temperature"), "top_p": request.get("top_p"), "text": text,
        "tool_choice": request.get("tool_choice", "auto"),
        # function tools as echoed: `strict` says whether the schema was enforced (only when the client asked)
        "tools": [{**t, "strict": bool(t.get("strict"))} if isinstance(t, dict) and t.get("type") == "function"
                  else t for t in request.get("tools") or []],
        "truncation": "disabled", "usage": usage,
        **({"user": request["user"]} if isinstance(request.get("user"), str) else {}),
    }


def from_chat(completion: JSON, request: JSON, response_id: str, created_at: int | None = None) -> JSON:
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[JSON] = []
    if isinstance(message.get("content"), str) and message["content"]:
        output.append(message_item(new_id("msg"), message["content"]))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(call_item(new_id("fc"), call.get("id") or new_id("call"), function.get("name", ""),
                                function.get("arguments") or "{}"))
    length = choice.get("finish_reason") == "length"
    return response_object(request, response_id, created_at or int(time.time()), output,
                           "incomplete" if length else "completed", usage_of(completion.get("usage")),
                           "max_output_tokens" if length else None)


def conversation(chat: JSON, response: JSON) -> list[JSON]:
    """The chat messages a stored response hands to its next turn: what was sent (but the instructions, which
    each turn gives anew) and the answer."""
    messages = list(chat["messages"])
    if response.get("instructions") and messages and messages[0].get("role") == "system":
        messages = messages[1:]
    texts = [c["text"] for item in response["output"] if item["type"] == "message" for c in item["content"]]
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"],
                                                                    "arguments": item["arguments"]}}
             for item in response["output"] if item["type"] == "function_call"]
    answer: JSON = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        answer["tool_calls"] = calls
    return [*messages, answer]


class StreamTranslator(ChatStreamReader):
    """Chat SSE bytes -> the Responses events (`event: <type>` and `data:` with a `sequence_number`)."""

    def __init__(self, request: JSON, response_id: str, created_at: int) -> None:
        super().__init__()
        self.request, self.id, self.created = request, response_id, created_at
        self.sequence = 0
        self.output: list[JSON] = []
        self.open: JSON | None = None  # the item being streamed
        self.calls: dict[int, JSON] = {}  # chat tool-call index -> its function_call item
        self.finish: str | None = None
        self.usage: JSON | None = None
        self.final: JSON | None = None

    def _event(self, kind: str, data: JSON) -> bytes:
        body = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

    def _snapshot(self, status: str, usage: JSON | None = None, incomplete: str | None = None) -> JSON:
        return response_object(self.request, self.id, self.created, self.output, status, usage, incomplete)

    def start(self) -> bytes:
        snapshot = self._snapshot("in_progress")
        return self._event("response.created", {"response": snapshot}) + \
            self._event("response.in_progress", {"response": snapshot})

    def failed(self, error: JSON) -> bytes:
        failed = self._snapshot("failed")
        failed["error"] = {"code": "server_error", "message": str(error.get("message") or "upstream failure")}
        return self._event("response.failed", {"response": failed})

    def done(self) -> bytes:
        return self._end()

    def chunk(self, chunk: JSON) -> bytes:
        out = b""
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self.open is None or self.open["type"] != "message":
                    out += self._close_item()
                    item = message_item(new_id("msg"), "", "in_progress")
                    part = item["content"][0]
                    item["content"] = []
                    out += self._event("response.output_item.added", {"output_index": len(self.output),
                                                                      "item": item})
                    out += self._event("response.content_part.added", {
                        "item_id": item["id"], "output_index": len(self.output), "content_index": 0, "part": part})
                    item["content"] = [part]  # (the events above are written already: this one accumulates)
                    self.open = item
                self.open["content"][0]["text"] += text
                out += self._event("response.output_text.delta", {
                    "item_id": self.open["id"], "output_index": len(self.output), "content_index": 0, "delta": text,
                    "logprobs": []})
            for call in delta.get("tool_calls") or []:
                index = call.get("index", 0)
                function = call.get("function") or {}
                known = self.calls.get(index)
                if known is None:
                    out += self._close_item()
                    item = self.calls[index] = call_item(new_id("fc"), call.get("id") or new_id("call"),
                                                         function.get("name", ""), "", "in_progress")
                    self.open = item
                    out += self._event("response.output_item.added", {"output_index": len(self.output),
                                                                      "item": dict(item)})
                else:
                    item = known
                if function.get("arguments"):
                    item["arguments"] += function["arguments"]
                    out += self._event("response.function_call_arguments.delta", {
                        "item_id": item["id"], "output_index": len(self.output), "delta": function["arguments"]})
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]
        return out

    def _close_item(self) -> bytes:
        item, self.open = self.open, None
        if item is None:
            return b""
        index = len(self.output)
        out = b""
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            out += self._event("response.output_text.done", {"item_id": item["id"], "output_index": index,
                                                             "content_index": 0, "text": part["text"],
                                                             "logprobs": []})
            out += self._event("response.content_part.done", {"item_id": item["id"], "output_index": index,
                                                              "content_index": 0, "part": part})
        else:
            out += self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "arguments": item["arguments"] or "{}",
                "name": item["name"]})
            item["arguments"] = item["arguments"] or "{}"
        self.output.append(item)
        return out + self._event("response.output_item.done", {"output_index": index, "item": item})

    def _end(self) -> bytes:
        out = self._close_item()
        length = self.finish == "length"
        self.final = self._snapshot("incomplete" if length else "completed", usage_of(self.usage),
                                    "max_output_tokens" if length else None)
        return out + self._event("response.incomplete" if length else "response.completed", {"response": self.final})
