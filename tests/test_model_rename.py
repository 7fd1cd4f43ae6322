"""router.model_rename: the top-level `model` of JSON answers, SSE streams and requests, rewritten in bytes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from starlette.responses import Response

from router.model_rename import ModelRename, StreamRenamer, model_spans, rename_json
from router.upstream import SSEResponse

UP, PUB = "smollm2-gguf", "local-smollm2"
# text a model may well write: the upstream's name, and what looks like a `model` key, inside content
TRICKY = f'The "model": "{UP}" field names {UP}; so does {{"model":"{UP}"}} \\"model\\" \\\\'


def completion(model: str, *, sort_keys: bool = False, spacing: bool = False) -> bytes:
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": TRICKY, "model": UP}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3, "model": UP}}
    option = orjson.OPT_SORT_KEYS if sort_keys else 0  # llama.cpp's server sorts keys: `choices` first
    if spacing:  # Python's json.dumps style, and pretty-printed
        option |= orjson.OPT_INDENT_2
    return orjson.dumps(body, option=option)


def chunk(model: str, content: str, sort_keys: bool = False) -> bytes:
    body = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": model,
            "choices": [{"index": 0, "delta": {"content": content, "tool_calls": [{"function": {
                "arguments": orjson.dumps({"model": UP}).decode()}}]}, "finish_reason": None}]}
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS if sort_keys else 0)


def stream(model: str, newline: bytes = b"\n", sort_keys: bool = False) -> bytes:
    events = [b"data: " + chunk(model, part, sort_keys) for part in ("", TRICKY, UP, f'"model":"{UP}"')]
    events += [b": keep-alive comment " + UP.encode(), b"data: [DONE]"]
    return b"".join(e + newline * 2 for e in events)


@pytest.mark.parametrize("sort_keys", [False, True])
@pytest.mark.parametrize("spacing", [False, True])
def test_json_answer_gets_the_public_name_and_nothing_else_changes(sort_keys: bool, spacing: bool) -> None:
    sent = completion(UP, sort_keys=sort_keys, spacing=spacing)
    renamed = rename_json(sent, PUB)
    assert renamed == completion(PUB, sort_keys=sort_keys, spacing=spacing)  # byte for byte
    parsed = orjson.loads(renamed)
    assert parsed["model"] == PUB
    assert parsed["choices"][0]["message"]["content"] == TRICKY  # the content, with its lookalikes, untouched
    assert parsed["choices"][0]["message"]["model"] == parsed["usage"]["model"] == UP  # nested keys too


@pytest.mark.parametrize("body, expected", [
    (b'{"model" : "a"}', b'{"model" : "b"}'),
    (b'{\r\n\t"model"\t:\r\n "a" }', b'{\r\n\t"model"\t:\r\n "b" }'),
    (b'{"x\\"model":"a","model":"a"}', b'{"x\\"model":"a","model":"b"}'),  # an escaped key is another key
    (b'{"x":"\\\\","model":"a"}', b'{"x":"\\\\","model":"b"}'),  # a string ending in a backslash
    (b'{"x":["{",{"model":"a"}],"model":"a\\"q"}', b'{"x":["{",{"model":"a"}],"model":"b"}'),
    (b'{"model":null,"x":"model"}', b'{"model":null,"x":"model"}'),  # not a string: left alone
    (b'[{"model":"a"}]', b'[{"model":"a"}]'),  # not an object
    (b'<html>"model":"a"</html>', b'<html>"model":"a"</html>'),
    (b'{"model":"a","model":"a"}', b'{"model":"b","model":"b"}'),  # every top-level one (duplicates)
])
def test_only_the_outermost_model_string_is_rewritten(body: bytes, expected: bytes) -> None:
    assert rename_json(body, "b") == expected


def test_unicode_names_are_json_encoded() -> None:
    assert orjson.loads(rename_json(b'{"model":"a"}', 'mod"èl\n'))["model"] == 'mod"èl\n'


def test_request_direction_sets_the_upstream_name_and_keeps_the_rest() -> None:
    body = b'{"messages":[{"role":"user","content":"say \\"model\\": x"}],"model":"local-smollm2","stream":true}'
    assert ModelRename(PUB, UP).request(body) == body.replace(b'"model":"local-smollm2"', b'"model":"smollm2-gguf"')


def test_many_nested_model_keys_take_linear_time() -> None:
    body = b'{"tools":[' + b",".join([b'{"model":"x","y":"[\\"model\\":\\"x\\"]"}'] * 100_000) + b'],"model":"a"}'
    started = time.perf_counter()
    renamed = rename_json(body, "b")
    assert time.perf_counter() - started < 2.0  # quadratic would be hours
    assert renamed.endswith(b'"model":"b"}') and renamed.count(b'{"model":"x"') == 100_000


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("sort_keys", [False, True])
def test_stream_split_at_every_byte_is_renamed_exactly(newline: bytes, sort_keys: bool) -> None:
    sent, expected = stream(UP, newline, sort_keys), stream(PUB, newline, sort_keys)
    for cut in range(len(sent) + 1):
        renamer = StreamRenamer(PUB)
        out = renamer.feed(sent[:cut]) + renamer.feed(sent[cut:]) + renamer.flush()
        assert out == expected, cut
    renamer = StreamRenamer(PUB)  # one byte at a time
    assert b"".join(renamer.feed(sent[i:i + 1]) for i in range(len(sent))) + renamer.flush() == expected


def test_stream_events_keep_content_and_only_complete_events_are_released() -> None:
    sent = stream(UP)
    renamer = StreamRenamer(PUB)
    first_event_end = sent.index(b"\n\n") + 2
    assert renamer.feed(sent[:first_event_end - 1]) == b""  # half an event waits for its end
    out = renamer.feed(sent[first_event_end - 1:])
    events = [line[6:] for line in out.split(b"\n") if line.startswith(b"data: {")]
    assert [orjson.loads(e)["model"] for e in events] == [PUB] * 4
    assert [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events] == ["", TRICKY, UP, f'"model":"{UP}"']
    assert b": keep-alive comment " + UP.encode() in out and out.endswith(b"data: [DONE]\n\n")


def test_a_stream_without_a_final_blank_line_is_flushed() -> None:
    renamer = StreamRenamer(PUB)
    assert renamer.feed(b'data: {"model":"x"}') == b""
    assert renamer.flush() == b'data: {"model":"local-smollm2"}'


def test_multi_line_data_events_are_left_as_they_are() -> None:
    event = b'data: {"a":1,\ndata: "model":"x"}\n\n'
    assert StreamRenamer(PUB).feed(event) == event
    nested = b'data: {"a":[\ndata: {"model":"x"}]}\n\n'  # a continuation line that starts like an object
    assert StreamRenamer(PUB).feed(nested) == nested


def test_response_wrapping_renames_json_and_streams_and_closes_the_source() -> None:
    rename = ModelRename(PUB, UP)
    json_answer = rename.response(Response(completion(UP), media_type="application/json"))
    assert isinstance(json_answer, Response)
    assert json_answer.body == completion(PUB)
    assert json_answer.headers["content-length"] == str(len(completion(PUB)))

    sent, closed = stream(UP), []

    async def source() -> AsyncIterator[bytes]:
        try:
            for i in range(0, len(sent), 7):
                yield sent[i:i + 7]
        finally:
            closed.append(True)

    async def consume() -> bytes:
        response = rename.response(SSEResponse(source()))
        assert isinstance(response, SSEResponse)
        out = b"".join([part async for part in response.body_iterator])
        await response.body_iterator.aclose()  # type: ignore[attr-defined]
        return out

    assert asyncio.run(consume()) == stream(PUB) and closed == [True]

    async def abandoned() -> None:  # never iterated (the client left at once): the source is closed all the same
        gen = source()
        await gen.__anext__()
        response = rename.response(SSEResponse(gen))
        await response.body_iterator.aclose()  # type: ignore[union-attr]

    closed.clear()
    asyncio.run(abandoned())
    assert closed == [True]


def test_model_spans_points_at_the_value() -> None:
    data = b'data: {"id":"x","model":"up"}'
    assert [data[a:b] for a, b in model_spans(data, 6)] == [b'"up"']
