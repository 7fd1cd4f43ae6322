"""One model group served by several deployments, end to end over real HTTP: an OpenAI-compatible stub, the
Anthropic stub and an agent; renaming both ways (JSON and every stream chunk); `x-router-deployment`;
prices from genai-prices; the cost threshold; OpenRouter's `provider` object; context windows; in-flight
counts shared by two routers through Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import ANTHROPIC_KEY
from tests.support.anthropic_stub import AnthropicStub
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.processes import RouterProcess

MSG = [{"role": "user", "content": "hi"}]
KEY_ENV = {"ANTH_TEST_KEY": ANTHROPIC_KEY}


@pytest.fixture()
def stubs() -> Iterator[tuple[OpenAIStub, OpenAIStub]]:
    started = (OpenAIStub(name="hosted", slow_seconds=3).start(), OpenAIStub(name="agent").start())
    yield started
    for s in started:
        s.stop()


def add(router: RouterProcess, *args: str) -> None:
    done = router.cli("add-model", *args, env=KEY_ENV)
    assert done.returncode == 0, done.stderr + done.stdout


def chat(http: httpx.Client, model: str = "shared", **extra: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": MSG, **extra})


def stream_models(resp: httpx.Response) -> list[str]:
    """The `model` of every data event of a stream."""
    out = []
    for line in resp.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(orjson.loads(line[6:])["model"])
    return out


def present(http: httpx.Client, model: str, deployment: str) -> bool:
    """Whether the router has read `deployment` of `model` from the registry (within a few polls)."""
    return wait_for(lambda: chat(http, model, provider={"only": [deployment]}).status_code == 200)


def mixed_group(start_router: Callable[..., RouterProcess], stubs: tuple[OpenAIStub, OpenAIStub],
                anthropic: AnthropicStub, env: dict[str, str] | None = None) -> RouterProcess:
    hosted, agent = stubs
    # the threshold rule off unless a test sets it (these prices are over the default $0.01 per request)
    router = start_router({"LOCAL_AGENT_URL": "", "ROUTER_COST_THRESHOLD": "0", **KEY_ENV, **(env or {})})
    add(router, "shared", "openai", hosted.url, "api", "--name", "compat", "--upstream-model", "gpt-4o-mini",
        "--input-price", "100", "--output-price", "100")
    add(router, "shared", "anthropic", anthropic.url, "api", "--name", "claude", "--upstream-model",
        "claude-text", "--key-env", "ANTH_TEST_KEY", "--input-price", "200", "--output-price", "200")
    with router.http() as http:
        assert http.post("/register", json={"name": "gpu", "endpoint": agent.url, "models": ["shared"]}
                         ).status_code == 200
        assert wait_for(lambda: chat(http, provider={"only": ["claude"]}).status_code == 200)  # both read
    return router


def test_one_group_across_openai_anthropic_and_an_agent_renamed_both_ways(
        start_router, stubs, anthropic_upstream) -> None:
    hosted, agent = stubs
    router = mixed_group(start_router, stubs, anthropic_upstream)
    upstream_name = {"compat": (hosted, "gpt-4o-mini"), "claude": (anthropic_upstream, "claude-text"),
                     "agent-gpu": (agent, "shared")}
    with router.http() as http:
        for target, (stub, name) in upstream_name.items():
            for stream in (False, True):
                stub.reset()
                resp = chat(http, provider={"only": [target]}, stream=stream)
                assert resp.status_code == 200, resp.text
                assert resp.headers["x-router-deployment"] == target
                if stream:
                    models = stream_models(resp)
                    assert models and set(models) == {"shared"}
                else:
                    assert resp.json()["model"] == "shared"
                sent = stub.last().json()
                assert sent["model"] == name and "provider" not in sent  # its own name; no steering object
        # errors say where they went too
        add(router, "broken", "openai", hosted.url, "api", "--name", "err", "--upstream-model", "gpt-error-400")
        assert wait_for(lambda: chat(http, "broken").status_code == 400)
        assert chat(http, "broken").headers["x-router-deployment"] == "err"


def test_provider_object_order_ignore_and_openrouter_keeps_it(start_router, stubs, anthropic_upstream) -> None:
    hosted, _ = stubs
    router = mixed_group(start_router, stubs, anthropic_upstream)
    with router.http() as http:
        assert {chat(http, provider={"order": ["claude", "compat"]}).headers["x-router-deployment"]
                for _ in range(3)} == {"claude"}
        assert {chat(http, provider={"ignore": ["anthropic", "local"]}).headers["x-router-deployment"]
                for _ in range(3)} == {"compat"}
        assert {chat(http, provider={"max_price": {"prompt": 150, "completion": 150}}).headers[
            "x-router-deployment"] for _ in range(3)} == {"compat"}  # the agent's price is unknown: excluded
        assert {chat(http, provider={"sort": "price", "ignore": ["local"]}).headers["x-router-deployment"]
                for _ in range(3)} == {"compat"}
        bad = chat(http, provider={"sort": "cheapest"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "provider.sort"
        # an OpenRouter deployment gets the object as sent
        add(router, "routed", "openrouter", hosted.url, "api", "--name", "or", "--upstream-model", "gpt-4o")
        assert wait_for(lambda: chat(http, "routed").status_code == 200)
        hosted.reset()
        assert chat(http, "routed", provider={"order": ["or"]}).status_code == 200
        assert hosted.last().json()["provider"] == {"order": ["or"]}


def test_cost_threshold_sends_expensive_requests_to_the_local_agent(start_router, stubs, anthropic_upstream) -> None:
    # 1000 thousandths of a cent = $0.01; this request costs ~$0.026 at $100 per million on `compat`
    router = mixed_group(start_router, stubs, anthropic_upstream,
                         {"ROUTER_COST_THRESHOLD": "1000", "AGENT_TTL": "1"})
    with router.http() as http:
        seen = {chat(http, provider={"ignore": ["claude"]}).headers["x-router-deployment"] for _ in range(6)}
        assert seen == {"agent-gpu"}
        time.sleep(1.3)  # the agent's heartbeats lapse: no healthy local deployment, the normal choice
        seen = {chat(http, provider={"ignore": ["claude"]}).headers["x-router-deployment"] for _ in range(3)}
        assert seen == {"compat"}


def test_prices_from_genai_prices_drive_the_cost_strategy(start_router, stubs) -> None:
    hosted, other = stubs
    router = start_router({"LOCAL_AGENT_URL": ""})
    # no explicit prices: gpt-4o ($2.5/$10 per million) against gpt-4o-mini ($0.15/$0.6)
    add(router, "priced", "openai", hosted.url, "api", "--name", "big", "--upstream-model", "gpt-4o",
        "--strategy", "cost")
    add(router, "priced", "openai", other.url, "api", "--name", "mini", "--upstream-model", "gpt-4o-mini")
    # an explicit price overrides: gpt-4o made cheaper than the known price of gpt-4o-mini
    add(router, "priced2", "openai", hosted.url, "api", "--name", "big", "--upstream-model", "gpt-4o",
        "--strategy", "cost", "--input-price", "0.01", "--output-price", "0.01")
    add(router, "priced2", "openai", other.url, "api", "--name", "mini", "--upstream-model", "gpt-4o-mini")
    with router.http() as http:
        assert present(http, "priced", "mini") and present(http, "priced2", "mini")
        assert {chat(http, "priced").headers["x-router-deployment"] for _ in range(4)} == {"mini"}
        assert {chat(http, "priced2").headers["x-router-deployment"] for _ in range(4)} == {"big"}


def test_context_window_too_small_is_skipped(start_router, stubs) -> None:
    hosted, other = stubs
    router = start_router({"LOCAL_AGENT_URL": ""})
    add(router, "ctx", "openai", hosted.url, "api", "--name", "small", "--upstream-model", "gpt-4o",
        "--context-window", "300", "--strategy", "round-robin")
    add(router, "ctx", "openai", other.url, "api", "--name", "large", "--upstream-model", "gpt-4o",
        "--context-window", "100000")
    long = [{"role": "user", "content": "word " * 1000}]
    with router.http() as http:
        assert present(http, "ctx", "large")
        got = {http.post("/v1/chat/completions", json={"model": "ctx", "messages": long}).headers[
            "x-router-deployment"] for _ in range(4)}
        assert got == {"large"}
        assert {chat(http, "ctx").headers["x-router-deployment"] for _ in range(4)} == {"small", "large"}


def test_two_routers_share_in_flight_counts_through_redis(start_router, stubs, redis_url, tmp_path) -> None:
    slow, fast = stubs  # `gpt-slow` waits 3 s on `slow`
    env = {"LOCAL_AGENT_URL": "", "REDIS_URL": redis_url, "UPSTREAM_TIMEOUT": "10"}
    first = start_router(env, workdir=tmp_path)
    add(first, "busy", "openai", slow.url, "api", "--name", "slow", "--upstream-model", "gpt-slow",
        "--strategy", "least-busy")
    add(first, "busy", "openai", fast.url, "api", "--name", "fast", "--upstream-model", "gpt-4o")
    second = start_router(env, workdir=tmp_path)  # the same registry
    with first.http() as h1, second.http() as h2:
        assert present(h1, "busy", "fast") and present(h2, "busy", "fast")
        threads = [threading.Thread(target=lambda: chat(h1, "busy", provider={"only": ["slow"]}))
                   for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.8)  # the first router's counts reach Redis (every 250 ms) and the second reads them
        seen = [chat(h2, "busy").headers["x-router-deployment"] for _ in range(6)]
        for t in threads:
            t.join(10)
    # without the first router's load, least-busy takes turns and half of these would wait on `slow`
    assert seen == ["fast"] * 6
