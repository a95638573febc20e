"""Publishing batches to a real Redis, the way the producer does."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from labelmill.queue import (
    QUEUE,
    TASK,
    batch_priority,
    make_celery,
    pending_batches,
    queue_lists,
    queued_count,
    send_batch,
)
from labelmill.settings import Settings

pytestmark = pytest.mark.integration


def test_batches_reach_the_queue_without_any_declaration(redis_url: str) -> None:
    """An empty Redis (no kombu binding: no worker ever declared the queue) still gets them."""
    app = make_celery(Settings(redis_url=redis_url))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    uris = [f"s3://b/p/{i}.jpg" for i in range(32)]
    with app.producer_or_acquire() as publisher:
        for batch_no in (0, 1):
            send_batch(
                app, job_id="j-1", batch_no=batch_no, uris=uris, model_version=3, producer=publisher
            )
    assert r.llen(QUEUE) == 2
    assert not r.keys("_kombu.binding.*")
    assert pending_batches(r, "j-1") == {0, 1}
    message = json.loads(r.lindex(QUEUE, -1) or "")
    headers = message["headers"]
    assert headers["task"] == TASK
    assert headers["kwargsrepr"] == (
        "{'job_id': 'j-1', 'batch_no': 0, 'uris': '<32 URIs>', 'model_version': 3}"
    )
    app.close()
    r.close()


def test_a_job_s_later_batches_wait_behind_another_job_s_first_ones(redis_url: str) -> None:
    app = make_celery(Settings(redis_url=redis_url))
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    assert [batch_priority(b) for b in (0, 7, 8, 63, 64, 511, 512, 10**6)] == [
        0,
        0,
        3,
        3,
        6,
        6,
        9,
        9,
    ]
    sent = [("j-big", 0), ("j-big", 9), ("j-big", 70), ("j-big", 600), ("j-small", 0)]
    for job_id, batch_no in sent:
        send_batch(app, job_id=job_id, batch_no=batch_no, uris=["s3://b/a.jpg"], model_version=1)
    assert [r.llen(name) for name in queue_lists()] == [2, 1, 1, 1]
    assert queued_count(r) == 5 and pending_batches(r, "j-big") == {0, 9, 70, 600}
    # A worker's BRPOP names the lists in step order (kombu's Channel._brpop_start).
    taken = []
    while popped := r.brpop(queue_lists(), timeout=1):
        message = json.loads(popped[1])
        kwargs = json.loads(base64.b64decode(message["body"]))[1]
        taken.append((kwargs["job_id"], kwargs["batch_no"]))
    assert taken == [("j-big", 0), ("j-small", 0), ("j-big", 9), ("j-big", 70), ("j-big", 600)]
    app.close()
    r.close()
