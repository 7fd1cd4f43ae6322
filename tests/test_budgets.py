"""Budgets per key (issue 13 §5): periods and their resets with a fake clock, the 429 `insufficient_quota`
answer, spend shared by two routers through a real Redis (exhausted exactly there), seeding from the request
log after a restart, and the CLI (create-key --budget, set-key-budget, list-keys)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson

from router.auth import Client
from router.budgets import Budgets, period_of
from router.config import load_settings
from router.errors import RouterError
from router.observability.metrics import Metrics
from router.redis_link import RedisLink
from router.registry import ClientKey
from tests.conftest import UPSTREAM_KEY
from tests.support.openai_stub import OpenAIStub, wait_for
from tests.support.redis_server import RedisServer

DAY = 86400.0
T0 = 1_800_000_000.0
MSG = [{"role": "user", "content": "hi"}]


def key(budget: float | None = 1.0, period: float | None = 30 * DAY, name: str = "team") -> ClientKey:
    return ClientKey(name, "h", "p", None, None, None, None, T0, None, budget, period, T0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def check(budgets: Budgets, k: ClientKey) -> RouterError | None:
    try:
        asyncio.run(budgets.check(Client(f"key:{k.name}", k.name, k)))
    except RouterError as exc:
        return exc
    return None


def test_periods_count_from_the_start() -> None:
    k = key(period=30 * DAY)
    assert period_of(k, T0 + 5) == (T0, T0 + 30 * DAY)
    assert period_of(k, T0 + 31 * DAY) == (T0 + 30 * DAY, T0 + 60 * DAY)
    assert period_of(key(period=None), T0 + 400 * DAY) == (T0, None)


def test_spent_budget_refuses_until_the_period_resets() -> None:
    clock = Clock()
    budgets = Budgets(load_settings(), clock=clock)
    k = key(budget=1.0, period=DAY)

    async def spend(amount: float) -> None:  # charge runs on the event loop, at each request's end
        budgets.charge(k, amount)

    asyncio.run(spend(0.6))
    assert check(budgets, k) is None
    asyncio.run(spend(0.4))
    clock.now = T0 + 3600
    refused = check(budgets, k)
    assert refused is not None and refused.status == 429 and refused.code == "insufficient_quota"
    assert refused.type == "insufficient_quota" and "'team'" in refused.message and "$1.00" in refused.message
    assert refused.headers is not None and refused.headers["Retry-After"] == str(int(DAY - 3600))
    body = orjson.loads(refused.response().body)
    assert body["error"]["code"] == "insufficient_quota"
    clock.now = T0 + DAY + 1  # the next period
    assert check(budgets, k) is None and budgets.spent_now(k) == 0


def test_keys_without_a_budget_and_unpriced_requests_spend_nothing() -> None:
    budgets = Budgets(load_settings(), clock=Clock())
    free = key(budget=None, period=None)

    async def spend() -> None:
        budgets.charge(free, 5.0)
        budgets.charge(key(), 0.0)

    asyncio.run(spend())
    assert check(budgets, free) is None and budgets.spent == {}


def test_a_lifetime_budget_never_resets_and_says_so() -> None:
    clock = Clock()
    budgets = Budgets(load_settings(), clock=clock)
    k = key(budget=0.5, period=None)

    async def spend() -> None:
        budgets.charge(k, 0.5)

    asyncio.run(spend())
    clock.now = T0 + 1000 * DAY
    refused = check(budgets, k)
    assert refused is not None and "does not reset" in refused.message and "Retry-After" not in (refused.headers or {})


def test_seeding_reads_each_keys_current_period() -> None:
    clock = Clock()
    clock.now = T0 + 45 * DAY
    budgets = Budgets(load_settings(), clock=clock)
    asked: dict[str, float] = {}

    def read(since: dict[str, float]) -> dict[str, float]:
        asked.update(since)
        return dict.fromkeys(since, 2.0)

    asyncio.run(budgets.seed([key(budget=1.0), key(budget=None, name="free")], read))
    assert asked == {"team": T0 + 30 * DAY}  # the period under way; keys without a budget are not read
    assert check(budgets, key(budget=1.0)) is not None


def test_two_budgets_share_spend_through_redis(redis_server: RedisServer) -> None:
    settings = load_settings(REDIS_URL=redis_server.url)
    k = key(budget=1.0, period=DAY)

    async def scenario() -> tuple[RouterError | None, RouterError | None]:
        clock = Clock()
        a = Budgets(settings, RedisLink(settings, Metrics()), clock)
        b = Budgets(settings, RedisLink(settings, Metrics()), clock)
        client = Client("key:team", "team", k)
        a.charge(k, 0.7)
        await a.stop()  # the background INCRBYFLOAT done
        await b.check(client)  # 0.7 < 1.0: allowed
        b.charge(k, 0.3)
        await b.stop()
        results = []
        for budgets in (a, b):
            try:
                await budgets.check(client)
                results.append(None)
            except RouterError as exc:
                results.append(exc)
        for budgets in (a, b):
            assert budgets.redis is not None
            await budgets.redis.close()
        return results[0], results[1]

    first, second = asyncio.run(scenario())
    assert first is not None and second is not None  # both refuse once the shared spend reached the budget


def test_two_routers_refuse_once_their_shared_spend_reaches_the_budget(
        start_router, stub: OpenAIStub, redis_server: RedisServer, tmp_path: Path) -> None:
    env = {"OPENAI_BASE_URL": stub.url, "EXTERNAL_OPENAI_KEY": UPSTREAM_KEY, "REDIS_URL": redis_server.url,
           "ROUTER_MASTER_KEY": "master-secret"}
    a = start_router(env)
    assert a.cli("add-model", "priced", "openai", stub.url, "api", "--upstream-model", "gpt-4o",
                 "--input-price", "1000", "--output-price", "1000").returncode == 0  # $0.012 a request
    secret = a.cli("create-key", "--name", "capped", "--budget", "0.05", "--budget-period", "30d").stdout.strip()
    b = start_router(env, workdir=tmp_path)
    auth = {"Authorization": f"Bearer {secret}"}
    with a.http() as ha, b.http() as hb:
        for h in (ha, hb):
            assert wait_for(lambda h=h: h.get("/v1/models/priced", headers=auth).status_code == 200, 10)
        statuses = []
        for i in range(8):  # alternating routers: 0.012 x 5 = 0.06 >= 0.05 after the 5th
            http = ha if i % 2 == 0 else hb
            resp = http.post("/v1/chat/completions", json={"model": "priced", "messages": MSG}, headers=auth)
            statuses.append(resp.status_code)
            if resp.status_code == 200:
                # the spend reaches Redis at the request's end, in the background: let it land
                assert wait_for(lambda n=i + 1: redis_server_spend(redis_server) >= 0.012 * n - 1e-9, 5)
        assert statuses == [200] * 5 + [429] * 3
        refused = hb.post("/v1/chat/completions", json={"model": "priced", "messages": MSG}, headers=auth)
        assert refused.json()["error"]["code"] == "insufficient_quota" and int(refused.headers["retry-after"]) > 0
        other = ha.post("/v1/chat/completions", json={"model": "priced", "messages": MSG},
                        headers={"Authorization": "Bearer master-secret"})
        assert other.status_code == 200  # only the capped key is refused
        metrics = ha.get("/metrics").text + hb.get("/metrics").text
    assert "router_budget_rejections_total 1.0" in metrics or "router_budget_rejections_total 2.0" in metrics
    listed = a.cli("list-keys").stdout
    assert "capped" in listed and "$0.05 / 30d" in listed


def redis_server_spend(server: RedisServer) -> float:
    import redis

    client = redis.Redis.from_url(server.url)
    try:
        return sum(float(client.get(k) or 0) for k in client.scan_iter("budget:capped:*"))
    finally:
        client.close()


def test_budget_cli_validates_and_sets(start_router, tmp_path: Path) -> None:
    router = start_router()
    bad = router.cli("create-key", "--name", "x", "--budget", "-3")
    assert bad.returncode != 0 and "positive" in bad.stderr
    assert router.cli("create-key", "--name", "x", "--budget-period", "soon").returncode != 0
    assert router.cli("create-key", "--name", "team").returncode == 0
    assert router.cli("set-key-budget", "team", "--budget", "20", "--budget-period", "1w").returncode == 0
    assert "$20.00 / 7d" in router.cli("list-keys").stdout
    assert router.cli("set-key-budget", "team", "--clear").returncode == 0
    assert "$20.00" not in router.cli("list-keys").stdout
    missing = router.cli("set-key-budget", "nobody", "--budget", "1")
    assert missing.returncode != 0 and "no active key" in missing.stderr
