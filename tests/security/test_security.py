"""Security: JSON-only messages, authenticated and encrypted Redis, secrets kept out of
logs and output, input policy, and local outputs that stay inside their root."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from kombu import Connection, Exchange, Queue

from labelmill.queue import QUEUE, TASK, make_celery, send_batch
from tests import images
from tests.faults.helpers import check_job, log_text, put_many, tiny_photos
from tests.fixtures.procs import Proc, free_port, wait_until
from tests.fixtures.servers import RedisServer, S3Server, _redis_binary
from tests.fixtures.stack import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.security]

MakePipeline = Callable[..., Pipeline]


class _CreatesFile:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_pickled_message_is_refused_not_executed(pipeline: Pipeline) -> None:
    p = pipeline
    marker = p.tmp / "pickle-was-executed"
    body = pickle.dumps(((), {"evil": _CreatesFile(str(marker))}, {}))
    worker = p.start_worker(concurrency=1)
    queue = Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)
    with Connection(p.env["LABELMILL_REDIS_URL"]) as conn:
        conn.Producer().publish(
            body,
            exchange=queue.exchange,
            routing_key=QUEUE,
            declare=[queue],
            serializer=None,
            content_type="application/x-python-serialize",
            content_encoding="binary",
            headers={"lang": "py", "task": TASK, "id": str(uuid.uuid4()), "argsrepr": "()"},
        )
    wait_until(
        lambda: "untrusted content" in log_text(worker),
        timeout=60,
        what="the worker to refuse the pickle",
    )
    r = p.ledger.r
    wait_until(lambda: r.llen(QUEUE) == 0 and r.hlen("unacked") == 0, timeout=30, what="drop")
    assert not marker.exists(), "the pickled payload was executed"
    # The worker is still there, and still working.
    inputs = put_many(p, tiny_photos("in/", 8))
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/in/", out)
    p.wait_done(job["job_id"])
    check_job(p, job["job_id"], inputs, out)
    assert worker.alive() and not marker.exists()


# --------------------------------------------------------------------------- Redis auth, TLS


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A password-protected redis-server speaking only TLS: (url, password)."""
    binary = _redis_binary()
    built = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    d = tmp_path / "tls"
    d.mkdir()
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    password = f"tls-pw-{uuid.uuid4().hex}"
    port = free_port()
    proc = Proc(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--requirepass", password, "--dir", str(d), "--save", "", "--appendonly", "no"],
        log=d / "redis.log",
    )  # fmt: skip
    url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={cert}"

    def ping() -> bool:
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()

    try:
        proc.wait_ready(ping, timeout=20, what=f"redis-server with TLS ({built.strip()})")
    except RuntimeError as exc:
        if "TLS" in proc.log_tail() and "not" in proc.log_tail():
            pytest.fail(f"this redis-server was built without TLS: {exc}")
        raise
    yield url, password
    proc.stop()


def _secrets_absent(texts: dict[str, str], secrets: list[str]) -> None:
    leaks = [(name, s) for name, text in texts.items() for s in secrets if s in text]
    assert not leaks, f"secrets leaked into {[n for n, _ in leaks]}"


def _run_job_and_collect(p: Pipeline) -> dict[str, str]:
    """Run a small job through password-protected Redis; return every text it produced."""
    inputs = put_many(p, tiny_photos("in/", 24))
    out = f"s3://{p.bucket}/out/"
    worker = p.start_worker(concurrency=1)
    enq = p.producer("-v", "enqueue", f"s3://{p.bucket}/in/", "--output", out, "--json")
    job_id = json.loads(enq.stdout)["job_id"]
    p.wait_done(job_id)
    check_job(p, job_id, inputs, out)
    texts = {"enqueue": enq.stdout + enq.stderr}
    for args in (("status", job_id, "--json"), ("jobs", "--json"), ("watch", job_id, "--json")):
        res = p.producer(*args, check=False)
        texts[" ".join(args)] = res.stdout + res.stderr
    # Failure paths say the most about a connection: a refused password, a dead port.
    url = urlsplit(p.env["LABELMILL_REDIS_URL"])
    wrong_pw = url._replace(netloc=f":wrong-password-000@{url.hostname}:{url.port}")
    dead_port = url._replace(netloc=f":{url.password}@{url.hostname}:{free_port()}")
    for name, bad in (("wrong password", wrong_pw), ("unreachable", dead_port)):
        res = p.producer("--redis-url", urlunsplit(bad), "status", job_id, "--json", check=False)
        assert res.returncode == 3, (name, res.returncode, res.stderr)
        texts[name] = res.stdout + res.stderr
    worker.stop(timeout=30)
    texts["worker log"] = log_text(worker)
    return texts


def test_redis_password_works_and_secrets_stay_out_of_logs(
    pipeline_factory: MakePipeline,
    redis_server_factory: Callable[..., RedisServer],
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    server = redis_server_factory(password=password)
    p = pipeline_factory(redis_url=server.url, s3=s3_server, bucket=s3_bucket)
    texts = _run_job_and_collect(p)
    _secrets_absent(texts, [password, S3Server.secret_key])


def test_rediss_tls_with_password(
    pipeline_factory: MakePipeline,
    tls_redis: tuple[str, str],
    s3_server: S3Server,
    s3_bucket: str,
) -> None:
    url, password = tls_redis
    p = pipeline_factory(redis_url=url, s3=s3_server, bucket=s3_bucket)
    texts = _run_job_and_collect(p)
    _secrets_absent(texts, [password, S3Server.secret_key])


# --------------------------------------------------------------------------- input policy


def test_policy_refuses_local_files_and_other_buckets(pipeline: Pipeline) -> None:
    """A task naming file:///etc/passwd or a bucket off the allow-list gets a forbidden line."""
    p = pipeline
    legit = put_many(p, tiny_photos("in/", 3))
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/in/", out, "--batch-size", "3")
    # Replace the one queued batch by a hostile one of the same size.
    r = p.ledger.r
    assert r.llen(QUEUE) == 1
    r.delete(QUEUE)
    hostile = ["file:///etc/passwd", "s3://lm-not-allowed/secret.jpg", legit[0]]
    send_batch(
        make_celery(p.settings), job_id=job["job_id"], batch_no=0, uris=hostile, model_version=1
    )
    p.start_worker(
        concurrency=1,
        extra={"LABELMILL_ALLOW_LOCAL_FILES": "false", "LABELMILL_ALLOWED_BUCKETS": p.bucket},
    )
    p.wait_done(job["job_id"])
    checked = check_job(p, job["job_id"], hostile, out)
    passwd = checked.by_uri["file:///etc/passwd"]
    assert passwd["status"] == "error" and passwd["error"]["kind"] == "forbidden"
    assert "root:" not in str(checked.output.lines)
    other = checked.by_uri["s3://lm-not-allowed/secret.jpg"]
    assert other["status"] == "error" and other["error"]["kind"] == "forbidden"
    assert "LABELMILL_ALLOWED_BUCKETS" in other["error"]["message"]
    assert checked.by_uri[legit[0]]["status"] == "ok"


def _snapshot(root: Path) -> set[Path]:
    return {q for q in root.rglob("*")}


def test_local_output_never_written_outside_its_root(pipeline: Pipeline, tmp_path: Path) -> None:
    p = pipeline
    # SeaweedFS refuses keys with ".." segments (AWS does not); those are sent
    # in a crafted message below instead; it also folds "//" in keys to "/".
    hostile_keys = {
        "in/..%2F..%2Fescape2.jpg": images.jpeg(16, 16, seed=2),
        "in/etc/passwd.jpg": images.jpeg(16, 16, seed=3),
        "in/~root/.ssh/authorized_keys.png": images.png(16, 16, seed=5),
        "in/ünï cödé.jpg": images.jpeg(16, 16, seed=6),
    }
    inputs = put_many(p, hostile_keys)
    arena = tmp_path / "arena"
    out = arena / "out"
    out.mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    # A job folder that is a symlink out of the root: refused before anything is written.
    (out / "linked").symlink_to(outside, target_is_directory=True)
    res = p.producer(
        "enqueue", f"s3://{p.bucket}/in/", "--output", str(out), "--job-id", "linked", check=False
    )
    assert res.returncode == 2, res.stderr
    assert list(outside.iterdir()) == []

    before = _snapshot(tmp_path)
    p.start_worker(concurrency=1)
    job = p.enqueue(f"s3://{p.bucket}/in/", str(out), "--batch-size", "2")
    p.wait_done(job["job_id"])
    check_job(p, job["job_id"], inputs, str(out))
    # Crafted messages: a job id and URIs that try to climb out of the root.
    app = make_celery(p.settings)
    climb = [f"s3://{p.bucket}/in/../../../../escape.jpg"]
    send_batch(app, job_id="../../outside", batch_no=0, uris=climb, model_version=1)
    send_batch(app, job_id=job["job_id"] + "/../../x", batch_no=-1, uris=climb, model_version=1)
    r = p.ledger.r
    # Both refused (each delivery logs it before its ack), then both acked.
    wait_until(
        lambda: (
            log_text(p.workers[0]).count("refusing a malformed batch message") == 2
            and r.llen(QUEUE) == 0
            and r.hlen("unacked") == 0
        ),
        timeout=60,
        what="both crafted messages refused",
    )
    new = _snapshot(tmp_path) - before
    stray = [q for q in new if out not in q.parents and q.parent != tmp_path]
    assert not stray, stray
    assert list(outside.iterdir()) == []
    assert all(os.path.realpath(q).startswith(str(out)) for q in new if out in q.parents)
