"""The worker's soft shutdown: Celery's, but over as soon as the running batches are.

Kubernetes stops a worker pod with SIGTERM, which the Deployment remaps to
Celery's cold shutdown (``REMAP_SIGTERM=SIGQUIT``, k8s/40-workers.yaml). The
cold shutdown first gives the running tasks ``worker_soft_shutdown_timeout``
(60 s, labelmill/queue.py) to finish, then cancels what still runs and
requeues its message. Celery spends that time in one ``sleep`` inside the
main process's signal handler (celery/worker/worker.py:
``WorkController.wait_for_soft_shutdown``; celery#9505): a worker whose batch
ends two seconds after the signal still holds its pod, its CPU and memory
requests, for the whole minute.

The pool's results cannot be read meanwhile (the event loop that reads them
is the one waiting), but the ledger says when a batch is over: counted done,
and no manifest of its job still being written. :class:`Worker` waits the
same timeout at most, and looks every half second; once each running batch
is over, Celery's cold shutdown goes on at once. As with Celery's own wait,
the finished batch's message is requeued, unacked, when the worker closes
its channel; its next delivery finds the batch done and skips it.

A running task that is not a labelmill batch, or a ledger that never
answers, gets Celery's behaviour: the whole timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.apps.worker import Worker as CeleryWorker
from celery.worker import state

from labelmill.job import Ledger
from labelmill.settings import Settings

log = logging.getLogger(__name__)

POLL_S = 0.5

Batch = tuple[str, int]


def request_batch(request: Any) -> Batch | None:
    """The (job, batch number) a running task works on; None when it is no labelmill batch."""
    kwargs = getattr(request, "kwargs", None) or {}
    job_id, batch_no = kwargs.get("job_id"), kwargs.get("batch_no")
    if isinstance(job_id, str) and isinstance(batch_no, int):
        return job_id, batch_no
    return None


def wait_until_over(
    batches: list[Batch | None],
    settled: Callable[[str, int], bool],
    timeout_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Wait until every batch is ``settled``, at most ``timeout_s``; whether they all were.

    A ``None`` (a task that is no batch) is never over: it waits the timeout
    out, as Celery does. ``settled`` raising (Redis away) counts as not yet:
    the next look may get an answer.
    """
    deadline = clock() + timeout_s
    left = list(batches)
    failed = False
    while True:
        try:
            left = [b for b in left if b is None or not settled(*b)]
        except Exception as exc:  # in a signal handler: nothing may escape
            if not failed:
                log.warning("soft shutdown: cannot read the ledger (%r); trying again", exc)
            failed = True
        if not left:
            return True
        remaining = deadline - clock()
        if remaining <= 0:
            return False
        if None in left:
            sleep(remaining)
            return False
        sleep(min(POLL_S, remaining))


class Worker(CeleryWorker):
    """``celery worker``'s worker, with the soft shutdown described above.

    ``labelmill_settings`` is set by the app (``workers.app.WorkerApp``).
    """

    labelmill_settings: Settings

    def wait_for_soft_shutdown(self) -> None:  # type: ignore[override] # Celery's returns None
        timeout_s = float(self.app.conf.worker_soft_shutdown_timeout or 0)
        running = tuple(state.active_requests)
        if timeout_s <= 0 or not running:
            super().wait_for_soft_shutdown()  # Celery's: no wait, or its wait on idle
            return
        log.warning(
            "soft shutdown: waiting up to %gs for %d running batch(es) to finish",
            timeout_s,
            len(running),
        )
        ledger = Ledger.from_settings(self.labelmill_settings)  # connects on first use
        started = time.monotonic()
        if wait_until_over([request_batch(r) for r in running], ledger.settled, timeout_s):
            log.warning("soft shutdown: the running batches finished in %.1fs",
                        time.monotonic() - started)  # fmt: skip
        else:
            log.warning("soft shutdown: timed out; what still runs is requeued")
