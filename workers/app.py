"""The Celery application of the worker tier: ``celery -A workers worker -Q classify``.

Settings are read once here, at start-up, from ``LABELMILL_*`` variables. Each
pool process builds its own clients (gRPC channel, boto3, Redis) after the
fork, once, and reuses them for every batch.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_shutdown

from labelmill.errors import TransientError
from labelmill.job import Ledger
from labelmill.model_client import ModelClient
from labelmill.queue import TASK, make_celery
from labelmill.settings import Settings
from labelmill.storage import Storage
from workers import signals
from workers.batch import Outcome, Services, run_batch
from workers.budget import process_budget

log = logging.getLogger(__name__)

settings = Settings()
app = make_celery(settings)
app.conf.worker_consumer = "workers.consumer:Consumer"
signals.connect(settings)  # metrics endpoint, heartbeat, visibility, orphan sweep

_services: Services | None = None
_services_pid: int | None = None
_lock = threading.Lock()
# Pool processes of this worker (-c), set in the main process before the pool
# forks; each process budgets its share of the worker's memory budget.
_pool_processes = 1


@worker_init.connect
def _pool_size(sender: Any = None, **_: Any) -> None:
    global _pool_processes
    _pool_processes = int(getattr(sender, "concurrency", None) or 1)


def services() -> Services:
    """This process's clients, created on first use after the fork."""
    global _services, _services_pid
    with _lock:
        if _services is None or _services_pid != os.getpid():
            _services = Services(
                settings=settings,
                storage=Storage(settings),
                ledger=Ledger.from_url(
                    settings.redis_url, prefix=settings.key_prefix, ttl_s=settings.ledger_ttl_s
                ),
                model=ModelClient(
                    settings.model_server,
                    settings.model_name,
                    timeout_s=settings.model_timeout_s,
                    retry_budget_s=min(30.0, settings.retry_budget_s),
                ),
                memory=process_budget(settings.memory_budget_mb, _pool_processes),
            )
            _services_pid = os.getpid()
        return _services


@app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def classify_batch(
    job_id: str, batch_no: int, uris: list[str], model_version: int | None = None
) -> dict[str, Any]:
    """Classify one batch of images and write its part file (idempotent)."""
    try:
        outcome: Outcome = run_batch(
            services(), job_id=job_id, batch_no=batch_no, uris=uris, model_version=model_version
        )
    except TransientError as exc:
        # Redis or the output store stayed down past the retry budget: hand the
        # message back rather than lose it (the delivery count bounds this).
        log.error("job %s batch %d: %s; message requeued", job_id, batch_no, exc)
        raise Reject(str(exc), requeue=True) from exc
    return {"status": outcome.status, "ok": outcome.ok, "errors": outcome.errors}


@worker_process_shutdown.connect
def _close(**_: Any) -> None:
    if _services is not None and _services_pid == os.getpid():
        _services.close()
