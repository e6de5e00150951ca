"""Every Prometheus collector of the service, declared once, names prefixed `meds_`.

Collectors live in a registry owned by the app (no import-time globals), so tests and several apps in one
process do not collide. Gauges of memory size are read from the engine at scrape time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .core.collapse import CollapseMetrics
from .engine.views import MemoryTotals

# Penalties take few values: 0 and min(0.1 * ln(size + 1), 0.2) for sizes 1..7 with the default alpha/beta.
PENALTY_BUCKETS = (0.0, 0.07, 0.11, 0.139, 0.161, 0.18, 0.195, 0.2, 0.5, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REFIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _BulkHistogram(Collector):
    """A histogram fed whole numpy batches at once (8k observations cost one np.searchsorted)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self.counts = np.zeros(len(buckets) + 1, dtype=np.int64)
        self.total = 0.0
        self._lock = threading.Lock()

    def observe_many(self, values: Sequence[float] | NDArray[np.float64]) -> None:
        arr = np.asarray(values, dtype=np.float64)
        if not len(arr):
            return
        slots = np.searchsorted(self.bounds, arr, side="left")
        with self._lock:
            self.counts += np.bincount(slots, minlength=len(self.counts))
            self.total += float(arr.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self.counts)
            total = self.total
        buckets = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative[:-1], strict=True)]
        buckets.append(("+Inf", int(cumulative[-1])))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=total)


class _MemoryGauges(Collector):
    def __init__(self, totals: Callable[[], MemoryTotals]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self.totals()
        for name, doc, value in (
            ("runs", "Runs with memory or config.", values.get("runs", 0)),
            ("keys", "Memory keys (run, prompt, correctness group).", values.get("keys", 0)),
            ("vectors", "Fingerprint vectors stored (live).", values.get("vectors", 0)),
            (
                "pending_refits",
                "Keys whose HDBSCAN labels are older than their vectors.",
                values.get("pending_refits", 0),
            ),
            ("refits_in_flight", "Refit jobs submitted and not yet adopted.", values.get("refits_in_flight", 0)),
        ):
            yield GaugeMetricFamily(f"meds_{name}", doc, value=value)


class _CollapseGauges(Collector):
    """Per run (the only label: never per prompt), the error-collapse metrics of its last scored batch."""

    DOCS: ClassVar[dict[str, str]] = {
        "repeat_rate": "Share of the last batch's wrong rollouts that fell into an existing error cluster.",
        "distinct_error_clusters": "Distinct error clusters per prompt in the last batch, averaged over prompts.",
        "largest_cluster_share": "Share of a prompt's judged wrong rollouts in its largest cluster, averaged.",
        "cluster_entropy": "Entropy (nats) of a prompt's judged wrong rollouts over clusters, averaged.",
        "penalised_fraction": "Share of the last batch's remembered rollouts with a penalty above 0.",
        "mean_penalty": "Mean penalty of the last batch's remembered rollouts.",
    }

    def __init__(self) -> None:
        self.last: dict[str, CollapseMetrics] = {}
        self._lock = threading.Lock()

    def set(self, run: str, metrics: CollapseMetrics) -> None:
        with self._lock:
            self.last[run] = metrics

    def forget(self, run: str) -> None:
        with self._lock:
            self.last.pop(run, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            last = dict(self.last)
        for name, doc in self.DOCS.items():
            family = GaugeMetricFamily(f"meds_collapse_{name}", doc, labels=["run"])
            for run, metrics in sorted(last.items()):
                family.add_metric([run], getattr(metrics, name))
            yield family


class Metrics:
    """The service's collectors; also the engine's observer."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "meds_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "meds_http_request_duration_seconds",
            "HTTP request latency by route and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rollouts_total = Counter(
            "meds_rollouts",
            "Rollouts by outcome: scored, skipped (no fingerprint) or duplicate (retry).",
            ["status"],
            registry=self.registry,
        )
        self.penalty = _BulkHistogram("meds_penalty", "Penalties given to scored rollouts.", PENALTY_BUCKETS)
        self.registry.register(self.penalty)
        self.refit_seconds = Histogram(
            "meds_refit_duration_seconds",
            "Wall time of one refit job (submit to result).",
            buckets=REFIT_BUCKETS,
            registry=self.registry,
        )
        self.refit_keys = Counter("meds_refit_keys", "Keys refitted with HDBSCAN.", registry=self.registry)
        self.refit_vectors = Counter("meds_refit_vectors", "Vectors clustered by refits.", registry=self.registry)
        self.refit_failures = Counter("meds_refit_failures", "Refit jobs that failed.", registry=self.registry)
        self.collapse_gauges = _CollapseGauges()
        self.registry.register(self.collapse_gauges)
        self.knn_fallbacks = Counter(
            "meds_knn_fallbacks",
            "Queries whose float32 neighbours were not provably exact, by the tier that decided them.",
            ["tier"],
            registry=self.registry,
        )

        self.score_refusals = Counter(
            "meds_score_refusals",
            "Score requests refused at once (503) by the bound they hit: run or total requests in flight.",
            ["bound"],
            registry=self.registry,
        )
        self.score_in_flight = Gauge(
            "meds_score_in_flight", "Score requests admitted and not yet answered.", registry=self.registry
        )
        self.knn_reference_loaded = Gauge(
            "meds_knn_reference_loaded",
            "1 once the kNN reference tier's library is loaded (a true near-tie before that waits seconds for it).",
            registry=self.registry,
        )

    def score_refused(self, bound: str) -> None:
        self.score_refusals.labels(bound).inc()

    def watch_memory(self, totals: Callable[[], MemoryTotals]) -> None:
        self.registry.register(_MemoryGauges(totals))

    # ---- EngineObserver ---------------------------------------------------------------------------

    def rollouts(self, status: str, count: int) -> None:
        self.rollouts_total.labels(status).inc(count)

    def penalties(self, values: Sequence[float] | NDArray[np.float64]) -> None:
        self.penalty.observe_many(values)

    def refit_done(self, keys: int, vectors: int, seconds: float) -> None:
        self.refit_keys.inc(keys)
        self.refit_vectors.inc(vectors)
        self.refit_seconds.observe(seconds)

    def refit_failed(self) -> None:
        self.refit_failures.inc()

    def knn_fallback(self, tier: str) -> None:
        self.knn_fallbacks.labels(tier).inc()

    def collapse(self, run: str, metrics: CollapseMetrics) -> None:
        self.collapse_gauges.set(run, metrics)

    def run_deleted(self, run: str) -> None:
        self.collapse_gauges.forget(run)
