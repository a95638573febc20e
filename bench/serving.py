"""Served vs in-process Inception-v3 (random weights), fp32, and bf16 where the CPU has it.

The bench photographs (``common.photographs``), decoded beforehand by
labelmill's own preprocessing, go in batches through three paths, which
alternate in rounds (the order rotates each round):

- Keras in this process, compiled with ``tf.function`` (fp32): the yardstick;
- ``serving local`` (fp32) through :class:`ModelClient`, over gRPC;
- ``serving local --bf16`` the same way, where the CPU has AVX512_BF16 or
  AMX; elsewhere the table says "not supported on this CPU".

Each round pairs each served rate with the in-process rate of its own round;
the table shows the medians of those paired ratios (target: served fp32 >=
0.9 of in-process). For bf16 it also shows what bf16 changes in the answers,
over every photograph: how often its top-1 class and its top-5 set agree with
fp32's, and the largest difference between the two top-5 score vectors.
Random weights spread the probabilities thin, so near-ties make top-1
agreement a pessimistic figure here; trained weights separate the classes
far more.

    python bench/serving.py [--images 96] [--batch 16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, describe, model_base, photographs, timed
from summary import report

from labelmill.hardware import NO_BF16, bf16_instructions, machine
from labelmill.model_client import ModelClient, Prediction
from labelmill.settings import DEFAULT_FORMATS
from tests.fixtures.model_server import start_model_server
from workers.preprocess import preprocess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
TARGET_SERVED = 0.9

Predict = Callable[[np.ndarray], Prediction | None]


def in_process(batch: int) -> Predict:
    """Keras fp32 in this process, one ``tf.function`` traced per batch shape."""
    import tensorflow as tf

    from serving.model import build
    from serving.model import preprocess as normalise

    model = build("inception_v3", "random", seed=1).model
    infer = tf.function(lambda x: model(normalise(x), training=False), reduce_retracing=True)

    def run(pixels: np.ndarray) -> None:
        infer(pixels).numpy()
        return None

    return run


def one_pass(run: Predict, pixels: np.ndarray, batch: int) -> tuple[float, list[Prediction]]:
    """Images per second over every image in batches, and the answers (if any)."""
    answers = []
    start = time.perf_counter()
    for i in range(0, len(pixels), batch):
        answer = run(pixels[i : i + batch])
        if answer is not None:
            answers.append(answer)
    return len(pixels) / (time.perf_counter() - start), answers


def agreement(fp32: list[Prediction], bf16: list[Prediction]) -> tuple[float, float, float]:
    """(top-1 agreement, top-5 set agreement, largest |score difference|) over all images."""
    ids32 = np.concatenate([p.class_ids for p in fp32])
    ids16 = np.concatenate([p.class_ids for p in bf16])
    scores32 = np.concatenate([p.scores for p in fp32])
    scores16 = np.concatenate([p.scores for p in bf16])
    top1 = float(np.mean(ids32[:, 0] == ids16[:, 0]))
    top5 = float(np.mean([set(a) == set(b) for a, b in zip(ids32, ids16, strict=True)]))
    return top1, top5, float(np.abs(scores32 - scores16).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with timed("photographs, decoded"):
        photos = photographs(args.images)
        pixels = np.stack(
            [
                preprocess(d, max_pixels=100_000_000, allowed_formats=DEFAULT_FORMATS)
                for _, d in photos
            ]
        )
    bf16 = bf16_instructions()
    base = model_base("inception_v3")
    with ExitStack() as cleanup:
        paths: dict[str, Predict] = {}
        names = ["fp32"] + (["bf16"] if bf16 else [])
        for name in names:
            with timed(f"serving local, {name}"):
                extra = ["--bf16"] if name == "bf16" else []
                server = start_model_server(base, OUT / f"serving-{name}.log", extra)
                cleanup.callback(server.proc.stop)
                client = cleanup.enter_context(ModelClient(server.target, timeout_s=600))
                paths[f"served {name}"] = client.predict
        with timed("Keras in process"):
            paths["in-process"] = in_process(args.batch)
        order = list(paths)
        for run in paths.values():  # warm-up: every batch shape, every path
            one_pass(run, pixels, args.batch)
        rates: dict[str, list[float]] = {p: [] for p in order}
        answers: dict[str, list[Prediction]] = {}
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for p in order[r % len(order) :] + order[: r % len(order)]:
                rates[p].append((result := one_pass(paths[p], pixels, args.batch))[0])
                answers[p] = result[1]

    med = statistics.median
    title = (
        f"Inception-v3 (random weights), batch {args.batch}, medians of {args.rounds} rounds\n"
        f"{machine()}\n{describe(photos)}"
    )
    table = Table(title=title)
    for column in ("path", "images/s", "vs in-process", "vs served fp32", "target", "met"):
        table.add_column(column, justify="right")
    table.add_row("Keras in process, fp32 (tf.function)", f"{med(rates['in-process']):.2f}",
                  "1.00", "", "", "")  # fmt: skip

    def ratio(a: str, b: str) -> float:
        return med([x / y for x, y in zip(rates[a], rates[b], strict=True)])

    served = ratio("served fp32", "in-process")
    table.add_row("served fp32", f"{med(rates['served fp32']):.2f}", f"{served:.2f}", "1.00",
                  f">= {TARGET_SERVED}", "yes" if served >= TARGET_SERVED else "NO")  # fmt: skip
    report("served fp32 vs Keras in process", f"{served:.2f}", f">= {TARGET_SERVED}",
           served >= TARGET_SERVED)  # fmt: skip
    if bf16:
        table.add_row(f"served bf16 ({bf16})", f"{med(rates['served bf16']):.2f}",
                      f"{ratio('served bf16', 'in-process'):.2f}",
                      f"{ratio('served bf16', 'served fp32'):.2f}", "", "")  # fmt: skip
    else:
        table.add_row("served bf16", "not supported on this CPU", "", "", "", "")
    Console(width=None if sys.stdout.isatty() else 150).print(table)
    if bf16:
        top1, top5, diff = agreement(answers["served fp32"], answers["served bf16"])
        print(
            f"bf16 vs fp32 over {len(pixels)} photographs: top-1 agrees on {top1:.1%}, "
            f"top-5 set on {top5:.1%}; largest top-5 score difference {diff:.2e}"
        )
    else:
        print(NO_BF16)
    print("per round, images/s:")
    for p in order:
        print(f"  {p}: " + " ".join(f"{x:.2f}" for x in rates[p]))


if __name__ == "__main__":
    main()
