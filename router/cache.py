"""Response cache: which requests are cached, under what key, where, and how a
cached answer is served again.

Rule (`CACHE_MODE`):
- `deterministic` (default): only requests with `temperature: 0` are cached
  (OpenAI's default temperature is 1, so a request without one is not);
- `all`: every request; `off`: none.
A request opts in with `x-router-cache: on` whatever its temperature;
`Cache-Control: no-cache` skips the lookup, `no-store` skips storing.

Key: SHA-256 of the client's scope (its key; one shared scope without keys),
the model group (not the deployment: any of them answers for the group, and
an alias shares its group's entries), and the request minus `model` and the
fields that do not change the answer (`stream`, `stream_options`, `user`, `metadata`,
`store`, `safety_identifier`, `prompt_cache_key`, `service_tier`), serialised
with sorted keys.

What is stored is always one OpenAI completion (JSON): an object whose
`choices` hold messages; anything else is neither stored nor, if found, served
(a miss). A stream is recorded as it passes and assembled into one, merging
deltas as the OpenAI SDKs do (`accumulate`); only a stream that ended with
`[DONE]` and no error is stored, and only 200 answers are. A hit is served as
JSON or replayed as a stream (role, the whole message in one delta, finish,
usage if asked, `[DONE]`), whichever the request wants, so a client
accumulating the replay gets the same message as from the live stream.

Backends: in memory (LRU, bounded by entries and bytes, TTL) or Redis
(`REDIS_URL`, TTL `CACHE_TTL`); a Redis failure is a miss, never an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Scope

from router.auth import ANONYMOUS_CACHE_SCOPE, Client
from router.observability import Metrics
from router.providers.base import ChatCall
from router.redis_link import RedisLink, RedisUnavailable
from router.upstream import SSEResponse, close_source

NOT_SEMANTIC = frozenset({"stream", "stream_options", "user", "metadata", "store", "safety_identifier",
                          "prompt_cache_key", "service_tier"})
HIT = [(b"x-router-cache", b"hit")]
MISS = [(b"x-router-cache", b"miss")]


class MemoryBackend:
    def __init__(self, max_entries: int, max_bytes: int, metrics: Metrics) -> None:
        self.entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self.bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def get(self, key: str) -> bytes | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry[1]

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        self.entries[key] = (time.monotonic() + ttl, value)
        self.bytes += len(value)
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))  # least recently used
        self.metrics.cache_entries.set(len(self.entries))
        self.metrics.cache_bytes.set(self.bytes)

    def _drop(self, key: str) -> None:
        _, value = self.entries.pop(key)
        self.bytes -= len(value)


class RedisBackend:
    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def get(self, key: str) -> bytes | None:
        try:
            value = await self.link.run("cache_get", lambda: self.link.client.get(key))
        except RedisUnavailable:
            return None
        return value.encode() if isinstance(value, str) else value  # the pool answers bytes; typed either

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        try:
            await self.link.run("cache_set", lambda: self.link.client.set(key, value, ex=ttl))
        except RedisUnavailable:
            pass


class ResponseCache:
    def __init__(self, mode: str, ttl: int, backend: MemoryBackend | RedisBackend, metrics: Metrics) -> None:
        self.mode = mode
        self.ttl = ttl
        self.backend = backend
        self.metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()

    # -- policy ------------------------------------------------------------------

    def policy(self, call: ChatCall, scope: Scope) -> tuple[bool, bool]:
        """(read, write) for this request."""
        if self.mode == "off" or call.op not in CACHED_OPS:
            return False, False
        opted_in = False
        read = write = True
        for name, value in scope["headers"]:
            if name == b"x-router-cache":
                opted_in = value.strip().lower() in (b"on", b"true", b"1")
            elif name == b"cache-control":
                directives = value.lower()
                read = read and b"no-cache" not in directives
                write = write and b"no-store" not in directives
        temperature = call.payload.get("temperature")
        deterministic = call.op == "embeddings" or (temperature == 0 and not isinstance(temperature, bool))
        if not (opted_in or self.mode == "all" or deterministic):
            return False, False
        return read, write

    @staticmethod
    def key(client: Client, group: str, call: ChatCall) -> str:
        """By client scope and model group (aliases share it; any deployment's answer serves), and the request's
        meaning (the `model` the client spelled is the group's)."""
        scope = client.scope if client.key is not None or client.admin else ANONYMOUS_CACHE_SCOPE
        material = {k: v for k, v in call.payload.items() if k not in NOT_SEMANTIC and k != "model"}
        digest = hashlib.sha256()
        for part in (scope, group, call.op):
            digest.update(part.encode())
            digest.update(b"\x00")
        digest.update(orjson.dumps(material, option=orjson.OPT_SORT_KEYS))
        return "cache:" + digest.hexdigest()

    # -- serving -----------------------------------------------------------------

    async def lookup(self, key: str, call: ChatCall) -> Response | SSEResponse | None:
        stored = await self.backend.get(key)
        completion = None
        if stored is not None:
            try:
                completion = orjson.loads(stored)
            except orjson.JSONDecodeError:
                pass
        if not STORABLE[call.op](completion):  # absent, or not an answer of this kind (never replayed as one)
            self.metrics.cache_requests.labels("miss").inc()
            return None
        assert stored is not None and completion is not None
        self.metrics.cache_requests.labels("hit").inc()
        if not call.stream:
            response = Response(stored, media_type="application/json")
            response.raw_headers += HIT
            return response
        replay = SSEResponse(replay_stream(completion, call.include_usage))
        replay.raw_headers += HIT
        return replay

    def record(self, key: str, response: Response | SSEResponse, op: str = "chat") -> None:
        """Store the answer once it is complete, off the request's path."""
        response.raw_headers += MISS
        if response.status_code != 200:
            return
        if isinstance(response, SSEResponse):
            response.body_iterator = self._recording(key, response.body_iterator)
        elif response.media_type == "application/json" or response.headers.get("content-type", "").startswith(
                "application/json"):
            try:
                completion = orjson.loads(response.body)
            except orjson.JSONDecodeError:
                return
            if STORABLE[op](completion):  # only an answer of the request's kind is ever stored
                self._store(key, bytes(response.body))

    async def _recording(self, key: str, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        assembler = StreamAssembler()
        try:
            async for chunk in source:
                assembler.feed(chunk)
                yield chunk
        finally:
            await close_source(source)
        completion = assembler.completion()
        if completion is not None:
            self._store(key, orjson.dumps(completion))

    def _store(self, key: str, value: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self.backend.set(key, value, self.ttl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def is_embeddings(value: Any) -> bool:
    """An embeddings answer: a list object whose `data` are embedding objects."""
    return (isinstance(value, dict) and value.get("object") == "list" and isinstance(data := value.get("data"), list)
            and all(isinstance(d, dict) and d.get("object") == "embedding" for d in data))


def is_completion(value: Any) -> bool:
    """A chat completion, as far as replaying it needs: an object whose `choices` are objects with a message."""
    return (isinstance(value, dict) and isinstance(choices := value.get("choices"), list)
            and all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices))


def accumulate(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """Merge one chunk's `delta` into `acc` as the OpenAI SDKs do: strings are concatenated, objects merged,
    lists of objects merged by their `index`; `index`, `type` and `role` are replaced; nulls change nothing.
    So every field survives (tool calls, `function_call`, `reasoning_content`, ...) exactly as a client that
    reads the live stream ends up with it, whichever way the upstream splits it across chunks."""
    for key, value in delta.items():
        if value is None:
            continue
        old = acc.get(key)
        if isinstance(value, list) and any(isinstance(v, dict) and "index" in v for v in value):
            entries = old if isinstance(old, list) else []
            for entry in value:
                position = entry.get("index") if isinstance(entry, dict) else None
                if isinstance(position, int) and 0 <= position < len(entries) and isinstance(entries[position], dict):
                    accumulate(entries[position], entry)
                elif isinstance(entry, dict):
                    fresh: dict[str, Any] = {}
                    accumulate(fresh, entry)
                    entries.insert(position if isinstance(position, int) and position >= 0 else len(entries), fresh)
            acc[key] = entries
        elif old is None or key in ("index", "type", "role"):
            acc[key] = value
        elif isinstance(old, str) and isinstance(value, str):
            acc[key] = old + value
        elif isinstance(old, dict) and isinstance(value, dict):
            accumulate(old, value)
        elif isinstance(old, list) and isinstance(value, list):
            old.extend(value)
        else:
            acc[key] = value


class StreamAssembler:
    """Builds one completion from the chat.completion.chunk events of a stream."""

    HEAD = ("id", "created", "model", "system_fingerprint", "service_tier")

    def __init__(self) -> None:
        self.buffer = b""
        self.head: dict[str, Any] | None = None
        self.messages: dict[int, dict[str, Any]] = {}
        self.finish: dict[int, Any] = {}
        self.usage: Any = None
        self.done = False
        self.failed = False

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            self._event(event.strip())

    def _event(self, event: bytes) -> None:
        if not event.startswith(b"data:"):
            return
        data = event[5:].strip()
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            self.failed = True
            return
        if not isinstance(chunk, dict) or "error" in chunk or not isinstance(chunk.get("choices"), list):
            self.failed = True
            return
        if self.head is None:
            self.head = {k: chunk[k] for k in self.HEAD if chunk.get(k) is not None}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for part in chunk["choices"]:
            if not isinstance(part, dict):
                self.failed = True
                return
            index = part.get("index", 0)
            message = self.messages.setdefault(index, {})
            delta = part.get("delta")
            if isinstance(delta, dict):
                accumulate(message, delta)
            if part.get("finish_reason"):
                self.finish[index] = part["finish_reason"]

    def completion(self) -> dict[str, Any] | None:
        if not self.done or self.failed or self.head is None or not self.messages:
            return None
        if any(index not in self.finish for index in self.messages):
            return None
        choices = []
        for index in sorted(self.messages):
            message = {"content": None, "refusal": None, **self.messages[index], "role": "assistant"}
            for call in message.get("tool_calls") or ():
                call.pop("index", None)
                call.setdefault("type", "function")
            choices.append({"index": index, "message": message, "logprobs": None,
                            "finish_reason": self.finish[index]})
        out = {**self.head, "object": "chat.completion", "choices": choices}
        if self.usage is not None:
            out["usage"] = self.usage
        return out


async def replay_stream(completion: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A stored completion as a stream: per choice, the role, then the whole message in one delta (tool calls
    with their `index`), then the finish reason; the usage if asked; `[DONE]`. Accumulated by a client, it
    gives back the stored message field for field."""
    base: dict[str, Any] = {"id": completion.get("id"), "object": "chat.completion.chunk",
                            "created": completion.get("created", int(time.time())), "model": completion.get("model")}
    for field in ("system_fingerprint", "service_tier"):
        if completion.get(field) is not None:
            base[field] = completion[field]
    if include_usage:
        base["usage"] = None

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    for choice in completion["choices"]:
        index = choice.get("index", 0)

        def delta(d: dict[str, Any], finish: str | None = None, i: int = index) -> dict[str, Any]:
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}

        yield event([delta({"role": "assistant"})])
        rest = {k: v for k, v in choice["message"].items() if v is not None and k != "role"}
        if isinstance(rest.get("tool_calls"), list):
            rest["tool_calls"] = [{"index": i, **call} if isinstance(call, dict) else call
                                  for i, call in enumerate(rest["tool_calls"])]
        if rest:
            yield event([delta(rest)])
        yield event([delta({}, choice.get("finish_reason") or "stop")])
    if include_usage and completion.get("usage"):
        yield event([], usage=completion["usage"])
    yield b"data: [DONE]\n\n"


#: what each cached operation stores: an answer of its own kind only
STORABLE: dict[str, Callable[[Any], bool]] = {"chat": is_completion, "embeddings": is_embeddings}
CACHED_OPS = frozenset(STORABLE)
