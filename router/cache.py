"""Response cache: which requests are cached, under what key, where, and how a
cached answer is served again.

Rule (`CACHE_MODE`):
- `deterministic` (default): only requests with `temperature: 0` are cached
  (OpenAI's default temperature is 1, so a request without one is not);
- `all`: every request; `off`: none.
A request opts in with `x-router-cache: on` whatever its temperature;
`Cache-Control: no-cache` skips the lookup, `no-store` skips storing.

Key: SHA-256 of the client's scope (its key; one shared scope without keys),
the resolved provider and endpoint, and the request minus the fields that do
not change the answer (`stream`, `stream_options`, `user`, `metadata`,
`store`, `safety_identifier`, `prompt_cache_key`, `service_tier`), serialised
with sorted keys.

What is stored is always one OpenAI completion (JSON). A stream is recorded
as it passes and assembled into one; only a stream that ended with `[DONE]`
and no error is stored, and only 200 answers are. A hit is served as JSON or
replayed as a stream (role, content, tool calls, finish, usage if asked,
`[DONE]`), whichever the request wants.

Backends: in memory (LRU, bounded by entries and bytes, TTL) or Redis
(`REDIS_URL`, TTL `CACHE_TTL`); a Redis failure is a miss, never an error.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Scope

from router.auth import ANONYMOUS_CACHE_SCOPE, Client
from router.observability import Metrics
from router.providers.base import ApiProvider, ChatCall, Provider
from router.redis_link import RedisLink, RedisUnavailable
from router.upstream import SSEResponse

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
            return await self.link.run("cache_get", lambda: self.link.client.get(key))
        except RedisUnavailable:
            return None

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
        if self.mode == "off":
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
        if not (opted_in or self.mode == "all" or (temperature == 0 and not isinstance(temperature, bool))):
            return False, False
        return read, write

    @staticmethod
    def key(client: Client, provider: Provider, call: ChatCall) -> str:
        scope = client.scope if client.key is not None or client.admin else ANONYMOUS_CACHE_SCOPE
        target = provider.base_url if isinstance(provider, ApiProvider) else ""
        material = {k: v for k, v in call.payload.items() if k not in NOT_SEMANTIC}
        digest = hashlib.sha256()
        for part in (scope, provider.type, target):
            digest.update(part.encode())
            digest.update(b"\x00")
        digest.update(orjson.dumps(material, option=orjson.OPT_SORT_KEYS))
        return "cache:" + digest.hexdigest()

    # -- serving -----------------------------------------------------------------

    async def lookup(self, key: str, call: ChatCall) -> Response | SSEResponse | None:
        stored = await self.backend.get(key)
        if stored is None:
            self.metrics.cache_requests.labels("miss").inc()
            return None
        self.metrics.cache_requests.labels("hit").inc()
        if not call.stream:
            response = Response(stored, media_type="application/json")
            response.raw_headers += HIT
            return response
        replay = SSEResponse(replay_stream(orjson.loads(stored), call.include_usage))
        replay.raw_headers += HIT
        return replay

    def record(self, key: str, response: Response | SSEResponse) -> None:
        """Store the answer once it is complete, off the request's path."""
        response.raw_headers += MISS
        if response.status_code != 200:
            return
        if isinstance(response, SSEResponse):
            response.body_iterator = self._recording(key, response.body_iterator)
        elif response.media_type == "application/json" or response.headers.get("content-type", "").startswith(
                "application/json"):
            self._store(key, bytes(response.body))

    async def _recording(self, key: str, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        assembler = StreamAssembler()
        try:
            async for chunk in source:
                assembler.feed(chunk)
                yield chunk
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                await aclose()
        completion = assembler.completion()
        if completion is not None:
            self._store(key, orjson.dumps(completion))

    def _store(self, key: str, value: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self.backend.set(key, value, self.ttl))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class StreamAssembler:
    """Builds one completion from the chat.completion.chunk events of a stream."""

    def __init__(self) -> None:
        self.buffer = b""
        self.head: dict[str, Any] | None = None
        self.choices: dict[int, dict[str, Any]] = {}
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
            self.head = {k: chunk.get(k) for k in ("id", "created", "model", "system_fingerprint")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for part in chunk["choices"]:
            slot = self.choices.setdefault(part.get("index", 0), {"content": [], "tools": {}, "finish": None,
                                                                  "refusal": []})
            delta = part.get("delta") or {}
            if delta.get("content"):
                slot["content"].append(delta["content"])
            if delta.get("refusal"):
                slot["refusal"].append(delta["refusal"])
            for call in delta.get("tool_calls") or []:
                tool = slot["tools"].setdefault(call.get("index", 0), {"id": None, "name": "", "arguments": []})
                tool["id"] = call.get("id") or tool["id"]
                fn = call.get("function") or {}
                tool["name"] += fn.get("name") or ""
                tool["arguments"].append(fn.get("arguments") or "")
            if part.get("finish_reason"):
                slot["finish"] = part["finish_reason"]

    def completion(self) -> dict[str, Any] | None:
        if not self.done or self.failed or self.head is None or not self.choices:
            return None
        if any(slot["finish"] is None for slot in self.choices.values()):
            return None
        choices = []
        for index in sorted(self.choices):
            slot = self.choices[index]
            message: dict[str, Any] = {"role": "assistant", "content": "".join(slot["content"]) or None,
                                       "refusal": "".join(slot["refusal"]) or None}
            if slot["tools"]:
                message["tool_calls"] = [
                    {"id": t["id"], "type": "function", "function": {"name": t["name"],
                                                                     "arguments": "".join(t["arguments"])}}
                    for _, t in sorted(slot["tools"].items())]
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": slot["finish"]})
        out = {**{k: v for k, v in self.head.items() if v is not None}, "object": "chat.completion",
               "choices": choices}
        if self.usage is not None:
            out["usage"] = self.usage
        return out


async def replay_stream(completion: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    """A stored completion as a proper stream of chunks."""
    base: dict[str, Any] = {"id": completion.get("id"), "object": "chat.completion.chunk",
                            "created": completion.get("created", int(time.time())), "model": completion.get("model")}
    if include_usage:
        base["usage"] = None

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

    for choice in completion.get("choices") or []:
        index = choice.get("index", 0)
        message = choice.get("message") or {}

        def delta(d: dict[str, Any], finish: str | None = None, i: int = index) -> dict[str, Any]:
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish}

        yield event([delta({"role": "assistant"})])
        if message.get("content"):
            yield event([delta({"content": message["content"]})])
        if message.get("refusal"):
            yield event([delta({"refusal": message["refusal"]})])
        calls = message.get("tool_calls") or []
        if calls:
            yield event([delta({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})])
        yield event([delta({}, choice.get("finish_reason") or "stop")])
    if include_usage and completion.get("usage"):
        yield event([], usage=completion["usage"])
    yield b"data: [DONE]\n\n"
