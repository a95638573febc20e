"""What a worker holds at once, fetched bytes and decoded pixels together, within one budget.

A worker process fetches and decodes a batch's images on ``fetch_concurrency``
threads. Unbounded, eight threads each decoding a 100-megapixel PNG hold
3 GB of pixels, and the container's memory limit kills the whole worker
(main process and pool together). So each process divides its share of the
worker's budget (``LABELMILL_MEMORY_BUDGET_MB``, by default half the
container's memory limit, split evenly over the pool processes) in two:

- a quarter for fetched bytes: a thread reserves an object's size (from its
  Content-Length or ``stat``) before reading its body, and holds it until
  the image is decoded;
- three quarters for decoding: a thread reserves what the decoded image will
  occupy (from the header, after JPEG draft scaling, see
  ``workers.preprocess.decode_cost``) before decoding it, and releases it
  once the image is resized to 299 x 299.

A thread waits until its reservation fits. One that is larger than its whole
pool runs when that pool is empty, alone, so no image is refused for being
big (``max_object_bytes`` and ``max_pixels`` bound those). Fetch holders may
wait for the decode pool, never the other way round, so the two pools cannot
deadlock. The 299 x 299 results (268 KB each, a batch's worth) are not counted.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# Without a container limit (a laptop, a VM), the worker budgets this much.
UNLIMITED_DEFAULT = 1024 * MIB
# A cgroup limit at or above this means "no limit" (v1 reports 2**63 - 4096).
_NO_LIMIT = 2**60


class MemoryBudget:
    """A byte budget shared by one process's threads: ``hold(n)`` waits until n fits."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes fit (or nothing is held), then count them."""
        n = max(0, n)
        with self._cond:
            while self.used > 0 and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
            self.peak = max(self.peak, self.used)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= max(0, n)
            self._cond.notify_all()

    @contextlib.contextmanager
    def hold(self, n: int) -> Iterator[None]:
        self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


class WorkerBudget:
    """One pool process's budget: a pool for fetched bytes and one for decoding."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.fetch = MemoryBudget(total // 4)
        self.decode = MemoryBudget(total - total // 4)


def container_memory_limit(proc_self_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """This process's cgroup memory limit in bytes, or None when it has none or it is unreadable.

    cgroup v2: ``memory.max`` of the unified hierarchy's path (line ``0::``);
    cgroup v1: ``memory.limit_in_bytes`` of the ``memory`` controller's path.
    In a container both paths are usually ``/``, the container's own cgroup.
    """
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return None
    root = Path("/sys/fs/cgroup")
    candidates: list[Path] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        rel = path.lstrip("/")
        if hierarchy == "0" and controllers == "":
            candidates.append(root / rel / "memory.max")
        elif "memory" in controllers.split(","):
            candidates.append(root / "memory" / rel / "memory.limit_in_bytes")
    for file in candidates:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            limit = int(text)
        except ValueError:
            continue
        return None if limit >= _NO_LIMIT else limit
    return None


def worker_budget_bytes(configured_mb: int | None, limit: int | None) -> int:
    """The whole worker's budget: as configured, else half the container's limit."""
    if configured_mb is not None:
        return configured_mb * MIB
    if limit is None:
        return UNLIMITED_DEFAULT
    # The other half holds the processes themselves (Python, numpy, gRPC,
    # boto3: about 150 MB each, the freed memory each keeps for reuse
    # included, see tune_malloc) and Pillow's short-lived buffers.
    return limit // 2


# glibc's malloc.h
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 * MIB
TOP_PAD = 64 * MIB


def tune_malloc() -> bool:
    """Set glibc's allocator for a worker: freed memory is bounded, and reused without faults.

    Call it before the process starts threads; forked pool processes inherit it.

    - One arena (M_ARENA_MAX), not one per thread: each arena keeps freed
      memory of its own, so eight fetch threads each decoding a large image
      once would keep eight images' worth, counted by the container's limit
      but no longer by the budget.
    - Blocks of 32 MiB or more (the largest threshold glibc itself would
      pick) always from mmap (M_MMAP_THRESHOLD), and given back when freed.
    - 64 MiB kept free at the top of the heap (M_TOP_PAD), instead of
      128 KiB. Each batch allocates and frees a few 8.6 MB buffers (the
      Predict request, gRPC's copy of it) and every fetched object; memory
      handed back to the kernel is page-faulted in again, zeroed, on the
      next batch: 450 minor faults and 1.4 ms of system CPU per image when
      every block of 1 MiB or more had its own mmap (bench/plumbing.py), as
      much as the S3 GET. Tuned: 3 faults and 0.3 ms, and the pool process
      peaked lower (148 vs 150 MB, before obstore's GETs), one arena
      replacing nine.

    The process thus keeps up to 64 MiB it does not use;
    ``worker_budget_bytes`` leaves half the container's limit for the
    processes themselves. Returns False where the C library is not glibc
    (nothing is changed).
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TOP_PAD, TOP_PAD))
    return all([bool(mallopt(option, value)) for option, value in settings])


def process_budget(configured_mb: int | None, pool_processes: int) -> WorkerBudget:
    """This pool process's share of the worker's budget."""
    limit = container_memory_limit()
    total = worker_budget_bytes(configured_mb, limit)
    share = total // max(1, pool_processes)
    log.info(
        "memory budget %d MiB for fetched and decoding images in this process "
        "(worker %d MiB over %d processes; container limit %s)",
        share // MIB,
        total // MIB,
        pool_processes,
        f"{limit // MIB} MiB" if limit else "none",
    )
    return WorkerBudget(share)
