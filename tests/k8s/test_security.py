"""Static checks of the deployment: checkov on the manifests and the Dockerfile,
hadolint on the Dockerfile. Tools missing: skip locally, fail when CI is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.procs import need_binary
from tests.k8s.conftest import ROOT


def _tool(name: str, *candidates: Path) -> str:
    installed = [str(c) for c in candidates if c.is_file() and os.access(c, os.X_OK)]
    return need_binary(installed[0] if installed else shutil.which(name), name)


def checkov() -> str:
    # checkov pins old boto3/packaging, so it lives in its own venv.
    return _tool("checkov", ROOT / ".venv-tools" / "bin" / "checkov")


def hadolint() -> str:
    return _tool("hadolint", Path(sys.executable).parent / "hadolint")


@pytest.mark.parametrize("target", [["-d", "k8s", "-d", "keda"], ["-f", "Dockerfile"]])
def test_checkov_finds_nothing(target: list[str]) -> None:
    config = ["--config-file", "deploy/checkov.yaml"]
    out = subprocess.run(
        [checkov(), *config, *target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Failed checks: 0" in out.stdout


def test_hadolint_is_clean() -> None:
    out = subprocess.run(
        [hadolint(), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_run_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = text.split("\nFROM ")
    for target in ("worker", "export"):
        stage = next(s for s in stages if s.split("\n", 1)[0].endswith(f" AS {target}"))
        assert "\nUSER 10001:10001" in stage, target
    assert "--require-hashes" in text
