"""Job-level views shared by producer and workers: ids, ``status --json``, the manifest."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime
from typing import Any

from labelmill.job.folder import JobFolder, job_uri
from labelmill.job.ledger import Ledger
from labelmill.job.model import CARRIED, INCREMENTAL_COUNTS, JobCounts, JobState
from labelmill.job.record import SCHEMA, weights_dict
from labelmill.storage import ObjectStore


def new_job_id(now: float | None = None) -> str:
    """``j-YYYYMMDD-HHMMSS-xxxxxxxx``: the time plus 32 random bits."""
    stamp = datetime.fromtimestamp(now or time.time(), tz=UTC).strftime("%Y%m%d-%H%M%S")
    return f"j-{stamp}-{secrets.token_hex(4)}"


def is_valid_job_id(job_id: object) -> bool:
    """Whether ``job_id`` is a job id the producer could have made or accepted.

    The same rule as ``producer``'s ``--job-id``: 1-128 letters, digits,
    ``-``, ``_`` and ``.``, not starting with ``.``. Workers check it on
    every message, so a crafted one cannot name keys or paths of its choice.
    """
    return (
        isinstance(job_id, str)
        and 0 < len(job_id) <= 128
        and not job_id.startswith(".")
        and all(c.isascii() and (c.isalnum() or c in "-_.") for c in job_id)
    )


def model_dict(counts: JobCounts) -> dict[str, Any]:
    spec = counts.spec
    return weights_dict(spec.model_name, spec.model_version, counts.model_weights or None)


def status_dict(counts: JobCounts, now: float | None = None) -> dict[str, Any]:
    """The object ``producer status --json`` prints (see the README for fields)."""
    now = now or time.time()
    finished = counts.images_ok + counts.images_error
    # From job creation: the first results arrive a whole batch after the
    # start, so timing from them would overstate the rate of a short job.
    started = counts.created_at
    end = (counts.finished_at or now) if counts.state.ended else now
    elapsed = max(end - started, 1e-9)
    rate = finished / elapsed
    remaining = max(counts.images_total - finished, 0)
    eta: float | None
    if counts.state.ended:
        eta = 0.0
    elif rate > 0 and counts.enqueue_complete:
        eta = round(remaining / rate, 1)
    else:
        eta = None
    batches_total = counts.batches_total if counts.enqueue_complete else counts.batches_sent
    return {
        "job_id": counts.spec.job_id,
        "state": counts.state,
        "input": counts.spec.input,
        "output": job_uri(counts.spec),
        "images": {
            "total": counts.images_total,
            "ok": counts.images_ok,
            "error": counts.images_error,
            "skipped": counts.images_skipped,
            "carried": counts.incremental.get(CARRIED, 0),
        },
        "incremental": incremental_dict(counts),
        "errors": dict(sorted(counts.errors.items())),
        "skipped": dict(sorted(counts.skipped.items())),
        "batches": {
            "total": batches_total,
            "done": counts.batches_done - counts.batches_dead,
            "dead": counts.batches_dead,
            "outstanding": counts.batches_outstanding if counts.state != JobState.CANCELLED else 0,
        },
        "enqueue_complete": counts.enqueue_complete,
        "model": model_dict(counts),
        "images_per_s": round(rate, 2),
        "eta_s": eta,
    }


def incremental_dict(counts: JobCounts) -> dict[str, Any] | None:
    """An incremental job's base and what it found compared with it (None: not incremental)."""
    if counts.spec.base is None:
        return None
    found = {k: counts.incremental.get(k, 0) for k in INCREMENTAL_COUNTS}
    return {"base": counts.spec.base, **found}


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat() if ts else None


def manifest_dict(counts: JobCounts, now: float | None = None) -> dict[str, Any]:
    """The job's ``_manifest.json``: spec, counts, model, times, throughput."""
    # The time the job was complete, as the ledger recorded it when the
    # manifest was first claimed: whoever writes the manifest, and however
    # often, it has the same bytes.
    finished = counts.finished_at or now or time.time()
    status = status_dict(counts, finished)
    elapsed = finished - counts.created_at
    return {
        "schema": SCHEMA,
        "job_id": counts.spec.job_id,
        "spec": counts.spec.as_dict(),
        "images": status["images"],
        "incremental": status["incremental"],
        "errors": status["errors"],
        "skipped": status["skipped"],
        "batches": {k: v for k, v in status["batches"].items() if k != "outstanding"},
        "dead_batches": None,  # filled by write_manifest
        "model": status["model"],
        "started_at": _iso(counts.created_at),
        "finished_at": _iso(finished),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round((counts.images_ok + counts.images_error) / max(elapsed, 1e-9), 2),
    }


def times_dict(counts: JobCounts, now: float | None = None) -> dict[str, Any]:
    """When the job started and finished (as the manifest says), and for how long it ran."""
    end = counts.finished_at if counts.state.ended and counts.finished_at else None
    elapsed = (end or now or time.time()) - counts.created_at
    return {
        "started_at": _iso(counts.created_at),
        "finished_at": _iso(end),
        "elapsed_s": round(elapsed, 1),
    }


def write_manifest(storage: ObjectStore, ledger: Ledger, job_id: str) -> dict[str, Any]:
    """Write ``_manifest.json`` then ``_SUCCESS`` and mark the job done in the ledger."""
    counts = ledger.counts(job_id)
    manifest = manifest_dict(counts)
    manifest["dead_batches"] = ledger.dead_batches(job_id)
    JobFolder.of(storage, counts.spec).write_manifest(manifest)
    ledger.mark_done(job_id)
    return manifest


def close_abandoned(storage: ObjectStore, ledger: Ledger) -> list[str]:
    """Write the manifest of each complete job whose claim lapsed; return their ids.

    The claim's holder died or gave up between claiming and writing (the
    workers' periodic sweep calls this), so that no job stays ``running``
    with nothing left to do.
    """
    closed = []
    for job_id in ledger.lapsed_claims():
        if ledger.take_over_manifest(job_id):
            write_manifest(storage, ledger, job_id)
            closed.append(job_id)
    return closed
