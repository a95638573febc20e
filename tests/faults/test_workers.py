"""Worker faults: killed pool processes, killed workers, scale-in, poison batches, races.

Each test enqueues a few hundred tiny images first and starts the workers
after, so the job is surely mid-way when the fault is injected; processes
are frozen (SIGSTOP) while the test decides what is in flight, so the
victims are known exactly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labelmill.queue import pending_batches, queue_lists, queued_tasks
from tests import images
from tests.faults.conftest import Fronted
from tests.faults.helpers import (
    check_job,
    frozen,
    frozen_holding,
    in_flight,
    log_text,
    pool_children,
    put_many,
    tiny_photos,
    wait_in_flight,
)
from tests.fixtures.model_server import start_model_server
from tests.fixtures.procs import free_port, wait_until
from tests.fixtures.stack import Pipeline

MakePipeline = Callable[..., Pipeline]

pytestmark = [pytest.mark.integration, pytest.mark.faults]

N_IMAGES = 320
BATCH = "8"  # 40 batches

# Short enough for a test, long enough for any batch here. Production: 3600 s.
SHORT_VISIBILITY = {"LABELMILL_VISIBILITY_TIMEOUT_S": "10", "LABELMILL_RESTORE_INTERVAL_S": "1"}


def _job(p: Pipeline, n: int = N_IMAGES) -> tuple[str, list[str], str]:
    inputs = put_many(p, tiny_photos("in/", n))
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", BATCH)
    assert job["images_total"] == n
    return job["job_id"], inputs, out


def test_killed_pool_process_batch_is_redelivered(pipeline: Pipeline) -> None:
    p = pipeline
    job_id, inputs, out = _job(p)
    worker = p.start_worker(concurrency=1)
    ledger = p.ledger
    [child] = pool_children(worker)
    with frozen_holding([child], ledger, job_id) as victims:
        os.kill(child, signal.SIGKILL)

    p.wait_done(job_id)
    checked = check_job(p, job_id, inputs, out)
    for b in victims:
        assert checked.ledger_attempts[b] >= 2, f"batch {b} was not redelivered"
        assert all(r["status"] == "ok" for r in checked.output.parts[b])
    assert worker.alive(), "the worker's main process must survive its pool child"
    assert "WorkerLostError" in log_text(worker)
    assert pool_children(worker) != [child]


def test_a_killed_worker_container_s_batches_are_back_within_two_minutes(
    pipeline: Pipeline,
) -> None:
    # Default settings: what an OOM kill of a worker pod looks like on Kubernetes.
    p = pipeline
    job_id, inputs, out = _job(p)
    first = p.start_worker(concurrency=2)
    ledger = p.ledger
    # Only the pool processes are frozen (to hold their batches in flight).
    # A frozen main process blocked in BRPOP would still be handed a message
    # by Redis, into a socket nobody reads: lost, where a killed process's
    # closed socket makes Redis give up the BRPOP at once.
    pids = pool_children(first, expect=2)
    with frozen_holding(pids, ledger, job_id) as victims:
        first.kill()  # SIGKILL to the whole process group: main and pool
    killed_at = time.time()
    p.start_worker(concurrency=2, name="w1")  # a peer: the rest of the tier
    # Their messages sit in the unacked hash: no consumer owns them any more.
    assert ledger.r.zcard("unacked_index") >= len(victims)

    wait_until(
        lambda: all(ledger.is_done(job_id, b) for b in victims),
        timeout=150,
        interval=0.05,
        what="the killed worker's batches to run again",
    )
    assert time.time() - killed_at < 120
    p.wait_done(job_id)
    checked = check_job(p, job_id, inputs, out)  # one line per image, none dead
    for b in victims:
        assert checked.ledger_attempts[b] >= 2
    assert ledger.r.hlen("unacked") == 0


def test_a_message_a_dying_worker_took_off_the_queue_is_sent_again(pipeline: Pipeline) -> None:
    # kombu takes a message with BRPOP and only then records it as unacked:
    # a worker killed in between takes it with it (labelmill/lost.py). The
    # RPOP here is that BRPOP, by a worker that dies before the next step.
    p = pipeline
    job_id, inputs, out = _job(p, n=40)
    ledger = p.ledger
    every_batch = pending_batches(ledger.r, job_id)
    popped = next(ledger.r.rpop(name) for name in queue_lists() if ledger.r.llen(name))
    assert popped is not None
    [lost] = every_batch - pending_batches(ledger.r, job_id)
    worker = p.start_worker(concurrency=1, extra={"LABELMILL_SWEEP_INTERVAL_S": "1"})
    p.wait_done(job_id, timeout=60)
    checked = check_job(p, job_id, inputs, out)
    assert checked.ledger_attempts[lost] == 1, "sent again once, run once"
    assert f"batches [{lost}] had no message" in log_text(worker)


def test_a_batch_longer_than_the_visibility_timeout_runs_once(
    pipeline_factory: MakePipeline,
    redis_url: str,
    s3_server: Any,
    s3_bucket: str,
    tiny_model_base: Path,
    tmp_path: Path,
) -> None:
    # One batch that waits for its model server for several visibility
    # timeouts, while a second worker sweeps the unacked index every second.
    port = free_port()
    short = {"LABELMILL_VISIBILITY_TIMEOUT_S": "10", "LABELMILL_RESTORE_INTERVAL_S": "1"}
    p = pipeline_factory(
        redis_url=redis_url,
        s3=s3_server,
        bucket=s3_bucket,
        model_target=f"127.0.0.1:{port}",
        env={**short, "LABELMILL_RETRY_BUDGET_S": "300"},
    )
    inputs = put_many(p, tiny_photos("long/", 4))
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/long/", out, "--batch-size", "4")["job_id"]
    p.start_worker(concurrency=1)
    p.start_worker(concurrency=1, name="w1")
    ledger = p.ledger
    wait_until(lambda: in_flight(ledger, job) == {0}, timeout=60, what="the batch to start")
    [(_tag, delivered)] = ledger.r.zrange("unacked_index", 0, -1, withscores=True)
    # Three timeouts later the message is still held, re-scored by its worker.
    wait_until(
        lambda: ledger.r.zrange("unacked_index", 0, -1, withscores=True)[0][1] > delivered + 3 * 10,
        timeout=90,
        what="the held message to be refreshed past three timeouts",
    )
    assert ledger.r.hget(f"labelmill:job:{job}:attempts", "0") == "1"
    server = start_model_server(tiny_model_base, tmp_path / "model.log", port=port)
    try:
        p.wait_done(job, timeout=120)
    finally:
        server.proc.stop()
    checked = check_job(p, job, inputs, out)
    assert checked.ledger_attempts == {0: 1}, "run twice while its worker lived"


def test_sigterm_finishes_running_batch_and_returns_prefetched(pipeline: Pipeline) -> None:
    """Kubernetes scale-in: SIGTERM to the worker's main process (PID 1 in a pod)."""
    p = pipeline
    job_id, inputs, out = _job(p)
    first = p.start_worker(concurrency=2)
    ledger = p.ledger
    wait_in_flight(ledger, job_id)
    os.kill(first.pid, signal.SIGTERM)
    assert first.popen.wait(timeout=60) == 0, first.log_tail()

    counts = ledger.counts(job_id)
    total = counts.batches_total or 0
    assert counts.state == "running" and counts.batches_done < total
    # Every batch the worker began, it finished...
    assert not in_flight(ledger, job_id), "a started batch was abandoned"
    done_before = {b for b in range(total) if ledger.is_done(job_id, b)}
    # ...and every message it had reserved but not started is back on the queue.
    assert ledger.r.hlen("unacked") == 0
    queued = [t["batch_no"] for t in queued_tasks(ledger.r) if t["job_id"] == job_id]
    assert set(range(total)) - done_before <= set(queued)
    # A batch that finished during the shutdown may be requeued as well
    # (Celery restores unacked messages when it closes the channel, racing
    # the ack): harmless, its redelivery is skipped as already done.
    assert set(queued) - (set(range(total)) - done_before) <= done_before
    assert "warm shutdown" in log_text(first).lower()

    p.start_worker(concurrency=2, name="w1")
    p.wait_done(job_id)
    checked = check_job(p, job_id, inputs, out)
    # Nothing was processed twice: the only batches delivered again are the
    # ones already done before the second worker started.
    again = {b for b, n in checked.ledger_attempts.items() if n > 1}
    assert again <= done_before


def test_an_idle_worker_stopped_as_kubernetes_stops_it_exits_at_once(pipeline: Pipeline) -> None:
    # The worker Deployment remaps SIGTERM to Celery's cold shutdown, which
    # starts with the soft shutdown (k8s/40-workers.yaml, REMAP_SIGTERM).
    # That waits out its whole timeout (60 s) when it runs; it must not run
    # for a worker with nothing to finish.
    p = pipeline
    job_id, inputs, out = _job(p, n=8)
    worker = p.start_worker(concurrency=1, extra={"REMAP_SIGTERM": "SIGQUIT"})
    p.wait_done(job_id)
    stopped = time.monotonic()
    os.kill(worker.pid, signal.SIGTERM)
    worker.popen.wait(timeout=60)
    took = time.monotonic() - stopped
    assert took < 20, f"an idle worker took {took:.0f} s to stop"
    assert "soft shutdown" not in log_text(worker).lower()
    check_job(p, job_id, inputs, out)


def test_a_busy_worker_stopped_as_kubernetes_stops_it_exits_once_its_batch_is_done(
    fronted: Fronted,
) -> None:
    # Celery's soft shutdown sleeps its whole timeout (60 s) however soon the
    # running batch ends (celery#9505); the worker's own (workers/shutdown.py)
    # ends with the batch. The batch waits in its Predict until the test lets
    # it through, after the stop signal.
    front, p = fronted
    job_id, inputs, out = _job(p, n=16)
    front.passing.clear()
    worker = p.start_worker(concurrency=1, extra={"REMAP_SIGTERM": "SIGQUIT"})
    wait_until(lambda: front.held == 1, timeout=60, what="a batch waiting for its Predict")
    [running] = in_flight(p.ledger, job_id)
    os.kill(worker.pid, signal.SIGTERM)
    wait_until(
        lambda: "soft shutdown" in log_text(worker).lower(),
        timeout=30,
        what="the soft shutdown to begin",
    )
    released = time.monotonic()
    front.passing.set()
    worker.popen.wait(timeout=90)
    took = time.monotonic() - released
    assert took < 20, f"a worker whose batch was done took {took:.0f} s more to stop"
    assert p.ledger.is_done(job_id, running), "the running batch was cancelled, not finished"
    assert "the running batches finished in" in log_text(worker)

    p.start_worker(concurrency=1, name="w1")
    p.wait_done(job_id)
    checked = check_job(p, job_id, inputs, out)
    # Its message came back unacked and was skipped as already done.
    assert checked.ledger_attempts[running] <= 2


POISON = "LABELMILL-TEST-POISON-4f1c"


def test_poison_batch_is_declared_dead_after_max_deliveries(pipeline: Pipeline) -> None:
    p = pipeline
    photos = tiny_photos("in/", 160)
    poison_key = "in/img-0085.jpg"  # batch 85 // 8 = 10
    photos[poison_key] = images.jpeg(16, 16, seed=85) + POISON.encode()
    inputs = put_many(p, photos)
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", BATCH)
    env = {"LABELMILL_TEST_CRASH_MARKER": POISON, "LABELMILL_MAX_DELIVERIES": "3"}
    worker = p.start_worker(concurrency=2, extra=env, app="tests.faults.crashing_worker")
    p.wait_done(job["job_id"], timeout=180)

    checked = check_job(p, job["job_id"], inputs, out, dead=[10])
    assert checked.ledger_attempts[10] == 4  # 3 crashes, then declared dead unopened
    assert {r["error"]["kind"] for r in checked.output.parts[10]} == {"dead"}
    assert (
        "delivered 4 times" in checked.by_uri[f"s3://{p.bucket}/{poison_key}"]["error"]["message"]
    )
    assert sum(1 for r in checked.output.lines if r["status"] == "ok") == 160 - 8
    assert worker.alive()
    assert log_text(worker).count("WorkerLostError") >= 3


def test_the_real_worker_has_no_such_hook(pipeline: Pipeline) -> None:
    """The same poisoned image, given to the production app, is just an ok image."""
    p = pipeline
    inputs = put_many(p, {"in/p.jpg": images.jpeg(16, 16) + POISON.encode()})
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/in/", out)
    p.start_worker(concurrency=1, extra={"LABELMILL_TEST_CRASH_MARKER": POISON})
    p.wait_done(job["job_id"])
    checked = check_job(p, job["job_id"], inputs, out)
    assert checked.output.lines[0]["status"] == "ok"


def test_manifest_written_once_when_workers_race_on_the_last_batch(pipeline: Pipeline) -> None:
    """Every batch delivered three times to two workers: one manifest write, right counts.

    The output bucket is versioned, so each PUT of ``_manifest.json`` leaves
    a version behind: a second write is visible, not overwritten.
    """
    from labelmill.queue import make_celery, send_batch

    p = pipeline
    s3 = p.s3
    s3.put_bucket_versioning(Bucket=p.bucket, VersioningConfiguration={"Status": "Enabled"})
    for _ in range(2):  # the check can fail: two writes leave two versions
        s3.put_object(Bucket=p.bucket, Key="probe", Body=b"x")
    assert len(s3.list_object_versions(Bucket=p.bucket, Prefix="probe")["Versions"]) == 2
    inputs = put_many(p, tiny_photos("in/", 96))
    out = f"s3://{p.bucket}/out/"
    workers = [p.start_worker(concurrency=2, name=n) for n in ("wa", "wb")]
    pids = [pid for w in workers for pid in (w.pid, *pool_children(w, expect=2))]
    # Both workers frozen while the job and two extra copies of every batch
    # are queued, then released together: copies of the last batches finish
    # on both workers at once.
    with frozen(pids):
        job = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", BATCH)
        job_id = job["job_id"]
        app = make_celery(p.settings)
        for b in range(12):
            for _ in range(2):
                uris = inputs[b * 8 : b * 8 + 8]
                send_batch(app, job_id=job_id, batch_no=b, uris=uris, model_version=1)
    p.wait_done(job_id)
    p.wait_delivered(job_id, 12 * 3)  # every batch: its own message and two duplicates
    checked = check_job(p, job_id, inputs, out)
    assert checked.output.manifest["images"]["ok"] == 96
    versions = s3.list_object_versions(Bucket=p.bucket, Prefix=f"out/{job_id}/_manifest.json")
    assert len(versions.get("Versions", [])) == 1, versions.get("Versions")
    assert sum(log_text(w).count("manifest written") for w in workers) == 1
    # Both workers took part, and redeliveries were noticed as such.
    assert all(f"job={job_id}" in log_text(w) for w in workers)
    assert sum(log_text(w).count("already done (redelivery)") for w in workers) >= 1


def test_a_worker_killed_holding_the_manifest_claim_does_not_strand_the_job(
    pipeline_factory: MakePipeline,
    redis_url: str,
    s3_server: Any,
    s3_bucket: str,
) -> None:
    # A short visibility timeout: it is also how long a manifest claim holds.
    short = {"LABELMILL_VISIBILITY_TIMEOUT_S": "10", "LABELMILL_RESTORE_INTERVAL_S": "1"}
    p = pipeline_factory(redis_url=redis_url, s3=s3_server, bucket=s3_bucket, env=short)
    inputs = put_many(p, tiny_photos("in/", 16))
    out = f"s3://{p.bucket}/out/"
    job_id = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "8")["job_id"]
    doomed = p.start_worker(concurrency=1, app="tests.faults.manifest_crash_worker")
    wait_until(lambda: not doomed.alive(), timeout=60, what="the claimant to die")
    counts = p.ledger.counts(job_id)
    # Every batch done, nothing outstanding, no manifest: what a dead claimant leaves.
    assert (counts.state, counts.batches_done) == ("running", counts.batches_total)
    assert not list(p.ledger.outstanding_batches(job_id))
    # A read-only command sees that and changes nothing.
    status = json.loads(p.producer("status", job_id, "--json").stdout)
    assert status["state"] == "running"
    p.start_worker(concurrency=1, name="w1")
    p.wait_done(job_id, timeout=120)
    check_job(p, job_id, inputs, out)
    assert "manifest written" in log_text(p.workers[-1])
