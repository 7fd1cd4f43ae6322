"""Strategies on constructed candidates with fake stats, a fake clock and a seeded random generator."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from router.config import Settings
from router.routing.deployment import Deployment, RequestFacts
from router.routing.stats import MIN_SAMPLES, DeploymentStats
from router.routing.strategies import (
    EXPLORE_SHARE, SORTS, STRATEGIES, build_strategy, queueing, strategy_for_sort,
)

SETTINGS = Settings(router_cost_weight=1.0, router_latency_weight=1.0)  # the design's weights
FACTS = RequestFacts(prompt_tokens=1000, output_tokens=500, stream=False)
STREAM = RequestFacts(prompt_tokens=1000, output_tokens=500, stream=True)


def dep(id: str, price: float | None = 1.0, latency: float | None = None, stream: bool = False,
        weight: float = 1.0, in_flight: int = 0, max_parallel: float = 1) -> Deployment:
    """A deployment whose estimate is `latency` (None: unmeasured) and prices `price` per million both ways."""
    stats = DeploymentStats()
    if latency is not None:
        for t in range(MIN_SAMPLES):
            stats.begin()
            if stream:
                stats.first_byte(latency, float(t))
            stats.end(latency, float(t), ok=True, stream=stream)
    for _ in range(in_flight):
        stats.begin()
    provider: Any = None
    return Deployment(id=id, group="g", type="openai", provider=provider, upstream_model="g", rename=None,
                      stats=stats, input_price=price, output_price=price, weight=weight, max_parallel=max_parallel)


def shares(strategy: Any, candidates: list[Deployment], n: int, facts: RequestFacts = FACTS,
           now: float = 5.0) -> Counter[str]:
    return Counter(strategy.choose(candidates, facts, now).id for _ in range(n))


def test_every_name_builds_and_unknown_names_fail_in_one_line() -> None:
    for name in STRATEGIES:
        assert build_strategy(name, SETTINGS, random.Random(0)).name == name
    with pytest.raises(ValueError) as err:
        build_strategy("fastest", SETTINGS)
    assert "fastest" in str(err.value) and "cost-latency" in str(err.value) and "\n" not in str(err.value)


def test_cost_latency_prefers_the_cheaper_of_two_equally_fast() -> None:
    cheap, dear = dep("cheap", price=1.0, latency=1.0), dep("dear", price=3.0, latency=1.0)
    got = shares(build_strategy("cost-latency", SETTINGS, random.Random(1)), [dear, cheap], 200)
    assert got == {"cheap": 200}


def test_cost_latency_prefers_the_faster_of_two_equally_priced() -> None:
    fast, slow = dep("fast", latency=0.5), dep("slow", latency=2.0)
    got = shares(build_strategy("cost-latency", SETTINGS, random.Random(1)), [slow, fast], 200)
    assert got == {"fast": 200}


def test_cost_latency_weighs_both_axes() -> None:
    # 10% dearer but 3x faster: latency wins with equal weights; with the cost weight at 50, cost wins
    a, b = dep("a", price=1.1, latency=1.0), dep("b", price=1.0, latency=3.0)
    assert build_strategy("cost-latency", SETTINGS, random.Random(1)).choose([a, b], FACTS, 5.0).id == "a"
    heavy = Settings(router_cost_weight=50.0, router_latency_weight=1.0)
    assert build_strategy("cost-latency", heavy, random.Random(1)).choose([a, b], FACTS, 5.0).id == "b"


def test_cost_latency_leaves_a_free_deployment_once_its_queue_makes_it_slow() -> None:
    """Latency counts in multiples of the fastest, unbounded: a free deployment 3x slower than a paid one
    (its queue, say) loses to it at the design's weights; at 1.5x slower it still wins. (Dividing latency
    by the largest would bound its term by 1: the free one would win however long its queue.)"""
    strategy = build_strategy("cost-latency", SETTINGS, random.Random(1))
    paid = dep("paid", price=4.0, latency=0.3)
    free = dep("free", price=0.0, latency=0.3)
    for _ in range(2):  # 0.3 s x 3 = 0.9 s: 3x the paid one's
        free.stats.begin()
    assert shares(strategy, [free, paid], 100) == {"paid": 100}  # scores: 0 + 3 against 1 + 1
    half = dep("half", price=0.0, latency=0.45)
    assert shares(strategy, [half, paid], 100) == {"half": 100}  # 0 + 1.5 against 1 + 1


def test_requests_in_flight_count_only_beyond_what_a_deployment_serves_at_once() -> None:
    """`max_parallel`: a local server with a batch of 4 keeps its estimate until 4 are in flight there, then
    (load + 1) / 4; a hosted API (unlimited) never queues ours, however many are in flight."""
    strategy = build_strategy("cost-latency", SETTINGS, random.Random(1))
    paid = dep("paid", price=4.0, latency=0.3, max_parallel=math.inf)
    free = dep("free", price=0.0, latency=0.5, max_parallel=4)  # 0 + 1.67 against 1 + 1
    for _ in range(3):
        free.stats.begin()
    assert queueing(free) == 1.0 and shares(strategy, [free, paid], 50) == {"free": 50}
    free.stats.begin()  # 4 in flight: the next one waits; 0.5 x 5/4 = 0.625 s, 0 + 2.08 against 2
    assert queueing(free) == 1.25 and shares(strategy, [free, paid], 50) == {"paid": 50}
    for _ in range(100):
        paid.stats.begin()
    assert queueing(paid) == 1.0 and shares(strategy, [free, paid], 50) == {"paid": 50}


def test_an_unmeasured_deployment_with_a_request_in_flight_counts_as_the_slowest() -> None:
    """While its first answer is awaited, requests do not pile onto a deployment that may be slow."""
    strategy = build_strategy("latency", SETTINGS, random.Random(4))
    known, new = dep("known", latency=0.5), dep("new", latency=None)
    assert strategy.choose([known, new], FACTS, 5.0).id == "new"  # unknown: as good as the best, measured
    new.stats.begin()
    assert shares(strategy, [known, new], 100) == {"known": 100}  # 0.5 x 2 with it in flight


def test_unknown_price_never_wins_on_cost() -> None:
    known, unknown = dep("known", price=5.0, latency=1.0), dep("unknown", price=None, latency=1.0)
    assert shares(build_strategy("cost", SETTINGS), [unknown, known], 50) == {"known": 50}
    cheap = dep("cheap", price=1.0, latency=1.0)
    assert shares(build_strategy("cost-latency", SETTINGS, random.Random(2)), [unknown, cheap], 200) == {"cheap": 200}


def test_cost_breaks_ties_by_latency() -> None:
    slow, fast, dear = dep("slow", latency=3.0), dep("fast", latency=1.0), dep("dear", price=2.0, latency=0.1)
    assert shares(build_strategy("cost", SETTINGS), [slow, fast, dear], 20) == {"fast": 20}


def test_load_changes_the_choice() -> None:
    strategy = build_strategy("latency", SETTINGS, random.Random(3))
    fast, slow = dep("fast", latency=1.0), dep("slow", latency=2.0)
    assert strategy.choose([fast, slow], FACTS, 5.0).id == "fast"
    for _ in range(2):  # 1 s x 3 > 2 s x 1
        fast.stats.begin()
    assert shares(strategy, [fast, slow], 100) == {"slow": 100}
    fast.stats.remote_in_flight = -1  # other replicas' requests count too: 1 s x 2 == 2 s x 1, a tie
    assert set(shares(strategy, [fast, slow], 100)) == {"fast", "slow"}
    cost_latency = build_strategy("cost-latency", SETTINGS, random.Random(3))
    fast.stats.remote_in_flight = 5
    assert cost_latency.choose([fast, slow], FACTS, 5.0).id == "slow"


def test_latency_strategy_sends_streams_to_the_1s_deployment() -> None:
    """50 streams one after another, simulated with the fake clock: >= 90% go to the 1 s TTFT one."""
    fast, slow = dep("fast", latency=None), dep("slow", latency=None)
    ttft = {"fast": 1.0, "slow": 3.0}
    strategy = build_strategy("latency", SETTINGS, random.Random(4))
    now, got = 0.0, Counter[str]()
    for _ in range(50):
        chosen = strategy.choose([slow, fast], STREAM, now)
        got[chosen.id] += 1
        chosen.stats.begin()
        now += ttft[chosen.id]
        chosen.stats.first_byte(ttft[chosen.id], now)
        now += 0.5
        chosen.stats.end(ttft[chosen.id] + 0.5, now, ok=True, stream=True)
    assert got["fast"] >= 45, got
    assert got["slow"] >= MIN_SAMPLES  # measured before being left alone


def test_exploration_share_is_bounded_and_nonzero() -> None:
    # "new" is unmeasured and dearer, "busy-new" unmeasured and busy on other replicas: by score neither
    # ever wins (an unknown latency counts as the best known one), so every request they get is exploration
    known, new = dep("known", price=1.0, latency=1.0), dep("new", price=2.0, latency=None)
    busy_new = dep("busy-new", latency=None)
    busy_new.stats.remote_in_flight = 10
    for name in ("cost-latency", "latency"):
        candidates = [known, new] if name == "cost-latency" else [known, busy_new]
        n = 4000
        got = shares(build_strategy(name, SETTINGS, random.Random(5)), candidates, n)
        explored = n - got["known"]
        assert 0 < 0.5 * EXPLORE_SHARE * n <= explored <= 1.5 * EXPLORE_SHARE * n <= 0.1 * n, (name, got)
    # a probe in flight from this process is enough: no more exploration of it
    new.stats.begin()
    assert shares(build_strategy("cost-latency", SETTINGS, random.Random(5)), [known, new], 1000) == {"known": 1000}


def test_stale_estimates_are_explored_again() -> None:
    known, old = dep("known", latency=1.0), dep("old", latency=5.0)
    strategy = build_strategy("latency", SETTINGS, random.Random(6))
    assert shares(strategy, [known, old], 1000, now=10.0) == {"known": 1000}
    old.stats.latency.stamp = -1000.0  # its last sample long ago
    known.stats.latency.stamp = 9.0
    assert 0 < shares(strategy, [known, old], 1000, now=10.0)["old"] <= 1.5 * EXPLORE_SHARE * 1000


def test_nothing_measured_spreads_by_load_taking_turns() -> None:
    a, b, c = dep("a"), dep("b"), dep("c")
    for name in ("cost-latency", "latency", "least-busy"):
        assert shares(build_strategy(name, SETTINGS, random.Random(7)), [a, b, c], 30) == {"a": 10, "b": 10, "c": 10}
    b.stats.begin()
    assert shares(build_strategy("cost-latency", SETTINGS, random.Random(7)), [a, b, c], 30) == {"a": 15, "c": 15}


def test_least_busy_counts_every_replica() -> None:
    a, b = dep("a", in_flight=1), dep("b")
    b.stats.remote_in_flight = 2
    assert shares(build_strategy("least-busy", SETTINGS), [a, b], 10) == {"a": 10}


def test_weighted_follows_weights() -> None:
    a, b, off = dep("a", weight=3.0), dep("b", weight=1.0), dep("off", weight=0.0)
    got = shares(build_strategy("weighted", SETTINGS, random.Random(8)), [a, b, off], 4000)
    assert 0.72 <= got["a"] / 4000 <= 0.78 and got["off"] == 0
    zero = dep("zero", weight=0.0)
    assert set(shares(build_strategy("weighted", SETTINGS, random.Random(8)), [off, zero], 100)) == {"off", "zero"}


def test_round_robin_and_random_baselines() -> None:
    a, b, c = dep("a", latency=9.0), dep("b", latency=1.0), dep("c")
    rr = build_strategy("round-robin", SETTINGS)
    assert [rr.choose([a, b, c], FACTS, 0.0).id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    got = shares(build_strategy("random", SETTINGS, random.Random(9)), [a, b, c], 3000)
    assert all(900 <= got[x] <= 1100 for x in "abc")


def test_one_candidate_is_chosen_without_looking() -> None:
    only = dep("only", price=None)
    for name in STRATEGIES:
        assert build_strategy(name, SETTINGS, random.Random(0)).choose([only], FACTS, 0.0) is only


def test_provider_sort_maps_to_strategies() -> None:
    assert strategy_for_sort(None, SETTINGS) is None
    for sort, name in SORTS.items():
        strategy = strategy_for_sort(sort, SETTINGS)
        assert strategy is not None and strategy.name == name
        assert strategy_for_sort(sort, SETTINGS) is strategy  # built once
    assert SORTS == {"price": "cost", "latency": "latency", "throughput": "least-busy"}
    for bad in ("fastest", 3, ["price"]):
        with pytest.raises(ValueError, match="provider.sort must be one of price, latency, throughput"):
            strategy_for_sort(bad, SETTINGS)
