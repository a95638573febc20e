"""Server faults: the model server, Redis and S3 going away mid-job.

Each test breaks a private server of its own (the session servers are
shared with other tests) and checks the same invariant as every fault test.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labelmill.queue import pending_batches, queued_count
from tests import images
from tests.faults.conftest import Fronted
from tests.faults.helpers import (
    check_job,
    frozen,
    in_flight,
    log_text,
    put_many,
    tiny_photos,
    wait_in_flight,
)
from tests.fixtures.model_server import (
    SERVING,
    ModelServer,
    health_status,
    serving_env,
    start_model_server,
)
from tests.fixtures.procs import Proc, wait_until
from tests.fixtures.servers import RedisServer, S3Server
from tests.fixtures.stack import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.faults]

MakePipeline = Callable[..., Pipeline]
PRODUCER = str(Path(sys.executable).parent / "producer")
SHORT_VISIBILITY = {"LABELMILL_VISIBILITY_TIMEOUT_S": "15", "LABELMILL_RESTORE_INTERVAL_S": "1"}


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


def _own_model_server_pipeline(
    pipeline_factory: MakePipeline, model_base: Path, tmp_path: Path, **kwargs: Any
) -> tuple[ModelServer, Pipeline]:
    """A pipeline on a model server of its own, for a test to kill and restart."""
    model = start_model_server(model_base, tmp_path / "model-1.log")
    # An outage, then the server's own start-up, must fit in the retry budget.
    env = {"LABELMILL_RETRY_BUDGET_S": "300"}
    return model, pipeline_factory(model_target=model.target, env=env, **kwargs)


def _restart(model: ModelServer, tmp_path: Path) -> None:
    """Same port, same model: what a restarted TF Serving pod looks like."""
    model.proc = Proc(model.proc.args, log=tmp_path / "model-2.log", env=serving_env())


def test_model_server_down_for_20s(
    pipeline_factory: MakePipeline,
    redis_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model_base: Path,
    tmp_path: Path,
) -> None:
    model, p = _own_model_server_pipeline(
        pipeline_factory,
        tiny_model_base,
        tmp_path,
        redis_url=redis_url,
        s3=s3_server,
        bucket=s3_bucket,
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
        _restart(model, tmp_path)
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


def test_model_server_answering_internal_for_a_while(fronted: Fronted) -> None:
    """A server fault (INTERNAL) is retried within the batch's budget, not written as a line."""
    front, p = fronted
    inputs = put_many(p, tiny_photos("in/", 64))
    out = f"s3://{p.bucket}/out/"
    front.failing.set()
    job_id = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "8")["job_id"]
    p.start_worker(concurrency=2)
    wait_until(lambda: front.faults >= 6, timeout=60, what="Predicts answered INTERNAL")
    front.failing.clear()
    p.wait_done(job_id)
    checked = check_job(p, job_id, inputs, out)
    assert checked.output.manifest["images"]["ok"] == 64
    assert set(checked.ledger_attempts.values()) == {1}  # waited out, not redelivered


def _private_redis_pipeline(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
) -> tuple[RedisServer, Pipeline]:
    redis = redis_server_factory()
    # A message a worker had received but not yet started when Redis went
    # down stays unacknowledged until the visibility timeout (the Guarantees
    # section): short here, so such a job finishes within the test.
    return redis, pipeline_factory(
        redis_url=redis.url, s3=s3_server, bucket=s3_bucket, env=SHORT_VISIBILITY
    )


def _job_in_flight(p: Pipeline) -> tuple[list[str], str, str]:
    """A 40-batch job with two pool processes at work: (inputs, output, job id)."""
    inputs = put_many(p, tiny_photos("in/", 320))
    out = f"s3://{p.bucket}/out/"
    job_id = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "8")["job_id"]
    p.start_worker(concurrency=2)
    wait_in_flight(p.ledger, job_id)
    return inputs, out, job_id


def _finish_or_retry(p: Pipeline, job_id: str) -> None:
    """Wait for the job; if it stalls on a message lost with Redis, `producer retry` it."""
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


def test_redis_killed_and_restarted_with_aof(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    redis, p = _private_redis_pipeline(pipeline_factory, redis_server_factory, s3_server, s3_bucket)
    inputs, out, job_id = _job_in_flight(p)
    redis.restart(keep_data=True, kill=True)  # SIGKILL, then start on the same AOF
    _finish_or_retry(p, job_id)
    check_job(p, job_id, inputs, out)


def test_redis_dies_under_an_idle_consumer_the_worker_stays_up(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model_base: Path,
    tmp_path: Path,
) -> None:
    """Redis goes away while the consumer waits in BRPOP with a message unacknowledged.

    The worker must reconnect, not exit. The failure this pins down needs
    an order of events that a plain kill only hits by chance: the control
    channel's (PUBSUB) socket fails first, while Redis is still down, and
    the consumer then closes a connection whose unacknowledged message it
    cannot requeue. Celery 5.7.0 exits there with "Unrecoverable error".
    The worker's main process is frozen while both sockets are cut, so its
    event loop sees them in that order.
    """
    redis = redis_server_factory()
    model, p = _own_model_server_pipeline(
        pipeline_factory,
        tiny_model_base,
        tmp_path,
        redis_url=redis.url,
        s3=s3_server,
        bucket=s3_bucket,
    )
    try:
        inputs = put_many(p, tiny_photos("in/", 8))
        out = f"s3://{p.bucket}/out/"
        job_id = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "8")["job_id"]
        model.proc.kill()  # the one batch waits for the model server, unacknowledged
        model.proc.stop()
        worker = p.start_worker(concurrency=2)
        r = redis.client()

        def consumer_waiting() -> bool:
            running = bool(in_flight(p.ledger, job_id))  # in a pool process, not just received
            waiting = any(c["cmd"] == "brpop" for c in r.client_list())
            return running and waiting and r.hlen("unacked") == 1

        wait_until(consumer_waiting, timeout=60, what="one batch running and the consumer in BRPOP")
        with frozen([worker.pid]):
            r.client_kill_filter(_type="pubsub")
            redis.stop()  # a clean stop: the unacked record is on disk
        wait_until(
            lambda: "Connection to broker lost" in log_text(worker) or not worker.alive(),
            timeout=30,
            what="the worker to notice",
        )
        redis.start()  # same port, same AOF
        # The batch cannot finish before the model server is back: its message
        # is still recorded as delivered and unacknowledged.
        assert redis.client().hlen("unacked") == 1
        _restart(model, tmp_path)
        _finish_or_retry(p, job_id)
        assert worker.alive(), worker.log_tail(60)
        # The running batch's late ack went through the old channel to the
        # restarted Redis (no redelivery after the visibility timeout needed).
        r = redis.client()
        wait_until(lambda: r.hlen("unacked") == 0, timeout=30, what="the late ack")
        check_job(p, job_id, inputs, out)
        # And the reconnected consumer takes new work.
        more = put_many(p, tiny_photos("more/", 8))
        out2 = f"s3://{p.bucket}/out2/"
        job2 = p.enqueue(f"s3://{p.bucket}/more/", out2, "--batch-size", "8")["job_id"]
        p.wait_done(job2, timeout=60)
        check_job(p, job2, more, out2)
        assert "Unrecoverable error" not in log_text(worker)
    finally:
        p.stop_workers()
        model.proc.stop()


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
        lambda: queued_count(ledger.r) == 0 and ledger.r.hlen("unacked") == 0,
        timeout=60,
        what="the workers to go idle",
    )
    res = p.producer("reconcile", job_id, "--output", out, "--json")
    assert '"missing_batches_resent": [' in res.stdout
    p.wait_done(job_id, timeout=180)
    check_job(p, job_id, inputs, out)


def test_the_bucket_changes_under_a_running_job_then_redis_loses_everything(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Reconcile re-sends exactly what was listed, whatever the bucket holds by then."""
    redis, p = _private_redis_pipeline(pipeline_factory, redis_server_factory, s3_server, s3_bucket)
    inputs = put_many(p, tiny_photos("in/", 320))
    out = f"s3://{p.bucket}/out/"
    window = 6
    producer = Proc(
        [PRODUCER, "enqueue", f"s3://{p.bucket}/in/", "--output", out, "--job-id", "j-changes",
         "--batch-size", "8", "--max-outstanding", str(window)],
        log=tmp_path / "producer.log", env=p.env,
    )  # fmt: skip
    ledger = p.ledger
    # No worker yet: the producer records all 40 batches, sends a window's worth and waits.
    wait_until(
        lambda: (
            ledger.r.exists("labelmill:job:j-changes")
            and ledger.counts("j-changes").batches_sent >= window
        ),
        timeout=60,
        what="the first window sent",
    )
    # The bucket changes under the running job ...
    deleted, overwritten = inputs[100:105], inputs[200:205]
    for uri in deleted:
        p.s3.delete_object(Bucket=p.bucket, Key=uri.split("/", 3)[3])
    for i, uri in enumerate(overwritten):
        p.put(uri.split("/", 3)[3], images.jpeg(24, 24, seed=1000 + i))
    added = put_many(
        p, {"in/000-first.jpg": images.jpeg(8, 8), "in/zzz-last.jpg": images.jpeg(8, 8)}
    )
    p.start_worker(concurrency=2)
    wait_until(lambda: ledger.counts("j-changes").batches_done >= 3, timeout=60, what="progress")
    # ... and Redis loses everything; the producer, its job gone, gives up.
    redis.restart(keep_data=False, kill=True)
    wait_until(lambda: not producer.alive(), timeout=120, what="the producer to give up")
    assert producer.stop() != 0, producer.log_tail()
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        r = p.ledger.r
        while not stop.is_set():
            peak = max(peak, queued_count(r) + int(r.hlen("unacked")))
            stop.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = json.loads(p.producer("reconcile", "j-changes", "--output", out, "--json").stdout)
        p.wait_done("j-changes", timeout=180)
    finally:
        stop.set()
        watcher.join()
    assert res["missing_batches_resent"]
    checked = check_job(p, "j-changes", inputs, out)  # the added objects have no line
    assert not set(added) & checked.by_uri.keys()
    assert {checked.by_uri[u]["error"]["kind"] for u in deleted} == {"not_found"}
    assert {checked.by_uri[u]["error"]["kind"] for u in overwritten} == {"changed"}
    assert peak <= window, f"Redis held {peak} messages, over the job's window of {window}"


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
