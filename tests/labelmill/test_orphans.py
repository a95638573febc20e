"""labelmill/orphans.py against a real Redis: what a dead producer marked but never sent."""

from __future__ import annotations

import time

import pytest

from labelmill.job import JobSpec, Ledger, Position
from labelmill.orphans import drop_orphans
from labelmill.queue import make_celery, send_batch
from labelmill.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def ledger(redis_url: str) -> Ledger:
    ledger = Ledger.from_url(redis_url)
    ledger.r.flushdb()
    return ledger


def _job(ledger: Ledger, job_id: str) -> None:
    ledger.create_job(JobSpec(job_id, "s3://in/p/", "s3://out/l", 4, "inception", 1, time.time()))


def test_a_dead_producer_s_unsent_batches_are_dropped_and_sent_ones_kept(
    ledger: Ledger, redis_url: str
) -> None:
    _job(ledger, "j1")
    app = make_celery(Settings(redis_url=redis_url))
    # Batches 0-1 sent and recorded; 2-4 marked as the next group, 2 sent
    # before the producer died (its message is queued), 3 and 4 not.
    ledger.hold_producer("j1", lease_s=30)
    ledger.mark_outstanding("j1", 0, 1, 2, 3, 4)
    for b in (0, 1, 2):
        send_batch(app, job_id="j1", batch_no=b, uris=[f"s3://in/p/{b}.jpg"], model_version=1)
    ledger.record_enqueued("j1", Position(2, listed=2, last_key="s3://in/p/1.jpg", images_total=2))
    assert drop_orphans(ledger, ledger.r) == {}, "the lease still runs"
    later = time.time() + 60  # the producer stopped renewing a minute ago
    assert drop_orphans(ledger, ledger.r, now=later) == {"j1": [3, 4]}
    assert sorted(ledger.outstanding_batches("j1")) == [0, 1, 2]
    assert drop_orphans(ledger, ledger.r, now=later) == {}, "a job is swept once"


def test_a_live_producer_and_a_finished_enqueue_are_left_alone(ledger: Ledger) -> None:
    _job(ledger, "live")
    ledger.hold_producer("live", lease_s=120)
    ledger.mark_outstanding("live", 0)
    _job(ledger, "over")
    ledger.hold_producer("over", lease_s=30)
    ledger.mark_outstanding("over", 0)
    ledger.finish_enqueue("over", 1, None)
    assert drop_orphans(ledger, ledger.r, now=time.time() + 60) == {}
    assert list(ledger.outstanding_batches("live")) == [0]
    assert list(ledger.outstanding_batches("over")) == [0]
    assert ledger.r.zrange(ledger.producers_key, 0, -1) == ["live"]
