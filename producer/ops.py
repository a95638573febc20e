"""Operator commands: cancel, retry dead or lost batches, reconcile from storage."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from celery import Celery

from labelmill.errors import JobNotFound, UsageError
from labelmill.job import Batch, JobSpec, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.record import Tally, tally
from labelmill.queue import broker_client, pending_batches
from labelmill.retry import patiently
from labelmill.storage import ObjectStore, normalise_uri
from producer.sending import Window, list_on

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


def _window(
    ledger: Ledger,
    app: Celery,
    spec: JobSpec,
    folder: JobFolder,
    retry_budget_s: float,
    default: int,
) -> Window:
    """The job's own window: the ``max_outstanding`` it was enqueued with."""
    options = patiently(folder.read_options, retry_budget_s, folder.uri)
    return Window(ledger, app, spec, int(options.get("max_outstanding", default)), retry_budget_s)


def retry(
    storage: ObjectStore,
    ledger: Ledger,
    app: Celery,
    job_id: str,
    *,
    max_outstanding: int,
    retry_budget_s: float,
) -> Resent:
    """Re-run dead batches, and batches that have neither a part file nor a message.

    Each is sent with exactly the inputs it was first sent with (the input
    manifest), inside the job's window.
    """
    counts = ledger.counts(job_id)
    spec = counts.spec
    out = Resent(job_id)
    folder = JobFolder.of(storage, spec)
    window = _window(ledger, app, spec, folder, retry_budget_s, max_outstanding)
    dead = set(ledger.dead_batches(job_id))
    lost: set[int] = set()
    if counts.enqueue_complete and counts.batches_total:
        have = {no for no, _uri in folder.parts()}
        # Not the outstanding set: a batch whose message was lost stays in it.
        queued = pending_batches(broker_client(app), job_id)
        lost = {
            b
            for b in range(counts.batches_total)
            if b not in have and b not in queued and not ledger.is_done(job_id, b)
        }
    recorded = {b.batch_no: b for b in InputLog(folder).batches(wanted=dead | lost) if b.uris}
    if missing := sorted((dead | lost) - recorded.keys()):
        raise UsageError(
            f"job {job_id}: batches {missing[:10]} are not in its input manifest; "
            f"`producer reconcile {job_id}` rebuilds the job from storage"
        )
    # A dead batch is counted as done: reopening it widens the window, so
    # each group is reopened once the window has room for all of it.
    for group in window.groups(recorded[b] for b in sorted(dead)):
        reopened = [b for b in group if ledger.reopen_dead(job_id, b.batch_no, len(b.uris))]
        if reopened:
            window.publish(reopened)
            out.dead += [b.batch_no for b in reopened]
    # A lost batch still counts as in flight: the window already holds its place.
    window.send((recorded[b] for b in sorted(lost)), lambda group: None)
    out.missing = sorted(lost)
    return out


def reconcile(
    storage: ObjectStore,
    ledger: Ledger,
    app: Celery,
    job_id: str,
    *,
    output: str | None = None,
    max_outstanding: int,
    retry_budget_s: float,
) -> Resent:
    """Rebuild the ledger from storage and send whatever has no part file.

    Works after Redis lost everything: the job is rebuilt from
    ``<output>/<job>/_job.json``, its input manifest and its part files. A
    batch without a part file is sent again with its recorded inputs; an
    enqueue that was interrupted is resumed after the last recorded key.
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
    if spec.model_version is None and versions:
        # The spec file predates the pin (the tier was at zero at enqueue);
        # the lines written so far carry it, and the rest must match them.
        spec = replace(spec, model_version=ledger.pin_model_version(job_id, min(versions)))
    # Counters first, from the part files (batches sent: those done), then
    # every recorded batch without a part file, counted as sent as it goes.
    ledger.reset_counts(job_id, done_batches=done)
    window = _window(ledger, app, spec, folder, retry_budget_s, max_outstanding)
    inputs = InputLog(folder)
    out = Resent(job_id)

    def counted(group: list[Batch]) -> None:
        patiently(lambda: ledger.count_sent(job_id, len(group)), retry_budget_s, "ledger")
        out.missing += [b.batch_no for b in group]

    window.send((b for b in inputs.batches() if b.uris and b.batch_no not in done), counted)
    tail = inputs.last()
    if tail is None or not tail.is_tail:
        # The enqueue was interrupted: list on after the last recorded key.

        def recorded(group: list[Batch]) -> None:
            window.record_position(group)
            out.missing += [b.batch_no for b in group]

        tail, _sent = list_on(storage, inputs, window, tail, recorded)
    # The listing's totals, which also let the last batch to finish claim the manifest.
    out.finished = window.finish(storage, tail)
    return out


def cancel(ledger: Ledger, job_id: str) -> int:
    """Cancel a job; returns how many outstanding batches were dropped."""
    return ledger.cancel(job_id)
