"""The Celery application both sides share: broker settings and the task's name.

The producer only sends tasks by name (it never imports ``workers``); the
workers register the task under the same name on an app built here.
"""

from __future__ import annotations

from collections.abc import Sequence

from celery import Celery
from kombu import Producer, Queue

from labelmill.settings import Settings

QUEUE = "classify"
TASK = "workers.classify_batch"


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for at-least-once delivery with idempotent effects."""
    app = Celery("labelmill", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        task_queues=[Queue(QUEUE, routing_key=QUEUE)],
        task_routes={TASK: {"queue": QUEUE}},
        # JSON only: a pickled message is refused, never executed.
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        # At-least-once: ack after the work, requeue if the worker dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Unacked messages come back after this many seconds; well above the
        # longest batch (its retry budget included). Only a running consumer
        # brings them back: each worker sweeps the unacked index at start-up
        # and then every `unacked_restore_interval` seconds (kombu's default
        # sweep is only every interval x throttle = 100 s). A message is thus
        # redelivered between visibility_timeout and visibility_timeout +
        # restore_interval_s after its worker died.
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        # Warm shutdown first; past this the running task is requeued.
        worker_soft_shutdown_timeout=60.0,
        worker_enable_soft_shutdown_on_idle=True,
        worker_send_task_events=True,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_max_memory_per_child=None,
    )
    return app


def send_batch(
    app: Celery,
    *,
    job_id: str,
    batch_no: int,
    uris: Sequence[str],
    model_version: int,
    producer: Producer | None = None,
) -> None:
    """Publish one batch: a message of URIs, never image bytes."""
    app.send_task(
        TASK,
        kwargs={
            "job_id": job_id,
            "batch_no": batch_no,
            "uris": list(uris),
            "model_version": model_version,
        },
        queue=QUEUE,
        producer=producer,
    )
