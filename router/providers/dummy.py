"""The built-in `dummy` model: answers "Hello world" in both modes, with a real
usage block, so a fresh install can be tried without any backend."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.responses import Response

from router.providers.base import ChatCall, Provider
from router.upstream import SSEResponse

REPLY_PIECES = ("Hello", " world")
_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """Words and punctuation marks: the dummy model's tokenizer."""
    return len(_TOKEN.findall(text))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    total = 0
    for message in messages:
        total += 1 + count_tokens(message.get("role", ""))  # per-message framing, as chat templates add
        content = message.get("content")
        if isinstance(content, str):
            total += count_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_tokens(part["text"])
    return total


class DummyProvider(Provider):
    type = "dummy"

    async def chat(self, call: ChatCall) -> Response | SSEResponse:
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        p_tokens = prompt_tokens(call.payload["messages"])
        c_tokens = sum(count_tokens(p) for p in REPLY_PIECES)
        usage = {"prompt_tokens": p_tokens, "completion_tokens": c_tokens, "total_tokens": p_tokens + c_tokens}
        if not call.stream:
            return Response(orjson.dumps({
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": call.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(REPLY_PIECES), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }],
                "usage": usage,
            }), media_type="application/json")
        return SSEResponse(self._stream(cid, created, call, usage))

    @staticmethod
    async def _stream(cid: str, created: int, call: ChatCall, usage: dict[str, int]) -> AsyncIterator[bytes]:
        base: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": call.model}
        if call.include_usage:
            base["usage"] = None

        def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        yield event([choice({"role": "assistant", "content": "", "refusal": None})])
        for piece in REPLY_PIECES:
            yield event([choice({"content": piece})])
        yield event([choice({}, "stop")])
        if call.include_usage:
            yield event([], usage=usage)
        yield b"data: [DONE]\n\n"
