"""Sending a job's batches: recorded in its input manifest first, then sent inside its window.

Every path that sends batches (``enqueue``, and ``retry`` and ``reconcile``
re-sending) goes through :class:`Window`: batches go out in groups, each once
the job's window (``max_outstanding`` batches queued or running) has room
for all of it; per group the order is (1) every batch marked outstanding,
(2) the messages, in one round trip, (3) the caller's bookkeeping. A crash
in between re-sends at most one group (harmless: batches are idempotent)
rather than losing a batch.

Batches that come from a listing are recorded first (:func:`record_and_send`):
a chunk of the input manifest (``labelmill.job.inputs``) is stored before any
of its batches is sent, so what a message holds can always be sent again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from celery import Celery

from labelmill import orphans
from labelmill.errors import ModelUnavailable
from labelmill.job import Batch, JobSpec, JobState, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.status import write_manifest
from labelmill.queue import send_batch
from labelmill.retry import patiently
from labelmill.storage import ObjectStore
from producer.listing import batch_objects, listed, open_base

# Batches sent per ledger update. Per batch, the producer would make four
# Redis round trips (window, outstanding, message, position); per group it
# makes four in all (one ZADD, one pipelined publish). Small windows keep
# groups small so that the window still fills one batch at a time.
GROUP_BATCHES = orphans.MAX_GROUP

# A chunk of the input manifest closes after this many batches (about 2.5 MB
# of URIs at 32 per batch: 31,000 objects for a billion images), or as many
# objects (an incremental job's lines also carry objects) ...
CHUNK_BATCHES = 1000
CHUNK_OBJECTS = 32_000
# ... or this long after it opened, so that a slow listing still sends, ...
CHUNK_S = 5.0
# ... and the first chunk after one group, so the first message is not delayed.


class Cancelled(Exception):
    """The job was cancelled while its batches were being sent."""


def wait_for_room(
    ledger: Ledger,
    job_id: str,
    max_outstanding: int,
    *,
    retry_budget_s: float,
    poll_s: float = 0.2,
) -> None:
    """Block until fewer than ``max_outstanding`` of the job's batches are in flight.

    Raise :class:`ModelUnavailable` when the window stays full for
    ``retry_budget_s`` while the job still has no model version (no model
    server ever served one), rather than wait for ever.
    """
    delay = poll_s
    started = time.monotonic()
    while True:
        state, in_flight = patiently(lambda: ledger.window(job_id), retry_budget_s, "ledger")
        if state == JobState.CANCELLED:
            raise Cancelled(job_id)
        if in_flight < max_outstanding:
            return
        waited = time.monotonic() - started
        if waited > retry_budget_s and ledger.counts(job_id).spec.model_version is None:
            raise ModelUnavailable(
                f"no model version became AVAILABLE within {retry_budget_s:g}s; job {job_id} "
                f"is left resumable ({in_flight} batches sent wait for one, then turn dead: "
                f"`producer retry {job_id}`); the same `producer enqueue` with "
                f"--job-id {job_id} sends the rest"
            )
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


@dataclass
class Window:
    """One job's bounded window, and the sending of its batches through it."""

    ledger: Ledger
    app: Celery
    spec: JobSpec
    max_outstanding: int
    retry_budget_s: float

    @property
    def group_size(self) -> int:
        return max(1, min(GROUP_BATCHES, self.max_outstanding // 8))

    def groups(self, batches: Iterable[Batch]) -> Iterator[list[Batch]]:
        """``batches`` in groups, each handed out once the window has room for all of it."""
        group: list[Batch] = []
        for b in batches:
            group.append(b)
            if len(group) == self.group_size:
                yield self._room_for(group)
                group = []
        if group:
            yield self._room_for(group)

    def _room_for(self, group: list[Batch]) -> list[Batch]:
        wait_for_room(
            self.ledger,
            self.spec.job_id,
            self.max_outstanding - len(group) + 1,
            retry_budget_s=self.retry_budget_s,
        )
        return group

    def publish(self, group: Sequence[Batch]) -> None:
        """Mark ``group`` outstanding, then send its messages in one round trip."""
        job_id = self.spec.job_id
        patiently(
            lambda: self.ledger.mark_outstanding(job_id, *(b.batch_no for b in group)),
            self.retry_budget_s,
            "ledger",
        )
        with self.app.producer_or_acquire() as publisher, publisher.batch(max_size=len(group)):
            for b in group:
                send_batch(
                    self.app,
                    job_id=job_id,
                    batch_no=b.batch_no,
                    uris=b.uris,
                    etags=b.etags,
                    model_version=self.spec.model_version,
                    producer=publisher,
                )

    def record_position(self, group: Sequence[Batch]) -> None:
        """Record where the listing stands once ``group``, consecutive batches, is sent."""
        position = group[-1].position()
        patiently(
            lambda: self.ledger.record_enqueued(self.spec.job_id, position),
            self.retry_budget_s,
            "ledger",
        )

    def finish(self, storage: ObjectStore, tail: Batch) -> bool:
        """Record the listing's end; write the manifest if that completed the job.

        True when this call wrote it (the job's batches were all done first).
        """
        job_id = self.spec.job_id
        if self.spec.base is not None:  # _job.json says what the comparison found
            folder = JobFolder.of(storage, self.spec)
            options = {
                "max_outstanding": self.max_outstanding,
                "incremental": dict(tail.incremental),
            }
            patiently(
                lambda: folder.write_spec(self.spec, options), self.retry_budget_s, folder.uri
            )
        if not patiently(
            lambda: self.ledger.finish_enqueue(job_id, tail.batch_no, tail.position()),
            self.retry_budget_s,
            "ledger",
        ):
            return False
        patiently(
            lambda: write_manifest(storage, self.ledger, job_id),
            self.retry_budget_s,
            self.spec.output,
        )
        return True

    def send(self, batches: Iterable[Batch], after: Callable[[list[Batch]], None]) -> int:
        """Publish every batch, group by group, calling ``after`` with each; return the count."""
        sent = 0
        for group in self.groups(batches):
            self.publish(group)
            after(group)
            sent += len(group)
        return sent


def list_on(
    storage: ObjectStore,
    inputs: InputLog,
    window: Window,
    last: Batch | None,
    after: Callable[[list[Batch]], None],
) -> tuple[Batch, int]:
    """List the job's input on from the ``last`` recorded batch (None: from the start).

    Each chunk of batches is recorded, then sent; returns the tail and how
    many batches were sent.
    """
    spec = window.spec
    start = last.position() if last is not None else None
    listing = listed(
        storage,
        spec.input,
        after=start.last_key if start else None,
        retry_budget_s=window.retry_budget_s,
    )
    base = None
    if spec.base is not None:
        base = open_base(
            storage, spec, after=start.last_key if start else None, budget_s=window.retry_budget_s
        )
    batches = batch_objects(listing, spec.batch_size, start=start, base=base)
    return record_and_send(inputs, window, batches, after)


def record_and_send(
    log: InputLog,
    window: Window,
    batches: Iterable[Batch],
    after: Callable[[list[Batch]], None],
) -> tuple[Batch, int]:
    """Record a listing's batches chunk by chunk, sending each chunk once stored.

    ``batches`` ends with the tail (no URIs), which closes the last chunk.
    Returns the tail and how many batches were sent.
    """
    chunk: list[Batch] = []
    limit = window.group_size  # the first chunk is small
    objects = 0  # URIs and carried objects in the chunk
    opened = time.monotonic()
    sent = 0

    def close() -> None:
        nonlocal sent, limit, objects, opened
        patiently(lambda: log.write(chunk), window.retry_budget_s, log.uri)
        sent += window.send((b for b in chunk if b.uris), after)
        chunk.clear()
        limit, objects, opened = CHUNK_BATCHES, 0, time.monotonic()

    for b in batches:
        chunk.append(b)
        if b.is_tail:
            close()
            return b, sent
        objects += len(b.uris) + len(b.carried)
        if len(chunk) >= limit or objects >= CHUNK_OBJECTS or time.monotonic() - opened >= CHUNK_S:
            close()
    raise AssertionError("a listing's batches always end with a tail")
