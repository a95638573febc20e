"""The Celery application of the worker tier: ``celery -A workers worker -Q classify``.

:func:`create_app` builds it from one settings object; ``workers.app`` (the
attribute Celery's ``-A workers`` looks up) builds it on first use from
``LABELMILL_*`` variables. Each pool process builds its own clients (gRPC
channel, boto3, Redis) after the fork, once, and reuses them for every batch.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import cached_property
from typing import Any

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_init, worker_process_shutdown

from labelmill.errors import TransientError
from labelmill.job import Ledger
from labelmill.model_client import ModelClient
from labelmill.queue import TASK, make_celery
from labelmill.settings import Settings
from labelmill.storage import Storage
from workers import shutdown, signals
from workers.batch import Outcome, Services, run_batch
from workers.budget import process_budget, tune_malloc

log = logging.getLogger(__name__)


class ProcessServices:
    """This process's clients, created on first use after the fork."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._services: Services | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()
        # Pool processes of this worker (-c), set in the main process before
        # the pool forks; each process budgets its share of the memory budget.
        self.pool_processes = 1

    def get(self) -> Services:
        s = self.settings
        with self._lock:
            if self._services is None or self._pid != os.getpid():
                self._services = Services(
                    settings=s,
                    storage=Storage(s),
                    ledger=Ledger.from_settings(s),
                    model=ModelClient(s.model_server, s.model_name, timeout_s=s.model_timeout_s),
                    memory=process_budget(s.memory_budget_mb, self.pool_processes),
                )
                self._pid = os.getpid()
            return self._services

    def close(self) -> None:
        if self._services is not None and self._pid == os.getpid():
            self._services.close()


class WorkerApp(Celery):
    """Celery, whose ``celery worker`` ends its soft shutdown when the running batches do."""

    settings: Settings

    @cached_property
    def Worker(self) -> type:  # Celery's name for it
        return self.subclass_with_self(shutdown.Worker, labelmill_settings=self.settings)


def create_app(settings: Settings) -> Celery:
    """The worker tier's Celery app, its task and its signal hooks."""
    tune_malloc()  # before Celery starts threads or forks its pool
    app = make_celery(settings, WorkerApp)
    app.settings = settings
    app.conf.worker_consumer = "workers.consumer:Consumer"
    signals.connect(settings, app)  # metrics endpoint, heartbeat, visibility, sweeps
    services = ProcessServices(settings)

    def pool_size(sender: Any = None, **_: Any) -> None:
        services.pool_processes = int(getattr(sender, "concurrency", None) or 1)

    def close(**_: Any) -> None:
        services.close()

    worker_init.connect(pool_size, weak=False)
    worker_process_shutdown.connect(close, weak=False)

    @app.task(name=TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def classify_batch(
        job_id: str,
        batch_no: int,
        uris: list[str],
        model_version: int | None = None,
        etags: list[str | None] | None = None,
    ) -> dict[str, Any]:
        """Classify one batch of images and write its part file (idempotent).

        ``etags``: what the listing saw of each object; messages from before
        it existed have none, and their objects are read unconditionally.
        """
        try:
            outcome: Outcome = run_batch(
                services.get(),
                job_id=job_id,
                batch_no=batch_no,
                uris=uris,
                model_version=model_version,
                etags=etags,
            )
        except TransientError as exc:
            # Redis or the output store stayed down past the retry budget: hand
            # the message back rather than lose it (the delivery count bounds this).
            log.error("job %s batch %d: %s; message requeued", job_id, batch_no, exc)
            raise Reject(str(exc), requeue=True) from exc
        return {"status": outcome.status, "ok": outcome.ok, "errors": outcome.errors}

    return app
