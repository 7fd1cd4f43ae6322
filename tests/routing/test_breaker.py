"""The circuit breaker as pure logic: a fake clock, a seeded random source, no sleeps."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from router.routing import breaker as b
from router.routing.breaker import Breaker, BreakerSettings
from router.routing.deployment import Deployment
from router.routing.failures import (
    BadRequest, ConnectionRefused, ContextLengthExceeded, Overloaded, RateLimited, ServerError,
)
from router.routing.stats import DeploymentStats

SETTINGS = BreakerSettings(failures=5, failure_rate=0.5, min_requests=10, window=30.0, base_ejection=10.0,
                           max_ejection=60.0, retry_after_cap=20.0, jitter=0.0)
FAULT = ServerError("boom")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def dep(id: str, group: str = "g") -> Deployment:
    provider: Any = None
    return Deployment(id=id, group=group, type="openai", provider=provider, upstream_model=group, rename=None,
                      stats=DeploymentStats())


def make(settings: BreakerSettings = SETTINGS, seed: int = 1) -> tuple[Breaker, Clock]:
    clock = Clock()
    return Breaker(settings, clock=clock, rng=random.Random(seed)), clock


def fail(breaker: Breaker, d: Deployment, times: int = 1, failure: Any = FAULT) -> None:
    for _ in range(times):
        breaker.begin(d)
        breaker.record_failure(d, failure)


def test_nothing_failed_costs_nothing_and_returns_the_same_sequence() -> None:
    breaker, _ = make()
    group = [dep("a"), dep("b")]
    assert breaker.available(group) is group
    breaker.record_success(group[0])  # a success never creates state
    assert breaker.available(group) is group and breaker.states() == []


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    breaker, clock = make()
    a, bb = dep("a"), dep("b")
    fail(breaker, a, 4)
    breaker.record_success(a)
    fail(breaker, a, 4)
    assert list(breaker.available([a, bb])) == [a, bb]  # 4 in a row after a success: still in
    fail(breaker, a)
    assert list(breaker.available([a, bb])) == [bb]
    (state,) = breaker.states()
    assert state.state == b.OPEN and state.returns_in == pytest.approx(10.0) and state.total_ejections == 1
    assert "5 consecutive failures" in state.reason


def test_failure_rate_over_the_window_ejects_only_with_enough_requests() -> None:
    breaker, clock = make()
    a, other = dep("a"), dep("other")
    for i in range(9):  # 4 failures interleaved with successes: never 5 in a row
        fail(breaker, a) if i % 2 == 0 else breaker.record_success(a)
        clock.now += 0.5
    assert list(breaker.available([a, other])) == [a, other]  # 5 of 9 failed, but fewer than 10 requests
    breaker.record_success(a)
    fail(breaker, a)  # 6 of 11 failed, > 50 %
    assert list(breaker.available([a, other])) == [other]


def test_old_failures_leave_the_window() -> None:
    breaker, clock = make()
    a, other = dep("a"), dep("other")
    for _ in range(4):
        fail(breaker, a)
        breaker.record_success(a)
    clock.now += 31.0  # all of them out of the 30 s window
    for _ in range(3):
        breaker.record_success(a)
    fail(breaker, a)
    fail(breaker, a)
    assert breaker.states()[0].window_requests == 5
    assert list(breaker.available([a, other])) == [a, other]


def test_ejection_doubles_each_time_is_capped_and_a_probe_decides() -> None:
    breaker, clock = make()
    a, other = dep("a"), dep("other")
    fail(breaker, a, 5)
    for k, seconds in enumerate([10.0, 20.0, 40.0, 60.0, 60.0], start=1):
        assert breaker.states()[0].ejections == k
        assert breaker.states()[0].returns_in == pytest.approx(seconds)
        clock.now += seconds - 0.01
        assert a not in breaker.available([a, other])
        clock.now += 0.01
        assert a in breaker.available([a, other])  # half-open
        assert breaker.states()[0].state == b.HALF_OPEN
        assert breaker.begin(a) is True  # this request is the probe
        assert a not in breaker.available([a, other])  # one probe at a time
        assert breaker.begin(a) is False
        breaker.record_failure(a, FAULT)  # the probe failed: out for longer
    clock.now += 60.0
    assert breaker.begin(a) is True
    breaker.record_success(a)  # the probe answered: closed, k back to 0
    state = breaker.states()[0]
    assert (state.state, state.ejections, state.returns_in) == (b.CLOSED, 0, 0.0)
    fail(breaker, a, 5)
    assert breaker.states()[0].returns_in == pytest.approx(10.0)  # back to the base


def test_jitter_only_shortens_and_varies() -> None:
    settings = BreakerSettings(failures=1, base_ejection=100.0, max_ejection=100.0, jitter=0.2)
    lengths = set()
    for seed in range(20):
        breaker, _ = make(settings, seed)
        a = dep("a")
        fail(breaker, a)
        lengths.add(round(breaker.states()[0].returns_in, 6))
    assert len(lengths) > 10 and all(80.0 <= s <= 100.0 for s in lengths)


def test_a_probe_that_never_reports_lets_another_through() -> None:
    breaker, clock = make(BreakerSettings(failures=1, base_ejection=1.0, jitter=0.0, probe_timeout=5.0))
    a, other = dep("a"), dep("other")
    fail(breaker, a)
    clock.now += 1.0
    assert breaker.begin(a)
    clock.now += 4.9
    assert a not in breaker.available([a, other])
    clock.now += 0.1
    assert a in breaker.available([a, other]) and breaker.begin(a)


def test_a_released_probe_frees_the_slot_without_a_verdict() -> None:
    breaker, clock = make(BreakerSettings(failures=1, base_ejection=1.0, jitter=0.0))
    a, other = dep("a"), dep("other")
    fail(breaker, a)
    clock.now += 1.0
    assert breaker.begin(a)
    breaker.release(a)  # the client left
    assert a in breaker.available([a, other]) and breaker.states()[0].state == b.HALF_OPEN


def test_a_429_cools_for_its_retry_after_without_counting_as_a_failure() -> None:
    breaker, clock = make()
    a, other = dep("a"), dep("other")
    for _ in range(10):  # far more than `failures`: none of them counts
        fail(breaker, a, failure=RateLimited("slow down", retry_after=3.0))
    state = breaker.states()[0]
    assert (state.state, state.cooling, state.consecutive_failures, state.total_ejections) == (b.CLOSED, True, 0, 0)
    assert a not in breaker.available([a, other])
    clock.now += 3.0
    assert a in breaker.available([a, other])
    assert breaker.begin(a) is False  # no probe after a cooldown: it simply takes traffic again


def test_retry_after_is_capped_and_never_shortened() -> None:
    breaker, _ = make()
    a = dep("a")
    fail(breaker, a, failure=RateLimited("x", retry_after=3600.0))
    assert breaker.states()[0].returns_in == pytest.approx(20.0)  # ROUTER_RETRY_AFTER_CAP
    fail(breaker, a, failure=Overloaded("x", retry_after=1.0))
    assert breaker.states()[0].returns_in == pytest.approx(20.0)


def test_the_clients_own_errors_count_as_answers() -> None:
    breaker, _ = make(BreakerSettings(failures=5, min_requests=100, jitter=0.0))  # consecutive failures only
    a = dep("a")
    fail(breaker, a, 4)
    fail(breaker, a, failure=BadRequest("bad"))
    fail(breaker, a, failure=ContextLengthExceeded("too long"))
    fail(breaker, a, 4)
    assert breaker.states()[0].state == b.CLOSED  # never 5 deployment faults in a row


def test_never_nothing_the_least_recently_failed_is_offered() -> None:
    breaker, clock = make()
    a, bb, c = dep("a"), dep("b"), dep("c")
    fail(breaker, bb, 5)
    clock.now += 1
    fail(breaker, a, 5)
    clock.now += 1
    fail(breaker, c, 5)
    assert list(breaker.available([a, bb, c])) == [bb]
    assert breaker.begin(bb) is False  # offered as a last resort, not a probe: its ejection still runs
    breaker.record_failure(bb, ConnectionRefused("down"))
    assert breaker.states()[0].total_ejections == 1  # no new verdict while it is still out
    assert list(breaker.available([])) == []


def test_deployments_are_kept_apart_by_group_and_across_table_rebuilds() -> None:
    breaker, _ = make()
    a = dep("a")
    fail(breaker, a, 5)
    rebuilt = Deployment(id="a", group="g", type="openai", provider=a.provider, upstream_model="g", rename=None,
                         stats=a.stats)  # a new table keeps the deployment's statistics object
    same_id_elsewhere = dep("a", group="h")
    assert list(breaker.available([rebuilt, same_id_elsewhere])) == [same_id_elsewhere]


def test_sweep_forgets_circuits_with_nothing_left_to_say() -> None:
    breaker, clock = make()
    a, c = dep("a"), dep("c")
    fail(breaker, a, 2)
    fail(breaker, c, 5)
    clock.now += 31.0
    breaker.sweep()
    assert [s.key for s in breaker.states()] == ["g\x00c"]  # a: idle; c: still open (half-open)


def test_on_eject_hook_and_settings_from_config() -> None:
    breaker, _ = make()
    seen: list[tuple[str, str]] = []
    breaker.on_eject = lambda key, reason: seen.append((key, reason))
    fail(breaker, dep("a"), 5)
    assert seen and seen[0][0] == "g\x00a"

    class Config:
        router_breaker_failures = 3
        router_retry_after_cap = 9.0

    settings = BreakerSettings.from_settings(Config())
    assert (settings.failures, settings.retry_after_cap, settings.window) == (3, 9.0, BreakerSettings().window)


def test_the_request_path_check_is_cheap() -> None:
    """available() over a 3-deployment group with one ejected, and begin(): a few hundred ns each here."""
    breaker = Breaker(SETTINGS)
    group = [dep("a"), dep("b"), dep("c")]
    fail(breaker, group[1], 5)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        chosen = breaker.available(group)
        breaker.begin(chosen[0])
    per_call = (time.perf_counter() - start) / n
    assert len(chosen) == 2
    assert per_call < 20e-6  # generous for a loaded CI machine; measured about 0.5 µs
