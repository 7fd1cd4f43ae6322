"""Issue 13 §1-3 and §6 end to end: GenAI metrics after real traffic, usage for every answered request
(streams whose client did not ask included, their bytes otherwise unchanged), cost from the deployment's
prices, request ids there and back, and the access log (text and JSON), with no key anywhere."""

from __future__ import annotations

import http.client
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.support.anthropic_stub import AnthropicStub
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.test_observability import sample

MSG = [{"role": "user", "content": "hi"}]
IN_PRICE, OUT_PRICE = 2.0, 8.0  # USD per million tokens
ANTHROPIC_KEY = "sk-ant-upstream-secret"


@pytest.fixture()
def priced(start_router, stub: OpenAIStub, tmp_path: Path):  # type: ignore[no-untyped-def]
    router = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "LOG_FORMAT": "json",
                           "COST_HEADER": "true", "ROUTER_MASTER_KEY": "master-secret-key"})
    assert router.cli("add-model", "team-gpt", "openai", stub.url, "api", "--upstream-model", "gpt-4o",
                      "--input-price", str(IN_PRICE), "--output-price", str(OUT_PRICE),
                      "--context-window", "128000").returncode == 0
    with router.http() as http:
        assert wait_for(lambda: http.get("/v1/models/team-gpt", headers=AUTH).status_code == 200, 5)
    return router


AUTH = {"Authorization": "Bearer master-secret-key"}


def stream_bytes(url: str, body: dict[str, object], headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    with httpx.Client(base_url=url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as resp:
            return resp.status_code, b"".join(resp.iter_bytes()), dict(resp.headers)


def test_usage_cost_and_metrics_for_answers_and_streams(priced, stub: OpenAIStub) -> None:
    with priced.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "team-gpt", "messages": MSG},
                         headers={**AUTH, "x-request-id": "client-chosen-id-1"})
    assert resp.status_code == 200
    assert resp.headers["x-request-id"] == "client-chosen-id-1"
    # forwarded upstream as OpenAI's header for a caller's own id
    assert stub.requests[-1].headers["x-client-request-id"] == "client-chosen-id-1"
    assert resp.headers["x-upstream-request-id"] == "req_stub"  # the upstream's own id, under its own name
    expected = (9 * IN_PRICE + 3 * OUT_PRICE) / 1e6  # the stub's usage: 9 prompt, 3 completion tokens
    assert float(resp.headers["x-router-cost"]) == pytest.approx(expected)

    # a stream whose client did not ask for usage: the upstream was asked, the client's bytes are what the
    # upstream sends a client that did not ask
    status, routed, headers = stream_bytes(priced.url, {"model": "team-gpt", "messages": MSG, "stream": True}, AUTH)
    assert status == 200 and headers["x-request-id"].startswith("req_")
    sent = stub.requests[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    _, direct, _ = stream_bytes(stub.url, {"model": "gpt-4o", "messages": MSG, "stream": True},
                                {"Authorization": f"Bearer {UPSTREAM_KEY}"})
    assert routed.replace(b'"model":"team-gpt"', b'"model":"gpt-4o"') == direct
    assert b"usage" not in routed

    # a client that asked gets the usage chunk, as the upstream sent it
    _, asked, _ = stream_bytes(priced.url, {"model": "team-gpt", "messages": MSG, "stream": True,
                                            "stream_options": {"include_usage": True}}, AUTH)
    assert b'"usage":{"completion_tokens":3' in asked and b'"usage":null' in asked

    with priced.http() as http:
        text = http.get("/metrics").text
    labels = {"gen_ai_request_model": "team-gpt", "gen_ai_provider_name": "openai"}
    assert sample(text, "gen_ai_client_operation_duration_seconds_count", **labels, status_class="2xx",
                  cache_hit="false") == 3
    assert sample(text, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="input") == 27
    assert sample(text, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output") == 9
    assert sample(text, "gen_ai_server_time_to_first_token_seconds_count", **labels) == 2
    assert sample(text, "gen_ai_server_time_per_output_token_seconds_count", **labels) == 2
    assert sample(text, "router_cost_usd_total", gen_ai_request_model="team-gpt") == pytest.approx(3 * expected)
    assert sample(text, "router_overhead_seconds_count", gen_ai_operation_name="chat") == 3
    assert "master-secret-key" not in text and UPSTREAM_KEY not in text


def test_access_log_lines_in_json_carry_the_request_and_no_key(priced, stub: OpenAIStub, tmp_path: Path) -> None:
    with priced.http() as http:
        ok = http.post("/v1/chat/completions", json={"model": "team-gpt", "messages": MSG}, headers=AUTH)
        refused = http.post("/v1/chat/completions", json={"model": "team-gpt", "messages": MSG},
                            headers={"Authorization": "Bearer wrong-client-secret"})
        failed = http.post("/v1/chat/completions", json={"model": "gpt-error-500", "messages": MSG}, headers=AUTH)
    assert (ok.status_code, refused.status_code) == (200, 401) and failed.status_code >= 500
    log = tmp_path / "logs" / "router.log"
    assert wait_for(lambda: log.exists() and log.read_text().count('"logger":"router.access"') >= 3, 5)
    lines = [orjson.loads(line) for line in log.read_text().splitlines()]
    access = {e["request_id"]: e for e in lines if e["logger"] == "router.access"}
    first = access[ok.headers["x-request-id"]]
    assert first["status"] == 200 and first["model"] == "team-gpt" and first["client"] == "master"
    assert first["prompt_tokens"] == 9 and first["completion_tokens"] == 3 and first["deployment"]
    assert first["cost"] == pytest.approx((9 * IN_PRICE + 3 * OUT_PRICE) / 1e6)
    assert access[refused.headers["x-request-id"]]["error"] == "invalid_api_key"
    assert access[failed.headers["x-request-id"]]["status"] == failed.status_code
    text = log.read_text() + priced.output()
    for secret in ("master-secret-key", "wrong-client-secret", UPSTREAM_KEY):
        assert secret not in text


def test_an_invalid_client_request_id_is_replaced(priced) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", priced.port, timeout=5)
    conn.request("POST", "/v1/chat/completions", body=orjson.dumps({"model": "team-gpt", "messages": MSG}),
                 headers={**AUTH, "content-type": "application/json", "x-request-id": "x" * 300})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200 and resp.getheader("x-request-id", "").startswith("req_")
    assert len(resp.getheaders()) == len({k.lower() for k, _ in resp.getheaders()})  # no header twice


@pytest.fixture()
def anthropic_stub():  # type: ignore[no-untyped-def]
    stub = AnthropicStub(key=ANTHROPIC_KEY).start()
    yield stub
    stub.stop()


def test_translated_streams_are_counted_without_the_client_asking(start_router, anthropic_stub: AnthropicStub,
                                                                  tmp_path: Path) -> None:
    router = start_router({"ANTHROPIC_BASE_URL": anthropic_stub.url, "EXTERNAL_ANTHROPIC_KEY": ANTHROPIC_KEY})
    body = {"model": "claude-sonnet-4-5", "messages": MSG, "stream": True, "max_tokens": 20}
    status, streamed, _ = stream_bytes(router.url, body, {})
    assert status == 200 and b"usage" not in streamed and streamed.endswith(b"data: [DONE]\n\n")
    with router.http() as http:
        text = http.get("/metrics").text
    labels = {"gen_ai_request_model": "claude-sonnet-4-5", "gen_ai_provider_name": "anthropic"}
    assert sample(text, "gen_ai_client_token_usage_count", **labels, gen_ai_token_type="output") == 1
    assert sample(text, "gen_ai_client_token_usage_sum", **labels, gen_ai_token_type="output") > 0
    assert ANTHROPIC_KEY not in text


def test_an_answer_without_usage_is_estimated(start_router, stub: OpenAIStub, tmp_path: Path) -> None:
    router = start_router({"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "LOG_FORMAT": "json"})
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={"model": "gpt-no-usage", "messages": MSG})
        assert resp.status_code == 200 and resp.json().get("usage") is None
        streamed = http.post("/v1/chat/completions", json={"model": "gpt-no-usage", "messages": MSG, "stream": True})
        assert streamed.status_code == 200
        upstream = http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSG})
    log = tmp_path / "logs" / "router.log"
    assert wait_for(lambda: log.exists() and log.read_text().count('"logger":"router.access"') == 3, 5)
    entries = {e["request_id"]: e for e in map(orjson.loads, log.read_text().splitlines())
               if e["logger"] == "router.access"}
    for answer in (resp, streamed):
        entry = entries[answer.headers["x-request-id"]]
        assert entry["usage_source"] == "estimated" and entry["prompt_tokens"] > 0 and entry["completion_tokens"] > 0
    assert entries[upstream.headers["x-request-id"]]["usage_source"] == "upstream"


def test_models_list_carries_owner_context_and_prices(priced, stub: OpenAIStub) -> None:
    with priced.http() as http:
        listed = {m["id"]: m for m in http.get("/v1/models", headers=AUTH).json()["data"]}
        one = http.get("/v1/models/team-gpt", headers=AUTH).json()
    entry = listed["team-gpt"]
    assert entry == one and entry["object"] == "model" and entry["owned_by"] == "openai"
    assert entry["context_length"] == 128000
    assert entry["pricing"] == {"prompt": "0.000002", "completion": "0.000008"}  # USD per token, as OpenRouter
    assert "pricing" not in listed["dummy"]
