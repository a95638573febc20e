"""Benchmark: encoded JPEG -> 299x299 uint8, labelmill's preprocess against plain Pillow.

Run with ``python bench/preprocess.py [--seconds 1.5] [--quick]``. The inputs are
scikit-image's sample photographs, resized to a small web image (500x375),
an HD frame (1920x1080) and a 12 Mpx camera photo (4032x3024), saved as JPEG
quality 90. The contenders run in the same process, interleaved in rounds,
so that a noisy neighbour slows all alike; each reports its median.

Plain Pillow runs twice: with labelmill's resampling filter (bilinear), the
like-for-like yardstick that the targets apply to, and with ``resize``'s
default filter (bicubic), what a worker written without care would do. The
first isolates what draft decoding and ``reducing_gap`` save; the second
adds the filter choice.

Targets, against the same filter: on 12 Mpx photos at least 3x faster; on
small images no more than 5% slower.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data as samples

sys.path.insert(0, str(Path(__file__).resolve().parent))

from summary import report

from labelmill.settings import DEFAULT_FORMATS
from workers.preprocess import RESAMPLE, SIZE, preprocess

SIZES = {"small": (500, 375), "HD": (1920, 1080), "12 Mpx": (4032, 3024)}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
MAX_SLOWDOWN_SMALL = 1.05
MIN_SPEEDUP_12MPX = 3.0


def sample_jpegs(size: tuple[int, int]) -> list[bytes]:
    """The sample photographs resized (aspect squashed) to ``size``, as JPEG q90."""
    out = []
    for name in PHOTOS:
        pixels = getattr(samples, name)()
        img = Image.fromarray(pixels).convert("RGB").resize(size, Image.Resampling.LANCZOS)
        buffer = BytesIO()
        img.save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def same_filter(data: bytes) -> np.ndarray:
    """Plain Pillow with labelmill's filter: full decode, one resample."""
    img = Image.open(BytesIO(data)).convert("RGB").resize((SIZE, SIZE), RESAMPLE)
    return np.asarray(img)


def default_filter(data: bytes) -> np.ndarray:
    """What a worker written without care would do (``resize``'s default, bicubic)."""
    img = Image.open(BytesIO(data)).convert("RGB").resize((SIZE, SIZE))
    return np.asarray(img)


def labelmill(data: bytes) -> np.ndarray:
    return preprocess(data, max_pixels=100_000_000, allowed_formats=DEFAULT_FORMATS)


def time_one(fn: Callable[[bytes], np.ndarray], images: list[bytes]) -> float:
    """Milliseconds per image for one pass over ``images``."""
    start = time.perf_counter()
    for data in images:
        fn(data)
    return (time.perf_counter() - start) * 1000 / len(images)


CONTENDERS: dict[str, Callable[[bytes], np.ndarray]] = {
    "labelmill": labelmill,
    "same filter": same_filter,
    "default filter": default_filter,
}


def measure(images: list[bytes], seconds: float) -> tuple[dict[str, float], int]:
    """Median ms per image of each contender, in rounds that rotate who goes first."""
    for fn in CONTENDERS.values():  # warm up caches and lazy imports
        time_one(fn, images)
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    names = list(CONTENDERS)
    deadline = time.perf_counter() + seconds
    rounds = 0
    gc.disable()
    try:
        while time.perf_counter() < deadline or rounds < 5:
            # Rotate the order, so that none always runs on a warm cache.
            for name in names[rounds % 3 :] + names[: rounds % 3]:
                times[name].append(time_one(CONTENDERS[name], images))
            rounds += 1
    finally:
        gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per size (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="0.5 s per size: a smoke test, noisier medians"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds = 0.5

    table = Table(title=f"JPEG bytes -> {SIZE}x{SIZE} uint8 RGB, median ms per image")
    columns = (
        "size", "pixels", "rounds", "labelmill ms", "Pillow, same filter ms", "speed-up",
        "Pillow, default filter ms", "speed-up", "target (same filter)", "met",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for label, size in SIZES.items():
        images = sample_jpegs(size)
        ms, rounds = measure(images, args.seconds)
        speedup = ms["same filter"] / ms["labelmill"]
        if label == "12 Mpx":
            target, met = f">= {MIN_SPEEDUP_12MPX:.1f}x", speedup >= MIN_SPEEDUP_12MPX
        elif label == "small":
            target, met = "not >5% slower", speedup >= 1 / MAX_SLOWDOWN_SMALL
        else:
            target, met = "-", True
        if target != "-":
            report(f"decode {label} JPEG vs Pillow, same filter", f"{speedup:.2f}x", target, met)
        table.add_row(
            label,
            f"{size[0]}x{size[1]}",
            str(rounds),
            f"{ms['labelmill']:.2f}",
            f"{ms['same filter']:.2f}",
            f"{speedup:.2f}x",
            f"{ms['default filter']:.2f}",
            f"{ms['default filter'] / ms['labelmill']:.2f}x",
            target,
            "yes" if met else "NO",
        )
    # Wide enough for the table when the output goes to a file or a pipe.
    Console(width=None if sys.stdout.isatty() else 150).print(table)


if __name__ == "__main__":
    main()
