"""Public model names for deployments whose upstream knows the model by another name.

`ModelRename(public, upstream)` sets the top-level `model` of a request body to
the upstream name, and of a JSON answer and of every SSE event of a stream to
the public one, so clients only ever see the name they asked for.

It rewrites bytes, never re-serialising JSON: everything else the upstream sent
stays byte for byte. `model_spans` finds the string value of each `"model"` key
of the outermost object in one linear pass: candidates come from `bytes.find`,
and the text between them is reduced with one C-level regex that drops whole
strings, leaving brackets to count. A `"model"` inside a string (its quotes are
escaped) or in a nested object is never touched. Streams are cut at event
boundaries (`\\n\\n`, `\\r\\n\\r\\n`, `\\r\\r`), so an event split across network
chunks is rewritten once whole; a client could not act on half an event anyway.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import orjson
from starlette.responses import Response

from router.upstream import SSEResponse, close_source

_KEY = b'"model"'
_STRING_RE = rb'"[^"\\]*(?:\\.[^"\\]*)*"'  # a JSON string, as a loop sre runs fast
_VALUE = re.compile(rb'[ \t\r\n]*:[ \t\r\n]*(' + _STRING_RE + rb')')  # after the key: its string value
_STRING = re.compile(_STRING_RE)
_BRACKET = re.compile(rb'[{}\[\]]')
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")
_BACKSLASH, _OPEN = 0x5C, 0x7B


def model_spans(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Where the string values of the outermost object's `model` keys lie in the JSON text `data[start:end]`."""
    end = len(data) if end is None else end
    spans: list[tuple[int, int]] = []
    scan, objects, arrays = start, 0, 0  # data[start:scan] is counted; `scan` is outside any string
    pos = data.find(_KEY, start, end)
    while pos != -1:
        i = pos - 1
        while i >= scan and data[i] == _BACKSLASH:
            i -= 1
        # an escaped opening quote: the text is inside a string, which the key's closing quote ends
        escaped = (pos - 1 - i) % 2 == 1
        stop = pos + len(_KEY) if escaped else pos
        if data[scan] == _OPEN and _BRACKET.search(data, scan + 1, stop) is None:
            objects += 1  # the usual first stretch, `{"id":"…","object":"…","created":1,`: no other bracket
        elif _BRACKET.search(data, scan, stop) is not None:  # brackets, some perhaps in strings: count the others
            rest = _STRING.sub(b"", data[scan:stop])
            objects += rest.count(b"{") - rest.count(b"}")
            arrays += rest.count(b"[") - rest.count(b"]")
        scan = stop
        after = pos + len(_KEY)
        if not escaped and objects == 1 and arrays == 0:
            match = _VALUE.match(data, after, end)
            if match is not None:
                spans.append(match.span(1))
                after = match.end()
        pos = data.find(_KEY, after, end)
    return spans


def _replace(data: bytes, spans: list[tuple[int, int]], value: bytes) -> bytes:
    if not spans:
        return data
    parts: list[bytes] = []
    done = 0
    for begin, finish in spans:
        parts += (data[done:begin], value)
        done = finish
    parts.append(data[done:])
    return b"".join(parts)


def rename_json(data: bytes, name: str) -> bytes:
    """`data` (a JSON object) with its top-level `model` string set to `name`; anything else unchanged."""
    if _KEY not in data:
        return data
    return _replace(data, model_spans(data), orjson.dumps(name))


def _line_start(data: bytes, lo: int, pos: int) -> int:
    return max(data.rfind(b"\n", lo, pos), data.rfind(b"\r", lo, pos), lo - 1) + 1


def _line_end(data: bytes, pos: int) -> int:
    lf, cr = data.find(b"\n", pos), data.find(b"\r", pos)
    if lf == -1 or (cr != -1 and cr < lf):
        return len(data) if cr == -1 else cr
    return lf


def rename_events(data: bytes, value: bytes) -> bytes:
    """Complete SSE events with the top-level `model` of each `data:` JSON set to `value` (a JSON string).

    Only an event's first data line is JSON on its own (every OpenAI-compatible server sends one line);
    continuation lines are left as they are."""
    pos = data.find(_KEY)
    if pos == -1:
        return data
    spans: list[tuple[int, int]] = []
    line_end = 0
    while pos != -1:
        start = _line_start(data, line_end, pos)
        line_end = _line_end(data, pos)
        if data.startswith(b"data:", start) and (start == 0 or not _continues(data, start)):
            first = start + 5
            if data.startswith(b" ", first):
                first += 1
            spans += model_spans(data, first, line_end)
        pos = data.find(_KEY, line_end)
    return _replace(data, spans, value)


def _continues(data: bytes, start: int) -> bool:
    """Whether the line at `start` follows a data line of the same event."""
    if start == 0:
        return False
    end = start - 1
    if data[end] == 0x0A and end > 0 and data[end - 1] == 0x0D:
        end -= 1
    prev = _line_start(data, 0, end)
    return prev < end and data.startswith(b"data:", prev)


class StreamRenamer:
    """Feed it a stream's chunks as they come; it returns the complete events, renamed, and keeps the rest."""

    def __init__(self, name: str) -> None:
        self.value = orjson.dumps(name)
        self._rest = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if not self._rest:
            cut = len(chunk) if chunk.endswith(_EVENT_ENDS) else _events_end(chunk, 0)
            if cut == len(chunk):  # the usual case: whole events, no copy
                return rename_events(chunk, self.value)
            self._rest += chunk[cut:]
            return rename_events(chunk[:cut], self.value) if cut else b""
        searched = max(0, len(self._rest) - 3)  # a separator may straddle the old and the new bytes
        self._rest += chunk
        cut = _events_end(self._rest, searched)
        if not cut:
            return b""
        events = bytes(self._rest[:cut])
        del self._rest[:cut]
        return rename_events(events, self.value)

    def flush(self) -> bytes:
        """What is left when the stream ends (an event without its blank line)."""
        rest, self._rest = bytes(self._rest), bytearray()
        return rename_events(rest, self.value)


def _events_end(data: bytes | bytearray, lo: int) -> int:
    """Where the last complete event in `data` ends (0: none); separators are searched from `lo`."""
    end = 0
    for sep in _EVENT_ENDS:
        i = data.rfind(sep, lo)
        if i != -1:
            end = max(end, i + len(sep))
    return end


class _Renamed:
    """An SSE body iterator with every event renamed; closing it closes the source."""

    def __init__(self, source: AsyncIterator[bytes], name: str) -> None:
        self.source = source
        self.renamer = StreamRenamer(name)
        self.ended = False

    def __aiter__(self) -> _Renamed:
        return self

    async def __anext__(self) -> bytes:
        while not self.ended:
            try:
                chunk = await self.source.__anext__()
            except StopAsyncIteration:
                self.ended = True
                tail = self.renamer.flush()
                if tail:
                    return tail
                break
            out = self.renamer.feed(chunk)
            if out:
                return out
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await close_source(self.source)


class ModelRename:
    """A deployment known to clients as `public` and to its upstream as `upstream`."""

    def __init__(self, public: str, upstream: str) -> None:
        self.public = public
        self.upstream = upstream

    def request(self, body: bytes) -> bytes:
        """The client's request body, with the upstream's name."""
        return rename_json(body, self.upstream)

    def answer(self, body: bytes) -> bytes:
        """A JSON answer, with the public name."""
        return rename_json(body, self.public)

    def stream(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """An SSE stream, every event with the public name."""
        return _Renamed(source, self.public)

    def response(self, response: Response | SSEResponse) -> Response | SSEResponse:
        """The upstream's answer as the client must see it (in place)."""
        if isinstance(response, SSEResponse):
            response.body_iterator = self.stream(response.body_iterator)
            return response
        body = self.answer(bytes(response.body))
        if body is not response.body:
            response.body = body
            response.headers["content-length"] = str(len(body))
        return response
