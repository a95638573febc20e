"""Prometheus metrics for the worker: images by outcome, stage latencies."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

IMAGES = Counter(
    "labelmill_images", "Images finished, by status and error kind", ["status", "kind"]
)
BATCHES = Counter("labelmill_batches", "Batches finished")
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


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time a stage of the batch into ``labelmill_stage_seconds{stage=name}``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        STAGE_SECONDS.labels(stage=name).observe(time.perf_counter() - t0)


def record_batch(*, ok: int, errors: Mapping[str, int], seconds: float) -> None:
    BATCHES.inc()
    BATCH_SECONDS.observe(seconds)
    if ok:
        IMAGES.labels(status="ok", kind="").inc(ok)
    for kind, n in errors.items():
        IMAGES.labels(status="error", kind=kind).inc(n)
