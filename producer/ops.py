"""Operator commands: cancel, retry dead or lost batches, reconcile from storage."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from celery import Celery

from labelmill.errors import JobNotFound, UsageError
from labelmill.job import JobSpec, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.record import Tally, tally
from labelmill.job.status import write_manifest
from labelmill.queue import broker_client, pending_batches, send_batch
from labelmill.retry import patiently
from labelmill.storage import ObjectStore, normalise_uri
from producer.listing import Batch, batch_objects, listed

log = logging.getLogger(__name__)


@dataclass
class Resent:
    """What `retry` or `reconcile` sent again."""

    job_id: str
    dead: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    finished: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "dead_batches_resent": self.dead,
            "missing_batches_resent": self.missing,
            "job_finished": self.finished,
        }


def _resend(
    storage: ObjectStore,
    ledger: Ledger,
    app: Celery,
    spec: JobSpec,
    wanted: Callable[[int], bool],
    retry_budget_s: float,
) -> tuple[list[int], Batch]:
    """Re-list the input, send the batches ``wanted`` picks; return them and the tail."""
    sent: list[int] = []
    tail = None
    listing = listed(storage, spec.input, retry_budget_s=retry_budget_s)
    for tail in batch_objects(listing, spec.batch_size):
        if tail.uris and wanted(tail.batch_no):
            ledger.mark_outstanding(spec.job_id, tail.batch_no)
            send_batch(
                app,
                job_id=spec.job_id,
                batch_no=tail.batch_no,
                uris=tail.uris,
                etags=tail.etags,
                model_version=spec.model_version,
            )
            sent.append(tail.batch_no)
    assert tail is not None  # batch_objects always ends with a tail
    return sent, tail


def retry(
    storage: ObjectStore, ledger: Ledger, app: Celery, job_id: str, *, retry_budget_s: float
) -> Resent:
    """Re-run dead batches, and batches that have neither a part file nor a message."""
    counts = ledger.counts(job_id)
    spec = counts.spec
    out = Resent(job_id)
    folder = JobFolder.of(storage, spec)
    for batch_no in ledger.dead_batches(job_id):
        uris = [r.uri for r in folder.part_records(folder.part_uri(batch_no))]
        if uris and ledger.reopen_dead(job_id, batch_no, len(uris)):
            send_batch(
                app, job_id=job_id, batch_no=batch_no, uris=uris, model_version=spec.model_version
            )
            out.dead.append(batch_no)
    if counts.enqueue_complete and counts.batches_total:
        have = {no for no, _uri in folder.parts()}
        # Not the outstanding set: a batch whose message was lost stays in it.
        queued = pending_batches(broker_client(app), job_id)
        lost = {
            b
            for b in range(counts.batches_total)
            if b not in have and b not in queued and not ledger.is_done(job_id, b)
        }
        if lost:
            out.missing, _tail = _resend(
                storage, ledger, app, spec, lost.__contains__, retry_budget_s
            )
    return out


def reconcile(
    storage: ObjectStore,
    ledger: Ledger,
    app: Celery,
    job_id: str,
    *,
    output: str | None = None,
    retry_budget_s: float,
) -> Resent:
    """Rebuild the ledger from storage and send whatever has no part file.

    Works after Redis lost everything: the job spec is read from
    ``<output>/<job>/_job.json`` when the ledger no longer knows the job.
    """
    try:
        spec = ledger.counts(job_id).spec
    except JobNotFound:
        if output is None:
            raise UsageError(
                f"job {job_id} is not in Redis; pass --output to read its spec from storage"
            ) from None
        found = JobFolder(storage, normalise_uri(output), job_id).read_spec()
        if found is None:
            raise JobNotFound(f"no job {job_id} in Redis nor under {output}") from None
        spec = found
        ledger.restore_job(spec)

    folder = JobFolder.of(storage, spec)
    done: dict[int, Tally] = {
        batch_no: tally(folder.part_records(uri)) for batch_no, uri in folder.parts()
    }
    versions = {v for t in done.values() for v in t.versions}

    # Counters first, from the part files; then one pass over the listing that
    # re-sends what has no part file; then the listing's totals, which also
    # let the last batch to finish claim the manifest.
    if spec.model_version is None and versions:
        # The spec file predates the pin (the tier was at zero at enqueue);
        # the lines written so far carry it, and the rest must match them.
        spec = replace(spec, model_version=ledger.pin_model_version(job_id, min(versions)))
    ledger.reset_counts(job_id, done_batches=done)
    sent, tail = _resend(storage, ledger, app, spec, lambda b: b not in done, retry_budget_s)
    out = Resent(job_id, missing=sent)
    if ledger.finish_enqueue(job_id, tail.batch_no, tail.position()):
        patiently(lambda: write_manifest(storage, ledger, job_id), retry_budget_s, spec.output)
        out.finished = True
    return out


def cancel(ledger: Ledger, job_id: str) -> int:
    """Cancel a job; returns how many outstanding batches were dropped."""
    return ledger.cancel(job_id)
