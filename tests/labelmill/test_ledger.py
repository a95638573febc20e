"""The ledger against a real Redis: exact counters, exactly-once completion."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace

import pytest

from labelmill.errors import JobNotFound, LedgerUnavailable
from labelmill.job import JobSpec, JobState, Ledger, Position
from labelmill.job.record import Tally
from labelmill.job.status import write_manifest
from tests.fixtures.procs import wait_until
from tests.memory_storage import memory_storage

pytestmark = pytest.mark.integration


def _t(ok: int = 0, *, weights: str | None = None, **errors: int) -> Tally:
    """A batch's tally: ``ok`` images classified, the others failed by kind."""
    return Tally(ok, Counter(errors), weights)


def _spec(job_id: str = "j1") -> JobSpec:
    return JobSpec(job_id, "s3://in/p/", "s3://out/l", 4, "inception", 2, time.time())


@pytest.fixture
def ledger(redis_url: str) -> Ledger:
    return Ledger.from_url(redis_url, prefix="t", ttl_s=120)


def test_create_is_idempotent_and_resumes(ledger: Ledger) -> None:
    spec, created = ledger.create_job(_spec())
    assert created
    again, created2 = ledger.create_job(_spec())
    assert not created2 and again.input == spec.input
    assert ledger.counts("j1").state == JobState.ENQUEUING
    assert ledger.recent_jobs() == ["j1"]


def test_unknown_job(ledger: Ledger) -> None:
    with pytest.raises(JobNotFound):
        ledger.counts("nope")
    with pytest.raises(JobNotFound):
        ledger.window("nope")


def test_complete_counts_once_and_claims_once(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    for b in range(3):
        ledger.mark_outstanding("j1", b)
    ledger.record_enqueued("j1", Position(3, listed=10, last_key="", images_total=10))
    assert ledger.complete_batch("j1", 0, _t(3, decode=1)) == (True, False)
    # Redelivery: not counted again.
    assert ledger.complete_batch("j1", 0, _t(3, decode=1)) == (False, False)
    assert ledger.finish_enqueue("j1", 3, None) is False
    assert ledger.complete_batch("j1", 1, _t(4, weights="random:seed=1")) == (True, False)
    assert ledger.complete_batch("j1", 2, _t(dead=2)) == (True, True)
    assert ledger.complete_batch("j1", 2, _t(dead=2)) == (False, False)
    c = ledger.counts("j1")
    assert (c.images_ok, c.images_error, c.batches_done, c.batches_dead) == (7, 3, 3, 1)
    assert c.errors == {"decode": 1, "dead": 2}
    assert c.model_weights == "random:seed=1"
    assert ledger.r.zcard("t:outstanding") == 0
    assert ledger.dead_batches("j1") == [2]


def test_finish_enqueue_claims_when_batches_already_done(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    ledger.complete_batch("j1", 0, _t(1))
    assert (
        ledger.finish_enqueue("j1", 1, Position(1, listed=1, last_key="", images_total=1)) is True
    )
    assert ledger.counts("j1").state == JobState.RUNNING
    ledger.mark_done("j1")
    assert ledger.counts("j1").state == JobState.DONE
    assert 0 < ledger.r.ttl("t:job:j1") <= 120


def test_empty_job_completes_at_enqueue(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    assert ledger.finish_enqueue("j1", 0, None) is True


def test_racing_completions_claim_exactly_once(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    n = 40
    ledger.finish_enqueue("j1", n, None)
    claims: list[bool] = []
    lock = threading.Lock()

    def work(b: int) -> None:
        for _ in range(2):  # every batch delivered twice
            _counted, claimed = ledger.complete_batch("j1", b, _t(1))
            with lock:
                claims.append(claimed)

    threads = [threading.Thread(target=work, args=(b,)) for b in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert claims.count(True) == 1
    assert ledger.counts("j1").images_ok == n


def test_window_and_cancel(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    for b in range(5):
        ledger.mark_outstanding("j1", b)
    ledger.mark_outstanding("other", 0)
    ledger.record_enqueued("j1", Position(5, listed=5, last_key="", images_total=5))
    ledger.complete_batch("j1", 0, _t(1))
    assert ledger.window("j1") == ("enqueuing", 4)
    assert sorted(ledger.outstanding_batches("j1")) == [1, 2, 3, 4]
    assert ledger.cancel("j1") == 4
    assert ledger.window("j1")[0] == "cancelled"
    assert ledger.r.zrange("t:outstanding", 0, -1) == ["other:0"]
    # A cancelled job never completes.
    assert ledger.finish_enqueue("j1", 5, None) is False


def test_reopen_dead_undoes_counts_once(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    ledger.finish_enqueue("j1", 2, None)
    ledger.complete_batch("j1", 0, _t(4))
    ledger.complete_batch("j1", 1, _t(dead=3))
    ledger.mark_done("j1")
    assert ledger.reopen_dead("j1", 1, 3) is True
    assert ledger.reopen_dead("j1", 1, 3) is False
    c = ledger.counts("j1")
    assert c.state == JobState.RUNNING
    assert (c.images_error, c.batches_done, c.batches_dead, c.errors) == (0, 1, 0, {})
    assert ledger.complete_batch("j1", 1, _t(3)) == (True, True)


def test_reset_counts_rebuilds_from_storage_view(ledger: Ledger) -> None:
    ledger.restore_job(_spec())
    ledger.reset_counts(
        "j1",
        done_batches={0: _t(3, decode=1), 2: _t(dead=4)},
    )
    c = ledger.counts("j1")
    assert (c.images_ok, c.images_error, c.batches_done, c.batches_dead) == (3, 5, 2, 1)
    assert ledger.is_done("j1", 2) and not ledger.is_done("j1", 1)
    assert ledger.finish_enqueue("j1", 3, None) is False
    ledger.complete_batch("j1", 1, _t(4))
    assert ledger.counts("j1").state == JobState.RUNNING


def test_unreachable_redis_is_a_service_error() -> None:
    ledger = Ledger.from_url("redis://127.0.0.1:1/0")
    with pytest.raises(LedgerUnavailable):
        ledger.ping()


def test_a_lost_reply_does_not_lose_the_manifest_claim(ledger: Ledger) -> None:
    """The same delivery retrying after a lost reply keeps its claim; a copy does not."""
    ledger.create_job(_spec())
    ledger.finish_enqueue("j1", 1, None)
    assert ledger.complete_batch("j1", 0, _t(1), token="delivery-a") == (True, True)
    # Redis died before the reply: the worker retries the same call.
    assert ledger.complete_batch("j1", 0, _t(1), token="delivery-a") == (False, True)
    # Another copy of the batch never gets it.
    assert ledger.complete_batch("j1", 0, _t(1), token="delivery-b") == (False, False)
    assert ledger.counts("j1").images_ok == 1


def test_the_first_pin_wins_for_the_whole_job(ledger: Ledger) -> None:
    unpinned = replace(_spec(), model_version=None)
    ledger.create_job(unpinned)
    assert ledger.counts("j1").spec.model_version is None
    assert ledger.begin_batch("j1", 0).spec == unpinned
    assert ledger.pin_model_version("j1", 3) == 3
    # A later batch that found another version gets the pinned one back.
    assert ledger.pin_model_version("j1", 4) == 3
    assert ledger.counts("j1").spec.model_version == 3
    start = ledger.begin_batch("j1", 1).spec
    assert start is not None and start.model_version == 3
    # Resuming the job sees the pin too.
    assert ledger.create_job(unpinned)[0].model_version == 3


def test_a_version_given_at_enqueue_is_the_pin(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    assert ledger.pin_model_version("j1", 7) == 2


def test_a_manifest_claim_is_a_lease_another_may_take_over_once_it_lapses(redis_url: str) -> None:
    held = Ledger.from_url(redis_url, prefix="t", ttl_s=120, lease_s=60)
    brief = Ledger.from_url(redis_url, prefix="t", ttl_s=120, lease_s=0.05)
    held.create_job(_spec())
    held.finish_enqueue("j1", 1, None)
    assert held.take_over_manifest("j1") is False  # not complete: nothing to claim
    assert held.complete_batch("j1", 0, _t(1)) == (True, True)
    finished_at = held.counts("j1").finished_at
    # Its holder is presumed alive for the whole lease: nobody takes it over.
    assert held.lapsed_claims() == [] and held.take_over_manifest("j1") is False
    # A claim with a short lease lapses (the same job, claimed again after a reset).
    held.reset_counts("j1", done_batches={0: _t(1)})
    assert held.counts("j1").finished_at is None
    assert brief.finish_enqueue("j1", 1, None) is True
    wait_until(lambda: brief.lapsed_claims() == ["j1"], timeout=10, what="the lease to lapse")
    assert held.take_over_manifest("j1") is True
    assert held.take_over_manifest("j1") is False  # now held again, for 60 s
    assert held.counts("j1").finished_at is not None
    held.mark_done("j1")
    assert held.lapsed_claims() == [] and held.take_over_manifest("j1") is False
    assert finished_at is not None


def test_the_manifest_has_the_same_bytes_whoever_writes_it_and_when(ledger: Ledger) -> None:
    storage, objects = memory_storage()
    ledger.create_job(_spec())
    ledger.finish_enqueue("j1", 1, Position(1, 5, "s3://in/p/e.jpg", 4, {"not_image_name": 1}))
    assert ledger.complete_batch("j1", 0, _t(3, decode=1)) == (True, True)
    write_manifest(storage, ledger, "j1")
    first = objects.objects["s3://out/l/j1/_manifest.json"]
    write_manifest(storage, ledger, "j1")  # a second writer, later, the job already done
    assert objects.objects["s3://out/l/j1/_manifest.json"] == first


def test_a_batch_is_settled_once_done_and_its_manifest_written(ledger: Ledger) -> None:
    ledger.create_job(_spec())
    for b in range(2):
        ledger.mark_outstanding("j1", b)
    ledger.record_enqueued("j1", Position(2, listed=2, last_key="", images_total=2))
    ledger.finish_enqueue("j1", 2, None)
    assert not ledger.settled("j1", 0)
    ledger.complete_batch("j1", 0, _t(1))
    assert ledger.settled("j1", 0) and not ledger.settled("j1", 1)
    # The last batch claims the manifest: not settled until it is written.
    assert ledger.complete_batch("j1", 1, _t(1)) == (True, True)
    assert not ledger.settled("j1", 1) and not ledger.settled("j1", 0)
    ledger.mark_done("j1")
    assert ledger.settled("j1", 1)
