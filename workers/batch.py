"""The batch task's body: fetch -> preprocess -> classify -> store -> ledger.

Everything here is plain Python on injected services, so unit tests run it
with in-memory fakes and integration tests with real servers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from labelmill.errors import (
    ImageError,
    InferenceError,
    ModelNotFound,
    ModelUnavailable,
    ServiceError,
    TransientError,
)
from labelmill.job import JobSpec, JobState, Ledger
from labelmill.job.folder import JobFolder
from labelmill.job.record import DEAD, ErrorRecord, OkRecord, Record, tally
from labelmill.job.status import is_valid_job_id, write_manifest
from labelmill.model_client import ModelClient
from labelmill.retry import Deadline, record_reserve_s, retry
from labelmill.settings import Settings
from labelmill.storage import ObjectStore
from workers import metrics
from workers.budget import UNLIMITED_DEFAULT, WorkerBudget
from workers.classify import classify
from workers.fetch import Failed, Loaded, load_batch

log = logging.getLogger(__name__)


@dataclass
class Services:
    """What a worker process holds for its lifetime: one of each client."""

    settings: Settings
    storage: ObjectStore
    ledger: Ledger
    model: ModelClient
    # Unit tests leave the default: a budget no test image comes near.
    memory: WorkerBudget = field(default_factory=lambda: WorkerBudget(UNLIMITED_DEFAULT))
    pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(
            max_workers=self.settings.fetch_concurrency, thread_name_prefix="fetch"
        )

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()


@dataclass
class Outcome:
    """What happened to one delivery of a batch (for logs and tests)."""

    status: str  # "done", "dead", "skipped:<why>"
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    attempt: int = 0
    finished_job: bool = False


def run_batch(
    svc: Services,
    *,
    job_id: str,
    batch_no: int,
    uris: Sequence[str],
    model_version: int | None = None,
    etags: Sequence[str | None] | None = None,
) -> Outcome:
    """Process one delivery of a batch. Idempotent: a redelivery changes nothing."""
    t0 = time.perf_counter()
    s = svc.settings
    budget = s.retry_budget_s
    # One deadline for every stage's retries; the last part of it is kept for
    # recording the outcome (part file, ledger, manifest).
    deadline = Deadline(budget, reserve_s=record_reserve_s(budget))
    problem = _malformed(job_id, batch_no, uris, etags)
    if problem is not None:
        # Not a message the producer sends (a bug or a hostile sender). Refuse
        # it before it reaches Redis: a negative batch number made every
        # ledger call fail, and the error was retried as an outage for the
        # whole retry budget, then requeued, forever.
        log.error(
            "refusing a malformed batch message (%s): job %r batch %r", problem, job_id, batch_no
        )
        return Outcome("skipped:malformed")
    start = retry(
        lambda: svc.ledger.begin_batch(job_id, batch_no), deadline=deadline, what="ledger"
    )
    if start.spec is None or start.state == JobState.CANCELLED:
        unknown = start.spec is None
        # Recording this outcome is all that is left to do: the reserve may serve.
        retry(
            lambda: svc.ledger.drop_outstanding(job_id, batch_no),
            deadline=deadline,
            what="ledger",
            record=True,
        )
        log.log(
            logging.WARNING if unknown else logging.INFO,
            "job %s batch %d: %s; dropped",
            job_id,
            batch_no,
            "unknown job (expired?)" if unknown else "job cancelled",
        )
        why = "unknown-job" if unknown else "cancelled"
        return Outcome(f"skipped:{why}", attempt=start.attempt)
    if start.already_done:
        log.info("job %s batch %d: already done (redelivery); nothing to do", job_id, batch_no)
        # Unless the job is complete and whoever claimed its manifest died
        # before writing it: then this delivery writes it.
        if retry(lambda: svc.ledger.take_over_manifest(job_id), deadline=deadline, what="ledger"):
            _write_manifest(svc, job_id, deadline)
        return Outcome("skipped:already-done", attempt=start.attempt)

    metrics.record_delivery(start.attempt)
    spec = start.spec
    version = model_version if model_version is not None else spec.model_version
    records: list[Record]
    dead_reason: str | None = None
    if start.attempt > s.max_deliveries:
        dead_reason = (
            f"delivered {start.attempt} times (limit {s.max_deliveries}); "
            "a worker died on every try"
        )
        records = []
    else:
        try:
            if version is None:
                version = _pin_version(svc, spec, deadline)
            records = _classify_batch(
                svc, spec.job_id, batch_no, uris, etags, spec.model_name, version, deadline
            )
        except TransientError as exc:
            dead_reason = f"gave up after the {budget:.0f}s retry budget: {exc}"
            records = []
        except ServiceError as exc:  # unserved model version, refused credentials
            dead_reason = f"{type(exc).__name__}: {exc}"
            records = []
        except Exception as exc:  # a bug must not lose the batch's lines
            log.exception("job %s batch %d: unexpected error", job_id, batch_no)
            dead_reason = f"internal error: {type(exc).__name__}: {exc}"
            records = []
    if dead_reason is not None:
        log.error("job %s batch %d declared dead: %s", job_id, batch_no, dead_reason)
        records = [ErrorRecord(u, DEAD, dead_reason, job_id, batch_no) for u in uris]

    folder = JobFolder.of(svc.storage, spec)
    with metrics.stage("store"):
        retry(
            lambda: folder.write_part(batch_no, records),
            deadline=deadline,
            record=True,
            what=f"write {folder.part_uri(batch_no)}",
            on_retry=_count_retry("s3"),
        )
    counts = tally(records)
    ok, errors = counts.ok, counts.errors
    token = uuid.uuid4().hex  # one per delivery: see Ledger.complete_batch
    with metrics.stage("ledger"):
        counted, claimed = retry(
            lambda: svc.ledger.complete_batch(job_id, batch_no, counts, token=token),
            deadline=deadline,
            record=True,
            what="ledger",
            on_retry=_count_retry("ledger"),
        )
    if claimed:
        _write_manifest(svc, job_id, deadline)
    ms = (time.perf_counter() - t0) * 1000
    metrics.record_batch(
        ok=ok, errors=errors, seconds=ms / 1000, status="dead" if dead_reason else "done"
    )
    log.info(
        "job=%s batch=%d images=%d ok=%d error=%d ms=%.0f attempt=%d model=%s:%s%s",
        job_id,
        batch_no,
        len(uris),
        ok,
        sum(errors.values()),
        ms,
        start.attempt,
        spec.model_name,
        version,
        "" if counted else " (already counted)",
    )
    return Outcome(
        "dead" if dead_reason else "done",
        ok=ok,
        errors=dict(errors),
        attempt=start.attempt,
        finished_job=claimed,
    )


def _write_manifest(svc: Services, job_id: str, deadline: Deadline) -> None:
    retry(
        lambda: write_manifest(svc.storage, svc.ledger, job_id),
        deadline=deadline,
        record=True,
        what=f"manifest of {job_id}",
    )
    log.info("job %s complete: manifest written", job_id)


def _pin_version(svc: Services, spec: JobSpec, deadline: Deadline) -> int:
    """The job's model version: the newest AVAILABLE one, pinned by the first batch to ask.

    A job enqueued while the model tier was at zero or loading has no
    version yet. Waiting for one is part of the batch's retry budget; the
    ledger's pin (first writer wins) gives every batch the same version.
    """
    newest = retry(
        lambda: _newest_available(svc.model),
        deadline=deadline,
        what=f"an AVAILABLE version of model {spec.model_name}",
        on_retry=_count_retry("model"),
    )
    pinned = retry(
        lambda: svc.ledger.pin_model_version(spec.job_id, newest),
        deadline=deadline,
        what="ledger",
    )
    log.info("job %s: model version %d pinned for the whole job", spec.job_id, pinned)
    return pinned


def _newest_available(client: ModelClient) -> int:
    try:
        return client.newest_available_version()
    except ModelNotFound as exc:
        # No version AVAILABLE yet: the server is still loading. Worth waiting.
        raise ModelUnavailable(str(exc)) from None


def _malformed(job_id: object, batch_no: object, uris: object, etags: object) -> str | None:
    """Why a task's arguments cannot be a real batch, or None when they can."""
    if not is_valid_job_id(job_id):
        return "bad job id"
    if isinstance(batch_no, bool) or not isinstance(batch_no, int) or not 0 <= batch_no < 2**32:
        return "batch number must be an integer from 0 to 2**32-1"
    if not isinstance(uris, (list, tuple)) or not all(isinstance(u, str) for u in uris):
        return "uris must be a list of strings"
    if etags is not None and (
        not isinstance(etags, (list, tuple))
        or len(etags) != len(uris)
        or not all(e is None or isinstance(e, str) for e in etags)
    ):
        return "etags must be a list of strings (or nulls), one per URI"
    return None


def _count_retry(what: str) -> Callable[[TransientError], None]:
    return lambda _exc: metrics.record_retry(what)


def _classify_batch(
    svc: Services,
    job_id: str,
    batch_no: int,
    uris: Sequence[str],
    etags: Sequence[str | None] | None,
    model_name: str,
    version: int | None,
    deadline: Deadline,
) -> list[Record]:
    s = svc.settings
    loaded = load_batch(
        svc.storage,
        uris,
        s,
        svc.pool,
        etags=etags,
        deadline=deadline,
        on_retry=_count_retry("s3"),
        memory=svc.memory,
    )
    # Fetch and decode overlap on the thread pool: these are the batch's
    # thread-seconds in each, which is what tells where a worker's time goes.
    metrics.observe_stage("fetch", sum(x.fetch_s for x in loaded))
    metrics.observe_stage("preprocess", sum(x.decode_s for x in loaded))
    good = [x for x in loaded if isinstance(x, Loaded)]
    results: dict[str, Record] = {}
    if good:
        try:
            with metrics.stage("predict"):
                labels, model = classify(
                    svc.model,
                    [g.pixels for g in good],
                    model_name=model_name,
                    version=version,
                    deadline=deadline,
                    version_wait_s=s.version_wait_s,
                    on_retry=_count_retry("model"),
                )
        except InferenceError as exc:
            for g in good:
                results[g.uri] = ErrorRecord(g.uri, "inference", str(exc), job_id, batch_no)
        else:
            for g, lab in zip(good, labels, strict=True):
                results[g.uri] = OkRecord(g.uri, g.etag, lab, model, job_id, batch_no)
    out: list[Record] = []
    for item in loaded:
        if isinstance(item, Failed):
            err: ImageError = item.error
            out.append(ErrorRecord(item.uri, err.kind, err.message, job_id, batch_no, err.detail))
        else:
            out.append(results[item.uri])
    return out
