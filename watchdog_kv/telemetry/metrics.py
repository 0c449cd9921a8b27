"""Metrics: counted where things happen, served in Prometheus format on the router.

Two halves:

* **In a vLLM process** (engine core, worker) the watches count into this process's
  :func:`local` set -- plain counters and fixed-bucket histograms, a dict update per
  observation, no lock on the step path beyond the GIL -- and the plugin copies a
  snapshot into the process's status record every couple of seconds
  (:func:`publish_every`). No HTTP server and no Prometheus client runs inside vLLM.
* **The router's** ``GET /metrics`` (:class:`ServiceCollector`) reads those records at
  scrape time, adds what the router and the supervisor counted themselves, and
  renders it with ``prometheus_client``. A process that died keeps its last counts
  (the collector remembers every process of the run), so counters never go down.
"""

from __future__ import annotations

import bisect
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from watchdog_kv import process, threads

__all__ = [
    "STEP_BUCKETS",
    "TRANSFER_BUCKETS",
    "Histogram",
    "ProcessMetrics",
    "ServiceCollector",
    "local",
    "publish_every",
]

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TRANSFER_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class Histogram:
    """Counts per bucket (not cumulative), sum and count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": list(self.buckets), "counts": list(self.counts), "sum": self.sum}


class ProcessMetrics:
    """What one vLLM process counted: by name, counters (by label) and histograms."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter[str]] = {}
        self.histograms: dict[str, Histogram] = {}
        self.version = 0

    def count(self, name: str, label: str, n: int = 1) -> None:
        self.counters.setdefault(name, Counter())[label] += n
        self.version += 1

    def observe(self, name: str, value: float, buckets: tuple[float, ...]) -> None:
        histogram = self.histograms.get(name)
        if histogram is None:
            histogram = self.histograms[name] = Histogram(buckets)
        histogram.observe(value)
        self.version += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "counters": {n: dict(c) for n, c in list(self.counters.items())},
            "histograms": {n: h.as_dict() for n, h in list(self.histograms.items())},
        }


_local: dict[str, Any] = {"pid": None, "metrics": None}


def local() -> ProcessMetrics:
    """This process's metrics (a forked child starts its own)."""
    if _local["pid"] != os.getpid():
        _local.update(pid=os.getpid(), metrics=ProcessMetrics())
    metrics: ProcessMetrics = _local["metrics"]
    return metrics


def publish_every(
    seconds: float,
    publish: Callable[[dict[str, Any]], None],
    also: Callable[[], None] | None = None,
) -> threading.Event:
    """Hand a snapshot of :func:`local` to ``publish`` whenever it changed, at most every
    ``seconds``, from a thread of ours, and call ``also`` each time round. Set the
    returned event to stop."""
    stop = threading.Event()

    def run() -> None:
        seen = -1
        while not stop.wait(seconds):
            metrics = local()
            if metrics.version != seen:
                seen = metrics.version
                publish(metrics.snapshot())
            if also is not None:
                also()

    threads.start(run, "watchdog_kv-metrics")
    return stop


# --- the router's /metrics ------------------------------------------------------------------


class ServiceCollector:
    """Renders the service's metrics at scrape time (a ``prometheus_client`` collector).

    ``own`` gives what the serving process counted itself: ``{metric: {labels: n}}``
    for ``recoveries`` (router rungs, restarts) and ``deadline_misses`` (stalls).
    """

    def __init__(self, state_dir: Callable[[], Path | None], own: Callable[[], dict[str, Any]]):
        self._state_dir = state_dir
        self._own = own
        self._seen: dict[int, dict[str, Any]] = {}  # pid -> its record's last metrics

    def _records(self) -> Iterable[dict[str, Any]]:
        folder = self._state_dir()
        if folder is not None:
            for record in process.read_records(folder):
                if record.get("metrics"):
                    self._seen[int(record["pid"])] = {
                        "server": record.get("server") or "",
                        "process": record.get("role") or "",
                        **record["metrics"],
                    }
        return list(self._seen.values())

    def collect(self) -> Iterator[Metric]:
        records = self._records()
        own = self._own()
        misses = CounterMetricFamily(
            "watchdog_kv_deadline_misses",
            "Deadlines missed, by kind: a KV-load phase (kv_handshake, kv_transfer, "
            "kv_verify, kv_first_progress) or an engine step stall (step).",
            labels=["kind", "server"],
        )
        recoveries = CounterMetricFamily(
            "watchdog_kv_recoveries",
            "Recoveries, by kind: the router's rungs, KV loads recomputed or failed "
            "on a decode, server restarts.",
            labels=["kind", "server"],
        )
        totals: Counter[tuple[str, str]] = Counter()
        recovered: Counter[tuple[str, str]] = Counter()
        for rec in records:
            counters = rec.get("counters") or {}
            for phase, n in (counters.get("kv_deadline_misses") or {}).items():
                totals[(f"kv_{phase}", rec["server"])] += n
            for kind, n in (counters.get("kv_recoveries") or {}).items():
                recovered[(f"kv_{kind}", rec["server"])] += n
        for (kind, server), n in (own.get("deadline_misses") or {}).items():
            totals[(kind, server)] += n
        for (kind, server), n in (own.get("recoveries") or {}).items():
            recovered[(kind, server)] += n
        for (kind, server), n in sorted(totals.items()):
            misses.add_metric([kind, server], n)
        for (kind, server), n in sorted(recovered.items()):
            recoveries.add_metric([kind, server], n)
        yield misses
        yield recoveries
        yield from self._histograms(
            records,
            "kv_transfer_seconds",
            "watchdog_kv_kv_transfer_seconds",
            "KV transfers on decodes, posted to done (seconds).",
        )
        yield from self._histograms(
            records,
            "step_seconds",
            "watchdog_kv_step_seconds",
            "Engine steps that ran the model, by server and process (seconds).",
        )

    @staticmethod
    def _histograms(
        records: Iterable[dict[str, Any]], key: str, name: str, doc: str
    ) -> Iterator[Metric]:
        family = HistogramMetricFamily(name, doc, labels=["server", "process"])
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for rec in records:
            found = (rec.get("histograms") or {}).get(key)
            if not found:
                continue
            into = merged.setdefault(
                (rec["server"], rec["process"]),
                {"buckets": found["buckets"], "counts": [0] * len(found["counts"]), "sum": 0.0},
            )
            if into["buckets"] != found["buckets"]:
                continue
            into["counts"] = [a + b for a, b in zip(into["counts"], found["counts"], strict=True)]
            into["sum"] += found["sum"]
        for (server, proc), h in sorted(merged.items()):
            cumulative, running = [], 0
            for bound, n in zip([*h["buckets"], float("inf")], h["counts"], strict=True):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            family.add_metric([server, proc], cumulative, h["sum"])
        yield family
