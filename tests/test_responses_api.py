"""OpenAI's Responses API at the router (issue 14 §4) with the official `openai` SDK: passed through to OpenAI,
translated for chat-only deployments (text, instructions, images, function tools and calls, json_schema,
streaming with the spec's events and sequence numbers, usage), `store` and `previous_response_id` for translated
answers, GET/DELETE of stored responses visible only to their key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.schema import assert_valid

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture()
def router(start_router, stub: OpenAIStub):  # type: ignore[no-untyped-def]
    r = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
                      "ROUTER_MASTER_KEY": "master-secret", "STUB_KEY": UPSTREAM_KEY})
    for name, upstream in (("chatonly", "gpt-4o"), ("chattools", "gpt-tools")):
        # an OpenAI-compatible server that is not OpenAI: it serves chat only, so the router translates
        assert r.cli("add-model", name, "openai", stub.url.replace("127.0.0.1", "localhost"), "api",
                     "--upstream-model", upstream, "--key-env", "STUB_KEY",
                     env={"STUB_KEY": UPSTREAM_KEY}).returncode == 0
    r.keys = [r.cli("create-key", "--name", n).stdout.strip() for n in ("team-a", "team-b")]
    with r.http() as http:
        assert wait_for(lambda: http.get("/v1/models/chattools",
                                         headers={"Authorization": f"Bearer {r.keys[1]}"}).status_code == 200, 5)
    return r


def client(router: Any, i: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=router.keys[i], max_retries=0, timeout=20)


def check(response: Any) -> Response:
    data = response.model_dump(mode="json", exclude_unset=True)
    assert_valid("Response", data)
    return Response.model_validate(data)


def test_translated_text_with_instructions_and_a_stored_conversation(router, stub: OpenAIStub) -> None:
    c = client(router)
    first = c.responses.create(model="chatonly", instructions="Be brief.", input="Say hello")
    check(first)
    assert first.output_text == stub.reply_text() and first.status == "completed" and first.model == "chatonly"
    assert first.usage is not None and (first.usage.input_tokens, first.usage.output_tokens) == (9, 3)
    sent = stub.requests[-1].json()
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    second = c.responses.create(model="chatonly", input="And again", previous_response_id=first.id)
    history = stub.requests[-1].json()["messages"]
    assert [m["role"] for m in history] == ["user", "assistant", "user"]
    assert history[1]["content"] == stub.reply_text() and second.previous_response_id == first.id
    assert c.responses.retrieve(first.id).id == first.id
    with pytest.raises(openai.NotFoundError):
        client(router, 1).responses.retrieve(first.id)  # another key's response is not found
    with pytest.raises(openai.NotFoundError):
        client(router, 1).responses.create(model="chatonly", input="x", previous_response_id=first.id)
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(first.id)
    unstored = c.responses.create(model="chatonly", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_translated_tools_images_and_json_schema(router, stub: OpenAIStub) -> None:
    c = client(router)
    called = c.responses.create(model="chattools", tools=[WEATHER], tool_choice="required", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather here?"},
                                     {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}])
    check(called)
    call = called.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == '{"city":"Paris"}'
    sent = stub.requests[-1].json()
    assert_valid("CreateChatCompletionRequest", sent)
    assert sent["tool_choice"] == "required" and sent["messages"][0]["content"][1]["type"] == "image_url"
    c.responses.create(model="chatonly", input=[
        {"role": "user", "content": "Weather?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        text={"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}})
    sent = stub.requests[-1].json()
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"}
    assert sent["response_format"]["type"] == "json_schema"
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="chatonly", input="x", tools=[{"type": "web_search"}])  # type: ignore[list-item]


def test_translated_streams_follow_the_spec(router, stub: OpenAIStub) -> None:
    c = client(router)
    with c.responses.stream(model="chatonly", input="hi") as s:
        events = list(s)
        final = s.get_final_response()
    for e in events:
        EVENTS.validate_python(e.model_dump(mode="json"))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == stub.reply_text()
    assert final.output_text == stub.reply_text() and final.usage is not None and final.usage.output_tokens == 3
    with c.responses.stream(model="chattools", input="weather?", tools=[WEATHER]) as s:
        tool_events = [e.type for e in s]
        called = s.get_final_response()
    assert "response.function_call_arguments.delta" in tool_events
    assert called.output[0].type == "function_call" and called.output[0].arguments == '{"city":"Paris"}'


def test_openai_passes_through(router, stub: OpenAIStub) -> None:
    answer = client(router).responses.create(model="gpt-4o", input="hi")
    assert stub.requests[-1].path == "/v1/responses" and answer.id == "resp_stub"
    assert answer.output_text == stub.reply_text()


def test_bad_requests(router, tmp_path: Path) -> None:
    c = client(router)
    with pytest.raises(openai.BadRequestError) as err:
        c.responses.create(model="chatonly", input=[])
    assert err.value.body["param"] == "input"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="chatonly", input=[{"type": "input_file", "file_id": "f"}])  # type: ignore[list-item]
