"""The whole pipeline against real Redis, S3, model server and Celery workers."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from labelmill.job.record import loads_lines
from tests import images
from tests.fixtures.stack import Pipeline

pytestmark = pytest.mark.integration


def _lines(p: Pipeline, prefix: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    pages = p.s3.get_paginator("list_objects_v2").paginate(Bucket=p.bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            if obj["Key"].rsplit("/", 1)[-1].startswith("part-"):
                body = p.s3.get_object(Bucket=p.bucket, Key=obj["Key"])["Body"].read()
                out.extend(loads_lines(body))
    return out


def test_s3_job_gives_one_line_per_image(pipeline: Pipeline) -> None:
    p = pipeline
    for i in range(200):
        if i % 2:
            p.put(f"photos/img-{i:03d}.jpg", images.jpeg(64, 48, seed=i))
        else:
            p.put(f"photos/sub/img-{i:03d}.png", images.png(40, 30, seed=i))
    bad = {
        "photos/bad/truncated.jpg": ("decode", images.truncated_jpeg()),
        "photos/bad/zero.jpg": ("empty", b""),
        "photos/bad/text.jpg": ("decode", images.text_as_jpg()),
        "photos/bad/bomb.png": ("decompression_bomb", images.decompression_bomb_png()),
    }
    for key, (_kind, data) in bad.items():
        p.put(key, data)
    p.put("photos/bad/cmyk.jpg", images.cmyk_jpeg())
    p.put("photos/readme.txt", b"not an image")
    p.put("photos/folder/", b"")

    p.start_worker()
    job = p.enqueue(f"s3://{p.bucket}/photos/", f"s3://{p.bucket}/labels/", "--batch-size", "16")
    assert job["images_total"] == 205
    assert job["skipped"] == {"not_image_name": 2}
    status = p.wait_done(job["job_id"])

    lines = _lines(p, f"labels/{job['job_id']}/")
    assert len(lines) == 205
    assert len({r["uri"] for r in lines}) == 205
    by_status = Counter(r["status"] for r in lines)
    assert by_status == {"ok": 201, "error": 4}
    kinds = {
        str(r["uri"]).rsplit("photos/", 1)[1]: r["error"]["kind"]
        for r in lines
        if r["status"] == "error"
    }  # type: ignore[index]
    assert kinds == {k.split("photos/", 1)[1]: v[0] for k, v in bad.items()}
    ok = next(r for r in lines if r["status"] == "ok")
    assert len(ok["labels"]) == 5  # type: ignore[arg-type]
    assert ok["model"]["version"] == 1  # type: ignore[index]
    assert ok["model"]["weights"].startswith("random")  # type: ignore[index]
    assert "meaningless" in ok["model"]["note"]  # type: ignore[index]

    assert status["state"] == "done"
    assert status["images"] == {"total": 205, "ok": 201, "error": 4, "skipped": 2, "carried": 0}
    manifest = json.loads(
        p.s3.get_object(Bucket=p.bucket, Key=f"labels/{job['job_id']}/_manifest.json")[
            "Body"
        ].read()
    )
    assert manifest["images"] == status["images"]
    assert manifest["errors"] == {"decode": 2, "decompression_bomb": 1, "empty": 1}
    assert manifest["model"]["weights"].startswith("random")
    assert p.s3.head_object(Bucket=p.bucket, Key=f"labels/{job['job_id']}/_SUCCESS")
    assert p.s3.head_object(Bucket=p.bucket, Key=f"labels/{job['job_id']}/_job.json")


def test_local_folder_job(pipeline: Pipeline, tmp_path: object) -> None:
    from pathlib import Path

    p = pipeline
    src = Path(str(tmp_path)) / "in put"
    (src / "deep" / "er").mkdir(parents=True)
    for i in range(10):
        (src / f"ü {i}.JPG").write_bytes(images.jpeg(50, 40, seed=i))
    (src / "deep" / "er" / "x.png").write_bytes(images.png(20, 20, seed=1))
    (src / "deep" / "empty.png").write_bytes(b"")
    out = Path(str(tmp_path)) / "out"
    p.start_worker()
    job = p.enqueue(str(src), str(out), "--batch-size", "4")
    status = p.wait_done(job["job_id"])
    assert status["images"] == {"total": 12, "ok": 11, "error": 1, "skipped": 0, "carried": 0}
    parts = sorted((out / job["job_id"]).glob("part-*.jsonl"))
    assert len(parts) == 3
    lines = [r for f in parts for r in loads_lines(f.read_bytes())]
    assert len(lines) == 12
    assert (out / job["job_id"] / "_SUCCESS").exists()
    # `producer results` streams the same lines, and CSV works.
    res = p.producer("results", job["job_id"])
    assert len(res.stdout.splitlines()) == 12
    csv = p.producer("results", job["job_id"], "--format", "csv", "--errors-only")
    rows = csv.stdout.splitlines()
    assert rows[0].startswith("uri,status")
    assert len(rows) == 2 and ",empty," in rows[1]


def test_same_job_id_twice_enqueues_nothing_new(pipeline: Pipeline) -> None:
    p = pipeline
    for i in range(10):
        p.put(f"in/{i}.jpg", images.jpeg(32, 32, seed=i))
    src, out = f"s3://{p.bucket}/in/", f"s3://{p.bucket}/out/"
    first = p.enqueue(src, out, "--job-id", "twice", "--batch-size", "3")
    assert first["enqueued_batches"] == 4
    second = p.enqueue(src, out, "--job-id", "twice", "--batch-size", "3")
    assert second["enqueued_batches"] == 0
    assert second["resumed"] is True
    assert p.ledger.r.llen("classify") == 4
    p.start_worker()
    status = p.wait_done("twice")
    assert status["images"]["ok"] == 10


def test_window_bounds_outstanding_batches(pipeline: Pipeline) -> None:
    """--max-outstanding 3 over 50 batches: never more than 3 queued or running."""
    import threading

    p = pipeline
    for i in range(50):
        p.put(f"w/{i:02d}.png", images.png(8, 8, seed=i))
    ledger = p.ledger
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, int(ledger.r.zcard("labelmill:outstanding")))
            stop.wait(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    p.start_worker()
    job = p.enqueue(
        f"s3://{p.bucket}/w/", f"s3://{p.bucket}/o/", "--batch-size", "1", "--max-outstanding", "3"
    )
    status = p.wait_done(job["job_id"])
    stop.set()
    t.join()
    assert status["images"]["ok"] == 50
    assert status["batches"] == {"total": 50, "done": 50, "dead": 0, "outstanding": 0}
    assert 1 <= peak <= 3


def test_an_object_changed_or_deleted_after_listing_is_not_labelled_as_listed(
    pipeline: Pipeline,
) -> None:
    """Workers read the listed ETag (If-Match): what changed since is a `changed` line."""
    p = pipeline
    for i in range(6):
        p.put(f"v/{i}.jpg", images.jpeg(32, 32, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/v/", f"s3://{p.bucket}/o/", "--batch-size", "4")
    listed = {
        o["Key"]: o["ETag"].strip('"') for o in p.s3.list_objects_v2(Bucket=p.bucket)["Contents"]
    }
    p.put("v/1.jpg", images.jpeg(32, 32, seed=100))  # overwritten after listing
    p.s3.delete_object(Bucket=p.bucket, Key="v/4.jpg")  # deleted after listing
    now = p.s3.head_object(Bucket=p.bucket, Key="v/1.jpg")["ETag"].strip('"')
    p.start_worker()
    p.wait_done(job["job_id"])
    lines = {str(r["uri"]).rsplit("/", 1)[1]: r for r in _lines(p, f"o/{job['job_id']}/")}
    assert sorted(lines) == [f"{i}.jpg" for i in range(6)]
    assert lines["1.jpg"]["error"] == {
        "kind": "changed",
        "message": lines["1.jpg"]["error"]["message"],  # type: ignore[index]
        "listed_etag": listed["v/1.jpg"],
        "etag": now,
    }
    assert lines["4.jpg"]["error"]["kind"] == "not_found"  # type: ignore[index]
    for name in ("0.jpg", "2.jpg", "3.jpg", "5.jpg"):
        assert lines[name]["status"] == "ok" and lines[name]["etag"] == listed[f"v/{name}"]


def test_a_message_without_etags_from_an_older_producer_is_still_served(
    pipeline: Pipeline,
) -> None:
    from labelmill.queue import TASK, make_celery

    p = pipeline
    for i in range(3):
        p.put(f"old/{i}.jpg", images.jpeg(16, 16, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/old/", f"s3://{p.bucket}/o/", "--batch-size", "3")
    p.ledger.r.delete("classify")  # replaced by the message an older producer sends:
    uris = [f"s3://{p.bucket}/old/{i}.jpg" for i in range(3)]
    make_celery(p.settings).send_task(
        TASK,
        kwargs={"job_id": job["job_id"], "batch_no": 0, "uris": uris, "model_version": 1},
        queue="classify",
    )
    p.start_worker()
    status = p.wait_done(job["job_id"])
    assert status["images"]["ok"] == 3


def test_a_small_job_behind_a_large_one_is_done_before_the_large_one_is_half_done(
    pipeline: Pipeline,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    p = pipeline
    names = [f"big/{i:03d}.jpg" for i in range(400)] + [f"small/{i}.jpg" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: p.put(k, images.jpeg(16, 16, seed=len(k))), names))
    big = p.enqueue(f"s3://{p.bucket}/big/", f"s3://{p.bucket}/o/", "--batch-size", "8")
    small = p.enqueue(f"s3://{p.bucket}/small/", f"s3://{p.bucket}/o/", "--batch-size", "8")
    assert (big["batches_total"], small["batches_total"]) == (50, 1)
    p.start_worker(concurrency=1)
    p.wait_done(small["job_id"])
    big_done = p.ledger.counts(big["job_id"]).batches_done
    assert big_done < 25, f"the small job waited for {big_done} of the large job's 50 batches"
    p.wait_done(big["job_id"])


def test_batch_delivered_twice_counts_once(pipeline: Pipeline) -> None:
    from labelmill.queue import make_celery, send_batch

    p = pipeline
    for i in range(6):
        p.put(f"d/{i}.jpg", images.jpeg(32, 32, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/d/", f"s3://{p.bucket}/o/", "--batch-size", "3")
    uris = [f"s3://{p.bucket}/d/{i}.jpg" for i in range(3)]
    app = make_celery(p.settings)
    # Two extra deliveries of batch 0 before any worker runs: three copies race.
    for _ in range(2):
        send_batch(app, job_id=job["job_id"], batch_no=0, uris=uris, model_version=1)
    p.start_worker(concurrency=2)
    p.wait_done(job["job_id"])
    p.wait_delivered(job["job_id"], 2 + 2)  # batch 0 three times, batch 1 once
    key = f"o/{job['job_id']}/part-000000000.jsonl"
    before = p.s3.get_object(Bucket=p.bucket, Key=key)["Body"].read()
    counts = p.ledger.counts(job["job_id"])
    assert (counts.images_ok, counts.images_error, counts.batches_done) == (6, 0, 2)
    # A redelivery after completion changes nothing either.
    send_batch(app, job_id=job["job_id"], batch_no=0, uris=uris, model_version=1)
    p.wait_delivered(job["job_id"], 2 + 2 + 1)
    after = p.ledger.counts(job["job_id"])
    assert (after.images_ok, after.batches_done) == (6, 2)
    assert p.s3.get_object(Bucket=p.bucket, Key=key)["Body"].read() == before
    assert len(loads_lines(before)) == 3


def test_killed_producer_resumes_without_duplicates(pipeline: Pipeline) -> None:
    import subprocess
    import sys

    from tests.fixtures.procs import wait_until

    p = pipeline
    for i in range(30):
        p.put(f"k/{i:02d}.png", images.png(8, 8, seed=i))
    args = [
        "enqueue",
        f"s3://{p.bucket}/k/",
        "--output",
        f"s3://{p.bucket}/o/",
        "--job-id",
        "resume-me",
        "--batch-size",
        "2",
        "--max-outstanding",
        "3",
        "--json",
    ]
    # No worker yet: the producer fills its window of 3 and waits; kill it there.
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer", *args], env=p.env, stdout=subprocess.DEVNULL
    )
    ledger = p.ledger
    wait_until(lambda: ledger.counts("resume-me").batches_sent == 3, timeout=60, what="window full")
    proc.kill()
    proc.wait()
    p.start_worker()
    job = p.enqueue(
        f"s3://{p.bucket}/k/",
        f"s3://{p.bucket}/o/",
        "--job-id",
        "resume-me",
        "--batch-size",
        "2",
        "--max-outstanding",
        "3",
    )
    assert job["resumed"] is True
    assert job["enqueued_batches"] == 12
    status = p.wait_done("resume-me")
    lines = _lines(p, "o/resume-me/")
    assert len(lines) == 30 and len({r["uri"] for r in lines}) == 30
    assert status["images"] == {"total": 30, "ok": 30, "error": 0, "skipped": 0, "carried": 0}


def test_cancel_drops_outstanding_batches(pipeline: Pipeline) -> None:

    p = pipeline
    for i in range(10):
        p.put(f"c/{i}.png", images.png(8, 8, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/c/", f"s3://{p.bucket}/o/", "--batch-size", "1")
    res = p.producer("cancel", job["job_id"])
    assert "10 outstanding batches dropped" in res.stdout
    p.start_worker()
    p.wait_delivered(job["job_id"], 10)  # each dropped batch still comes by once
    assert _lines(p, f"o/{job['job_id']}/") == []
    st = json.loads(p.producer("status", job["job_id"], "--json").stdout)
    assert st["state"] == "cancelled"
    assert st["batches"]["outstanding"] == 0
    assert p.ledger.r.zcard("labelmill:outstanding") == 0
    watch = p.producer("watch", job["job_id"], "--json", check=False)
    assert watch.returncode == 4


def test_dead_batch_then_retry(pipeline: Pipeline) -> None:
    p = pipeline
    for i in range(6):
        p.put(f"r/{i}.jpg", images.jpeg(16, 16, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/r/", f"s3://{p.bucket}/o/", "--batch-size", "3")
    jid = job["job_id"]
    # Pretend batch 1 already killed its worker five times.
    p.ledger.r.hset(f"labelmill:job:{jid}:attempts", "1", 5)
    p.start_worker(extra={"LABELMILL_MAX_DELIVERIES": "5"})
    status = p.wait_done(jid)
    assert status["batches"]["dead"] == 1
    assert status["images"] == {"total": 6, "ok": 3, "error": 3, "skipped": 0, "carried": 0}
    assert status["errors"] == {"dead": 3}
    lines = _lines(p, f"o/{jid}/")
    assert sorted(r["status"] for r in lines) == ["error"] * 3 + ["ok"] * 3
    manifest_key = f"o/{jid}/_manifest.json"
    assert json.loads(p.s3.get_object(Bucket=p.bucket, Key=manifest_key)["Body"].read())[
        "dead_batches"
    ] == [1]

    res = json.loads(p.producer("retry", jid, "--json").stdout)
    assert res["dead_batches_resent"] == [1]
    status = p.wait_done(jid)
    from tests.fixtures.procs import wait_until

    wait_until(
        lambda: p.ledger.counts(jid).state == "done" and p.ledger.counts(jid).images_ok == 6,
        timeout=60,
        what="retry to finish",
    )
    manifest = json.loads(p.s3.get_object(Bucket=p.bucket, Key=manifest_key)["Body"].read())
    assert manifest["images"] == {"total": 6, "ok": 6, "error": 0, "skipped": 0, "carried": 0}
    assert manifest["dead_batches"] == []
    assert Counter(r["status"] for r in _lines(p, f"o/{jid}/")) == {"ok": 6}


def test_reconcile_after_redis_lost_everything(pipeline: Pipeline) -> None:
    p = pipeline
    for i in range(9):
        p.put(f"rc/{i}.jpg", images.jpeg(16, 16, seed=i))
    p.start_worker()
    job = p.enqueue(f"s3://{p.bucket}/rc/", f"s3://{p.bucket}/o/", "--batch-size", "3")
    jid = job["job_id"]
    p.wait_done(jid)
    p.s3.delete_object(Bucket=p.bucket, Key=f"o/{jid}/part-000000001.jsonl")
    p.s3.delete_object(Bucket=p.bucket, Key=f"o/{jid}/_SUCCESS")
    p.ledger.r.flushall()

    unknown = p.producer("reconcile", jid, check=False)
    assert unknown.returncode == 2 and "--output" in unknown.stderr

    res = json.loads(
        p.producer("reconcile", jid, "--output", f"s3://{p.bucket}/o/", "--json").stdout
    )
    assert res["missing_batches_resent"] == [1]
    status = p.wait_done(jid)
    assert status["images"] == {"total": 9, "ok": 9, "error": 0, "skipped": 0, "carried": 0}
    assert len(_lines(p, f"o/{jid}/")) == 9
    assert p.s3.head_object(Bucket=p.bucket, Key=f"o/{jid}/_SUCCESS")


def test_status_and_watch_report_progress(pipeline: Pipeline) -> None:
    p = pipeline
    for i in range(8):
        p.put(f"s/{i}.jpg", images.jpeg(16, 16, seed=i))
    p.put("s/bad.jpg", b"")
    job = p.enqueue(f"s3://{p.bucket}/s/", f"s3://{p.bucket}/o/", "--batch-size", "3")
    st = json.loads(p.producer("status", job["job_id"], "--json").stdout)
    assert st["state"] == "running"
    assert st["images"] == {"total": 9, "ok": 0, "error": 0, "skipped": 0, "carried": 0}
    assert st["batches"] == {"total": 3, "done": 0, "dead": 0, "outstanding": 3}
    assert st["model"]["version"] == 1
    p.start_worker()
    res = p.producer("watch", job["job_id"], "--json", "--interval", "0.1", check=False)
    assert res.returncode == 1  # done, with one error line
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert rows[-1]["state"] == "done"
    assert rows[-1]["images"] == {"total": 9, "ok": 8, "error": 1, "skipped": 0, "carried": 0}
    assert rows[-1]["batches"]["outstanding"] == 0
    done_counts = [r["images"]["ok"] + r["images"]["error"] for r in rows]
    assert done_counts == sorted(done_counts)


def test_cli_errors_are_one_line(pipeline: Pipeline) -> None:
    p = pipeline
    res = p.producer("status", "no-such-job", check=False)
    assert res.returncode == 2 and "unknown job" in res.stderr
    assert "Traceback" not in res.stderr
    res = p.producer("enqueue", "ftp://x/y", "--output", "s3://abc/o", check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    res = p.producer("--redis-url", "redis://127.0.0.1:1/0", "status", "x", check=False)
    assert res.returncode == 3 and "Traceback" not in res.stderr
    res = p.producer("enqueue", f"s3://{p.bucket}/x/", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    res = p.producer(
        "enqueue", "s3://no-such-bucket-xyz/x/", "--output", f"s3://{p.bucket}/o/", check=False
    )
    assert res.returncode == 2 and "no-such-bucket-xyz" in res.stderr


def test_retry_resends_a_batch_whose_message_was_lost(pipeline: Pipeline) -> None:
    """A message gone from Redis (taken as Redis died) is found and re-sent by retry."""
    from labelmill.queue import pending_batches

    p = pipeline
    for i in range(8):
        p.put(f"l/{i}.jpg", images.jpeg(16, 16, seed=i))
    job = p.enqueue(f"s3://{p.bucket}/l/", f"s3://{p.bucket}/o/", "--batch-size", "2")
    jid = job["job_id"]
    r = p.ledger.r
    assert pending_batches(r, jid) == {0, 1, 2, 3}
    # Lose batch 2's message.
    for raw in r.lrange("classify", 0, -1):
        if _batch_of(raw) == 2:
            r.lrem("classify", 1, raw)
    assert pending_batches(r, jid) == {0, 1, 3}
    p.start_worker()
    p.wait_delivered(jid, 3)
    st = json.loads(p.producer("status", jid, "--json").stdout)
    assert st["state"] == "running" and st["batches"]["outstanding"] == 1
    res = json.loads(p.producer("retry", jid, "--json").stdout)
    assert res["missing_batches_resent"] == [2]
    status = p.wait_done(jid)
    assert status["images"] == {"total": 8, "ok": 8, "error": 0, "skipped": 0, "carried": 0}
    assert len(_lines(p, f"o/{jid}/")) == 8


def _batch_of(raw: str) -> int | None:
    import base64

    message = json.loads(raw)
    _args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return int(kwargs["batch_no"])


def test_unreachable_or_refusing_s3_is_exit_3(pipeline: Pipeline) -> None:
    import subprocess
    import sys

    p = pipeline
    cases = {
        "refused credentials": {"AWS_SECRET_ACCESS_KEY": "not-the-secret"},
        "unreachable": {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"},
    }
    for what, env in cases.items():
        res = subprocess.run(
            [sys.executable, "-m", "producer", "enqueue", f"s3://{p.bucket}/in/",
             "--output", f"s3://{p.bucket}/out/"],
            env={**p.env, **env}, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert res.returncode == 3, (what, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1, (what, res.stderr)
        assert "Traceback" not in res.stderr
        assert "not-the-secret" not in res.stderr
