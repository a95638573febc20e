"""The producer's logic in-process, against the real Redis and the real S3 server.

No worker runs here: where a test needs a batch finished, it writes the part
file and counts it in the ledger as a worker does (``JobFolder.write_part``,
``Ledger.complete_batch`` with the records' tally). What is under test is
what ``enqueue``, ``retry``, ``reconcile`` and ``watch`` do with that state.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from celery import Celery

from labelmill.errors import StorageUnavailable
from labelmill.job import JobSpec, JobState, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.record import DEAD, ErrorRecord, Label, ModelInfo, OkRecord, Record, tally
from labelmill.job.status import write_manifest
from labelmill.queue import QUEUE, broker_client, make_celery, pending_batches, queued_tasks
from labelmill.settings import Settings
from labelmill.storage import ObjectInfo, Storage
from labelmill.storage.s3 import S3Objects
from labelmill.storage.uris import Location
from producer import enqueue as enq
from producer import ops
from producer.listing import batch_objects
from producer.watch import watch_json
from tests import images

pytestmark = pytest.mark.integration

BATCH = 3
BUDGET_S = 30.0  # how long the producer waits out an outage here
MODEL = ModelInfo("inception", 1, "random:seed=0")


@dataclass
class Producer:
    storage: Storage
    ledger: Ledger
    app: Celery
    bucket: str

    def enqueue(self, n_images: int, job_id: str = "j-ops") -> enq.EnqueueResult:
        for i in range(n_images):
            self.storage.put(
                f"s3://{self.bucket}/in/img-{i:03d}.jpg", images.jpeg(8, 8, seed=i), root=None
            )
        return enq.enqueue(
            storage=self.storage,
            ledger=self.ledger,
            app=self.app,
            source=f"s3://{self.bucket}/in/",
            output=f"s3://{self.bucket}/out/",
            batch_size=BATCH,
            max_outstanding=100,
            model_name="inception",
            resolve_version=lambda: 1,
            job_id=job_id,
            retry_budget_s=BUDGET_S,
        )

    def retry(self, job_id: str) -> ops.Resent:
        return ops.retry(
            self.storage,
            self.ledger,
            self.app,
            job_id,
            max_outstanding=100,
            retry_budget_s=BUDGET_S,
        )

    def queued(self, job_id: str) -> set[int]:
        return pending_batches(broker_client(self.app), job_id)

    def folder(self, job_id: str) -> JobFolder:
        return JobFolder.of(self.storage, self.ledger.counts(job_id).spec)

    def finish(self, job_id: str, batch_no: int, *, dead: bool = False) -> bool:
        """Write batch ``batch_no``'s part file and count it, as a worker does."""
        uris = self.batch_uris(job_id, batch_no)
        records: list[Record] = [
            ErrorRecord(u, DEAD, "gave up", job_id, batch_no)
            if dead
            else OkRecord(u, None, (Label("cat", 281, 0.9),), MODEL, job_id, batch_no)
            for u in uris
        ]
        self.folder(job_id).write_part(batch_no, records)
        _counted, claimed = self.ledger.complete_batch(job_id, batch_no, tally(records))
        if claimed:  # the last batch counted: its worker writes the manifest
            write_manifest(self.storage, self.ledger, job_id)
        return claimed

    def batch_uris(self, job_id: str, batch_no: int) -> list[str]:
        listing = sorted(o.uri for o in self.storage.list(self.ledger.counts(job_id).spec.input))
        return listing[batch_no * BATCH : (batch_no + 1) * BATCH]


@pytest.fixture
def producer(redis_url: str, s3_bucket: str) -> Iterator[Producer]:
    settings = Settings(redis_url=redis_url)
    app = make_celery(settings)
    yield Producer(Storage(settings), Ledger.from_url(redis_url), app, s3_bucket)
    app.close()


def test_enqueue_records_the_job_sends_every_batch_and_writes_the_spec(producer: Producer) -> None:
    p = producer
    result = p.enqueue(8)
    assert (result.batches_total, result.images_total, result.resumed) == (3, 8, False)
    counts = p.ledger.counts("j-ops")
    assert (counts.state, counts.batches_sent, counts.enqueue_complete) == (
        JobState.RUNNING, 3, True,
    )  # fmt: skip
    assert sorted(p.ledger.outstanding_batches("j-ops")) == [0, 1, 2]
    assert p.queued("j-ops") == {0, 1, 2}
    assert p.folder("j-ops").read_spec() == counts.spec
    # The same id again: the job resumes and sends nothing twice.
    again = p.enqueue(8)
    assert (again.resumed, again.new_batches) == (True, 0)


class ListingBreaksOnce(S3Objects):
    """The real S3 backend, whose listing breaks once after ``items`` URIs."""

    def __init__(self, settings: Settings, items: int) -> None:
        super().__init__(settings, None)
        self.left: int | None = items
        self.opened: list[tuple[str, str | None]] = []  # (prefix, after) of each listing

    def list(self, prefix: Location, after: Location | None) -> Iterator[ObjectInfo]:
        self.opened.append((prefix.uri, after.uri if after else None))
        for info in super().list(prefix, after):
            if self.left == 0:
                self.left = None
                raise StorageUnavailable(f"{prefix.uri}: connection reset mid-listing")
            if self.left is not None:
                self.left -= 1
            yield info


def test_enqueue_waits_out_a_listing_that_breaks_and_resumes_it(
    producer: Producer, redis_url: str
) -> None:
    p = producer
    flaky = ListingBreaksOnce(Settings(redis_url=redis_url), items=4)
    p.storage = Storage(p.storage.settings, backends={"s3": flaky})
    result = p.enqueue(8)
    assert (result.batches_total, result.images_total) == (3, 8)
    inputs = f"s3://{p.bucket}/in/"
    openings = [after for prefix, after in flaky.opened if prefix == inputs]
    assert openings == [None, f"{inputs}img-003.jpg"]  # resumed after the 4th URI
    sent = sorted((t["batch_no"], t["uris"]) for t in queued_tasks(broker_client(p.app)))
    assert [b for b, _uris in sent] == [0, 1, 2]
    assert [u for _b, uris in sent for u in uris] == [f"{inputs}img-{i:03d}.jpg" for i in range(8)]


def test_retry_reruns_a_dead_batch_once_and_undoes_its_counts(producer: Producer) -> None:
    p = producer
    p.enqueue(6)
    broker_client(p.app).delete(QUEUE)  # the test plays the workers: take the messages away
    p.finish("j-ops", 0)
    p.finish("j-ops", 1, dead=True)
    assert p.ledger.counts("j-ops").state == JobState.DONE  # dead batches end a job too
    res = p.retry("j-ops")
    assert (res.dead, res.missing) == ([1], [])
    counts = p.ledger.counts("j-ops")
    assert (counts.state, counts.batches_done, counts.batches_dead) == (JobState.RUNNING, 1, 0)
    assert counts.images_error == 0 and p.queued("j-ops") == {1}
    # A second retry finds nothing dead: the batch is sent once.
    assert (
        ops.retry(
            p.storage, p.ledger, p.app, "j-ops", max_outstanding=100, retry_budget_s=BUDGET_S
        ).dead
        == []
    )
    assert p.finish("j-ops", 1)  # now it succeeds and closes the job
    assert p.ledger.counts("j-ops").state == JobState.DONE


def test_retry_resends_lost_messages_and_nothing_else(producer: Producer) -> None:
    p = producer
    p.enqueue(9)
    p.finish("j-ops", 0)
    # The messages of batches 1 and 2 are lost (they left the queue with
    # workers that died before kombu recorded them as unacknowledged).
    broker_client(p.app).delete(QUEUE)
    assert p.queued("j-ops") == set()
    res = p.retry("j-ops")
    assert (res.dead, res.missing) == ([], [1, 2])
    assert p.queued("j-ops") == {1, 2}
    # Queued now: a second retry sends nothing.
    assert (
        ops.retry(
            p.storage, p.ledger, p.app, "j-ops", max_outstanding=100, retry_budget_s=BUDGET_S
        ).missing
        == []
    )


def test_reconcile_rebuilds_a_job_redis_lost_from_its_folder(producer: Producer) -> None:
    p = producer
    p.enqueue(7)  # batches 0, 1, 2 (the last one short)
    spec = p.ledger.counts("j-ops").spec
    p.finish("j-ops", 0)
    p.finish("j-ops", 2)
    p.ledger.r.flushdb()  # Redis lost everything: the job, the queue
    res = ops.reconcile(
        p.storage,
        p.ledger,
        p.app,
        "j-ops",
        output=spec.output,
        max_outstanding=100,
        retry_budget_s=BUDGET_S,
    )
    assert (res.missing, res.finished) == ([1], False)
    counts = p.ledger.counts("j-ops")
    assert (counts.images_ok, counts.batches_done, counts.images_total) == (4, 2, 7)
    assert p.queued("j-ops") == {1}
    # Once batch 1's part file is there too, reconcile closes the job.
    p.finish("j-ops", 1)
    assert p.ledger.counts("j-ops").state == JobState.DONE
    manifest = json.loads(p.storage.read(f"{spec.output.rstrip('/')}/j-ops/_manifest.json") or b"")
    assert manifest["images"]["ok"] == 7


def test_watch_prints_status_lines_until_the_job_ends(producer: Producer) -> None:
    p = producer
    p.enqueue(3)
    p.finish("j-ops", 0)
    lines: list[str] = []
    last = watch_json(p.ledger, "j-ops", interval_s=0.05, emit=lines.append, timeout_s=30)
    assert last["state"] == JobState.DONE and last["images"]["ok"] == 3
    assert json.loads(lines[-1]) == last


def test_retry_resends_exactly_what_was_sent_after_the_bucket_changed(producer: Producer) -> None:
    p = producer
    p.enqueue(9)  # batches of img-000..002, 003..005, 006..008
    first = {t["batch_no"]: (t["uris"], t["etags"]) for t in queued_tasks(broker_client(p.app))}
    broker_client(p.app).delete(QUEUE)  # every message lost
    # New objects that sort among the old ones, and one deleted: a fresh listing differs.
    p.storage.put(f"s3://{p.bucket}/in/img-000a.jpg", images.jpeg(8, 8, seed=50), root=None)
    p.storage.delete(f"s3://{p.bucket}/in/img-004.jpg")
    res = p.retry("j-ops")
    assert res.missing == [0, 1, 2]
    again = {t["batch_no"]: (t["uris"], t["etags"]) for t in queued_tasks(broker_client(p.app))}
    assert again == first


def test_reconcile_resumes_an_interrupted_enqueue_after_the_last_recorded_key(
    producer: Producer,
) -> None:
    """The producer died after recording (and sending) batch 0 only; Redis is gone too."""
    p = producer
    for i in range(9):
        p.storage.put(f"s3://{p.bucket}/in/img-{i:03d}.jpg", images.jpeg(8, 8, seed=i), root=None)
    spec = JobSpec(
        "j-cut", f"s3://{p.bucket}/in/", f"s3://{p.bucket}/out/", BATCH, "inception", 1, 1.0
    )
    folder = JobFolder.of(p.storage, spec)
    folder.write_spec(spec, {"max_outstanding": 100})
    listing = list(p.storage.list(spec.input))
    (batch0,) = [b for b in batch_objects(listing[:3], BATCH) if b.uris]
    InputLog(folder).write([batch0])
    # Since then: one object that sorts before the recorded key, one after it.
    p.storage.put(f"s3://{p.bucket}/in/img-001b.jpg", images.jpeg(8, 8, seed=70), root=None)
    p.storage.put(f"s3://{p.bucket}/in/img-009.jpg", images.jpeg(8, 8, seed=9), root=None)
    res = ops.reconcile(
        p.storage, p.ledger, p.app, "j-cut", output=spec.output,
        max_outstanding=100, retry_budget_s=BUDGET_S,
    )  # fmt: skip
    assert res.missing == [0, 1, 2, 3]
    sent = {t["batch_no"]: t["uris"] for t in queued_tasks(broker_client(p.app))}
    inputs = f"s3://{p.bucket}/in/"
    assert sent[0] == batch0.uris  # as recorded, img-001b left out
    assert [u for b in (1, 2, 3) for u in sent[b]] == [
        f"{inputs}img-{i:03d}.jpg" for i in range(3, 10)
    ]
    counts = p.ledger.counts("j-cut")
    assert (counts.enqueue_complete, counts.batches_total, counts.images_total) == (True, 4, 10)
    assert [b.batch_no for b in InputLog(folder).batches()] == [0, 1, 2, 3, 4]  # the tail too
