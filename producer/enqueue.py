"""``producer enqueue``: list, batch, pin the model version, feed a bounded window."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery

from labelmill import orphans
from labelmill.errors import JobNotFound, LedgerUnavailable, UsageError
from labelmill.job import Batch, JobCounts, JobSpec, JobState, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.picture import base_spec, find_base
from labelmill.job.status import new_job_id
from labelmill.retry import patiently
from labelmill.storage import ObjectStore, normalise_uri
from producer.listing import last_batch, listed
from producer.sending import Cancelled, Window, list_on

log = logging.getLogger(__name__)


@dataclass
class EnqueueResult:
    job_id: str
    state: JobState | str  # or "dry-run"
    new_batches: int
    batches_total: int
    images_total: int
    skipped: dict[str, int]
    model_version: int | None
    output: str
    resumed: bool
    dry_run: bool = False
    base: str | None = None  # an incremental job's base
    incremental: dict[str, int] | None = None  # what it found, compared with the base

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "enqueued_batches": self.new_batches,
            "batches_total": self.batches_total,
            "images_total": self.images_total,
            "skipped": self.skipped,
            "model_version": self.model_version,
            "output": self.output,
            "resumed": self.resumed,
            "dry_run": self.dry_run,
            "base": self.base,
            "incremental": self.incremental,
        }


Progress = Callable[[Batch], None]


def dry_run(
    storage: ObjectStore, source: str, batch_size: int, *, retry_budget_s: float
) -> EnqueueResult:
    """List and count without writing anything anywhere."""
    source = normalise_uri(source)
    storage.check_access(source, write=False)
    tail = last_batch(listed(storage, source, retry_budget_s=retry_budget_s), batch_size)
    return EnqueueResult(
        job_id="",
        state="dry-run",
        new_batches=0,
        batches_total=tail.batch_no,
        images_total=tail.images,
        skipped=dict(tail.skipped),
        model_version=None,
        output="",
        resumed=False,
        dry_run=True,
    )


def enqueue(
    *,
    storage: ObjectStore,
    ledger: Ledger,
    app: Celery,
    source: str,
    output: str,
    batch_size: int,
    max_outstanding: int,
    model_name: str,
    resolve_version: Callable[[], int | None],
    job_id: str | None = None,
    progress: Progress | None = None,
    retry_budget_s: float,
    incremental: bool = False,
    base: str | None = None,
) -> EnqueueResult:
    """Create (or resume) a job and send all of its batches.

    Resuming with the same job id continues after the last batch that was
    sent; a job whose enqueuing completed sends nothing new. Storage outages
    are waited out for ``retry_budget_s`` (so is a model tier with no
    version, when the window is full).

    ``incremental``: label only what is new or changed since ``base``, or,
    without one, since the newest finished job over the same input, in the
    same output, with the same model version (``labelmill.job.picture``).
    """
    source = normalise_uri(source)
    output = normalise_uri(output)
    # The preflight fails fast (a wrong endpoint or bucket is not an outage
    # to wait out); every call after it waits out outages.
    storage.check_access(source, write=False)
    storage.check_access(output, write=True)
    ledger.ping()

    job_id = job_id or new_job_id()
    existing = None
    with contextlib.suppress(JobNotFound):
        existing = ledger.counts(job_id)
    if existing is not None:
        spec = existing.spec
        if (spec.input, spec.output) != (source, output):
            raise UsageError(
                f"job {job_id} exists with input {spec.input} and output {spec.output}; "
                "use another --job-id"
            )
        if base is not None and base != spec.base:
            raise UsageError(f"job {job_id} exists with base {spec.base}, not {base}")
        if existing.state == JobState.CANCELLED:
            raise Cancelled(job_id)
        resumed = True
    else:
        version = resolve_version()
        base_id = None
        if incremental or base is not None:
            base_id = choose_base(storage, source, output, model_name, version, base)
        spec, created = ledger.create_job(
            JobSpec(
                job_id=job_id,
                input=source,
                output=output,
                batch_size=batch_size,
                model_name=model_name,
                model_version=version,
                created_at=time.time(),
                base=base_id,
            )
        )
        resumed = not created
        folder = JobFolder.of(storage, spec)
        patiently(
            lambda: folder.write_spec(spec, {"max_outstanding": max_outstanding}),
            retry_budget_s,
            folder.uri,
        )

    counts = ledger.counts(job_id)
    if counts.enqueue_complete:
        return EnqueueResult(
            job_id=job_id,
            state=counts.state,
            new_batches=0,
            batches_total=counts.batches_total or 0,
            images_total=counts.images_total,
            skipped=counts.skipped,
            model_version=spec.model_version,
            output=output,
            resumed=True,
            base=spec.base,
            incremental=counts.incremental if spec.base else None,
        )

    with producer_lease(ledger, job_id):
        return _send(
            storage, ledger, app, spec, counts, max_outstanding, resumed, progress, retry_budget_s
        )


def choose_base(
    storage: ObjectStore,
    source: str,
    output: str,
    model_name: str,
    version: int | None,
    named: str | None,
) -> str | None:
    """The base of an incremental job: ``named``, or the newest that fits (None: none does)."""
    if version is None:
        raise UsageError(
            "an incremental job needs the model version now, to compare it with the base's, "
            "and no model server serves one: pass --model-version"
        )
    if named is not None:
        spec = base_spec(storage, output, named, source=source)
        if spec.model_version != version:
            log.warning(
                "base job %s used model version %s, this job uses %s: nothing is carried",
                named,
                spec.model_version,
                version,
            )
        return spec.job_id
    found = find_base(storage, output, source=source, model_name=model_name, model_version=version)
    return found.job_id if found else None


@contextlib.contextmanager
def producer_lease(ledger: Ledger, job_id: str, lease_s: float = orphans.LEASE_S) -> Iterator[None]:
    """Hold the job's producer lease, renewed every ``lease_s / 3``, for the block.

    A producer killed mid-group leaves batches outstanding with no message;
    once its lease lapses, workers drop them (labelmill/orphans.py).
    """
    ledger.hold_producer(job_id, lease_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                ledger.hold_producer(job_id, lease_s)
            except LedgerUnavailable as exc:  # the lease covers two misses
                log.warning("could not renew the producer lease of %s: %s", job_id, exc)

    thread = threading.Thread(target=renew, name="producer-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(LedgerUnavailable):
            ledger.release_producer(job_id)


def _send(
    storage: ObjectStore,
    ledger: Ledger,
    app: Celery,
    spec: JobSpec,
    counts: JobCounts,
    max_outstanding: int,
    resumed: bool,
    progress: Progress | None,
    retry_budget_s: float,
) -> EnqueueResult:
    """Send what the input manifest holds but was not sent, then list on from its end."""
    job_id = spec.job_id
    window = Window(ledger, app, spec, max_outstanding, retry_budget_s)
    inputs = InputLog(JobFolder.of(storage, spec))

    def sent(group: list[Batch]) -> None:
        window.record_position(group)
        if progress:
            for b in group:
                progress(b)

    # A run that was interrupted may have recorded batches it never sent.
    last = patiently(inputs.last, retry_budget_s, inputs.uri)
    new = 0
    if last is not None:
        unsent = (b for b in inputs.batches(start=counts.batches_sent) if b.uris)
        new = window.send(unsent, sent)
    if last is not None and last.is_tail:
        tail = last  # the listing had ended
    else:
        tail, more = list_on(storage, inputs, window, last, sent)
        new += more
    window.finish(storage, tail)
    counts = ledger.counts(job_id)
    return EnqueueResult(
        job_id=job_id,
        state=counts.state,
        new_batches=new,
        batches_total=tail.batch_no,
        images_total=tail.images,
        skipped=dict(tail.skipped),
        model_version=spec.model_version,
        output=spec.output,
        resumed=resumed,
        base=spec.base,
        incremental=dict(tail.incremental) if spec.base else None,
    )
