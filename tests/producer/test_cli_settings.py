"""`producer`'s settings: a flag beats LABELMILL_* in the environment, which beats the default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labelmill.settings import Settings
from tests import images

PRODUCER = str(Path(sys.executable).parent / "producer")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(10):
        (folder / f"img-{i}.jpg").write_bytes(images.jpeg(8, 8, seed=i))
    return folder


def _dry_run(photos: Path, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LABELMILL_")}
    return subprocess.run(
        [PRODUCER, "enqueue", str(photos), "--output", str(photos.parent / "out"), "--dry-run",
         "--json", *flags],
        env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def _batches(photos: Path, env: dict[str, str], *flags: str) -> int:
    res = _dry_run(photos, env, *flags)
    assert res.returncode == 0, res.stderr
    return int(json.loads(res.stdout)["batches_total"])


def test_a_flag_beats_the_environment_which_beats_the_default(photos: Path) -> None:
    default = Settings.model_fields["batch_size"].default
    assert _batches(photos, {}) == -(-10 // default)
    assert _batches(photos, {"LABELMILL_BATCH_SIZE": "4"}) == 3
    assert _batches(photos, {"LABELMILL_BATCH_SIZE": "4"}, "--batch-size", "5") == 2


def test_a_bad_setting_in_the_environment_is_one_line_and_exit_2(photos: Path) -> None:
    res = _dry_run(photos, {"LABELMILL_BATCH_SIZE": "0"})
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "batch_size" in res.stderr, res.stderr
