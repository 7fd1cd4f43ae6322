"""Checks every provider's answers must pass: spec-valid chunks and bodies, and
the SDK's assembled stream equal to the non-streaming answer."""

from __future__ import annotations

from typing import Any

import orjson

from tests.support.processes import RouterProcess
from tests.support.schema import assert_valid


def raw_stream(router: RouterProcess, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bytes]:
    """POST a streaming request; return the JSON events (spec-checked) and the raw bytes."""
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={**body, "stream": True})
    assert resp.status_code == 200, resp.text
    events = [e.removeprefix(b"data: ") for e in resp.content.split(b"\n\n") if e.strip()]
    parsed = []
    for e in events:
        if e == b"[DONE]":
            break
        obj = orjson.loads(e)
        if "error" not in obj:
            assert_valid("CreateChatCompletionStreamResponse", obj)
        parsed.append(obj)
    return parsed, resp.content


def non_stream(router: RouterProcess, body: dict[str, Any]) -> dict[str, Any]:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert_valid("CreateChatCompletionResponse", data)
    return data


def assert_stream_matches(router: RouterProcess, **request: Any) -> Any:
    """The SDK's assembled stream equals the non-streaming answer, tool calls and usage included."""
    client = router.client()
    plain = client.chat.completions.create(**request)
    with client.chat.completions.stream(**request, stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert len(final.choices) == len(plain.choices)
    for a, b in zip(final.choices, plain.choices, strict=True):
        assert a.message.content == b.message.content
        assert a.finish_reason == b.finish_reason
        calls_a = [(c.function.name, orjson.loads(c.function.arguments)) for c in a.message.tool_calls or []]
        calls_b = [(c.function.name, orjson.loads(c.function.arguments)) for c in b.message.tool_calls or []]
        assert calls_a == calls_b
    assert final.usage is not None and plain.usage is not None
    assert (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.total_tokens) == \
        (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens)
    return plain
