"""DeploymentStats and StatsRegistry with a fake clock: peak-EWMA, counters, merging replicas, forgetting."""

from __future__ import annotations

import gc
import math
import weakref

import pytest

from router.routing.stats import (
    FORGET_AFTER, MIN_SAMPLES, STALE_AFTER, TAU, WEIGHT_CAP, DeploymentStats, StatsRegistry, merge,
)


def call(stats: DeploymentStats, seconds: float, now: float, stream: bool = False, ok: bool = True) -> None:
    stats.begin()
    if stream and ok:
        stats.first_byte(seconds, now)
    stats.end(seconds, now, ok=ok, stream=stream)


def test_no_estimate_below_min_samples() -> None:
    stats = DeploymentStats()
    for i in range(MIN_SAMPLES - 1):
        call(stats, 1.0, float(i))
        assert stats.expected_latency(False, float(i)) is None
    call(stats, 1.0, 10.0)
    assert stats.expected_latency(False, 10.0) == pytest.approx(1.0)
    assert stats.samples(False) == MIN_SAMPLES


def test_peak_jumps_up_at_once_and_decays_down_with_time() -> None:
    stats = DeploymentStats()
    for t in range(3):
        call(stats, 1.0, float(t))
    call(stats, 5.0, 3.0)
    assert stats.expected_latency(False, 3.0) == pytest.approx(5.0)  # a slower sample replaces the estimate
    call(stats, 1.0, 3.0 + TAU)  # one time constant later: weight e^-1 on the old value
    after_tau = 5.0 * math.exp(-1) + 1.0 * (1 - math.exp(-1))
    assert stats.expected_latency(False, 3.0 + TAU) == pytest.approx(after_tau)
    call(stats, 1.0, 3.0 + TAU + 0.1)  # soon after: hardly moves
    assert stats.expected_latency(False, 3.1 + TAU) == pytest.approx(after_tau, rel=0.02)
    now = 3.1 + TAU
    for _ in range(20):
        now += 5.0
        call(stats, 1.0, now)
    assert stats.expected_latency(False, now) == pytest.approx(1.0, abs=0.01)


def test_streams_and_non_streams_have_separate_estimates() -> None:
    stats = DeploymentStats()
    for t in range(3):
        call(stats, 0.2, float(t), stream=True)
        call(stats, 4.0, float(t), stream=False)
    assert stats.expected_latency(True, 3.0) == pytest.approx(0.2)
    assert stats.expected_latency(False, 3.0) == pytest.approx(4.0)
    assert stats.samples(True) == stats.samples(False) == 3


def test_a_stream_end_does_not_feed_the_ttft_estimate() -> None:
    stats = DeploymentStats()
    for t in range(3):
        stats.begin()
        stats.first_byte(0.5, float(t))
        stats.end(60.0, float(t) + 60, ok=True, stream=True)  # a long stream: its length is no TTFT
    assert stats.expected_latency(True, 70.0) == pytest.approx(0.5)
    assert stats.samples(False) == 0


def test_failures_only_raise_the_estimate() -> None:
    stats = DeploymentStats()
    for t in range(3):
        call(stats, 2.0, float(t))
    call(stats, 0.01, 10.0, ok=False)  # a fast error must not make it look fast
    assert stats.expected_latency(False, 10.0) == pytest.approx(2.0)
    call(stats, 30.0, 40.0, ok=False)  # a timeout makes it look slow
    assert stats.expected_latency(False, 40.0) == pytest.approx(30.0)


def test_in_flight_never_negative_and_load_adds_replicas() -> None:
    stats = DeploymentStats()
    stats.begin()
    stats.begin()
    assert stats.in_flight == 2 and stats.load() == 2
    stats.remote_in_flight = 3
    assert stats.load() == 5
    for _ in range(4):
        stats.end(0.1, 1.0, ok=False, stream=True)
    assert stats.in_flight == 0 and stats.negative_ends == 2 and stats.load() == 3


def test_freshness_lapses_after_stale_after() -> None:
    stats = DeploymentStats()
    for t in range(3):
        call(stats, 1.0, float(t))
    assert stats.fresh(False, 2.0 + STALE_AFTER - 1)
    assert not stats.fresh(False, 2.0 + STALE_AFTER + 1)
    assert stats.expected_latency(False, 2.0 + STALE_AFTER + 1) == pytest.approx(1.0)  # kept, only stale
    assert not stats.fresh(True, 0.0)  # no stream samples at all


def test_merge_sums_in_flight_and_weights_estimates_by_capped_samples() -> None:
    a = {"k": [2, 1.0, 100, 0.5, 0.0, 0, 1e9]}  # many stream samples: weight capped
    b = {"k": [3, 3.0, WEIGHT_CAP, 1.0, 8.0, 4, 2.0], "other": [1, 0, 0, 1e9, 0, 0, 1e9]}
    stale = {"k": [1, 100.0, 50, STALE_AFTER + 1, 100.0, 50, STALE_AFTER + 1]}
    bad = {"k": [1, "x"], "j": "nonsense", "n": [-1, 0, 0, 0, 0, 0, 0]}
    merged = merge([a, b, stale, bad])
    in_flight, ttft, latency = merged["k"]
    assert in_flight == 6  # the stale entry's in-flight still counts (its process is alive); bad ones don't
    assert ttft[0] == pytest.approx(2.0)  # (1.0 x 16 + 3.0 x 16) / 32: the cap evens them out
    assert ttft[1:] == (2 * WEIGHT_CAP, 100 + WEIGHT_CAP, True)
    assert latency[0] == pytest.approx(8.0) and latency[1:] == (4, 4, True)
    assert merged["other"][0] == 1 and "n" not in merged and "j" not in merged


def test_remote_estimates_combine_with_local_ones() -> None:
    stats = DeploymentStats()
    assert stats.expected_latency(True, 0.0) is None  # nothing measured anywhere
    call(stats, 1.0, 0.0, stream=True)  # one local sample
    assert stats.expected_latency(True, 0.0) == pytest.approx(1.0)
    stats.remote_in_flight, stats.remote_ttft, stats.remote_latency = merge([{"k": [0, 3.0, 2, 0.1, 0, 0, 0]}])["k"]
    assert stats.samples(True) == 3
    assert stats.expected_latency(True, 0.0) == pytest.approx((1.0 * 1 + 3.0 * 2) / 3)
    assert stats.fresh(True, 0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_registry_keeps_objects_across_rebuilds_and_forgets_idle_unheld_ones() -> None:
    clock = Clock()
    registry = StatsRegistry(clock=clock)
    held = registry.get("g\x00a")  # a route table holds it
    assert registry.get("g\x00a") is held  # a rebuild gets the same object
    busy = registry.get("g\x00busy")
    busy.begin()
    busy_ref = weakref.ref(busy)
    del busy
    dropped = weakref.ref(registry.get("g\x00old"))
    assert dropped() is not None  # kept while recent even though no table holds it
    clock.now = FORGET_AFTER + 1
    registry.get("g\x00new")  # the sweep runs
    gc.collect()
    assert dropped() is None  # idle, not held, not asked for: gone
    assert busy_ref() is not None and registry.get("g\x00busy") is busy_ref()  # in flight: kept
    assert registry.get("g\x00a") is held  # a table still holds it: the same object
    assert {k for k, _ in registry.items()} == {"g\x00a", "g\x00busy", "g\x00new"}
