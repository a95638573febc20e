"""The Celery application both sides share: broker settings and the task's name.

The producer only sends tasks by name (it never imports ``workers``); the
workers register the task under the same name on an app built here.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

import redis
from celery import Celery
from kombu import Producer, Queue

from labelmill.settings import Settings

AppT = TypeVar("AppT", bound=Celery)

QUEUE = "classify"
TASK = "workers.classify_batch"
# kombu's hash of delivered, unacknowledged messages (Channel.unacked_key).
UNACKED = "unacked"

# Jobs share the queue fairly by priority. kombu's Redis transport keeps one
# list per priority step (kombu/transport/redis.py: PRIORITY_STEPS = [0, 3, 6,
# 9], Channel._q_for_pri names them "classify", "classify\x06\x163", ...) and a
# worker's BRPOP names them in that order (Channel._brpop_start), so a message
# of a lower step is taken first, FIFO within a step. A job's first batches
# get step 0, its later ones ever lower steps (_PRIORITY_FROM): a job enqueued
# behind a long one starts within a few batches and, if short, ends long
# before it; two long jobs share the workers in the order they were sent.
PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_FROM = ((512, 9), (64, 6), (8, 3))  # (first batch number, step)
_SEP = "\x06\x16"  # kombu's Channel.sep


def batch_priority(batch_no: int) -> int:
    """The priority step of a job's batch ``batch_no`` (0 is served first)."""
    return next((step for first, step in _PRIORITY_FROM if batch_no >= first), 0)


def queue_lists() -> list[str]:
    """The Redis lists that hold the queue, one per priority step, served in this order."""
    return [QUEUE if step == 0 else f"{QUEUE}{_SEP}{step}" for step in PRIORITY_STEPS]


def queued_count(client: redis.Redis, *, unacked: bool = False) -> int:
    """Messages waiting in the queue, every priority step together.

    With ``unacked``, also those delivered and not yet acknowledged: every
    classify message that exists.
    """
    pipe = client.pipeline(transaction=False)
    for name in queue_lists():
        pipe.llen(name)
    if unacked:
        pipe.hlen(UNACKED)
    return sum(int(n) for n in pipe.execute())


def make_celery(settings: Settings, cls: type[AppT] = Celery) -> AppT:  # type: ignore[assignment]
    """A Celery app (of ``cls``) configured for at-least-once delivery with idempotent effects."""
    app = cls("labelmill", broker=settings.redis_url, set_as_current=False)
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
        # Unacked messages come back this many seconds after they were last
        # refreshed: live workers refresh the ones they hold every quarter of
        # it (workers/visibility.py), so only a dead worker's come back. Only a
        # running consumer brings them back: each worker sweeps the unacked
        # index at start-up and then every `unacked_restore_interval` seconds
        # (kombu's default sweep is only every interval x throttle = 100 s).
        # A dead worker's message is thus redelivered within visibility_timeout
        # + visibility_timeout / 4 + restore_interval_s of its death (85 s).
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.restore_interval_s,
            "unacked_restore_throttle": 1,
            "socket_timeout": 10,
            "socket_connect_timeout": 5,
        },
        broker_connection_retry_on_startup=True,
        # Warm shutdown first; past this the running task is requeued. The
        # worker tier ends the wait once its running batches are over
        # (workers/shutdown.py): Celery's own sleeps the whole timeout.
        worker_soft_shutdown_timeout=60.0,
        # An idle worker exits at once. Celery's soft shutdown sleeps the
        # whole timeout whenever it runs (celery/worker/worker.py:
        # WorkController.wait_for_soft_shutdown); run on idle, it only held
        # an idle pod for a minute on every scale-in. Celery's reason to wait
        # on idle is reserved ETA tasks, and labelmill sends none.
        worker_enable_soft_shutdown_on_idle=False,
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
    model_version: int | None,
    etags: Sequence[str | None] | None = None,
    producer: Producer | None = None,
) -> None:
    """Publish one batch: a message of URIs (and their listed ETags), never image bytes.

    ``model_version`` None: the job's version is not pinned yet; the worker
    reads (or makes) the pin in the ledger.

    Two things Celery would do per message are skipped, because they were
    most of the producer's cost per batch (bench/enqueue.py):

    - the repr of the keyword arguments (32 URIs through ``saferepr``, shown
      by Flower): a short one is given instead;
    - declaring the queue (kombu binds a copy of it each time): the message
      goes to Celery's anonymous direct exchange, which on Redis is a push
      onto the list named by the routing key, so no binding is consulted.
      Workers declare the queue they consume.
    """
    summary = {
        "job_id": job_id,
        "batch_no": batch_no,
        "uris": f"<{len(uris)} URIs>",
        "model_version": model_version,
    }
    app.send_task(
        TASK,
        kwargs={
            "job_id": job_id,
            "batch_no": batch_no,
            "uris": list(uris),
            "model_version": model_version,
            **({"etags": list(etags)} if etags is not None else {}),
        },
        queue=QUEUE,
        priority=batch_priority(batch_no),
        producer=producer,
        argsrepr="()",
        kwargsrepr=repr(summary),
        declare=[],
    )


def broker_client(app: Celery) -> redis.Redis:
    """A Redis client on ``app``'s broker, where kombu keeps the queue and unacked messages."""
    return redis.Redis.from_url(
        str(app.conf.broker_url), decode_responses=True, socket_timeout=10, socket_connect_timeout=5
    )


def pending_batches(client: redis.Redis, job_id: str) -> set[int]:
    """Batch numbers of ``job_id`` that have a message: queued, or delivered and unacked.

    `producer retry` tells a batch still on its way from one whose message
    was lost (see :func:`pending_messages`).
    """
    return {b for j, b in pending_messages(client) if j == job_id}


def pending_messages(client: redis.Redis) -> set[tuple[str, int]]:
    """(job, batch) of every classify message: queued, or delivered and unacked.

    Reads kombu's Redis layout: the queue lists, and the ``unacked`` hash
    where a delivered message stays until it is acknowledged. A batch in
    neither lost its message (``labelmill.lost``). The two are read one after
    the other, not atomically: a message moving from the queue to the hash
    in that instant is in neither, so one look proves nothing.
    """
    raw = cast(dict[str, str], client.hgetall(UNACKED))
    unacked = (
        _task_kwargs(message[0])
        for value in raw.values()
        if isinstance(message := json.loads(value), list) and message
    )
    return {
        (kwargs["job_id"], kwargs["batch_no"])
        for kwargs in itertools.chain(queued_tasks(client), unacked)
        if kwargs
        and isinstance(kwargs.get("job_id"), str)
        and isinstance(kwargs.get("batch_no"), int)
    }


def queued_tasks(client: redis.Redis, *, chunk: int = 1000) -> Iterator[dict[str, Any]]:
    """The keyword arguments of each classify message waiting in the queue (every step)."""
    for name in queue_lists():
        start = 0
        while True:
            items = cast(list[str], client.lrange(name, start, start + chunk - 1))
            for item in items:
                kwargs = _task_kwargs(json.loads(item))
                if kwargs is not None:
                    yield kwargs
            if len(items) < chunk:
                break
            start += chunk


def _task_kwargs(message: dict[str, Any]) -> dict[str, Any] | None:
    """The keyword arguments of a Celery (protocol 2) task message, or None."""
    if not isinstance(message, dict) or message.get("headers", {}).get("task") != TASK:
        return None
    body = message.get("body", "")
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    try:
        _args, kwargs, _embed = json.loads(body)
    except (ValueError, TypeError):
        return None
    return kwargs if isinstance(kwargs, dict) else None
