"""The routing simulator (`make bench-routing`): its fake deployments, workload, checks, and a short smoke run
of the whole thing against a real router, so it keeps working."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from bench.fake_deployment import FakeSpec, dump_specs
from bench.routing import (
    STRATEGIES, Outcome, Row, Scenario, Workload, check_mixed, check_threshold, p50_95_99, plan)
from tests.support.processes import Service, free_port

ROOT = Path(__file__).resolve().parents[1]


def test_workload_is_seeded_and_mixed() -> None:
    w = Workload(requests=200, rate=10.0, concurrency=8, seed=3)
    first, again = plan(w, "g"), plan(w, "g")
    assert [p.body for p in first] == [p.body for p in again]
    assert [p.body for p in plan(Workload(requests=200, rate=10.0, concurrency=8, seed=4), "g")] != \
        [p.body for p in first]
    assert 0.35 < sum(p.stream for p in first) / len(first) < 0.65
    assert {p.max_tokens for p in first} == set(w.max_tokens)
    sizes = {round(len(p.payload["messages"][1]["content"]) / 4 / 50) * 50 for p in first}
    assert sizes == set(w.prompt_tokens)  # about 4 characters a token
    times = [p.at for p in first]
    assert times == sorted(times) and 10 < times[-1] < 30  # about 200 / 10 per second
    body = orjson.loads(first[0].body)
    assert body["model"] == "g" and body["stream"] == first[0].stream
    assert ("stream_options" in body) == first[0].stream


def test_percentiles_are_nearest_rank() -> None:
    assert p50_95_99([float(v) for v in range(100, 0, -1)]) == (50.0, 95.0, 99.0)
    assert p50_95_99([2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(v) for v in p50_95_99([]))


def row(strategy: str, p99: float, cost: float, outcomes: list[Outcome] | None = None) -> Row:
    return Row(strategy, 10, 0, (p99 / 2, p99, p99), (0.1, 0.1, 0.1), cost, {}, {}, 0, 0, {}, outcomes or [])


def test_mixed_target_needs_both_lower_p99_and_no_higher_cost() -> None:
    assert check_mixed([row("cost-latency", 6.9, 1.0), row("round-robin", 10.0, 1.0)]).passed
    assert not check_mixed([row("cost-latency", 7.1, 1.0), row("round-robin", 10.0, 1.0)]).passed
    assert not check_mixed([row("cost-latency", 2.0, 1.01), row("round-robin", 10.0, 1.0)]).passed


def test_threshold_check_counts_every_request_over_it() -> None:
    hosted = FakeSpec("hosted", "h", input_price=0.0, output_price=60.0)
    local = FakeSpec("local", "l", type="llm-d")
    scenario = Scenario("threshold", "g", (hosted, local), Workload(4, 0, 1), ("round-robin",))
    planned = plan(Workload(4, 0, 1, max_tokens=(50, 400), seed=1), "g")
    over = [p.max_tokens == 400 for p in planned]  # 400 x 60 / 1e6 USD = 2400e-5 USD; 50 tokens: 300e-5
    assert any(over) and not all(over)

    def outcomes(where: list[str]) -> list[Outcome]:
        return [Outcome(200, d, p.stream, 0.1) for d, p in zip(where, planned, strict=True)]

    right = ["local" if o else "hosted" for o in over]
    assert check_threshold(scenario, row("round-robin", 1, 1, outcomes(right)), planned, 1000).passed
    one_missed = ["hosted"] * len(over)
    assert not check_threshold(scenario, row("round-robin", 1, 1, outcomes(one_missed)), planned, 1000).passed
    # all on local passes the rule but shows nothing: the rule must leave cheap requests to the strategy
    assert not check_threshold(scenario, row("round-robin", 1, 1, outcomes(["local"] * 4)), planned, 1000).passed


class Fakes(Service):
    name = "fakes"

    def __init__(self, workdir: Path, specs: list[FakeSpec]) -> None:
        super().__init__(workdir)
        self.ports = {spec.name: free_port() for spec in specs}
        self.port = next(iter(self.ports.values()))
        self.specs_path = workdir / "fakes.json"
        workdir.mkdir(parents=True, exist_ok=True)
        self.specs_path.write_bytes(dump_specs([(s, self.ports[s.name]) for s in specs]))
        self.env["PYTHONPATH"] = str(ROOT)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bench.fake_deployment", str(self.specs_path)]

    def start(self, timeout: float = 30) -> Fakes:
        return super().start(timeout)  # type: ignore[no-any-return]

    def url_of(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


@pytest.fixture()
def fakes(tmp_path: Path) -> Iterator[Fakes]:
    proc = Fakes(tmp_path, [
        FakeSpec("queue", "q-model", ttft=0.1, sigma=0, tokens_per_s=2000, concurrency=1),
        FakeSpec("broken", "b-model", ttft=0.01, sigma=0, failure_rate=1.0),
    ]).start()
    yield proc
    proc.stop()


def chat(model: str, stream: bool, max_tokens: int = 20) -> dict[str, object]:
    body: dict[str, object] = {"model": model, "max_tokens": max_tokens, "stream": stream,
                               "messages": [{"role": "user", "content": "x" * 40}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def test_fake_queues_beyond_its_concurrency_and_bills_tokens(fakes: Fakes) -> None:
    url = fakes.url_of("queue")

    async def one(client: httpx.AsyncClient, stream: bool) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        resp = await client.post("/v1/chat/completions", json=chat("q-model", stream))
        assert resp.status_code == 200
        return time.perf_counter() - t0, resp.content

    async def three() -> list[tuple[float, bytes]]:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            return list(await asyncio.gather(one(client, False), one(client, True), one(client, False)))

    done = asyncio.run(three())
    times = sorted(t for t, _ in done)
    # one at a time, 0.1 s each: the second waits for the first, the third for both
    assert times[0] >= 0.09 and times[1] >= times[0] + 0.08 and times[2] >= times[1] + 0.08, times
    stream = done[1][1]
    assert stream.endswith(b"data: [DONE]\n\n") and b'"usage":{"prompt_tokens":14,"completion_tokens":20' in stream
    assert orjson.loads(done[0][1])["usage"] == {"prompt_tokens": 14, "completion_tokens": 20, "total_tokens": 34}
    stats = httpx.get(url + "/stats").json()
    assert stats["name"] == "queue"
    # served one at a time; two waited at once
    assert (stats["requests"], stats["ok"], stats["max_in_flight"], stats["max_queued"]) == (3, 3, 1, 2)
    assert (stats["prompt_tokens"], stats["completion_tokens"], stats["wrong_model"]) == (42, 60, 0)
    httpx.post(url + "/v1/chat/completions", json=chat("other-name", False))
    assert httpx.get(url + "/stats").json()["wrong_model"] == 1
    httpx.post(url + "/reset")
    assert httpx.get(url + "/stats").json()["requests"] == 0


def test_fake_failures_are_500s_in_openais_format(fakes: Fakes) -> None:
    resp = httpx.post(fakes.url_of("broken") + "/v1/chat/completions", json=chat("b-model", True))
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
    stats = httpx.get(fakes.url_of("broken") + "/stats").json()
    assert (stats["failed"], stats["ok"], stats["completion_tokens"]) == (1, 0, 0)


@pytest.mark.integration
def test_simulator_smoke_run(tmp_path: Path) -> None:
    """Every scenario and strategy, tiny counts and durations a tenth of the real ones."""
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "bench.routing", "--quick", "--time-scale", "0.1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.exists(), done.stdout + done.stderr
    results = orjson.loads(out.read_bytes())
    mixed = {r["strategy"]: r for r in results["scenarios"]["mixed"]}
    assert tuple(mixed) == STRATEGIES
    prices = {"fast": (1.0, 4.0), "cheap": (0.4, 1.6), "local": (0.0, 0.0)}
    for r in mixed.values():
        assert r["requests"] == 30 and r["errors"] <= 3, r
        assert set(r["shares"]) <= set(prices) and sum(r["shares"].values()) == pytest.approx(1.0), r
        assert r["not_renamed"] == 0 and r["wrong_model"] == 0, r  # the router rewrote `model` both ways
        billed = sum(p * t / 1e6 for name, (pi, po) in prices.items()
                     for p, t in zip((pi, po), r["tokens"][name], strict=True))
        assert r["cost"] == pytest.approx(billed)
    assert mixed["cost"]["shares"] == {"local": 1.0} and mixed["cost"]["cost"] == 0  # the free one, always
    assert mixed["round-robin"]["cost"] > 0
    rr = mixed["round-robin"]["shares"]
    assert rr == {"fast": pytest.approx(1 / 3), "cheap": pytest.approx(1 / 3), "local": pytest.approx(1 / 3)}
    checks = {c["name"]: c for c in results["checks"]}
    assert len(checks) == 4 and all(f"{'PASS' if c['passed'] else 'FAIL'} {c['name']}" in done.stdout
                                    for c in checks.values())
    assert checks["cost threshold is exact"]["passed"], checks
    # the chaos scenario keeps its real timeouts: failures and a hung deployment are absorbed even this short
    assert checks["chaos: failures and a hung deployment absorbed"]["passed"], checks
    assert done.returncode == (0 if all(c["passed"] for c in checks.values()) else 1)
    assert "| cost-latency |" in done.stdout and "| round-robin |" in done.stdout
