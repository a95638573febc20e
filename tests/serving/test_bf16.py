"""bf16 serving: bfloat16 kernels where the CPU has them, a clean refusal elsewhere, fp32 default.

What ran is read from oneDNN itself (``ONEDNN_VERBOSE=1``, see
``tests.fixtures.model_server.onednn_convolutions``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import serving.cli
from labelmill.dev import stack
from labelmill.hardware import bf16_instructions
from labelmill.model_client import ModelClient, Prediction
from labelmill.settings import DEFAULT_FORMATS
from tests import images
from tests.fixtures.model_server import onednn_convolutions, start_model_server
from workers.preprocess import preprocess

pytestmark = pytest.mark.integration

BF16_SCORE_BOUND = 0.01
"""docs/serving.md: bf16 moves no score by more than this, in absolute terms."""


@dataclass
class Served:
    prediction: Prediction
    convolutions: list[tuple[str, str]]  # (implementation, source data type), as executed


def _serve(base: Path, log: Path, extra: list[str], pixels: np.ndarray) -> Served:
    server = start_model_server(base, log, extra)
    try:
        with ModelClient(server.target) as client:
            prediction = client.predict(pixels)
    finally:
        server.proc.stop()
    return Served(prediction, onednn_convolutions(log))


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.stack(
        [
            preprocess(
                images.jpeg(640, 480, seed=i), max_pixels=10**8, allowed_formats=DEFAULT_FORMATS
            )
            for i in range(8)
        ]
    )


@pytest.fixture(scope="module")
def fp32(
    tiny_model_base: Path, tmp_path_factory: pytest.TempPathFactory, pixels: np.ndarray
) -> Iterator[Served]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONEDNN_VERBOSE", "1")
        yield _serve(tiny_model_base, tmp_path_factory.mktemp("fp32") / "log", [], pixels)


def test_fp32_is_the_default(fp32: Served) -> None:
    assert fp32.convolutions, "oneDNN ran no convolution: is TF_ENABLE_ONEDNN_OPTS=0 set?"
    assert {dtype for _, dtype in fp32.convolutions} == {"f32"}


def test_bf16_runs_bfloat16_kernels_in_hardware_where_the_cpu_has_them(
    fp32: Served,
    tiny_model_base: Path,
    tmp_path: Path,
    pixels: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if bf16_instructions() is None:
        pytest.skip("bf16 is not supported here: the CPU has neither AVX512_BF16 nor AMX")
    monkeypatch.setenv("ONEDNN_VERBOSE", "1")
    bf16 = _serve(tiny_model_base, tmp_path / "log", ["--bf16"], pixels)
    assert bf16.convolutions
    assert {dtype for _, dtype in bf16.convolutions} == {"bf16"}
    # The instructions made for it, not an emulation on plain AVX-512.
    assert all(re.search(r"bf16|amx", impl) for impl, _ in bf16.convolutions), bf16.convolutions
    # The answers move, and within the documented bound.
    diff = np.abs(bf16.prediction.scores - fp32.prediction.scores).max()
    assert 0 < diff <= BF16_SCORE_BOUND


def test_serving_local_refuses_bf16_in_one_line_on_a_cpu_without_it(
    tiny_model_base: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(serving.cli, "bf16_instructions", lambda: None)
    with pytest.raises(SystemExit) as exit_:
        serving.cli.main(["local", "--model-base-path", str(tiny_model_base), "--bf16"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bf16 is not supported on this CPU" in err[0], err


@pytest.mark.skipif(bf16_instructions() is not None, reason="this CPU has bf16 instructions")
def test_serving_local_refuses_bf16_on_this_cpu(tiny_model_base: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving", "local", "--model-base-path", str(tiny_model_base),
         "--bf16"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1 and "bf16 is not supported on this CPU" in lines[0], lines


def test_the_local_stack_refuses_bf16_before_exporting_a_model_on_a_cpu_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(stack, "bf16_instructions", lambda: None)
    assert stack.main(["up", "--dir", str(tmp_path / "s"), "--bf16"]) == 2
    assert "bf16 is not supported on this CPU" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_the_local_stack_serves_in_bf16_only_when_asked(tmp_path: Path) -> None:
    def model_line(**kw: bool) -> str:
        text = stack.procfile(tmp_path, stack.Ports(), workers=1, model_base=tmp_path, **kw)
        return next(line for line in text.splitlines() if line.startswith("model:"))

    assert "--bf16" not in model_line()
    assert "--bf16" in model_line(bf16=True)
