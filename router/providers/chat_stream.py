"""Reading an OpenAI chat stream to write it in another API's events (Anthropic's Messages, OpenAI's
Responses): `ChatStreamReader` splits SSE bytes, however they arrive, into chat chunks and hands each to its
subclass (`chunk`, `done` at `[DONE]`, `failed` for an error event), once the stream is over nothing more;
`rewritten` runs a chat stream through one."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

import orjson

JSON = dict[str, Any]


class ChatStreamReader(ABC):
    def __init__(self) -> None:
        self.pending = b""
        self.ended = False

    def start(self) -> bytes:
        """What goes before the first chunk's events (nothing by default)."""
        return b""

    @abstractmethod
    def chunk(self, chunk: JSON) -> bytes:
        """The events for one chat chunk."""

    @abstractmethod
    def done(self) -> bytes:
        """The events that end the stream, at `[DONE]`."""

    @abstractmethod
    def failed(self, error: JSON) -> bytes:
        """The events for an error event (the stream ends there)."""

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        lines = self.pending.split(b"\n")
        self.pending = lines.pop()
        return b"".join(self._line(line.rstrip(b"\r")) for line in lines)

    def close(self) -> bytes:
        out = self._line(self.pending.rstrip(b"\r")) if self.pending else b""
        self.pending = b""
        return out

    def _line(self, line: bytes) -> bytes:
        if self.ended or not line.startswith(b"data:"):
            return b""
        data = line[5:].strip()
        if data == b"[DONE]":
            self.ended = True
            return self.done()
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            return b""
        if not isinstance(chunk, dict):
            return b""
        if "error" in chunk:
            self.ended = True
            error = chunk["error"]
            return self.failed(error if isinstance(error, dict) else {"message": str(error)})
        return self.chunk(chunk)


async def rewritten(source: AsyncIterator[bytes], reader: ChatStreamReader) -> AsyncIterator[bytes]:
    """`source`, a chat stream, as `reader` writes it; the source closed however it ends."""
    from router.upstream import close_source

    try:
        head = reader.start()
        if head:
            yield head
        async for data in source:
            out = reader.feed(data)
            if out:
                yield out
        tail = reader.close()
        if tail:
            yield tail
    finally:
        await close_source(source)
