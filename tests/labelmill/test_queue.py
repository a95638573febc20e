"""Publishing batches to a real Redis, the way the producer does."""

from __future__ import annotations

import json

import pytest
import redis

from labelmill.queue import QUEUE, TASK, make_celery, pending_batches, send_batch
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
