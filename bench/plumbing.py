"""Plumbing: the e2e job with the ``tiny`` model, beside bare decode-and-resize on the same cores.

With a model that costs nothing, what is left of a job is the pipeline's own
work: listing and enqueuing, Redis round trips, S3 GETs (SeaweedFS runs on
the same cores), decoding, the gRPC call, writing part files and the
ledger. The yardstick is the bare rate of decoding and resizing the same
JPEGs (labelmill's ``preprocess`` from bytes already in memory) in one
process per core: the CPU work nothing can avoid. Targets: the job reaches
at least half of its rate, and the worker (pool and main processes) spends
at most 1.25 times its CPU per image.

    python bench/plumbing.py [--images 300] [--batch 32] [--concurrency 2] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cores, describe, photographs, self_cpu_s, stack, timed, vm_hwm_mb
from summary import report

from labelmill.hardware import machine
from labelmill.settings import DEFAULT_FORMATS
from workers.preprocess import preprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TARGET_RATIO = 0.5
TARGET_WORKER_CPU = 1.25  # worker CPU per image, at most this times the bare decode's


def _decode_all(blobs: list[bytes]) -> float:
    """Decode and resize every blob; the CPU seconds it took."""
    cpu = self_cpu_s()
    for data in blobs:
        preprocess(data, max_pixels=100_000_000, allowed_formats=DEFAULT_FORMATS)
    return self_cpu_s() - cpu


def bare_rate(blobs: list[bytes], processes: int) -> tuple[float, float]:
    """Decoding and resizing ``blobs`` in ``processes`` processes: (images/s, images/CPU-s)."""
    shards = [blobs[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_decode_all, [s[:4] for s in shards]))  # warm-up: imports, first decode
        start = time.perf_counter()
        cpu = sum(pool.map(_decode_all, shards))
        return len(blobs) / (time.perf_counter() - start), len(blobs) / cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32, help="job batch size (default 32)")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="Celery pool processes (default: one per core)",
    )
    parser.add_argument("--fetch-concurrency", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=1, help="alternations (default 1)")
    args = parser.parse_args()
    n_cores = cores()
    concurrency = args.concurrency or n_cores

    with timed("photographs"):
        photos = photographs(args.images)
    blobs = [d for _, d in photos]
    extra = {}
    if args.fetch_concurrency:
        extra["LABELMILL_FETCH_CONCURRENCY"] = str(args.fetch_concurrency)
    job: list[float] = []
    bare: list[float] = []
    job_cpu: list[float] = []
    breakdown: dict[str, float] = {}
    bare_cpu: list[float] = []
    worker_ms: list[float] = []
    with stack("tiny") as st:
        with timed("upload"):
            st.upload("photos/", photos)
            st.upload("warmup/", photos[: 2 * args.batch * concurrency])
        st.start_worker(concurrency=concurrency, extra=extra)
        st.run_job("warmup/", "--batch-size", str(args.batch))
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            rate, per_cpu = bare_rate(blobs, n_cores)
            bare.append(rate)
            bare_cpu.append(per_cpu)
            cpu, parts = st.cpu_s(), st.cpu_by_part()
            n, seconds = st.run_job("photos/", "--batch-size", str(args.batch))
            assert n == len(photos), (n, len(photos))
            job.append(n / seconds)
            job_cpu.append(n / (st.cpu_s() - cpu))
            after = st.cpu_by_part()
            breakdown = {k: (after[k] - parts[k]) * 1000 / n for k in parts}
            worker_ms.append(
                breakdown["worker pool processes"] + breakdown["worker main processes"]
            )
        peak = max(vm_hwm_mb(pid) for pid in st.pool_pids())

    med = statistics.median
    # Paired by round, so that a neighbour's load weighs on both sides alike.
    ratio = med([j / b for j, b in zip(job, bare, strict=True)])
    cpu_ratio = med([j / b for j, b in zip(job_cpu, bare_cpu, strict=True)])
    table = Table(
        title=(
            f"tiny model, batch {args.batch}, medians of {args.rounds} round(s)\n"
            f"{machine()}\n{describe(photos)}"
        )
    )
    for column in ("path", "images/s", "ratio", "images/CPU-s", "CPU ratio", "target", "met"):
        table.add_column(column, justify="right")
    table.add_row(
        f"bare decode+resize ({n_cores} processes)",
        f"{med(bare):.1f}",
        "1.00",
        f"{med(bare_cpu):.1f}",
        "1.00",
        "",
        "",
    )
    table.add_row(
        f"job end to end (1 worker, -c {concurrency})",
        f"{med(job):.1f}",
        f"{ratio:.2f}",
        f"{med(job_cpu):.1f}",
        f"{cpu_ratio:.2f}",
        f">= {TARGET_RATIO}",
        "yes" if ratio >= TARGET_RATIO else "NO",
    )
    bare_ms = [1000 / b for b in bare_cpu]
    worker_ratio = med([w / b for w, b in zip(worker_ms, bare_ms, strict=True)])
    table.add_row(
        "worker CPU ms/image (pool + main) vs bare decode's",
        f"{med(worker_ms):.2f} vs {med(bare_ms):.2f}",
        f"{worker_ratio:.2f}x",
        "",
        "",
        f"<= {TARGET_WORKER_CPU}x",
        "yes" if worker_ratio <= TARGET_WORKER_CPU else "NO",
    )
    table.add_row("worker pool process peak RSS", f"{peak:.0f} MB", "", "", "", "", "")
    report("tiny-model job vs bare decode", f"{ratio:.2f}", f">= {TARGET_RATIO}",
           ratio >= TARGET_RATIO)  # fmt: skip
    report("worker CPU per image vs bare decode", f"{worker_ratio:.2f}x",
           f"<= {TARGET_WORKER_CPU}x", worker_ratio <= TARGET_WORKER_CPU)  # fmt: skip
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    print("CPU ms per image by part of the stack (last round):")
    print(f"  bare decode+resize: {1000 / med(bare_cpu):.2f}")
    shown = ", ".join(f"{k} {v:.2f}" for k, v in breakdown.items())
    print(f"  job: total {sum(breakdown.values()):.2f}: {shown}")
    print("per round, images/s (images per CPU-second):")
    print("  bare:", " ".join(f"{x:.1f} ({y:.1f})" for x, y in zip(bare, bare_cpu, strict=True)))
    print("  job: ", " ".join(f"{x:.1f} ({y:.1f})" for x, y in zip(job, job_cpu, strict=True)))


if __name__ == "__main__":
    main()
