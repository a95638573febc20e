"""Fetch a batch's objects concurrently and decode them, with bounded memory.

Each thread fetches one object (capped at ``max_object_bytes``) and decodes it
to a 299x299 array before taking the next. What the threads of a process hold
at once, fetched bytes and decoded pixels together, stays within the
process's memory budget (``workers.budget``). Pillow releases the GIL while
decoding, so the threads also use several cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from labelmill.errors import ImageError, TransientError
from labelmill.retry import Deadline, retry
from labelmill.settings import Settings
from labelmill.storage import ObjectStore
from workers.budget import WorkerBudget
from workers.preprocess import preprocess


@dataclass(frozen=True)
class Loaded:
    """An image ready for the model."""

    uri: str
    etag: str | None
    pixels: np.ndarray
    fetch_s: float = 0.0
    decode_s: float = 0.0


@dataclass(frozen=True)
class Failed:
    """An image that will get an error line."""

    uri: str
    error: ImageError
    fetch_s: float = 0.0
    decode_s: float = 0.0


Decoder = Callable[[bytes], np.ndarray]


def load_one(
    storage: ObjectStore,
    uri: str,
    settings: Settings,
    *,
    etag: str | None = None,
    deadline: Deadline,
    on_retry: Callable[[TransientError], None] | None = None,
    memory: WorkerBudget | None = None,
) -> Loaded | Failed:
    """Fetch and decode one object; permanent problems become :class:`Failed`.

    With ``etag`` (the listing's), an object that changed since is ``changed``.

    With ``memory``, the object's bytes are reserved before they are read and
    until the image is decoded, and decoding reserves what it will take
    (``workers.budget``).
    """
    held = 0

    def admit(size: int) -> None:
        nonlocal held
        if memory is not None:
            memory.fetch.release(held)  # a retried fetch replaces its reservation
            held = 0
            memory.fetch.acquire(size)
            held = size

    try:
        return _load_one(storage, uri, etag, settings, deadline, on_retry, memory, admit)
    finally:
        if memory is not None:
            memory.fetch.release(held)


def _load_one(
    storage: ObjectStore,
    uri: str,
    listed_etag: str | None,
    settings: Settings,
    deadline: Deadline,
    on_retry: Callable[[TransientError], None] | None,
    memory: WorkerBudget | None,
    admit: Callable[[int], None],
) -> Loaded | Failed:
    t0 = time.perf_counter()
    t1: float | None = None  # when the bytes arrived
    try:
        data, etag = retry(
            lambda: storage.get(
                uri, max_bytes=settings.max_object_bytes, admit=admit, if_match=listed_etag
            ),
            deadline=deadline,
            what=f"fetch {uri}",
            on_retry=on_retry,
        )
        t1 = time.perf_counter()
        if not data:
            raise ImageError("empty", f"{uri}: object is empty (0 bytes)")
        pixels = preprocess(
            data,
            max_pixels=settings.max_pixels,
            allowed_formats=settings.allowed_formats,
            hold=memory.decode.hold if memory is not None else None,
        )
    except ImageError as exc:
        msg = exc.message if uri in exc.message else f"{uri}: {exc.message}"
        now = time.perf_counter()
        fetched = t1 if t1 is not None else now
        return Failed(uri, ImageError(exc.kind, msg, exc.detail), fetched - t0, now - fetched)
    assert t1 is not None
    return Loaded(uri, etag, pixels, t1 - t0, time.perf_counter() - t1)


def load_batch(
    storage: ObjectStore,
    uris: Sequence[str],
    settings: Settings,
    pool: ThreadPoolExecutor,
    *,
    etags: Sequence[str | None] | None = None,
    deadline: Deadline,
    on_retry: Callable[[TransientError], None] | None = None,
    memory: WorkerBudget | None = None,
) -> list[Loaded | Failed]:
    """Fetch and decode every URI, in order. Transient errors past the deadline propagate.

    ``etags``, one per URI, are what the listing saw (None: read unconditionally).
    """
    futures = [
        pool.submit(
            load_one,
            storage,
            u,
            settings,
            etag=e,
            deadline=deadline,
            on_retry=on_retry,
            memory=memory,
        )
        for u, e in zip(uris, etags or [None] * len(uris), strict=True)
    ]
    return [f.result() for f in futures]
