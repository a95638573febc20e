"""Batches a dead producer marked outstanding but never sent, and how they are dropped.

``producer enqueue`` adds a group of batches to the outstanding set before
it sends their messages (so a fast worker can never remove a batch before it
is added), and records its position after. A producer killed between the two
leaves at most one group in the outstanding set with no message: nothing
would ever remove them, and KEDA would keep both tiers up for them forever.

So a producer holds a lease while it enqueues (``Ledger.hold_producer``:
``<prefix>:producers``, job id -> expiry, renewed every ``LEASE_S / 3``),
and live workers sweep (``drop_orphans``): for a job whose lease has expired
and that is still ``enqueuing``, the outstanding batches at or past its
recorded position that have no message (queued or unacknowledged, see
``labelmill.queue.pending_batches``) are dropped from the outstanding set.
The job stays resumable: ``producer enqueue ... --job-id JOB`` sends them
again from its recorded position.
"""

from __future__ import annotations

import logging
import time

import redis

from labelmill.errors import JobNotFound
from labelmill.job import JobState, Ledger
from labelmill.queue import pending_batches

log = logging.getLogger(__name__)

LEASE_S = 30.0
# The most batches a producer marks outstanding before it records its
# position (producer/enqueue.py sends in groups of at most this many).
MAX_GROUP = 16


def drop_orphans(
    ledger: Ledger, broker: redis.Redis, *, now: float | None = None
) -> dict[str, list[int]]:
    """Drop what dead producers marked but never sent; return job -> dropped batches.

    ``broker`` is the Redis that holds the Celery queue (where the messages are).
    """
    dropped: dict[str, list[int]] = {}
    for job_id in ledger.expired_producers(time.time() if now is None else now):
        try:
            counts = ledger.counts(job_id)
        except JobNotFound:
            counts = None
        if counts is None or counts.state != JobState.ENQUEUING:
            ledger.release_producer(job_id)
            continue
        sent = counts.batches_sent
        candidates = [b for b in range(sent, sent + MAX_GROUP) if ledger.is_outstanding(job_id, b)]
        if candidates:
            pending = pending_batches(broker, job_id)
            orphans = [b for b in candidates if b not in pending]
            if orphans:
                ledger.drop_outstanding(job_id, *orphans)
                dropped[job_id] = orphans
                log.warning(
                    "job %s: its producer is gone (lease expired); dropped %d batches it had "
                    "marked outstanding but not sent (%s). `producer enqueue ... --job-id %s` "
                    "resumes the job",
                    job_id,
                    len(orphans),
                    orphans,
                    job_id,
                )
        ledger.release_producer(job_id)
    return dropped
