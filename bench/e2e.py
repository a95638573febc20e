"""End to end: a job through the whole local stack beside in-process Keras, both fp32.

A few hundred photographs of mixed sizes (scikit-image's samples, as is,
cropped, HD and 12 Mpx; one in five is 12 Mpx) are uploaded to S3
(SeaweedFS). ``producer enqueue`` sends the job through Redis to one Celery
worker, which fetches, decodes, calls ``serving local`` (Inception-v3,
random weights) and writes the labels back to S3. The job's time is the
ledger's, from creation to the manifest.

In the same run, the same images, decoded beforehand by labelmill's own
preprocessing, go through the Keras model in this process at the same batch
size: the best this machine does with the model alone. The ratio e2e /
in-process says how much of the hardware the pipeline leaves to the model
(target >= 0.85). Also printed: the peak RSS (VmHWM) of each worker pool
process over the job (target < 250 MB).

    python bench/e2e.py [--images 300] [--batch 32] [--concurrency 1] [--rounds 1]

Other processes on the same cores slow both sides alike only when they are
measured close together: with ``--rounds N`` the two alternate N times and
the medians are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    cores,
    describe,
    photographs,
    profile,
    self_cpu_s,
    stack,
    timed,
    vm_hwm_mb,
)

from labelmill.settings import DEFAULT_FORMATS
from workers.preprocess import preprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TARGET_RATIO = 0.85
TARGET_RSS_MB = 250.0


def keras_rate(pixels: np.ndarray, batch: int) -> tuple[float, float]:
    """Keras in this process over ``pixels`` in batches of ``batch``: (images/s, CPU s)."""
    import tensorflow as tf

    from serving.model import build
    from serving.model import preprocess as normalise

    model = build("inception_v3", "random", seed=1).model
    infer = tf.function(lambda x: model(normalise(x), training=False), reduce_retracing=True)
    infer(pixels[:batch])  # warm-up: tracing and oneDNN primitives for this batch size
    if len(pixels) % batch:
        infer(pixels[-(len(pixels) % batch) :])
    start, cpu = time.perf_counter(), self_cpu_s()
    for i in range(0, len(pixels), batch):
        infer(pixels[i : i + batch]).numpy()
    return len(pixels) / (time.perf_counter() - start), self_cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="job batch size (default 32)")
    parser.add_argument(
        "--concurrency",
        default="2",
        help="Celery pool processes; a comma-separated list compares several (default 2)",
    )
    parser.add_argument("--fetch-concurrency", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="alternations (default 1)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="py-spy record every worker pool process (and the model server) during the "
        "last job into this folder, as collapsed stacks",
    )
    args = parser.parse_args()

    with timed("photographs"):
        photos = photographs(args.images)
    with timed("decoding beforehand for the in-process side"):
        pixels = np.stack(
            [
                preprocess(d, max_pixels=100_000_000, allowed_formats=DEFAULT_FORMATS)
                for _, d in photos
            ]
        )

    extra = {}
    if args.fetch_concurrency:
        extra["LABELMILL_FETCH_CONCURRENCY"] = str(args.fetch_concurrency)
    settings = [int(c) for c in args.concurrency.split(",")]
    e2e: dict[int, list[float]] = {c: [] for c in settings}
    e2e_cpu: dict[int, list[float]] = {c: [] for c in settings}
    local_cpu: list[float] = []
    breakdown: dict[int, dict[str, float]] = {}
    peaks: dict[int, float] = dict.fromkeys(settings, 0.0)
    local: list[float] = []
    main_rss = 0.0
    with stack("inception_v3") as st:
        with timed("upload"):
            st.upload("photos/", photos)
            st.upload("warmup/", photos[: args.batch])
            st.upload("warmup-small/", photos[-2 * max(settings) :])
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: in-process Keras", file=sys.stderr, flush=True)
            rate, cpu = keras_rate(pixels, args.batch)
            local.append(rate)
            local_cpu.append(len(pixels) / cpu)
            for c in settings:
                print(f"round {r + 1}/{args.rounds}: end to end, -c {c}", file=sys.stderr)
                st.stop_workers()
                worker = st.start_worker(concurrency=c, extra=extra)
                # Warm-up: every pool process builds its clients (one image per
                # batch), and once, the model server its kernels for this batch size.
                st.run_job("warmup-small/", "--batch-size", "1")
                if r == 0 and c == settings[0]:
                    st.run_job("warmup/", "--batch-size", str(args.batch))
                profiling = (
                    profile([*st.pool_pids(), st.model_pid], args.profile / f"c{c}")
                    if args.profile and r == args.rounds - 1
                    else contextlib.nullcontext()
                )
                with profiling:
                    cpu, parts = st.cpu_s(), st.cpu_by_part()
                    n, seconds = st.run_job("photos/", "--batch-size", str(args.batch))
                    e2e_cpu[c].append(n / (st.cpu_s() - cpu))
                    after = st.cpu_by_part()
                    breakdown[c] = {k: (after[k] - parts[k]) * 1000 / n for k in parts}
                assert n == len(photos), (n, len(photos))
                e2e[c].append(n / seconds)
                peaks[c] = max(peaks[c], *(vm_hwm_mb(pid) for pid in st.pool_pids()))
                main_rss = max(main_rss, vm_hwm_mb(worker.pid))

    # Each e2e run is paired with the in-process run of its own round: a
    # neighbour's load then weighs on both sides of each ratio alike.
    table = Table(
        title=(
            f"Inception-v3 fp32 (random weights), batch {args.batch}, {cores()} cores, "
            f"medians of {args.rounds} round(s)\n{describe(photos)}"
        )
    )
    for column in (
        "path", "images/s", "ratio", "images/CPU-s", "CPU ratio", "pool process peak RSS",
        "target", "met",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    med = statistics.median
    table.add_row(
        "in-process Keras (pre-decoded)",
        f"{med(local):.2f}",
        "1.00",
        f"{med(local_cpu):.2f}",
        "1.00",
        "",
        "",
        "",
    )
    for c in settings:
        ratio = med([e / k for e, k in zip(e2e[c], local, strict=True)])
        cpu_ratio = med([e / k for e, k in zip(e2e_cpu[c], local_cpu, strict=True)])
        met = ratio >= TARGET_RATIO and peaks[c] < TARGET_RSS_MB
        table.add_row(
            f"end to end (1 worker, -c {c})",
            f"{med(e2e[c]):.2f}",
            f"{ratio:.2f}",
            f"{med(e2e_cpu[c]):.2f}",
            f"{cpu_ratio:.2f}",
            f"{peaks[c]:.0f} MB",
            f">= {TARGET_RATIO}, < {TARGET_RSS_MB:.0f} MB",
            "yes" if met else "NO",
        )
    table.add_row("worker main process peak RSS", f"{main_rss:.0f} MB", "", "", "", "", "", "")
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    print("CPU ms per image by part of the stack (last round):")
    print("  in-process Keras: " + f"{1000 / med(local_cpu):.1f}")
    for c in settings:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in breakdown[c].items())
        print(f"  e2e -c {c}: total {sum(breakdown[c].values()):.1f}: {shown}")
    print("per round, images/s (images per CPU-second):")
    pairs = zip(local, local_cpu, strict=True)
    print("  in-process:", " ".join(f"{x:.2f} ({y:.2f})" for x, y in pairs))
    for c in settings:
        pairs = zip(e2e[c], e2e_cpu[c], strict=True)
        print(f"  e2e -c {c}:", " ".join(f"{x:.2f} ({y:.2f})" for x, y in pairs))


if __name__ == "__main__":
    main()
