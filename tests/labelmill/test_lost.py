"""labelmill/lost.py against a real Redis: batches whose message a dying worker took."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from labelmill.job import Batch, JobSpec, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.lost import resend_lost
from labelmill.queue import (
    QUEUE,
    make_celery,
    pending_batches,
    queue_lists,
    queued_tasks,
    send_batch,
)
from labelmill.settings import Settings
from labelmill.storage import Storage
from tests.fixtures.procs import wait_until
from tests.memory_storage import memory_storage

pytestmark = pytest.mark.integration

GAP = 10.0  # what the workers pass: half their sweep interval


@dataclass
class World:
    ledger: Ledger
    app: Celery
    storage: Storage

    def sweep(self, now: float) -> dict[str, list[int]]:
        return resend_lost(
            self.ledger, self.ledger.r, self.app, self.storage, min_gap_s=GAP, now=now
        )


def _batch(n: int) -> Batch:
    uris = [f"s3://in/p/{n:03d}-{i}.jpg" for i in range(2)]
    return Batch(n, uris, [f"etag-{n}-{i}" for i in range(2)], 2 * n + 2, uris[-1])


@pytest.fixture
def world(redis_url: str) -> World:
    ledger = Ledger.from_url(redis_url)
    ledger.r.flushdb()
    storage, _objects = memory_storage()
    return World(ledger, make_celery(Settings(redis_url=redis_url)), storage)


def _job(w: World, job_id: str, *, sent: range, lost: set[int], finished: bool = True) -> None:
    """A job whose batches in ``sent`` were recorded, marked and sent, but ``lost``'s messages."""
    spec = JobSpec(job_id, "s3://in/p/", "s3://out/labels", 2, "inception", 1, time.time())
    w.ledger.create_job(spec)
    batches = [_batch(n) for n in sent]
    tail = Batch(len(sent), [], [], 2 * len(sent), batches[-1].last_key)
    InputLog(JobFolder.of(w.storage, spec)).write([*batches, tail])
    w.ledger.mark_outstanding(job_id, *sent)
    for b in batches:
        if b.batch_no not in lost:
            send_batch(w.app, job_id=job_id, batch_no=b.batch_no, uris=b.uris, model_version=1)
    if finished:
        w.ledger.finish_enqueue(job_id, len(sent), tail.position())
    else:
        w.ledger.record_enqueued(job_id, batches[-1].position())


def test_a_batch_without_a_message_at_two_sweeps_is_sent_again_as_recorded(world: World) -> None:
    w = world
    _job(w, "j1", sent=range(4), lost={2})
    t0 = time.time()
    assert w.sweep(t0) == {}, "one look proves nothing"
    assert w.sweep(t0 + GAP / 2) == {}, "nor two looks too close together"
    assert w.sweep(t0 + GAP) == {"j1": [2]}
    assert pending_batches(w.ledger.r, "j1") == {0, 1, 2, 3}
    [again] = [m for m in queued_tasks(w.ledger.r) if m["batch_no"] == 2]
    recorded = _batch(2)
    assert (again["uris"], again["etags"], again["model_version"]) == (
        recorded.uris,
        recorded.etags,
        1,
    )
    assert w.sweep(t0 + 2 * GAP) == {}, "it has a message again"
    assert w.ledger.r.hlen(w.ledger.missing_key) == 0


def test_a_message_that_turns_up_between_sweeps_is_not_sent_twice(world: World) -> None:
    w = world
    _job(w, "j1", sent=range(3), lost={1})
    t0 = time.time()
    assert w.sweep(t0) == {}
    # It was only on its way (between the queue and the unacked hash).
    send_batch(w.app, job_id="j1", batch_no=1, uris=_batch(1).uris, model_version=1)
    assert w.sweep(t0 + GAP) == {}
    assert sum(1 for m in queued_tasks(w.ledger.r) if m["batch_no"] == 1) == 1


def test_held_done_and_unsent_batches_are_not_lost(world: World) -> None:
    w = world
    # j1: batch 1 is done (acknowledged, not yet out of the outstanding set).
    _job(w, "j1", sent=range(3), lost={1})
    # j2 is still enqueuing: it recorded batches 0-1 as sent, and marked 2-3
    # without sending them (a dead producer's: labelmill/orphans.py drops them).
    _job(w, "j2", sent=range(2), lost=set(), finished=False)
    w.ledger.mark_outstanding("j2", 2, 3)
    w.ledger.r.setbit(w.ledger.keys("j1").done, 1, 1)
    # j3 lost one, so that the sweep reads the messages.
    _job(w, "j3", sent=range(2), lost={0})
    # A live consumer holds one of the messages: delivered, unacknowledged
    # (closing its channel would put it back).
    with w.app.connection_for_read() as conn:
        assert conn.default_channel.basic_get(QUEUE, no_ack=False) is not None
        assert w.ledger.r.hlen("unacked") == 1
        t0 = time.time()
        assert w.sweep(t0) == {}
        assert w.sweep(t0 + GAP) == {"j3": [0]}
    assert w.ledger.r.hlen(w.ledger.missing_key) == 0


class CountingRedis:
    """A Redis client that records which commands were called on it."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self.client, name)


def test_the_messages_are_not_read_while_every_unfinished_batch_can_have_one(
    world: World,
) -> None:
    w = world
    # Batch 1's message went twice (a retry) and batch 2's was lost: as many
    # messages as unfinished batches, so the loss hides until 0 and 1 are done.
    _job(w, "j1", sent=range(3), lost={2})
    send_batch(w.app, job_id="j1", batch_no=1, uris=_batch(1).uris, model_version=1)
    broker = CountingRedis(w.ledger.r)
    t0 = time.time()
    for t in (t0, t0 + GAP):
        assert resend_lost(w.ledger, broker, w.app, w.storage, min_gap_s=GAP, now=t) == {}  # type: ignore[arg-type]
    assert "hgetall" not in broker.calls and "lrange" not in broker.calls
    # 0 and 1 run and are acknowledged: their messages are gone.
    w.ledger.r.setbit(w.ledger.keys("j1").done, 0, 1)
    w.ledger.r.setbit(w.ledger.keys("j1").done, 1, 1)
    w.ledger.r.delete(*queue_lists())
    assert w.sweep(t0 + 2 * GAP) == {}
    assert w.sweep(t0 + 3 * GAP) == {"j1": [2]}


def test_one_worker_claims_each_round(world: World) -> None:
    ledger = world.ledger
    assert ledger.claim_sweep("cleanup", 0.5)
    assert not ledger.claim_sweep("cleanup", 0.5), "a second worker in the same round"

    def lapsed() -> bool:
        return ledger.r.exists(f"{ledger.p}:sweep:cleanup") == 0

    wait_until(lapsed, timeout=10, what="the round's claim to lapse")
    assert ledger.claim_sweep("cleanup", 0.5), "the next round"
