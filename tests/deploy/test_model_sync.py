"""deploy/scripts/model_sync.py against the real S3 server: pull, push order, the watch sidecar."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from labelmill.settings import Settings
from labelmill.storage import Storage
from tests.fixtures.procs import wait_until

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "scripts" / "model_sync.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("model_sync", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _version(base: Path, v: int, payload: str) -> None:
    (base / str(v) / "variables").mkdir(parents=True)
    (base / str(v) / "variables" / "variables.index").write_text(payload)
    (base / str(v) / "saved_model.pb").write_text(payload)


def test_pull_skips_a_version_without_its_saved_model_and_prunes_old_ones(
    s3_bucket: str, tmp_path: Path
) -> None:
    sync = _module()
    storage = Storage(Settings())
    prefix = f"s3://{s3_bucket}/models/inception"
    src = tmp_path / "src"
    for v in (1, 2, 3):
        _version(src, v, f"v{v}")
    sync.push(storage, src, prefix)
    # A push caught half way: files of version 4 are there, its saved_model.pb not yet.
    storage.put(f"{prefix}/4/variables/variables.index", b"v4", content_type="x")

    dest = tmp_path / "models"
    assert sync.pull(storage, prefix, dest, 2) == [2, 3]
    assert sorted(p.name for p in dest.iterdir()) == ["2", "3"]
    assert (dest / "3" / "saved_model.pb").read_text() == "v3"

    storage.put(f"{prefix}/4/saved_model.pb", b"v4", content_type="x")
    assert sync.pull(storage, prefix, dest, 2) == [3, 4]
    assert sorted(p.name for p in dest.iterdir()) == ["3", "4"]


def test_push_uploads_saved_model_last(tmp_path: Path) -> None:
    sync = _module()
    _version(tmp_path, 7, "x")
    (tmp_path / "7" / "zz-after-the-marker.txt").write_text("x")

    class Recorder:
        def __init__(self) -> None:
            self.keys: list[str] = []

        def put(self, uri: str, data: bytes, *, content_type: str) -> None:
            self.keys.append(uri.rsplit("/7/", 1)[1])

    recorder = Recorder()
    sync.push(recorder, tmp_path, "s3://b/models/m")
    assert recorder.keys[-1] == "saved_model.pb"
    assert set(recorder.keys) == {
        "variables/variables.index",
        "zz-after-the-marker.txt",
        "saved_model.pb",
    }


def test_watch_brings_a_new_version_into_a_running_pod_and_stops_on_sigterm(
    s3_bucket: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    sync = _module()
    storage = Storage(Settings())
    prefix = f"s3://{s3_bucket}/models/inception"
    src = tmp_path / "src"
    _version(src, 1, "v1")
    sync.push(storage, src, prefix)
    dest = tmp_path / "models"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "pull", prefix, str(dest), "--keep=2", "--watch=0.5"],
        env={**os.environ, **s3_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: (dest / "1" / "saved_model.pb").is_file(), timeout=30, what="v1")
        _version(src, 2, "v2")
        sync.push(storage, src, prefix)
        wait_until(lambda: (dest / "2" / "saved_model.pb").is_file(), timeout=30, what="v2")
        assert not any(p.name.startswith(".pull-") for p in dest.iterdir())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert "pulled version 2" in out
