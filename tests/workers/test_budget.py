"""workers/budget.py: the byte budget, the cgroup limit, the defaults."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from PIL import Image

from workers.budget import (
    MIB,
    UNLIMITED_DEFAULT,
    MemoryBudget,
    WorkerBudget,
    container_memory_limit,
    worker_budget_bytes,
)
from workers.preprocess import SIZE, decode_cost, preprocess


def test_a_reservation_waits_until_it_fits() -> None:
    budget = MemoryBudget(100)
    budget.acquire(60)
    got = threading.Event()

    def second() -> None:
        with budget.hold(60):
            got.set()

    t = threading.Thread(target=second)
    t.start()
    assert not got.wait(0.2), "60 + 60 does not fit in 100"
    budget.release(60)
    assert got.wait(5)
    t.join()
    assert budget.used == 0 and budget.peak == 60


def test_an_item_larger_than_the_budget_runs_alone() -> None:
    budget = MemoryBudget(100)
    with budget.hold(500):  # nothing else held: it goes
        assert budget.used == 500
    assert budget.used == 0


def test_the_worker_share_is_split_between_fetching_and_decoding() -> None:
    w = WorkerBudget(400 * MIB)
    assert (w.fetch.limit, w.decode.limit) == (100 * MIB, 300 * MIB)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_limit_is_read_from_cgroup_v1_or_v2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.budget as budget

    monkeypatch.setattr(budget, "Path", lambda p: tmp_path / str(p).lstrip("/"))
    v1 = write(tmp_path / "self-v1", "4:memory:/pod/c1\n1:cpu:/\n")
    write(tmp_path / "sys/fs/cgroup/memory/pod/c1/memory.limit_in_bytes", "1610612736\n")
    assert container_memory_limit(v1) == 1536 * MIB
    v2 = write(tmp_path / "self-v2", "0::/pod/c2\n")
    write(tmp_path / "sys/fs/cgroup/pod/c2/memory.max", "max\n")
    assert container_memory_limit(v2) is None
    write(tmp_path / "sys/fs/cgroup/pod/c2/memory.max", "805306368\n")
    assert container_memory_limit(v2) == 768 * MIB
    unlimited = write(tmp_path / "self-v1u", "4:memory:/\n")
    write(tmp_path / "sys/fs/cgroup/memory/memory.limit_in_bytes", str(2**63 - 4096))
    assert container_memory_limit(unlimited) is None
    assert container_memory_limit(tmp_path / "missing") is None


def test_defaults() -> None:
    assert worker_budget_bytes(None, 1536 * MIB) == 768 * MIB
    assert worker_budget_bytes(None, None) == UNLIMITED_DEFAULT
    assert worker_budget_bytes(300, 1536 * MIB) == 300 * MIB


def encoded(fmt: str, mode: str, side: int) -> bytes:
    out = io.BytesIO()
    Image.new(mode, (side, side)).save(out, format=fmt)
    return out.getvalue()


def test_decode_cost_follows_draft_scaling_and_mode() -> None:
    jpeg = Image.open(io.BytesIO(encoded("JPEG", "RGB", 4000)))
    jpeg.draft("RGB", (SIZE, SIZE))  # 1/8 scale: 500 x 500
    assert decode_cost(jpeg) == 500 * 500 * 4
    png = Image.open(io.BytesIO(encoded("PNG", "P", 1000)))
    assert decode_cost(png) == 1000 * 1000 * (1 + 4)  # palette, then its RGB copy


def test_preprocess_holds_the_cost_while_it_decodes() -> None:
    seen: list[int] = []
    budget = MemoryBudget(10**9)

    def hold(n: int) -> AbstractContextManager[None]:
        seen.append(n)
        return budget.hold(n)

    preprocess(encoded("PNG", "RGB", 600), max_pixels=10**8, allowed_formats=["PNG"], hold=hold)
    assert seen == [600 * 600 * 4]
    assert budget.used == 0 and budget.peak == seen[0]


_ALLOCATOR_PROBE = """
import gc, resource, sys, threading
from workers.budget import MIB, TOP_PAD, tune_malloc

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

assert tune_malloc()
block = b"x" * (9 * MIB)  # a batch's Predict request
before = faults()
for _ in range(50):
    copy = block[:-1] + b"y"  # a fresh 9 MiB buffer, written, then freed
    del copy
per_batch = (faults() - before) / 50
# A huge image's pixels, decoded on a fetch thread and freed: its memory must
# go back to the kernel, not stay with the process.
base = rss()
def decode():
    pixels = bytearray(4 * TOP_PAD)
    del pixels
thread = threading.Thread(target=decode)
thread.start()
thread.join()
gc.collect()
print(per_batch, (rss() - base) / MIB)
"""


def test_a_tuned_worker_reuses_batch_buffers_and_gives_big_images_back() -> None:
    """Batch-sized buffers are refilled without faulting their pages in again.

    When every block of 1 MiB or more had its own mmap, each 9 MiB buffer
    cost 2304 page faults, every batch. A block larger than what the process
    keeps (here, a huge image decoded on a fetch thread) still goes back to
    the kernel once freed.
    """
    out = subprocess.run(
        [sys.executable, "-c", _ALLOCATOR_PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split()
    faults_per_batch, kept_mib = float(out[0]), float(out[1])
    assert faults_per_batch < 100, faults_per_batch  # of 2 x 2304 pages
    assert kept_mib < 16, kept_mib  # of the 256 MiB freed
