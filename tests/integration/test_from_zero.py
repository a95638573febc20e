"""A job enqueued while no model server runs: the model tier at zero, or loading.

Real Redis, the real S3 server, a real Celery worker, the producer as a
process, and ``serving local`` started only after the job is enqueued, on
the address everyone was told about (what KEDA scaling TF Serving up from
zero looks like to them). The job's first batch to meet an AVAILABLE
server pins the newest version for the whole job.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.helpers import check_job, put_many, tiny_photos
from tests.fixtures.model_server import start_model_server
from tests.fixtures.procs import free_port, wait_until
from tests.fixtures.stack import REPO, Pipeline

pytestmark = pytest.mark.integration


@pytest.fixture
def two_versions(tiny_model_base: Path, tmp_path: Path) -> Path:
    """A model base with versions 1 and 2 (the same tiny model)."""
    base = tmp_path / "models" / "inception"
    shutil.copytree(tiny_model_base / "1", base / "1")
    shutil.copytree(tiny_model_base / "1", base / "2")
    return base


def at_zero(
    pipeline_factory: Callable[..., Pipeline], redis_url: str, s3_server: Any, s3_bucket: str
) -> tuple[Pipeline, int]:
    """A pipeline whose model server address has nothing behind it yet."""
    port = free_port()
    # The server's start-up must fit in a batch's retry budget.
    p = pipeline_factory(
        redis_url=redis_url,
        s3=s3_server,
        bucket=s3_bucket,
        model_target=f"127.0.0.1:{port}",
        env={"LABELMILL_RETRY_BUDGET_S": "300"},
    )
    return p, port


def test_enqueue_at_zero_returns_and_the_job_completes_on_one_version(
    pipeline_factory: Callable[..., Pipeline],
    redis_url: str,
    s3_server: Any,
    s3_bucket: str,
    two_versions: Path,
    tmp_path: Path,
) -> None:
    p, port = at_zero(pipeline_factory, redis_url, s3_server, s3_bucket)
    inputs = put_many(p, tiny_photos("zero/", 10))
    output = f"s3://{s3_bucket}/labels"
    p.start_worker(concurrency=2)

    res = p.producer(
        "enqueue", f"s3://{s3_bucket}/zero/", "--output", output, "--batch-size", "3", "--json"
    )
    result = json.loads(res.stdout)
    assert result["model_version"] is None
    assert "no model version is AVAILABLE yet" in res.stderr
    job = result["job_id"]
    counts = p.ledger.counts(job)
    # Visible to the autoscaler before anything serves: 4 batches outstanding.
    assert counts.batches_outstanding == 4
    assert len(list(p.ledger.outstanding_batches(job))) == 4
    assert counts.spec.model_version is None

    server = start_model_server(two_versions, tmp_path / "model.log", port=port)
    try:
        p.wait_done(job, timeout=240)
    finally:
        server.proc.stop()
    checked = check_job(p, job, inputs, output)
    versions = {r["model"]["version"] for r in checked.output.lines}
    assert versions == {2}, "every line of the job on the newest version"
    assert checked.output.manifest["model"]["version"] == 2
    assert p.ledger.counts(job).spec.model_version == 2


def test_a_producer_killed_while_it_waits_leaves_work_that_completes_and_resumes(
    pipeline_factory: Callable[..., Pipeline],
    redis_url: str,
    s3_server: Any,
    s3_bucket: str,
    two_versions: Path,
    tmp_path: Path,
) -> None:
    p, port = at_zero(pipeline_factory, redis_url, s3_server, s3_bucket)
    inputs = put_many(p, tiny_photos("killed/", 6))
    output = f"s3://{s3_bucket}/labels"
    p.start_worker(concurrency=2)
    job = "j-killed-while-waiting"
    args = ["enqueue", f"s3://{s3_bucket}/killed/", "--output", output, "--job-id", job]
    args += ["--batch-size", "1", "--max-outstanding", "2"]
    err = tmp_path / "producer.err"
    with err.open("w") as stderr:
        producer = subprocess.Popen(
            [sys.executable, "-m", "producer", *args],
            env=p.env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        # The window is full and nothing serves: the producer waits for room
        # once both messages are sent (and their position recorded).
        wait_until(
            lambda: p.ledger.counts(job).batches_sent == 2,
            timeout=60,
            what="two batches sent",
        )
        assert producer.poll() is None
        producer.send_signal(signal.SIGKILL)
        producer.wait(timeout=10)
    finally:
        if producer.poll() is None:
            producer.kill()
            producer.wait()
    # What it sent is still outstanding (KEDA keeps both tiers up for it),
    # and its lease is left to lapse (labelmill/orphans.py) ...
    assert len(list(p.ledger.outstanding_batches(job))) == 2
    assert p.ledger.r.zscore(p.ledger.producers_key, job) is not None
    server = start_model_server(two_versions, tmp_path / "model.log", port=port)
    try:
        # ... and completes once the model tier is up.
        wait_until(
            lambda: (
                not list(p.ledger.outstanding_batches(job))
                and p.ledger.counts(job).batches_done == 2
            ),
            timeout=240,
            what="the killed producer's batches to complete",
        )
        assert p.ledger.counts(job).state == "enqueuing"
        # The same command resumes the job after its last sent batch.
        p.producer(*args)
        assert p.ledger.r.zscore(p.ledger.producers_key, job) is None, "lease released"
        p.wait_done(job, timeout=240)
    finally:
        server.proc.stop()
    checked = check_job(p, job, inputs, output)
    assert {r["model"]["version"] for r in checked.output.lines} == {2}
    assert max(checked.ledger_attempts.values()) == 1, "no batch ran twice"


def test_a_full_window_with_no_model_version_gives_up_leaving_the_job_resumable(
    pipeline_factory: Callable[..., Pipeline],
    redis_url: str,
    s3_server: Any,
    s3_bucket: str,
) -> None:
    p, _port = at_zero(pipeline_factory, redis_url, s3_server, s3_bucket)
    p.env["LABELMILL_RETRY_BUDGET_S"] = "3"  # how long anyone waits for a version
    put_many(p, tiny_photos("never/", 3))
    job = "j-no-model-ever"
    args = ["enqueue", f"s3://{s3_bucket}/never/", "--output", f"s3://{s3_bucket}/labels"]
    args += ["--job-id", job, "--batch-size", "1", "--max-outstanding", "1"]
    res = p.producer(*args, check=False, timeout=60)
    assert res.returncode == 3, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "no model version became AVAILABLE within 3s" in last
    assert f"--job-id {job}" in last
    assert "Traceback" not in res.stderr
    counts = p.ledger.counts(job)
    assert (counts.state, counts.batches_sent) == ("enqueuing", 1)
    assert p.ledger.r.zscore(p.ledger.producers_key, job) is None, "lease released"
