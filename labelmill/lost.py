"""Batches whose message was lost, and how live workers send them again.

kombu's Redis transport takes a message off the queue with BRPOP and only
then records it as unacknowledged (kombu/transport/redis.py:
``Channel._brpop_read`` hands it to ``Channel._deliver``, and only then
``QoS.append`` adds it to the ``unacked`` hash and ``unacked_index``). A
worker whose container is killed in between (an OOM kill), or that stops
while a popped message still sits unread in its socket (celery/celery#7950),
takes the message with it: it is in neither the queue nor the unacked hash,
so no restore brings it back (kombu#305). Its batch stays outstanding, the
job never finishes, and KEDA keeps both tiers up for it.

So live workers sweep (:func:`resend_lost`, one of them per
``LABELMILL_SWEEP_INTERVAL_S``): a batch that is outstanding, not done, and
has no message (``labelmill.queue.pending_messages``) on sweeps at least
``min_gap_s`` apart is sent again, with the URIs its input manifest recorded
(``labelmill.job.inputs``). One look proves nothing: the sweep reads the
unacked hash and the queue one after the other, so a message moving between
them in that instant is in neither. And the sweep reads the messages only
when there are fewer of them than unfinished batches (a window of 10,000
batches is tens of megabytes of messages); a batch sent twice can hide a loss
from that count until the job's other batches are done, not longer. A
batch sent twice costs a second run, never a second line
(``workers.batch.run_batch`` is idempotent).

Only batches the producer recorded as sent are looked at: what a dead
producer marked and never sent is ``labelmill.orphans``' to drop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

import redis
from celery import Celery

from labelmill.errors import JobNotFound
from labelmill.job import JobSpec, JobState, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.queue import pending_messages, queued_count, send_batch
from labelmill.storage import ObjectStore

log = logging.getLogger(__name__)


def unfinished(ledger: Ledger) -> dict[str, tuple[JobSpec, list[int]]]:
    """Outstanding batches that are sent and not done, by job (with its spec)."""
    found: dict[str, tuple[JobSpec, list[int]]] = {}
    for job_id, batch_nos in ledger.outstanding_by_job().items():
        try:
            counts = ledger.counts(job_id)
        except JobNotFound:
            continue
        if counts.state == JobState.RUNNING:
            sent = batch_nos
        elif counts.state == JobState.ENQUEUING:
            sent = [b for b in batch_nos if b < counts.batches_sent]
        else:
            continue
        done = ledger.done_among(job_id, sent)
        if waiting := sorted(b for b in sent if b not in done):
            found[job_id] = (counts.spec, waiting)
    return found


def resend_lost(
    ledger: Ledger,
    broker: redis.Redis,
    app: Celery,
    storage: ObjectStore,
    *,
    min_gap_s: float,
    now: float | None = None,
) -> dict[str, list[int]]:
    """One sweep: send again what has had no message since a sweep ``min_gap_s`` ago.

    ``broker`` is the Redis that holds the Celery queue. Returns job ->
    batches sent again.
    """
    now = time.time() if now is None else now
    waiting = unfinished(ledger)
    missing: set[tuple[str, int]] = set()
    if sum(len(bs) for _spec, bs in waiting.values()) > queued_count(broker, unacked=True):
        pending = pending_messages(broker)
        missing = {(j, b) for j, (_s, bs) in waiting.items() for b in bs if (j, b) not in pending}
    before = ledger.missing_since()
    first = {m: before.get(m, now) for m in missing}
    lost: dict[str, list[int]] = {}
    for (job_id, batch_no), since in sorted(first.items()):
        if now - since >= min_gap_s:
            lost.setdefault(job_id, []).append(batch_no)
            del first[job_id, batch_no]  # sent again: a fresh start
    ledger.set_missing(first, keep_s=4 * min_gap_s)
    return {
        job_id: _send_again(app, storage, waiting[job_id][0], bs) for job_id, bs in lost.items()
    }


def _send_again(
    app: Celery, storage: ObjectStore, spec: JobSpec, batch_nos: Collection[int]
) -> list[int]:
    """Send ``batch_nos`` again as the input manifest recorded them; return those sent."""
    wanted = set(batch_nos)
    recorded = [b for b in InputLog(JobFolder.of(storage, spec)).batches(wanted=wanted) if b.uris]
    if unrecorded := sorted(wanted - {b.batch_no for b in recorded}):
        log.error(
            "job %s: batches %s have no message and are not in its input manifest; "
            "`producer reconcile %s` rebuilds the job from storage",
            spec.job_id,
            unrecorded[:10],
            spec.job_id,
        )
    with app.producer_or_acquire() as publisher:
        for b in recorded:
            send_batch(
                app,
                job_id=spec.job_id,
                batch_no=b.batch_no,
                uris=b.uris,
                etags=b.etags,
                model_version=spec.model_version,
                producer=publisher,
            )
    sent = [b.batch_no for b in recorded]
    if sent:
        log.warning(
            "job %s: batches %s had no message (lost by a worker that died as it took "
            "them); sent again",
            spec.job_id,
            sent,
        )
    return sent
