"""What translating providers (Anthropic, Gemini) share: reading the upstream's
event stream, writing OpenAI chat-completion objects and stream chunks, and
the request-side helpers both need (content parts, tool arguments, stop)."""

from __future__ import annotations

import base64
from abc import abstractmethod
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import aiohttp
import orjson
from httpx_sse._decoders import SSEDecoder  # spec-following SSE decoder; fed lines from aiohttp
from httpx_sse import ServerSentEvent

from starlette.responses import Response

from router.errors import RouterError, upstream_error
from router.providers.base import ApiProvider, ChatCall
from router.upstream import SSEResponse, pass_headers

JSON = dict[str, Any]


def bad_request(message: str, param: str | None = None) -> RouterError:
    return RouterError(400, message, param=param, code="invalid_value")


# -- request side --------------------------------------------------------------


def append_turn(turns: list[JSON], role: str, items: list[JSON], field: str) -> None:
    """Add a turn, merged into the previous one when the role is the same; empty turns vanish."""
    if not items:
        return
    if turns and turns[-1]["role"] == role:
        turns[-1][field].extend(items)
    else:
        turns.append({"role": role, field: items})


def text_of(content: Any, param: str) -> str:
    """The text of a message whose content may be a string or text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"Only text parts are supported in {param}.", f"{param}[{i}]")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"Invalid type for {param}: expected a string or an array of parts.", param)


def parse_arguments(arguments: Any, param: str) -> JSON:
    """An assistant tool call's `arguments` JSON string as an object ("" is {})."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        value = orjson.loads(arguments)
    except (orjson.JSONDecodeError, TypeError):
        raise bad_request(f"{param} is not valid JSON.", param) from None
    if not isinstance(value, dict):
        raise bad_request(f"{param} must be a JSON object.", param)
    return value


def data_uri(url: str) -> tuple[str, str] | None:
    """`data:image/png;base64,AAAA` -> ("image/png", "AAAA"); None for other URLs."""
    if not url.startswith("data:"):
        return None
    header, sep, data = url[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not sep or encoding != "base64" or not media_type:
        raise bad_request("Image data URIs must look like data:<media type>;base64,<data>.", "messages")
    try:
        base64.b64decode(data, validate=True)
    except ValueError:
        raise bad_request("Image data URI is not valid base64.", "messages") from None
    return media_type, data


def stop_list(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise bad_request("'stop' must be a string or an array of strings.", "stop")


def max_tokens_of(payload: JSON) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad_request(f"'{name}' must be a positive integer.", name)
            return value
    return None


def function_tools(payload: JSON) -> list[JSON]:
    """The request's `tools`, checked to be function tools."""
    tools = payload.get("tools") or []
    if not isinstance(tools, list):
        raise bad_request("'tools' must be an array.", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("Only function tools with a name are supported.", f"tools[{i}]")
        out.append(fn)
    return out


def named_tool_choice(choice: Any) -> str | None:
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if isinstance(name, str):
            return name
        raise bad_request("tool_choice.function.name is required.", "tool_choice")
    return None


def reject_unsupported(payload: JSON, provider: str) -> None:
    """Parameters that would change the answer's shape and cannot be honoured."""
    n = payload.get("n")
    if n not in (None, 1) and provider != "google":
        raise bad_request(f"'n' greater than 1 is not supported by {provider}.", "n")
    if payload.get("logprobs"):
        raise bad_request(f"'logprobs' is not supported by {provider}.", "logprobs")
    audio = payload.get("modalities")
    if isinstance(audio, list) and "audio" in audio:
        raise bad_request(f"audio output is not supported by {provider}.", "modalities")


# -- response side -------------------------------------------------------------


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + uuid.uuid4().hex


def tool_call(call_id: str, name: str, args: Any) -> JSON:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": orjson.dumps(args if args is not None else {}).decode()}}


def choice(index: int, content: str | None, tool_calls: list[JSON], finish: str) -> JSON:
    message: JSON = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def completion(cid: str, model: str, choices: list[JSON], usage: JSON | None) -> bytes:
    body: JSON = {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
                  "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def usage_block(prompt: int, completion_tokens: int, cached: int = 0, reasoning: int = 0) -> JSON:
    usage: JSON = {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                   "total_tokens": prompt + completion_tokens}
    usage["prompt_tokens_details"] = {"cached_tokens": cached}
    usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


class ChunkWriter:
    """Builds `data: {chat.completion.chunk}` events for one OpenAI stream."""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.base: JSON = {"id": new_id(), "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model}
        if include_usage:
            self.base["usage"] = None
        self.include_usage = include_usage

    def event(self, choices: list[JSON], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**self.base, "choices": choices, **extra}) + b"\n\n"

    def delta(self, delta: JSON, finish: str | None = None, index: int = 0) -> bytes:
        return self.event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def usage(self, usage: JSON) -> bytes:
        return self.event([], usage=usage) if self.include_usage else b""

    @staticmethod
    def done() -> bytes:
        return b"data: [DONE]\n\n"


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[ServerSentEvent]:
    """Server-sent events from an upstream response; LF and CRLF framing alike.

    Reads whatever the network delivered and splits it into lines here: one
    await per network read, not one per line."""
    decoder = SSEDecoder()
    pending = b""
    async for data in resp.content.iter_any():
        lines = (pending + data).split(b"\n")
        pending = lines.pop()  # an incomplete last line waits for more
        for line in lines:
            event = decoder.decode(line.rstrip(b"\r").decode("utf-8"))
            if event is not None:
                yield event
    for text in (pending.rstrip(b"\r").decode("utf-8"), ""):  # a last event with no blank line after it
        event = decoder.decode(text)
        if event is not None:
            yield event


def join_text(parts: Iterable[str]) -> str | None:
    text = "".join(parts)
    return text if text else None


class TranslatingProvider(ApiProvider):
    """An API provider whose wire format is not OpenAI's.

    Subclasses turn a `ChatCall` into the provider's request (`build_request`),
    the provider's answer into an OpenAI completion (`build_completion`), and
    the provider's event stream into OpenAI chunks (`translate_stream`, which
    ends with `[DONE]` or raises `RouterError`). Upstream error bodies go
    through `build_error`. Sending and status handling are here; relaying,
    with its mid-stream failures, is `UpstreamClient.relay`, as for every provider.
    """

    max_tokens_param = None  # `build_request` maps both fields itself

    @abstractmethod
    def build_request(self, call: ChatCall) -> tuple[str, bytes, dict[str, str]]:
        """URL, body and headers of the provider's request for this call."""

    @abstractmethod
    def build_completion(self, data: JSON, call: ChatCall) -> bytes:
        """The provider's (parsed) answer as an OpenAI chat completion."""

    @abstractmethod
    def translate_stream(self, events: AsyncIterator[ServerSentEvent], call: ChatCall,
                         out: ChunkWriter) -> AsyncIterator[bytes]:
        """The provider's events as OpenAI chunks, ending with `[DONE]` (or raising RouterError)."""

    def build_error(self, status: int, body: bytes, headers: dict[str, str]) -> RouterError:
        return upstream_error(status, body, self.http.scrub, self.type, headers)

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        url, body, headers = self.build_request(call)
        resp = await self.http.open(self.type, url, body, headers)
        if resp.status >= 400:
            data = await self.http.read(self.type, url, resp)
            raise self.build_error(resp.status, data, pass_headers(resp))
        if not call.stream:
            data = await self.http.read(self.type, url, resp)
            try:
                parsed = orjson.loads(data)
                return Response(self.build_completion(parsed, call), media_type="application/json")
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise RouterError(502, f"upstream {self.type} sent an answer the router could not read: "
                                  f"{exc.__class__.__name__}", code="upstream_bad_response") from None
        out = ChunkWriter(call.model, call.include_usage)
        return self.http.relay(self.type, url, resp, self.translate_stream(sse_events(resp), call, out))
