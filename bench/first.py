"""First results: how soon a new job's first line is in storage, how soon a new worker works.

On a warm local stack (``serving local`` with Inception-v3 loaded, one
Celery worker idle, both warmed by a job), two things are timed, each over
``--rounds`` rounds, and their medians compared with the targets:

- **first line**: from the start of the ``producer enqueue`` process (its
  Python start-up, preflight, model version lookup and input manifest
  included) for a new one-photo job, to the job's first part file in S3
  (target <= 1.5 s);
- **worker from nothing**: with a one-photo batch already queued and no
  worker running, from the start of a ``celery -A workers worker`` process
  (what KEDA does when it scales the tier up from zero) to the moment the
  worker takes the batch: the ledger counts the delivery as the batch
  starts (target <= 3 s).

    python bench/first.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CELERY, ROOT, photographs, stack, timed
from summary import report

from labelmill.hardware import machine
from tests.fixtures.procs import Proc, wait_until

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TARGET_FIRST_LINE_S = 1.5
TARGET_WORKER_S = 3.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    photos = photographs(300)
    # A 640x480 photo and nothing bigger: what is timed is the path, not a decode.
    small = [p for p in photos if p[0].endswith("-small.jpg")][: 2 * args.rounds + 2]
    first_line: list[float] = []
    worker_start: list[float] = []
    with stack("inception_v3") as st:
        for i, photo in enumerate(small):
            st.upload(f"one-{i}/", [photo])
        with timed("a warm worker, warmed up"):
            st.start_worker(concurrency=2)
            st.run_job("one-0/", "--batch-size", "1")
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: first line", file=sys.stderr, flush=True)
            start = time.perf_counter()
            job_id, proc = st.start_producer(f"one-{2 * r + 1}/", "--batch-size", "1")
            first_line.append(st.wait_first_part(job_id, proc, start))
            st.wait_done(job_id, proc, start, 120)
            st.finish_producer(job_id, proc)

        st.stop_workers()
        ledger = st.ledger
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: worker from nothing", file=sys.stderr, flush=True)
            job_id, proc = st.start_producer(f"one-{2 * r + 2}/", "--batch-size", "1")
            st.finish_producer(job_id, proc)  # sent; nothing runs it yet
            attempts = ledger.keys(job_id).attempts
            start = time.perf_counter()
            worker = Proc(
                [*CELERY, "-c", "2", "-n", f"cold{r}@%h"],
                log=st.tmp / f"worker-cold{r}.log",
                env=st.env,
                cwd=ROOT,
            )
            try:
                wait_until(partial(ledger.r.hget, attempts, "0"), timeout=60,
                           interval=0.005, what="the batch taken")  # fmt: skip
                worker_start.append(time.perf_counter() - start)
                st.wait_done(job_id, None, start, 120)
            finally:
                worker.stop(timeout=60)

    med = statistics.median
    print(f"first results, medians of {args.rounds} rounds; {machine()}")
    rows = [
        ("first line of a one-photo job, from the producer's start", first_line,
         TARGET_FIRST_LINE_S),
        ("a worker from nothing takes its first batch, from its start", worker_start,
         TARGET_WORKER_S),
    ]  # fmt: skip
    for what, values, target in rows:
        m = med(values)
        met = "yes" if m <= target else "NO"
        shown = " ".join(f"{v:.2f}" for v in values)
        print(f"  {what}: {m:.2f} s (target <= {target} s, met: {met}); rounds: {shown}")
        report(what, f"{m:.2f} s", f"<= {target} s", m <= target)


if __name__ == "__main__":
    main()
