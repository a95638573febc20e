"""`producer enqueue` with the model tier at zero: it waits, says so, and wakes the tier.

Real Redis, a real `serving local` started (late) on the port the producer
was told about, the producer as a process. The waiting set is what KEDA's
second trigger on the model tier reads (keda/tf-serving-scaledobject.yaml).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from labelmill.ledger import Ledger
from producer.waiting import LEASE_S
from tests import images
from tests.fixtures.model_server import SERVING, health_status, serving_env
from tests.fixtures.procs import Proc, free_port, wait_until

pytestmark = pytest.mark.integration


def _folder(tmp: Path, n: int) -> Path:
    src = tmp / "in"
    src.mkdir()
    for i in range(n):
        (src / f"{i:02d}.png").write_bytes(images.png(8, 8, seed=i))
    return src


def _producer(redis_url: str, model_port: int, *args: str, log: Path) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env.update(
        LABELMILL_REDIS_URL=redis_url,
        LABELMILL_MODEL_SERVER=f"127.0.0.1:{model_port}",
    )
    with log.open("w") as stderr:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "producer", "enqueue", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )


def test_enqueue_waits_for_a_tier_at_zero_and_pins_what_it_then_serves(
    redis_url: str, tiny_model_base: Path, tmp_path: Path
) -> None:
    src = _folder(tmp_path, 5)
    port = free_port()
    err = tmp_path / "producer.err"
    proc = _producer(
        redis_url,
        port,
        str(src),
        "--output",
        str(tmp_path / "out"),
        "--batch-size",
        "2",
        "--json",
        log=err,
    )
    ledger = Ledger.from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        # Nothing serves: the producer registers as waiting (the model tier's
        # wake-up signal) and says what it waits for; no job exists yet.
        wait_until(
            lambda: client.zcard(ledger.waiting_key) == 1, timeout=60, what="producer waiting"
        )
        wait_until(lambda: "waiting up to" in err.read_text(), timeout=30, what="waiting note")
        assert proc.poll() is None
        assert client.zcard(ledger.jobs_key) == 0
        assert client.zcard(ledger.outstanding_key) == 0

        # The tier comes up (as KEDA would start it) on the address the producer uses.
        server = Proc(
            [
                sys.executable,
                "-m",
                "serving",
                "local",
                "--model-base-path",
                str(tiny_model_base),
                "--port",
                str(port),
            ],
            log=tmp_path / "serving.log",
            env=serving_env(),
        )
        try:
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, err.read_text()
            assert health_status(f"127.0.0.1:{port}") == SERVING
        finally:
            server.stop()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["model_version"] == 1
    assert result["images_total"] == 5
    # Its batches are outstanding (no worker runs here), and it no longer waits.
    assert client.zcard(ledger.outstanding_key) == 3
    assert client.exists(ledger.waiting_key) == 0
    assert "model version 1 is AVAILABLE" in err.read_text()


def test_a_producer_killed_while_waiting_lets_the_tier_go(redis_url: str, tmp_path: Path) -> None:
    src = _folder(tmp_path, 1)
    proc = _producer(
        redis_url,
        free_port(),
        str(src),
        "--output",
        str(tmp_path / "out"),
        log=tmp_path / "producer.err",
    )
    ledger = Ledger.from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(
            lambda: client.zcard(ledger.waiting_key) == 1, timeout=60, what="producer waiting"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    # Nobody renews the lease now: the key lapses within one lease. (That an
    # unrenewed key does lapse, and that a live waiter prunes a dead one's
    # entry, is shown with a short lease in tests/labelmill/test_ledger.py.)
    pttl = int(client.pttl(ledger.waiting_key))
    assert 0 < pttl <= LEASE_S * 1000
    (token,) = [str(m) for m in ledger.r.zrange(ledger.waiting_key, 0, -1)]
    expiry_ms = ledger.r.zscore(ledger.waiting_key, token)
    assert expiry_ms is not None and expiry_ms <= (time.time() + LEASE_S) * 1000


def test_the_wait_is_bounded_and_leaves_nothing_behind(redis_url: str, tmp_path: Path) -> None:
    src = _folder(tmp_path, 1)
    err = tmp_path / "producer.err"
    proc = _producer(
        redis_url,
        free_port(),
        str(src),
        "--output",
        str(tmp_path / "out"),
        "--model-wait",
        "1",
        log=err,
    )
    proc.communicate(timeout=60)
    assert proc.returncode == 3
    lines = err.read_text().strip().splitlines()
    assert lines[-1].startswith("producer: no model version became AVAILABLE within 1s")
    assert "LABELMILL_MODEL_WAIT_S" in lines[-1]
    client = redis.Redis.from_url(redis_url)
    ledger = Ledger.from_url(redis_url)
    assert client.exists(ledger.waiting_key) == 0
    assert client.zcard(ledger.jobs_key) == 0
    assert not (tmp_path / "out").exists()
