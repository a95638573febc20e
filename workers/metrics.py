"""Prometheus metrics for the worker: images by outcome, stage latencies, retries.

Celery's prefork pool runs tasks in child processes while the HTTP endpoint
lives in the main process, so the metrics use prometheus_client's
multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (the Kubernetes
Deployment sets it): each child writes its values to files in that folder and
the main process sums them at scrape time. Without the variable (tests, one
process) the ordinary in-process registry is used. ``workers.signals`` starts
the endpoint; this module only defines and records.

Names (``labelmill_`` prefix; counters get ``_total`` on the wire):

- ``labelmill_images_total{status, kind}``: images finished; ``kind`` is the
  error kind (DESIGN.md's closed set) or empty for ``ok``.
- ``labelmill_batches_total{status}``: batches finished (``done``, ``dead``).
- ``labelmill_batch_seconds``: a batch's wall time, end to end.
- ``labelmill_stage_seconds{stage}``: time per batch in each stage (``fetch``,
  ``preprocess``, ``predict``, ``store``, ``ledger``).
- ``labelmill_retries_total{what}``: transient failures that were retried.
- ``labelmill_redeliveries_total``: batches delivered more than once.
- ``labelmill_requeues_total``: batches handed back to the queue (``Reject``).
- ``labelmill_outstanding_batches``: ``ZCARD <prefix>:outstanding``, read by
  the main process at scrape time (the number KEDA scales on).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, Collector

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("fetch", "preprocess", "predict", "store", "ledger")

# prometheus_client opens its value files as soon as a metric exists, so the
# folder must exist before the definitions below.
if os.environ.get(MULTIPROC_ENV):
    Path(os.environ[MULTIPROC_ENV]).mkdir(parents=True, exist_ok=True)

IMAGES = Counter(
    "labelmill_images", "Images finished, by status and error kind", ["status", "kind"]
)
BATCHES = Counter("labelmill_batches", "Batches finished, by status", ["status"])
STAGE_SECONDS = Histogram(
    "labelmill_stage_seconds",
    "Time per batch spent in each stage",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BATCH_SECONDS = Histogram(
    "labelmill_batch_seconds",
    "Wall time of a batch, end to end",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
RETRIES = Counter("labelmill_retries", "Transient failures retried, by what was retried", ["what"])
REDELIVERIES = Counter("labelmill_redeliveries", "Batches delivered more than once")
REQUEUES = Counter("labelmill_requeues", "Batches handed back to the queue unfinished")


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage of the batch into ``labelmill_stage_seconds{stage=name}``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage=name).observe(time.perf_counter() - t0)


def observe_stage(name: str, seconds: float) -> None:
    """Record a stage's time measured elsewhere (e.g. summed over fetch threads)."""
    STAGE_SECONDS.labels(stage=name).observe(seconds)


def record_batch(
    *, ok: int, errors: Mapping[str, int], seconds: float, status: str | None = None
) -> None:
    """Count one finished batch and its images (``status``: done or dead)."""
    if status is None:
        status = "dead" if errors.get("dead") else "done"
    BATCHES.labels(status=status).inc()
    BATCH_SECONDS.observe(seconds)
    if ok:
        IMAGES.labels(status="ok", kind="").inc(ok)
    for kind, n in errors.items():
        if n:
            IMAGES.labels(status="error", kind=kind).inc(n)


def record_retry(what: str) -> None:
    """Count one retried transient failure (``what``: model, s3, ledger...)."""
    RETRIES.labels(what=what).inc()


def record_delivery(attempt: int) -> None:
    """Count a delivery of a batch; only redeliveries (attempt > 1) show."""
    if attempt > 1:
        REDELIVERIES.inc()


# -- exposition (main process) -------------------------------------------------


class OutstandingCollector(Collector):
    """``labelmill_outstanding_batches`` from a callable, sampled at scrape time.

    A failed read yields no sample (a gap in the graph), never a stale value.
    """

    def __init__(self, read: Callable[[], int]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "labelmill_outstanding_batches",
            "Batches queued or running (ZCARD of the outstanding set)",
        )
        try:
            family.add_metric([], float(self._read()))
        except Exception as exc:  # Redis down: say so in the log, not in the metric
            log.warning("outstanding batches: %s: %s", type(exc).__name__, exc)
        yield family


def multiproc_dir() -> Path | None:
    """The multiprocess folder, or None when metrics are in-process."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None


def reset_multiproc_dir() -> None:
    """Empty the multiprocess folder: a restarted container must not count old files."""
    folder = multiproc_dir()
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for f in folder.glob("*.db"):
        f.unlink(missing_ok=True)


def child_exited(pid: int) -> None:
    """Drop a dead pool child's live gauges (its counters stay counted)."""
    if multiproc_dir() is not None:
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def registry(outstanding: Callable[[], int] | None = None) -> CollectorRegistry:
    """The registry the endpoint serves: every process's values, plus the outstanding gauge."""
    if multiproc_dir() is not None:
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg)  # type: ignore[no-untyped-call]
    else:
        reg = CollectorRegistry()
        reg.register(_Forward(REGISTRY))
    if outstanding is not None:
        reg.register(OutstandingCollector(outstanding))
    return reg


class _Forward(Collector):
    """Serve the default registry's metrics through another registry."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return self._source.collect()
