"""Strategies: each chooses one deployment of a model group for one request (`Strategy.choose`).

- `cost-latency` (the default, the design's rule): lowest ROUTER_COST_WEIGHT x cost / largest cost +
  ROUTER_LATENCY_WEIGHT x latency / smallest latency among the candidates. Cost is a share of the dearest
  candidate's (0 for a free one: a ratio to the cheapest would be infinite); latency is a multiple of the
  fastest, unbounded, because queueing can make a deployment arbitrarily slow. With the design's 1:1
  weights, paying the dearest candidate's whole price is worth the same as halving latency. (Dividing
  latency by the largest instead bounds its term by 1, so the cheapest candidate could never lose to the
  dearest, however long its queue: measured in `make bench-routing`, that sent overflow to a slow cheap
  deployment and did not improve p99 on round-robin. Min-max scaling would stretch any difference,
  however small, over the whole range.)
- `latency`: lowest expected latency (with queueing); `cost`: lowest expected cost (known prices before
  unknown ones), ties by latency; `least-busy`: fewest requests in flight (all replicas); `weighted`:
  random by `Deployment.weight`; `round-robin` and `random`: baselines.

Latency is the deployment's peak-EWMA estimate (TTFT for streams) times its queueing factor: (load + 1) /
`max_parallel` once the requests in flight there fill it, else 1 (a hosted API serves ours in parallel; a
local server queues beyond its batch), so load counts where it delays. An
unknown price counts as the dearest known one (never as free); an unknown latency (no sample yet) as the
best known one, or the worst while a request is in flight there. Exploration keeps estimates fresh: in
`cost-latency` and `latency`, EXPLORE_SHARE of the requests go to a candidate whose estimate is missing or
stale and that has nothing in flight here; when no candidate has an estimate at all, the least busy one is
taken. Ties take turns.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from router.routing.deployment import Deployment, RequestFacts, Strategy

if TYPE_CHECKING:
    from router.config import Settings

EXPLORE_SHARE = 0.05  # share of requests sent to a deployment whose latency estimate is missing or stale


class _Turns:
    """Picks among equally good candidates in turn."""

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, best: list[Deployment]) -> Deployment:
        if len(best) == 1:
            return best[0]
        self.turn += 1
        return best[self.turn % len(best)]

    def lowest(self, candidates: Sequence[Deployment], scores: list[float]) -> Deployment:
        low = min(scores)
        return self.pick([d for d, s in zip(candidates, scores, strict=True) if s == low])


def _latencies(candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> list[float] | None:
    """Expected latency x (load + 1) per candidate; None when no candidate has an estimate.

    An unknown estimate counts as the best known one while nothing is in flight there, and as the worst
    known one once something is: its first answer is awaited, and requests must not pile onto a deployment
    that may be slow (they did, in `make bench-routing`, for as long as a slow deployment's first answer
    took)."""
    stream = facts.stream
    estimates = [d.stats.expected_latency(stream, now) for d in candidates]
    known = [e for e in estimates if e is not None]
    if not known:
        return None
    best, worst = min(known), max(known)
    return [(e if e is not None else worst if d.stats.load() else best) * queueing(d)
            for d, e in zip(candidates, estimates, strict=True)]


def queueing(d: Deployment) -> float:
    """How much longer than its estimate a request to `d` is expected to take, given the requests in flight
    there (all replicas): (load + 1) / max_parallel once the deployment is full, else 1. A deployment with
    unlimited parallelism (a hosted API) never queues our requests; one with max_parallel 1 serves them one
    after the other (peak-EWMA's `(load + 1)` factor)."""
    load = d.stats.load()
    return (load + 1) / d.max_parallel if load >= d.max_parallel else 1.0


def _costs(candidates: Sequence[Deployment], facts: RequestFacts) -> list[float | None]:
    return [d.expected_cost(facts.prompt_tokens, facts.output_tokens) for d in candidates]


class _Exploring(_Turns):
    """Shared by the strategies that rank by latency: sends EXPLORE_SHARE of requests to a candidate that
    needs measuring (no estimate, or a stale one, and nothing of this process in flight on it)."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def explore(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment | None:
        if self.rng.random() >= EXPLORE_SHARE:
            return None
        probes = [d for d in candidates if d.stats.in_flight == 0 and not d.stats.fresh(facts.stream, now)]
        return self.rng.choice(probes) if probes else None

    def least_busy(self, candidates: Sequence[Deployment]) -> Deployment:
        return self.lowest(candidates, [float(d.stats.load()) for d in candidates])


class CostLatency(_Exploring):
    name = "cost-latency"

    def __init__(self, cost_weight: float, latency_weight: float, rng: random.Random) -> None:
        super().__init__(rng)
        self.cost_weight = cost_weight
        self.latency_weight = latency_weight

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        latencies = _latencies(candidates, facts, now)
        if latencies is None:
            return self.least_busy(candidates)  # nothing measured yet: spread out, measuring each
        probe = self.explore(candidates, facts, now)
        if probe is not None:
            return probe
        costs = _costs(candidates, facts)
        known = [c for c in costs if c is not None]
        dearest = max(known) if known else 0.0
        fastest = min(latencies)
        cw = self.cost_weight / dearest if dearest > 0 else 0.0
        lw = self.latency_weight / fastest if fastest > 0 else 0.0
        scores = [cw * (dearest if c is None else c) + lw * lat for c, lat in zip(costs, latencies, strict=True)]
        low = min(scores)
        best = [(d, c) for d, c, s in zip(candidates, costs, scores, strict=True) if s == low]
        priced = [d for d, c in best if c is not None]  # a tie is never won by an unknown price
        return self.pick(priced or [d for d, _ in best])


class Latency(_Exploring):
    name = "latency"

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        latencies = _latencies(candidates, facts, now)
        if latencies is None:
            return self.least_busy(candidates)
        return self.explore(candidates, facts, now) or self.lowest(candidates, latencies)


class Cost(_Turns):
    name = "cost"

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        costs = _costs(candidates, facts)
        known = [c for c in costs if c is not None]
        if known:  # an unknown price never wins on cost: only known ones compete
            low = min(known)
            pool = [d for d, c in zip(candidates, costs, strict=True) if c == low]
        else:
            pool = list(candidates)
        if len(pool) == 1:
            return pool[0]
        latencies = _latencies(pool, facts, now)
        return self.lowest(pool, latencies if latencies is not None else [float(d.stats.load()) for d in pool])


class LeastBusy(_Turns):
    name = "least-busy"

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        if len(candidates) == 1:
            return candidates[0]
        return self.lowest(candidates, [float(d.stats.load()) for d in candidates])


class Weighted:
    name = "weighted"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        weights = [max(d.weight, 0.0) for d in candidates]
        total = sum(weights)
        if total <= 0:
            return self.rng.choice(candidates)
        point = self.rng.random() * total
        for d, w in zip(candidates, weights, strict=True):
            point -= w
            if point < 0:
                return d
        return next(d for d, w in zip(reversed(candidates), reversed(weights), strict=True) if w > 0)


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self.turn = -1

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        self.turn += 1
        return candidates[self.turn % len(candidates)]


class Random:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, candidates: Sequence[Deployment], facts: RequestFacts, now: float) -> Deployment:
        return self.rng.choice(candidates)


STRATEGIES = ("cost-latency", "weighted", "least-busy", "latency", "cost", "round-robin", "random")

#: OpenRouter's `provider.sort` -> the strategy that serves it for one request. `throughput` is least-busy:
#: the router measures no tokens per second, and the deployment with the fewest requests in flight (all
#: replicas) is the one with the most capacity left for this one; TTFT (`latency`) says little of it.
SORTS = {"price": "cost", "latency": "latency", "throughput": "least-busy"}


def build_strategy(name: str, settings: Settings, rng: random.Random | None = None) -> Strategy:
    """A new strategy object (each group has its own: turns and counters are per group)."""
    rng = rng if rng is not None else random.Random()
    if name == "cost-latency":
        return CostLatency(settings.router_cost_weight, settings.router_latency_weight, rng)
    if name == "latency":
        return Latency(rng)
    if name == "cost":
        return Cost()
    if name == "least-busy":
        return LeastBusy()
    if name == "weighted":
        return Weighted(rng)
    if name == "round-robin":
        return RoundRobin()
    if name == "random":
        return Random(rng)
    raise ValueError(f"unknown strategy {name!r}; valid strategies: {', '.join(STRATEGIES)}")


_sort_strategies: dict[str, Strategy] = {}


def strategy_for_sort(sort: object, settings: Settings) -> Strategy | None:
    """The strategy for OpenRouter's `provider.sort` (None: none given, the group's applies). Raises
    ValueError with a one-line message for an unknown value. The objects are built once and shared."""
    if sort is None:
        return None
    if not isinstance(sort, str) or sort not in SORTS:
        raise ValueError(f"provider.sort must be one of {', '.join(SORTS)}")
    strategy = _sort_strategies.get(sort)
    if strategy is None:
        strategy = _sort_strategies[sort] = build_strategy(SORTS[sort], settings)
    return strategy
