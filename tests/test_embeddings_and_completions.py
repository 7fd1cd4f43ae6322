"""`/v1/embeddings` and `/v1/completions` (issue 14 §1-2) through a real router with the official `openai` SDK:
pass-through (bytes as sent), spec-valid answers, the same keys, limits, cache, routing, usage and request log
as chat; translated deployments answer a clear 400."""

from __future__ import annotations

import base64
import sqlite3
import struct
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.test_request_log import count
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.schema import assert_valid
from tests.test_observability import sample


@pytest.fixture()
def router(start_router, stub: OpenAIStub):  # type: ignore[no-untyped-def]
    r = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY,
                      "ANTHROPIC_BASE_URL": "http://127.0.0.1:9", "EXTERNAL_ANTHROPIC_KEY": "sk-ant-x"})
    assert r.cli("add-model", "embedder", "openai", stub.url, "api", "--upstream-model", "text-embedding-3-small",
                 "--input-price", "0.02", "--output-price", "0").returncode == 0
    with r.http() as http:
        assert wait_for(lambda: http.get("/v1/models/embedder").status_code == 200, 5)
    return r


def test_embeddings_pass_through_with_the_sdk(router, stub: OpenAIStub) -> None:
    client = router.client()
    one = client.embeddings.create(model="text-embedding-3-small", input="hello world")
    assert len(one.data) == 1 and len(one.data[0].embedding) == 8 and one.usage.prompt_tokens == 2
    body = b'{"model":"text-embedding-3-small","input":["a b","c"],"dimensions":4}'
    with httpx.Client(base_url=router.url, timeout=10) as http:
        raw = http.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert raw.status_code == 200 and stub.requests[-1].body == body  # the client's bytes, untouched
    assert_valid("CreateEmbeddingResponse", raw.json())
    assert [len(d["embedding"]) for d in raw.json()["data"]] == [4, 4]
    # base64 (little-endian float32), as the caller asks
    raw64 = client.embeddings.with_raw_response.create(model="text-embedding-3-small", input="hello world",
                                                       encoding_format="base64").http_response.json()
    vector = struct.unpack("<8f", base64.b64decode(raw64["data"][0]["embedding"]))
    assert vector == pytest.approx(one.data[0].embedding, abs=1e-6)


def test_embeddings_route_rename_cache_and_count(router, stub: OpenAIStub, tmp_path: Path) -> None:
    client = router.client()
    first = client.embeddings.with_raw_response.create(model="embedder", input=["x y z"])
    assert stub.requests[-1].json()["model"] == "text-embedding-3-small"  # renamed for the upstream
    answer = first.parse()
    assert answer.model == "embedder" and first.headers["x-router-deployment"]
    received = len(stub.requests)
    again = client.embeddings.with_raw_response.create(model="embedder", input=["x y z"])
    assert len(stub.requests) == received and again.headers["x-router-cache"] == "hit"  # deterministic: cached
    assert again.parse().data[0].embedding == answer.data[0].embedding
    with router.http() as http:
        text = http.get("/metrics").text
    assert sample(text, "gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="embeddings",
                  gen_ai_request_model="embedder") == 2
    assert sample(text, "gen_ai_client_token_usage_sum", gen_ai_operation_name="embeddings",
                  gen_ai_token_type="input") == 6  # 3 tokens, twice (the cache hit too: its usage is the answer's)
    path = tmp_path / "data" / "requests.db"
    assert wait_for(lambda: count(path, "endpoint = '/v1/embeddings'") == 2, 10)
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT prompt_tokens, completion_tokens, cost, cache_hit FROM request_log "
                            "WHERE endpoint = '/v1/embeddings' ORDER BY id").fetchall()
    assert rows[0][:2] == (3, 0) and rows[0][2] == pytest.approx(3 * 0.02 / 1e6) and rows[1][3] == 1


def test_bad_embeddings_requests_are_clear_400s(router) -> None:
    client = router.client()
    for kwargs, param in (({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", 1]}, "input"),
                          ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
                          ({"input": "a", "dimensions": 0}, "dimensions")):
        with pytest.raises(openai.BadRequestError) as err:
            client.embeddings.create(model="embedder", **kwargs)  # type: ignore[arg-type]
        assert err.value.body["param"] == param  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="claude-sonnet-4-5", input="x")  # a translated chat-only deployment
    assert err.value.body["code"] == "unsupported_operation"  # type: ignore[index]


def test_legacy_completions_stream_and_not(router, stub: OpenAIStub) -> None:
    client = router.client()
    done = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=5)
    assert done.choices[0].text == stub.reply_text() and done.usage is not None and done.usage.total_tokens == 8
    with httpx.Client(base_url=router.url, timeout=10) as http:
        raw = http.post("/v1/completions", json={"model": "gpt-3.5-turbo-instruct", "prompt": ["a", "b"]})
    assert_valid("CreateCompletionResponse", raw.json())
    assert "max_completion_tokens" not in stub.requests[-1].json()  # chat's renaming is for chat only
    streamed = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == stub.reply_text()
    assert all(c.usage is None for c in streamed)  # the usage the router asked for is not the client's
    assert stub.requests[-1].json()["stream_options"] == {"include_usage": True}
    asked = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", stream=True,
                                           stream_options={"include_usage": True}))
    assert asked[-1].usage is not None and asked[-1].usage.completion_tokens == 3
    with router.http() as http:
        text = http.get("/metrics").text
    assert sample(text, "gen_ai_client_token_usage_sum", gen_ai_operation_name="text_completion",
                  gen_ai_token_type="output") == 12  # 3 tokens x 4 answers, streams included
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="claude-sonnet-4-5", prompt="x")
    assert err.value.body["code"] == "unsupported_operation"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=None)  # type: ignore[arg-type]
    assert err.value.body["param"] == "prompt"  # type: ignore[index]


def test_gemini_embeddings_are_translated(hosted, gemini_upstream) -> None:
    gemini_upstream.reset()
    client = hosted.client()
    answer = client.embeddings.create(model="gemini-embedding-001", input=["first text", "second"], dimensions=4)
    sent = gemini_upstream.requests[-1]
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents" and not gemini_upstream.violations
    assert [r["content"]["parts"][0]["text"] for r in sent.json()["requests"]] == ["first text", "second"]
    assert all(r["outputDimensionality"] == 4 for r in sent.json()["requests"])
    assert [len(d.embedding) for d in answer.data] == [4, 4] and answer.model == "gemini-embedding-001"
    assert answer.usage.prompt_tokens > 0  # estimated: Gemini reports none
    floats = client.embeddings.with_raw_response.create(model="gemini-embedding-001", input="x",
                                                        encoding_format="float").http_response.json()
    assert_valid("CreateEmbeddingResponse", floats)  # (the spec's schema knows only the float form)
    raw = client.embeddings.with_raw_response.create(model="gemini-embedding-001", input="x",
                                                     encoding_format="base64").http_response.json()
    decoded = struct.unpack("<6f", base64.b64decode(raw["data"][0]["embedding"]))  # six float32s
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="gemini-embedding-001", input=[1, 2, 3])
    assert err.value.body["param"] == "input"  # type: ignore[index]
