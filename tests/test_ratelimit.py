"""Rate limits: in-process by default, exact across routers with Redis."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest

from tests.support.openai_stub import wait_for
from tests.support.processes import RouterProcess
from tests.support.schema import assert_valid
from tests.test_observability import sample

X = [{"role": "user", "content": "hi"}]
DUMMY = {"model": "dummy", "messages": X}


def post(router: RouterProcess, body: dict = DUMMY, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with router.http() as http:
        return http.post("/v1/chat/completions", json=body, headers=headers)


def test_no_limit_unless_configured(start_router) -> None:
    """The default: a batch job from one client is never throttled, and no limit headers are sent."""
    router = start_router()
    with router.http() as http:
        answers = [http.post("/v1/chat/completions", json=DUMMY) for _ in range(100)]
    assert {a.status_code for a in answers} == {200}
    assert not any(name.startswith("x-ratelimit") for a in answers for name in a.headers)


def test_requests_per_minute_with_openai_headers(start_router) -> None:
    router = start_router({"RATE_LIMIT_REQUESTS": "3"})
    answers = [post(router) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    for a in answers[:3]:  # the headers are on every response
        assert a.headers["x-ratelimit-limit-requests"] == "3"
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert answers[0].headers["x-ratelimit-reset-requests"] == "20s"  # one request refills in 60/3 s
    refused = answers[3]
    body = refused.json()
    assert_valid("ErrorResponse", body)
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["retry-after"]) <= 20
    # streams carry the headers too
    with router.http() as http:
        resp = http.post("/v1/chat/completions", json={**DUMMY, "stream": True})
    assert resp.status_code == 429 and "x-ratelimit-limit-requests" in resp.headers


def test_limit_refills_over_time(start_router) -> None:
    router = start_router({"RATE_LIMIT_REQUESTS": "12"})  # after the burst, one every 5 s
    with router.http() as http:  # one connection: the burst is quick even on a loaded machine
        def status() -> int:
            return http.post("/v1/chat/completions", json=DUMMY).status_code

        started = time.monotonic()
        for _ in range(12):
            assert status() == 200
        refused = status()
        assert time.monotonic() - started < 5  # (else a refill could have been earned meanwhile)
        assert refused == 429
        time.sleep(5.1)
        assert status() == 200
        assert status() == 429


def test_tokens_per_minute(start_router) -> None:
    router = start_router({"RATE_LIMIT_REQUESTS": "0", "RATE_LIMIT_TOKENS": "1000"})
    ok = post(router, {**DUMMY, "max_tokens": 100})
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-tokens"] == "1000"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) < 1000 - 100
    refused = post(router, {**DUMMY, "max_tokens": 5000})
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "tokens"
    assert post(router, {**DUMMY, "max_tokens": 100}).status_code == 200  # a refused request costs nothing


def test_per_key_and_per_model_limits(start_router) -> None:
    router = start_router({"RATE_LIMIT_REQUESTS": "100"})
    fast = router.cli("create-key", "--name", "fast").stdout.strip()
    slow = router.cli("create-key", "--name", "slow", "--rpm", "2").stdout.strip()
    other = router.cli("create-key", "--name", "other").stdout.strip()
    for key in (fast, other):  # each key loaded (every CLI command is its own commit)
        assert wait_for(lambda k=key: post(router, key=k).status_code == 200, 5)
    assert wait_for(lambda: post(router, key=slow).status_code == 200, 5)
    assert post(router, key=slow).status_code == 200
    assert post(router, key=slow).status_code == 429  # its own 2/min
    assert post(router, key=fast).headers["x-ratelimit-limit-requests"] == "100"
    # a model's own limit holds across clients: `fast` uses it up, then `other` is refused too
    assert router.cli("add-model", "capped", "dummy", "http://localhost:1", "api").returncode == 0
    assert router.cli("set-model-limits", "capped", "--rpm", "2").returncode == 0
    capped = {"model": "capped", "messages": X}
    assert wait_for(lambda: post(router, capped, key=fast).status_code == 429, 5)  # (100/min for `fast` itself)
    refused = post(router, capped, key=other)
    assert refused.status_code == 429 and "model 'capped'" in refused.json()["error"]["message"]
    assert post(router, key=other).status_code == 200  # other models are not affected


def burst(routers: list[RouterProcess], total: int) -> list[int]:
    def one(i: int) -> int:
        with httpx.Client(timeout=30) as http:
            return http.post(routers[i % len(routers)].url + "/v1/chat/completions", json=DUMMY).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        return list(pool.map(one, range(total)))


def test_three_routers_sharing_redis_admit_exactly_the_limit(start_router, redis_url: str, tmp_path: Path) -> None:
    import redis

    redis.Redis.from_url(redis_url).delete("rl:ip:127.0.0.1:requests")
    env = {"REDIS_URL": redis_url, "RATE_LIMIT_REQUESTS": "12"}  # after the burst, one every 5 s
    routers = [start_router(env, workdir=tmp_path / f"r{i}") for i in range(3)]
    started = time.monotonic()
    statuses = burst(routers, 60)
    assert time.monotonic() - started < 5  # the burst ended before a refill was due
    assert statuses.count(200) == 12 and statuses.count(429) == 48


def test_without_redis_each_router_counts_alone(start_router, tmp_path: Path) -> None:
    """The contrast: in-process limits are per process (what Redis fixes)."""
    routers = [start_router({"RATE_LIMIT_REQUESTS": "10"}, workdir=tmp_path / f"r{i}") for i in range(2)]
    assert burst(routers, 40).count(200) == 20


@pytest.mark.parametrize("policy, expected", [("local", [200, 200, 429]), ("open", [200, 200, 200]),
                                              ("closed", [503, 503, 503])])
def test_redis_failure_policy(start_router, redis_server, policy: str, expected: list[int]) -> None:
    router = start_router({"REDIS_URL": redis_server.url, "RATE_LIMIT_REQUESTS": "2",
                           "RATE_LIMIT_ON_REDIS_FAILURE": policy, "REDIS_RETRY_AFTER": "30"})
    redis_server.stop()
    assert [post(router).status_code for _ in range(3)] == expected
    with router.http() as http:
        text = http.get("/metrics").text
    assert sample(text, "router_redis_up") == 0


def test_redis_limits_resume_after_redis_returns(start_router, redis_server) -> None:
    router = start_router({"REDIS_URL": redis_server.url, "RATE_LIMIT_REQUESTS": "1000", "REDIS_RETRY_AFTER": "1"})
    assert post(router).status_code == 200
    redis_server.stop()
    assert all(post(router).status_code == 200 for _ in range(5))  # degraded to local limits
    redis_server.start()
    import redis

    client = redis.Redis(port=redis_server.port)
    assert wait_for(lambda: post(router).status_code == 200 and client.exists("rl:ip:127.0.0.1:requests"), 10)


def test_rate_limit_cost_is_measured_in_the_bench_not_here(start_router) -> None:
    """Limits on, and far from reached, change nothing but the headers."""
    router = start_router({"RATE_LIMIT_REQUESTS": "1000000"})
    resp = post(router)
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "Hello world"
    assert resp.headers["x-ratelimit-remaining-requests"] == "999999"


def test_behind_a_trusted_proxy_each_client_has_its_own_limit(start_router, tmp_path: Path) -> None:
    def as_client(router: RouterProcess, ip: str) -> int:
        with router.http() as http:
            return http.post("/v1/chat/completions", json=DUMMY, headers={"X-Forwarded-For": ip}).status_code

    trusted = start_router({"RATE_LIMIT_REQUESTS": "1", "ROUTER_TRUSTED_PROXIES": "127.0.0.1"},
                           workdir=tmp_path / "trusted")
    assert [as_client(trusted, ip) for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.1")] == [200, 200, 429]
    # without trusting the proxy, the header is ignored: everyone is the proxy's address
    untrusted = start_router({"RATE_LIMIT_REQUESTS": "1"}, workdir=tmp_path / "untrusted")
    assert [as_client(untrusted, ip) for ip in ("10.0.0.1", "10.0.0.2")] == [200, 429]
