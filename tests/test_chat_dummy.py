"""The built-in dummy model through the official openai SDK, validated against the spec."""

from __future__ import annotations

import orjson

from tests.support.processes import RouterProcess
from tests.support.schema import assert_valid

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello, please."}]


def sse_events(raw: bytes) -> list[bytes]:
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: "):] for e in events]


def test_dummy_non_streaming(router: RouterProcess) -> None:
    raw = router.client().chat.completions.with_raw_response.create(model="dummy", messages=MESSAGES)
    body = orjson.loads(raw.content)
    assert_valid("CreateChatCompletionResponse", body)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.object == "chat.completion" and completion.model == "dummy"
    usage = completion.usage
    assert usage is not None and usage.completion_tokens == 2
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_dummy_usage_counts_the_prompt(router: RouterProcess) -> None:
    client = router.client()
    short = client.chat.completions.create(model="dummy", messages=[{"role": "user", "content": "hi"}])
    long = client.chat.completions.create(
        model="dummy", messages=[{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "ok"}])
    assert short.usage and long.usage
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 49


def test_dummy_streaming_chunks_validate_and_match(router: RouterProcess) -> None:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={
            "model": "dummy", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.content)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hello world"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({c["id"] for c in chunks}) == 1


def test_dummy_stream_without_usage_has_no_usage_chunk(router: RouterProcess) -> None:
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "dummy", "messages": MESSAGES, "stream": True})
    chunks = [orjson.loads(e) for e in sse_events(resp.content)[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


def test_sdk_stream_assembles_to_the_non_streaming_answer(router: RouterProcess) -> None:
    client = router.client()
    plain = client.chat.completions.create(model="dummy", messages=MESSAGES)
    with client.chat.completions.stream(model="dummy", messages=MESSAGES,
                                        stream_options={"include_usage": True}) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.content == plain.choices[0].message.content
    assert final.choices[0].finish_reason == plain.choices[0].finish_reason
    assert final.usage == plain.usage
