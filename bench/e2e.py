"""End to end: a job through the whole local stack beside in-process Keras fp32.

A few hundred photographs of mixed sizes (scikit-image's samples, as is,
cropped, HD and 12 Mpx; one in five is 12 Mpx) are uploaded to S3
(SeaweedFS). ``producer enqueue`` sends the job through Redis to one Celery
worker, which fetches, decodes, calls ``serving local`` (Inception-v3,
random weights) and writes the labels back to S3. The job's time runs from
the start of the ``producer enqueue`` process to its ``_SUCCESS`` in S3.

In the same run, the same images, decoded beforehand by labelmill's own
preprocessing, go through the Keras model in this process (fp32,
``tf.function``) at the same batch size: the best this machine does with the
model alone. The ratio e2e / in-process says how much of the hardware the
pipeline leaves to the model (target >= 0.85 with fp32 serving). Where the
CPU has AVX512_BF16 or AMX, the job also runs against ``serving local
--bf16`` (target >= 1.5 times the fp32 in-process rate); elsewhere that row
says "not supported on this CPU". Also printed: the peak RSS (VmHWM) of each
worker pool process over the job (target < 250 MB).

    python bench/e2e.py [--images 300] [--batch 32] [--concurrency 2] [--rounds 1]
                        [--precision fp32,bf16]

Other processes on the same cores slow both sides alike only when they are
measured close together: with ``--rounds N`` the sides alternate N times,
each e2e run is paired with the in-process run of its round, and the
medians of the paired ratios are reported.
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
    describe,
    photographs,
    profile,
    self_cpu_s,
    stack,
    timed,
    vm_hwm_mb,
)
from summary import report

from labelmill.hardware import bf16_instructions, machine
from labelmill.settings import DEFAULT_FORMATS
from workers.preprocess import preprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TARGET_RATIO = 0.85
TARGET_BF16 = 1.5
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
    parser.add_argument(
        "--precision",
        default="fp32,bf16",
        help="model server modes, comma-separated (default fp32,bf16; bf16 where the CPU has it)",
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
    wanted = args.precision.split(",")
    bf16 = bf16_instructions()
    precisions = [p for p in wanted if p == "fp32" or (p == "bf16" and bf16)]
    settings = [int(c) for c in args.concurrency.split(",")]
    runs = [(p, c) for p in precisions for c in settings]
    e2e: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
    e2e_cpu: dict[tuple[str, int], list[float]] = {r: [] for r in runs}
    breakdown: dict[tuple[str, int], dict[str, float]] = {}
    peaks: dict[tuple[str, int], float] = dict.fromkeys(runs, 0.0)
    local: list[float] = []
    local_cpu: list[float] = []
    main_rss = 0.0
    with stack("inception_v3") as st:
        targets = {"fp32": st.model_target}
        if "bf16" in precisions:
            with timed("serving local --bf16"):
                targets["bf16"] = st.start_model("inception_v3", ["--bf16"], "bf16")
        with timed("upload"):
            st.upload("photos/", photos)
            st.upload("warmup/", photos[: args.batch])
            st.upload("warmup-small/", photos[-2 * max(settings) :])
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: in-process Keras", file=sys.stderr, flush=True)
            rate, cpu = keras_rate(pixels, args.batch)
            local.append(rate)
            local_cpu.append(len(pixels) / cpu)
            for p, c in runs:
                print(f"round {r + 1}/{args.rounds}: end to end, {p}, -c {c}", file=sys.stderr)
                st.stop_workers()
                env = {**extra, "LABELMILL_MODEL_SERVER": targets[p]}
                worker = st.start_worker(concurrency=c, extra=env)
                # Warm-up: every pool process builds its clients (one image per
                # batch), and once, each model server its kernels for this batch size.
                st.run_job("warmup-small/", "--batch-size", "1")
                if r == 0 and c == settings[0]:
                    st.run_job("warmup/", "--batch-size", str(args.batch))
                profiling = (
                    profile([*st.pool_pids(), *st.model_pids], args.profile / f"{p}-c{c}")
                    if args.profile and r == args.rounds - 1
                    else contextlib.nullcontext()
                )
                with profiling:
                    cpu, parts = st.cpu_s(), st.cpu_by_part()
                    n, seconds = st.run_job("photos/", "--batch-size", str(args.batch))
                    e2e_cpu[p, c].append(n / (st.cpu_s() - cpu))
                    after = st.cpu_by_part()
                    breakdown[p, c] = {k: (after[k] - parts[k]) * 1000 / n for k in parts}
                assert n == len(photos), (n, len(photos))
                e2e[p, c].append(n / seconds)
                peaks[p, c] = max(peaks[p, c], *(vm_hwm_mb(pid) for pid in st.pool_pids()))
                main_rss = max(main_rss, vm_hwm_mb(worker.pid))

    table = Table(
        title=(
            f"Inception-v3 (random weights), batch {args.batch}, "
            f"medians of {args.rounds} round(s)\n{machine()}\n{describe(photos)}"
        )
    )
    for column in (
        "path", "images/s", "ratio", "images/CPU-s", "CPU ratio", "pool process peak RSS",
        "target", "met",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    med = statistics.median
    table.add_row("in-process Keras fp32 (pre-decoded)", f"{med(local):.2f}", "1.00",
                  f"{med(local_cpu):.2f}", "1.00", "", "", "")  # fmt: skip
    for p, c in runs:
        ratio = med([e / k for e, k in zip(e2e[p, c], local, strict=True)])
        cpu_ratio = med([e / k for e, k in zip(e2e_cpu[p, c], local_cpu, strict=True)])
        target = TARGET_RATIO if p == "fp32" else TARGET_BF16
        met = ratio >= target and peaks[p, c] < TARGET_RSS_MB
        table.add_row(
            f"end to end, {p} serving (1 worker, -c {c})",
            f"{med(e2e[p, c]):.2f}",
            f"{ratio:.2f}",
            f"{med(e2e_cpu[p, c]):.2f}",
            f"{cpu_ratio:.2f}",
            f"{peaks[p, c]:.0f} MB",
            f">= {target}, < {TARGET_RSS_MB:.0f} MB",
            "yes" if met else "NO",
        )
        report(f"job with {p} serving (-c {c}) vs fp32 Keras in process",
               f"{ratio:.2f}, {peaks[p, c]:.0f} MB", f">= {target}, < {TARGET_RSS_MB:.0f} MB",
               met)  # fmt: skip
    if "bf16" in wanted and not bf16:
        table.add_row("end to end, bf16 serving", "not supported on this CPU", "", "", "", "",
                      f">= {TARGET_BF16}", "")  # fmt: skip
        report("job with bf16 serving vs fp32 Keras in process", "not supported on this CPU",
               f">= {TARGET_BF16}", None)  # fmt: skip
    table.add_row("worker main process peak RSS", f"{main_rss:.0f} MB", "", "", "", "", "", "")
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    print("CPU ms per image by part of the stack (last round):")
    print("  in-process Keras: " + f"{1000 / med(local_cpu):.1f}")
    for p, c in runs:
        shown = ", ".join(f"{k} {v:.1f}" for k, v in breakdown[p, c].items())
        print(f"  e2e {p} -c {c}: total {sum(breakdown[p, c].values()):.1f}: {shown}")
    print("per round, images/s (images per CPU-second):")
    pairs = zip(local, local_cpu, strict=True)
    print("  in-process:", " ".join(f"{x:.2f} ({y:.2f})" for x, y in pairs))
    for p, c in runs:
        pairs = zip(e2e[p, c], e2e_cpu[p, c], strict=True)
        print(f"  e2e {p} -c {c}:", " ".join(f"{x:.2f} ({y:.2f})" for x, y in pairs))


if __name__ == "__main__":
    main()
