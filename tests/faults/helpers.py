"""Shared by the fault and security suites: the invariant checker and process tools.

The invariant every fault test ends with (``check_job``): every input image
has exactly one result line, every part file parses, the ledger's counters
equal the lines, the job is ``done`` with a manifest that agrees, and the
only dead batches are the ones the test expects.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelmill.errors import ERROR_KINDS
from labelmill.job import Ledger
from labelmill.job.record import SCHEMA
from tests import images
from tests.fixtures.procs import Proc, wait_until
from tests.fixtures.stack import Pipeline

JOB_FILES = {"_job.json", "_manifest.json", "_SUCCESS"}


# --------------------------------------------------------------------------- inputs


def put_many(p: Pipeline, objects: dict[str, bytes]) -> list[str]:
    """Upload ``objects`` (key -> bytes) to the pipeline's bucket; return their URIs."""
    client = p.s3

    def put(item: tuple[str, bytes]) -> None:
        client.put_object(Bucket=p.bucket, Key=item[0], Body=item[1])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, objects.items()))
    return [f"s3://{p.bucket}/{k}" for k in sorted(objects)]


def tiny_photos(prefix: str, n: int) -> dict[str, bytes]:
    """``n`` distinct 16x16 JPEGs under ``prefix`` (cheap to fetch, decode and classify)."""
    return {f"{prefix}img-{i:04d}.jpg": images.jpeg(16, 16, seed=i) for i in range(n)}


# --------------------------------------------------------------------------- outputs


@dataclass
class JobOutput:
    """Everything a job left in storage, parsed."""

    files: dict[str, bytes]
    lines: list[dict[str, Any]] = field(default_factory=list)
    parts: dict[int, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def manifest(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.files["_manifest.json"])
        return result


def read_output(p: Pipeline, output: str, job_id: str) -> JobOutput:
    """Read ``<output>/<job_id>/`` from S3 (``s3://``) or the local disk (a path)."""
    files: dict[str, bytes] = {}
    if output.startswith("s3://"):
        bucket, _, key = output[len("s3://") :].partition("/")
        prefix = f"{key.rstrip('/')}/{job_id}/".lstrip("/")
        client = p.s3
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(prefix) :]
                files[name] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    else:
        root = Path(output) / job_id
        for path in root.rglob("*"):
            if path.is_file():
                files[str(path.relative_to(root))] = path.read_bytes()
    out = JobOutput(files)
    for name, body in sorted(files.items()):
        if name in JOB_FILES or name.startswith("_inputs/"):  # the input manifest
            continue
        assert name.startswith("part-") and name.endswith(".jsonl"), f"stray file {name!r}"
        batch_no = int(name[len("part-") : -len(".jsonl")])
        text = body.decode("utf-8")  # a corrupt part file fails here or below
        assert text.endswith("\n"), f"{name} does not end with a newline (torn write?)"
        records = [json.loads(line) for line in text.splitlines()]
        for r in records:
            assert r["schema"] == SCHEMA and r["job_id"] == job_id and r["batch"] == batch_no, r
            assert r["status"] in ("ok", "error"), r
            if r["status"] == "ok":
                assert len(r["labels"]) == 5, r
            else:
                assert r["error"]["kind"] in ERROR_KINDS, r
        out.parts[batch_no] = records
        out.lines.extend(records)
    return out


@dataclass
class Checked:
    """What ``check_job`` found, for further assertions."""

    output: JobOutput
    by_uri: dict[str, dict[str, Any]]
    ledger_attempts: dict[int, int]


def check_job(
    p: Pipeline,
    job_id: str,
    inputs: Iterable[str],
    output: str,
    *,
    dead: Sequence[int] = (),
    ledger: Ledger | None = None,
) -> Checked:
    """Assert the fault suite's invariant for a finished job (see the module docstring)."""
    ledger = ledger or p.ledger
    inputs = list(inputs)
    out = read_output(p, output, job_id)
    uris = [r["uri"] for r in out.lines]
    dupes = [u for u, n in Counter(uris).items() if n > 1]
    assert not dupes, f"{len(dupes)} images have more than one line, e.g. {dupes[:3]}"
    missing = sorted(set(inputs) - set(uris))
    assert not missing, f"{len(missing)} images have no line, e.g. {missing[:3]}"
    extra = sorted(set(uris) - set(inputs))
    assert not extra, f"lines for images never enqueued: {extra[:3]}"

    counts = ledger.counts(job_id)
    ok = sum(1 for r in out.lines if r["status"] == "ok")
    kinds = Counter(r["error"]["kind"] for r in out.lines if r["status"] == "error")
    assert counts.state == "done", f"job state is {counts.state}"
    assert counts.images_total == len(inputs)
    assert (counts.images_ok, counts.images_error) == (ok, sum(kinds.values()))
    assert counts.errors == dict(kinds)
    assert counts.batches_total == len(out.parts) == counts.batches_done
    assert sorted(out.parts) == list(range(len(out.parts)))

    dead_parts = sorted(
        b
        for b, rs in out.parts.items()
        if rs and all(r.get("error", {}).get("kind") == "dead" for r in rs)
    )
    assert dead_parts == sorted(dead), f"dead batches {dead_parts}, expected {sorted(dead)}"
    assert ledger.dead_batches(job_id) == sorted(dead)
    assert counts.batches_dead == len(dead)
    assert not list(ledger.outstanding_batches(job_id)), "batches left in the outstanding set"

    manifest = out.manifest
    assert manifest["images"] == {
        "total": len(inputs),
        "ok": ok,
        "error": sum(kinds.values()),
        "skipped": counts.images_skipped,
        "carried": 0,
    }
    assert manifest["errors"] == dict(sorted(kinds.items()))
    assert manifest["dead_batches"] == sorted(dead)
    assert "_SUCCESS" in out.files
    attempts = {
        int(k): int(v) for k, v in ledger.r.hgetall(f"labelmill:job:{job_id}:attempts").items()
    }
    return Checked(out, {r["uri"]: r for r in out.lines}, attempts)


# --------------------------------------------------------------------------- processes


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces: fields start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry))
    return sorted(found)


def pool_children(worker: Proc, expect: int = 1, timeout: float = 60) -> list[int]:
    """The pool processes of a Celery worker (prefork), once ``expect`` of them run."""

    def enough() -> list[int]:
        kids = children(worker.pid)
        return kids if len(kids) >= expect else []

    result = wait_until(enough, timeout=timeout, what="celery pool processes")
    assert isinstance(result, list)
    return result


def rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


@contextmanager
def frozen(pids: Sequence[int]) -> Iterator[None]:
    """SIGSTOP ``pids`` for the block (so a test can look, then act, without a race)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def in_flight(ledger: Ledger, job_id: str) -> set[int]:
    """Batches that a worker started (a delivery was counted) but did not finish."""
    key = f"labelmill:job:{job_id}"
    started = {int(b) for b in ledger.r.hkeys(f"{key}:attempts")}
    return {b for b in started if not ledger.is_done(job_id, b)}


def wait_in_flight(ledger: Ledger, job_id: str, *, timeout: float = 60) -> None:
    """Wait until some batch of the job is running and some are done (mid-job)."""
    wait_until(
        lambda: in_flight(ledger, job_id) and ledger.counts(job_id).batches_done >= 1,
        timeout=timeout,
        interval=0.01,
        what=f"job {job_id} to be mid-way",
    )


@contextmanager
def frozen_holding(
    pids: Sequence[int], ledger: Ledger, job_id: str, *, timeout: float = 60
) -> Iterator[set[int]]:
    """SIGSTOP ``pids`` while the job has batches in flight; yields those batches.

    A batch seen in flight can finish in the instant before the freeze (tiny
    images take milliseconds), leaving the frozen processes holding nothing:
    then they are thawed and caught again, until ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        wait_in_flight(ledger, job_id, timeout=max(deadline - time.monotonic(), 1))
        with frozen(pids):
            victims = in_flight(ledger, job_id)
            if victims:
                yield victims
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id}: never caught a batch in flight")


def log_text(proc: Proc) -> str:
    return proc.log_path.read_text(errors="replace")
