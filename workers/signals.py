"""Celery signal hooks: metrics endpoint, liveness heartbeat, requeue counting.

Kept out of the task body (dramatiq keeps such concerns in middleware):

- ``celeryd_init`` (main process, before the pool forks): empty the
  prometheus multiprocess folder, so a restarted container does not add its
  previous life's files to the new counts.
- ``worker_ready`` (main process, pool and consumer started): touch the
  heartbeat file, start the thread that keeps the messages this worker holds
  from being redelivered (``workers.visibility``) and, when
  ``LABELMILL_METRICS_PORT`` is set, start the Prometheus endpoint; and the
  sweep that cleans up after dead producers and workers (``start_sweeper``).
  Starting them here, after the fork, keeps these threads in the main
  process only; pool children write their metric values to the
  multiprocess folder and the endpoint sums them.
- ``heartbeat_sent`` (main process, every couple of seconds while the
  consumer is connected to the broker): touch the heartbeat file. The
  Kubernetes probes run ``python -m workers.signals --max-age S``, which
  fails when the file is older than S seconds: a worker whose event loop is
  stuck or whose consumer cannot reach Redis stops touching it. That costs
  one ``stat``, where ``celery inspect ping`` would cost a broadcast
  round-trip through Redis per probe per pod.
- ``task_postrun`` (pool child): count batches handed back with ``Reject``.
- ``worker_process_shutdown`` (pool child): drop the child's live gauges.

``workers.metrics`` is imported inside the handlers, not at the top: the
probe (``python -m workers.signals``) runs every few seconds in a fresh
process and must not create value files in the multiprocess folder.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery.signals import (
    celeryd_init,
    heartbeat_sent,
    task_postrun,
    worker_process_shutdown,
    worker_ready,
)

if TYPE_CHECKING:
    from celery import Celery

    from labelmill.settings import Settings

log = logging.getLogger(__name__)

HEARTBEAT_FILE = Path(tempfile.gettempdir()) / "labelmill-worker.heartbeat"


def touch_heartbeat(path: Path = HEARTBEAT_FILE) -> None:
    """Record that the worker's main loop is alive (mtime = now)."""
    try:
        path.touch()
        os.utime(path)
    except OSError as exc:  # a full or read-only /tmp must not stop the worker
        log.warning("heartbeat %s: %s", path, exc)


def heartbeat_age(path: Path = HEARTBEAT_FILE, *, now: float | None = None) -> float | None:
    """Seconds since the last heartbeat, or None when there was none."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


def start_metrics_server(port: int, redis_url: str, key_prefix: str) -> None:
    """Serve every pool process's metrics plus the outstanding gauge on ``port``."""
    import redis
    from prometheus_client import start_http_server

    from labelmill.job import Ledger
    from workers import metrics

    # Short deadlines: a scrape must not hang on a Redis outage.
    client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
    ledger = Ledger(client, prefix=key_prefix)

    start_http_server(port, addr="0.0.0.0", registry=metrics.registry(ledger.outstanding_total))
    log.info("metrics on :%d/metrics", port)


@celeryd_init.connect
def _reset_metrics(**_: Any) -> None:
    from workers import metrics

    metrics.reset_multiproc_dir()


def connect(settings: Settings, app: Celery) -> None:
    """Connect the hooks that need the worker's settings and app (``workers.app`` calls this)."""

    def ready(**_: Any) -> None:
        _ready(settings, app)

    worker_ready.connect(ready, weak=False)


def _ready(settings: Settings, app: Celery) -> None:
    touch_heartbeat()
    if settings.metrics_port is not None:
        try:
            start_metrics_server(settings.metrics_port, settings.redis_url, settings.key_prefix)
        except OSError as exc:  # port taken: run without metrics rather than not at all
            log.error("metrics endpoint on :%d: %s", settings.metrics_port, exc)
    start_visibility_refresher(settings.redis_url, settings.visibility_timeout_s)
    start_sweeper(settings, app)


def start_sweeper(settings: Settings, app: Celery) -> None:
    """Clean up after the dead, in a thread of the main process.

    Every ``sweep_interval_s`` one worker (whichever claims the round) drops
    what dead producers marked but never sent (labelmill/orphans.py), writes
    the manifest of a complete job whose claimant died before it did
    (``labelmill.job.status.close_abandoned``), and sends again the batches
    whose message a dead worker took with it (labelmill/lost.py).
    """
    import threading

    import redis

    from labelmill.errors import LabelmillError
    from labelmill.job import Ledger
    from labelmill.job.status import close_abandoned
    from labelmill.lost import resend_lost
    from labelmill.orphans import drop_orphans
    from labelmill.storage import Storage

    ledger = Ledger.from_settings(settings)
    storage = Storage(settings)
    broker = redis.Redis.from_url(settings.redis_url, decode_responses=True, socket_timeout=10)

    every = settings.sweep_interval_s

    def sweep() -> None:
        drop_orphans(ledger, broker)
        for job_id in close_abandoned(storage, ledger):
            log.warning("job %s: its manifest was claimed, not written; written now", job_id)
        # Rounds are at least 0.9 x every apart: a batch missing at two is lost.
        resend_lost(ledger, broker, app, storage, min_gap_s=every / 2)

    def loop() -> None:
        while True:
            try:
                # A little less than the interval: the next round is claimable
                # when the workers' clocks (their sleeps) come round to it.
                if ledger.claim_sweep("cleanup", every * 0.9):
                    sweep()
            except (LabelmillError, redis.RedisError) as exc:  # Redis or S3 down: next round
                log.warning("sweep: %s", exc)
            except Exception:  # a bug or a message nobody expected: never end the thread
                log.exception("sweep failed; trying again next round")
            time.sleep(every)

    threading.Thread(target=loop, name="orphans", daemon=True).start()


def start_visibility_refresher(redis_url: str, visibility_timeout_s: float) -> None:
    """Keep this worker's held messages from being redelivered (workers/visibility.py)."""
    import redis

    from workers.visibility import VisibilityRefresher

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    # Four refreshes per timeout: one lost to a Redis hiccup costs nothing.
    VisibilityRefresher(client, every_s=visibility_timeout_s / 4).start()


@heartbeat_sent.connect
def _heartbeat(**_: Any) -> None:
    touch_heartbeat()


@task_postrun.connect
def _count_requeue(state: str | None = None, **_: Any) -> None:
    if state == "REJECTED":
        from workers import metrics

        metrics.REQUEUES.inc()


@worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: Any) -> None:
    from workers import metrics

    metrics.child_exited(pid or os.getpid())


def main(argv: list[str] | None = None) -> int:
    """Probe: exit 0 if the heartbeat is younger than ``--max-age`` seconds, else 1."""
    parser = argparse.ArgumentParser(prog="python -m workers.signals", description=main.__doc__)
    parser.add_argument("--max-age", type=float, required=True)
    parser.add_argument("--file", type=Path, default=HEARTBEAT_FILE)
    args = parser.parse_args(argv)
    age = heartbeat_age(args.file)
    if age is None:
        print(f"no heartbeat at {args.file}: worker not ready", file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"heartbeat {age:.0f}s old (limit {args.max_age:.0f}s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
