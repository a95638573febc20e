"""Server faults: the model server, Redis and S3 going away mid-job.

Each test breaks a private server of its own (the session servers are
shared with other tests) and checks the same invariant as every fault test.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from labelmill.queue import pending_batches
from tests.faults.helpers import check_job, log_text, put_many, tiny_photos, wait_in_flight
from tests.fixtures.model_server import SERVING, health_status, serving_env, start_model_server
from tests.fixtures.procs import Proc, wait_until
from tests.fixtures.servers import RedisServer, S3Server
from tests.fixtures.stack import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MakePipeline = Callable[..., Pipeline]


def _hold_down(p: Pipeline, job_id: str, seconds: float) -> None:
    """Keep a fault in place for ``seconds``, checking that no batch is declared dead meanwhile.

    The duration is the fault's, not a synchronisation: what the test waits
    for afterwards is a condition (the job finishing).
    """
    ledger = p.ledger
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert int(ledger.r.hget(f"labelmill:job:{job_id}", "batches_dead") or 0) == 0
        time.sleep(0.5)


def test_model_server_down_for_20s(
    pipeline_factory: MakePipeline,
    redis_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model_base: Path,
    tmp_path: Path,
) -> None:
    model = start_model_server(tiny_model_base, tmp_path / "model-1.log")
    p = pipeline_factory(
        redis_url=redis_url,
        s3=s3_server,
        bucket=s3_bucket,
        model_target=model.target,
        # The outage (20 s, then the server's own start-up) must fit the budget.
        env={"LABELMILL_RETRY_BUDGET_S": "300"},
    )
    try:
        inputs = put_many(p, tiny_photos("in/", 320))
        out = f"s3://{p.bucket}/out/"
        job = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "8")
        job_id = job["job_id"]
        worker = p.start_worker(concurrency=2)
        wait_in_flight(p.ledger, job_id)
        model.proc.kill()
        model.proc.stop()  # closes its log
        _hold_down(p, job_id, 20)
        counts = p.ledger.counts(job_id)
        assert counts.state == "running" and counts.batches_done < (counts.batches_total or 0)
        # Same port, same model: what a restarted TF Serving pod looks like.
        model.proc = Proc(model.proc.args, log=tmp_path / "model-2.log", env=serving_env())
        model.proc.wait_ready(
            lambda: health_status(model.target) == SERVING, timeout=180, what="model server"
        )
        p.wait_done(job_id, timeout=300)
        checked = check_job(p, job_id, inputs, out)
        # The batches caught by the outage waited it out (retrying with
        # backoff) inside their first delivery: none was redelivered or dead.
        assert set(checked.ledger_attempts.values()) == {1}
        took = [int(m) for m in re.findall(r" ms=(\d+) ", log_text(worker))]
        assert max(took) >= 20_000, "no batch spanned the outage"
    finally:
        p.stop_workers()
        model.proc.stop()


def _private_redis_pipeline(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
) -> tuple[RedisServer, Pipeline]:
    redis = redis_server_factory()
    return redis, pipeline_factory(redis_url=redis.url, s3=s3_server, bucket=s3_bucket)


def _job_in_flight(p: Pipeline) -> tuple[list[str], str, str]:
    """A 40-batch job with two pool processes at work: (inputs, output, job id)."""
    inputs = put_many(p, tiny_photos("in/", 320))
    out = f"s3://{p.bucket}/out/"
    job_id = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "8")["job_id"]
    p.start_worker(concurrency=2)
    wait_in_flight(p.ledger, job_id)
    return inputs, out, job_id


def test_redis_killed_and_restarted_with_aof(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    redis, p = _private_redis_pipeline(pipeline_factory, redis_server_factory, s3_server, s3_bucket)
    inputs, out, job_id = _job_in_flight(p)
    redis.restart(keep_data=True, kill=True)  # SIGKILL, then start on the same AOF
    ledger = p.ledger

    def finished_or_stalled() -> str | None:
        if ledger.counts(job_id).state == "done":
            return "done"
        # Stalled: batches still outstanding, none of them with a message. (A
        # message of a batch that did finish can linger as unacknowledged,
        # its ack lost with the old connection, until the visibility timeout.)
        waiting = set(ledger.outstanding_batches(job_id))
        return "stalled" if waiting and not waiting & pending_batches(ledger.r, job_id) else None

    outcome = wait_until(finished_or_stalled, timeout=180, what="the job to finish or stall")
    if outcome == "stalled":
        # kombu's Redis transport can lose a message that a worker took in the
        # instant Redis died (BRPOP done, not yet recorded as unacked): the
        # Guarantees section says so, and `producer retry` re-sends it.
        res = json.loads(p.producer("retry", job_id, "--json").stdout)
        assert res["missing_batches_resent"], "stalled, yet retry found nothing to re-send"
    p.wait_done(job_id, timeout=180)
    check_job(p, job_id, inputs, out)


def test_redis_lost_everything_reconcile_recovers(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    redis, p = _private_redis_pipeline(pipeline_factory, redis_server_factory, s3_server, s3_bucket)
    inputs, out, job_id = _job_in_flight(p)
    redis.restart(keep_data=False, kill=True)  # queue and ledger gone
    ledger = p.ledger
    # Whatever was running finishes; then nothing is left to do in Redis.
    wait_until(
        lambda: ledger.r.llen("classify") == 0 and ledger.r.hlen("unacked") == 0,
        timeout=60,
        what="the workers to go idle",
    )
    res = p.producer("reconcile", job_id, "--output", out, "--json")
    assert '"missing_batches_resent": [' in res.stdout
    p.wait_done(job_id, timeout=180)
    check_job(p, job_id, inputs, out)


def test_s3_down_for_10s(
    pipeline_factory: MakePipeline,
    redis_url: str,
    s3_server_factory: Callable[[], S3Server],
) -> None:
    s3 = s3_server_factory()
    bucket = s3.create_bucket()
    p = pipeline_factory(redis_url=redis_url, s3=s3, bucket=bucket)
    inputs = put_many(p, tiny_photos("in/", 320))
    out = f"s3://{bucket}/out/"
    job = p.enqueue(f"s3://{bucket}/in/", out, "--batch-size", "8")
    job_id = job["job_id"]
    worker = p.start_worker(concurrency=2)
    wait_in_flight(p.ledger, job_id)
    s3.stop()
    _hold_down(p, job_id, 10)
    assert p.ledger.counts(job_id).state == "running"
    s3.start()
    p.wait_done(job_id, timeout=180)
    check_job(p, job_id, inputs, out)
    assert "retry" in log_text(worker)
