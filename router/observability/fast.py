"""Metric families cheap enough for every request: plain counters and histograms in this process's memory
(a histogram observation is one `bisect` and two additions; no lock, since the event loop is one thread),
exposed in Prometheus form by a collector at scrape time.

With several workers (`PROMETHEUS_MULTIPROC_DIR`), prometheus-client's multiprocess files are how `/metrics`
sums the workers: `sync` adds what each family gained since the last sync to a prometheus-client metric of
the same name (created on first use, never touched on the request path); the router syncs every second and
before it answers a scrape, so a scrape is at most a second behind the other workers.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterChild:
    __slots__ = ("value", "synced")

    def __init__(self) -> None:
        self.value = 0.0
        self.synced = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum", "synced_counts", "synced_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.synced_counts = [0] * (len(bounds) + 1)
        self.synced_sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus' `le`: value <= bound
        self.sum += value


class _Family:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)


class FastCounter(_Family):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> None:
        assert name.endswith("_total"), name
        super().__init__(name, documentation, labelnames)
        self.children: dict[tuple[str, ...], CounterChild] = {}
        self.mirror: Counter | None = None  # the multiprocess file-backed twin

    def labels(self, *values: str) -> CounterChild:
        child = self.children.get(values)
        if child is None:
            assert len(values) == len(self.labelnames), (self.name, values)
            child = self.children[values] = CounterChild()
        return child

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name.removesuffix("_total"), self.documentation, labels=self.labelnames)
        for values, child in self.children.items():
            family.add_metric(values, child.value)
        return family

    def sync(self) -> None:
        if self.mirror is None:
            self.mirror = Counter(self.name, self.documentation, self.labelnames, registry=None)
        for values, child in self.children.items():
            delta, child.synced = child.value - child.synced, child.value
            if delta:
                (self.mirror.labels(*values) if values else self.mirror).inc(delta)


class FastHistogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Iterable[float]) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(float(b) for b in buckets)
        self.children: dict[tuple[str, ...], HistogramChild] = {}
        self.mirror: Histogram | None = None

    def labels(self, *values: str) -> HistogramChild:
        child = self.children.get(values)
        if child is None:
            assert len(values) == len(self.labelnames), (self.name, values)
            child = self.children[values] = HistogramChild(self.bounds)
        return child

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        names = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, child in self.children.items():
            total, buckets = 0, []
            for name, count in zip(names, child.counts, strict=True):
                total += count
                buckets.append((name, total))
            family.add_metric(values, buckets, child.sum)
        return family

    def sync(self) -> None:
        if self.mirror is None:
            self.mirror = Histogram(self.name, self.documentation, self.labelnames, buckets=self.bounds,
                                    registry=None)
        for values, child in self.children.items():
            if child.sum == child.synced_sum and child.counts == child.synced_counts:
                continue
            twin = self.mirror.labels(*values) if values else self.mirror
            # prometheus-client has no bulk observe: its per-bucket values (non-cumulative) take the counts
            for i, (count, synced) in enumerate(zip(child.counts, child.synced_counts, strict=True)):
                if count != synced:
                    twin._buckets[i].inc(count - synced)  # noqa: SLF001
            twin._sum.inc(child.sum - child.synced_sum)  # noqa: SLF001
            child.synced_counts = list(child.counts)
            child.synced_sum = child.sum


class FastGauge(_Family):
    """One unlabelled gauge summed over workers (`livesum`), such as requests in flight."""

    kind = "gauge"

    def __init__(self, name: str, documentation: str) -> None:
        super().__init__(name, documentation, ())
        self.value = 0.0
        self.mirror: Gauge | None = None

    def collect(self) -> Metric:
        family = GaugeMetricFamily(self.name, self.documentation)
        family.add_metric((), self.value)
        return family

    def sync(self) -> None:
        if self.mirror is None:
            self.mirror = Gauge(self.name, self.documentation, registry=None, multiprocess_mode="livesum")
        self.mirror.set(self.value)


Fast = FastCounter | FastHistogram | FastGauge


class FastCollector(Collector):
    """Exposes the fast families of one process (the single-process `/metrics`)."""

    def __init__(self, families: Sequence[Fast]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()
