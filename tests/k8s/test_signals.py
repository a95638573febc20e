"""workers/signals.py and workers/metrics.py: the probe and the exposition."""

from __future__ import annotations

import os
import time
from pathlib import Path

from prometheus_client import generate_latest

from workers import metrics, signals


def test_probe_fails_without_a_heartbeat(tmp_path: Path) -> None:
    f = tmp_path / "hb"
    assert signals.main(["--max-age", "30", "--file", str(f)]) == 1


def test_probe_passes_on_a_fresh_heartbeat_and_fails_on_a_stale_one(tmp_path: Path) -> None:
    f = tmp_path / "hb"
    signals.touch_heartbeat(f)
    assert signals.main(["--max-age", "30", "--file", str(f)]) == 0
    old = time.time() - 120
    os.utime(f, (old, old))
    assert signals.main(["--max-age", "30", "--file", str(f)]) == 1
    assert 119 < (signals.heartbeat_age(f) or 0) < 200


def test_registry_serves_counts_and_the_outstanding_gauge() -> None:
    metrics.record_batch(ok=3, errors={"decode": 1}, seconds=0.5)
    metrics.record_retry("model")
    text = generate_latest(metrics.registry(lambda: 42)).decode()
    assert 'labelmill_images_total{kind="decode",status="error"}' in text
    assert 'labelmill_retries_total{what="model"}' in text
    assert "labelmill_outstanding_batches 42.0" in text


def test_outstanding_gauge_is_absent_when_redis_fails() -> None:
    def broken() -> int:
        raise ConnectionError("down")

    text = generate_latest(metrics.registry(broken)).decode()
    assert "\nlabelmill_outstanding_batches " not in text


def test_dashboard_queries_name_the_metrics_the_worker_exports() -> None:
    import json
    import re

    from tests.k8s.conftest import ROOT

    dash = json.loads((ROOT / "deploy" / "grafana" / "labelmill.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"\blabelmill_[a-z_]+", exprs))
    with metrics.stage("fetch"):
        pass
    metrics.REDELIVERIES.inc(0)
    text = generate_latest(metrics.registry(lambda: 0)).decode()
    exported = set(re.findall(r"^(labelmill_[a-z_]+)", text, re.M))
    assert used <= exported, used - exported


def test_the_probe_does_not_import_prometheus(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.k8s.conftest import ROOT

    code = (
        "import sys, workers.signals as s; "
        "sys.exit(1 if 'prometheus_client' in sys.modules or 'workers.metrics' in sys.modules "
        "else s.main(['--max-age', '5', '--file', sys.argv[1]]))"
    )
    hb = tmp_path / "hb"
    hb.touch()
    out = subprocess.run([sys.executable, "-c", code, str(hb)], cwd=ROOT, timeout=60)
    assert out.returncode == 0
