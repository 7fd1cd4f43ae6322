"""A stream's token usage, for every stream: `ask_for_usage` makes a streamed chat request ask its upstream
for usage (`stream_options.include_usage`) when its client did not, and `UsageTap` reads the usage event
from the stream (onto `SSEResponse.usage`) and, for a client that did not ask, removes what asking added:
the usage event itself (a chunk with no choices) and the `"usage":null` each chunk then carries. The client's
stream is otherwise unchanged, byte for byte. A chunk without `"usage"` in it costs one substring search."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from router.providers.base import ChatCall
from router.upstream import SSEResponse, close_source

_ASK = b'"stream_options":{"include_usage":true},'
_USAGE = b'"usage"'
_NULLS = (b',"usage":null', b', "usage": null', b'"usage":null,', b'"usage": null, ')


def ask_for_usage(call: ChatCall) -> ChatCall:
    """`call` asking its upstream for the stream's usage (its bytes changed as little as possible)."""
    options = call.payload.get("stream_options")
    if options is None:
        start = call.body.index(b"{") + 1  # the body is a JSON object with at least `model` and `messages`
        body = call.body[:start] + _ASK + call.body[start:]
        payload = {"stream_options": {"include_usage": True}, **call.payload}
    else:
        payload = {**call.payload, "stream_options": {**options, "include_usage": True}}
        body = orjson.dumps(payload)
    return ChatCall(call.model, payload, body, call.stream, True, call.op, call.context)


class UsageTap:
    """The stream of `source`, its usage event read onto `response.usage`; with `strip`, what `ask_for_usage`
    added is taken out. `events` counts the data events seen (an estimate of output tokens when no usage
    comes); with `keep`, the chunks the client got are kept (the request log's answer)."""

    __slots__ = ("source", "response", "strip", "events", "keep")

    def __init__(self, source: AsyncIterator[bytes], response: SSEResponse, strip: bool,
                 keep: list[bytes] | None = None) -> None:
        self.source, self.response, self.strip, self.keep = source, response, strip, keep
        self.events = 0

    def __aiter__(self) -> UsageTap:
        return self

    async def __anext__(self) -> bytes:
        while True:
            chunk = await self.source.__anext__()
            self.events += chunk.count(b"data:")
            if _USAGE in chunk:
                chunk = self._take(chunk)
                if not chunk:
                    continue  # the chunk was only the usage event the client did not ask for
            if self.keep is not None:
                self.keep.append(chunk)
            return chunk

    async def aclose(self) -> None:
        await close_source(self.source)

    def _take(self, chunk: bytes) -> bytes:
        lines = chunk.split(b"\n")
        out: list[bytes] = []
        drop_blank = False
        for line in lines:
            if drop_blank and not line.strip():
                drop_blank = False
                continue
            drop_blank = False
            if _USAGE in line and line.startswith(b"data:"):
                event = _event(line)
                if event is not None:
                    usage = event.get("usage")
                    if isinstance(usage, dict):  # Anthropic's come in two parts: the start's, then the end's
                        known = self.response.usage
                        self.response.usage = {**known, **usage} if known else usage
                    if self.strip and "usage" in event:
                        if isinstance(usage, dict) and not event.get("choices"):
                            drop_blank = True  # the usage event and the blank line that ends it
                            self.events -= 1
                            continue
                        line = _without_usage(line, event)
            out.append(line)
        return b"\n".join(out)


def _event(line: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(line[5:])
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def _without_usage(line: bytes, event: dict[str, Any]) -> bytes:
    """The event line without its `usage` key: its bytes as they were where the key is found as written."""
    for spelling in _NULLS:
        if spelling in line:
            shorter = line.replace(spelling, b"", 1)
            if _USAGE not in shorter:
                return shorter
    if isinstance(event.get("usage"), dict):  # usage beside content: the upstream's own way, kept
        return line
    event.pop("usage", None)
    return b"data: " + orjson.dumps(event)
