"""Served vs in-process throughput of Inception-v3 (random weights), fp32 and bf16.

Exports Inception-v3 with random weights, starts ``serving local`` on it (fp32,
then ``--bf16``), and times the same uint8 batch through :class:`ModelClient`
and through the Keras model in this process. Prints images/s, the served /
in-process ratio (target >= 0.9) and the largest score difference bf16 - fp32.

    python bench/serving.py [--batch 16] [--iters 4]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labelmill.model_client import ModelClient  # noqa: E402
from tests.fixtures.model_server import export_model, start_model_server  # noqa: E402


def images_per_s(run: Callable[[], object], batch: int, iters: int) -> float:
    run()  # warm-up: graph building and oneDNN primitive caches
    started = time.perf_counter()
    for _ in range(iters):
        run()
    return batch * iters / (time.perf_counter() - started)


def served(
    base: Path, images: np.ndarray, iters: int, extra: list[str]
) -> tuple[float, np.ndarray]:
    server = start_model_server(base, base.parent / f"serving{'-'.join(extra)}.log", extra)
    try:
        with ModelClient(server.target, timeout_s=600) as client:
            rate = images_per_s(lambda: client.predict(images), len(images), iters)
            return rate, client.predict(images).scores
    finally:
        server.proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=4)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 299, 299, 3), np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "inception"
        export_model(base, arch="inception_v3", weights="random", seed=1, version=1)
        fp32_rate, fp32_scores = served(base, images, args.iters, [])
        bf16_rate, bf16_scores = served(base, images, args.iters, ["--bf16"])

    from serving.model import build, preprocess

    model = build("inception_v3", "random", seed=1).model
    keras_rate = images_per_s(
        lambda: model(preprocess(images), training=False), args.batch, args.iters
    )
    cpu = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    print(
        f"Inception-v3, random weights, batch {args.batch}, {args.iters} timed batches, {cpu} cores"
    )
    print(f"in-process Keras fp32   {keras_rate:8.2f} images/s")
    print(f"served fp32 (client)    {fp32_rate:8.2f} images/s  ratio {fp32_rate / keras_rate:.2f}")
    print(
        f"served bf16 (client)    {bf16_rate:8.2f} images/s  x{bf16_rate / fp32_rate:.2f} vs fp32"
    )
    print(f"max |score bf16 - fp32| {np.abs(bf16_scores - fp32_scores).max():.2e}")


if __name__ == "__main__":
    main()
