"""The job's input manifest: the exact inputs of every batch, written before it is sent.

Under ``<output>/<job>/_inputs/`` the producer writes chunks of batches, each
object named by its first batch number (``000001000.jsonl``), one JSON line
per batch: its URIs, the ETags the listing saw, and where the listing stood
after it (objects listed, the last key, what was skipped). The chunk that
ends the listing carries the tail too, a line without URIs whose number is
the job's batch count.

A batch's message is sent only once its chunk is stored, so ``retry`` and
``reconcile`` re-send exactly what was sent, whatever the bucket holds by
then, and an interrupted enqueue resumes after the last recorded key. A
chunk closes on a count or after a few seconds (the producer decides), so a
billion images take tens of thousands of objects, not millions.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from labelmill.errors import UsageError
from labelmill.job.folder import JobFolder
from labelmill.job.model import Batch
from labelmill.storage import join_uri

INPUTS_DIR = "_inputs"
_CHUNK = "{:09d}.jsonl"
_CHUNK_RE = re.compile(r"(\d{9})\.jsonl")


def _line(b: Batch) -> dict[str, Any]:
    return {
        "batch": b.batch_no,
        "uris": b.uris,
        "etags": b.etags,
        "listed": b.listed,
        "last_key": b.last_key,
        "skipped": dict(b.skipped),
    }


def _batch(d: dict[str, Any]) -> Batch:
    return Batch(
        batch_no=int(d["batch"]),
        uris=[str(u) for u in d["uris"]],
        etags=[None if e is None else str(e) for e in d["etags"]],
        listed=int(d["listed"]),
        last_key=str(d["last_key"]),
        skipped={str(k): int(v) for k, v in d["skipped"].items()},
    )


class InputLog:
    """The chunks of one job's input manifest, in its folder."""

    def __init__(self, folder: JobFolder) -> None:
        self.folder = folder
        self.uri = join_uri(folder.uri, INPUTS_DIR)

    def write(self, batches: Sequence[Batch]) -> None:
        """Store one chunk (consecutive batches, maybe ending with the tail)."""
        if not batches:
            return
        body = "".join(json.dumps(_line(b), ensure_ascii=False) + "\n" for b in batches)
        self.folder.put(
            f"{INPUTS_DIR}/{_CHUNK.format(batches[0].batch_no)}",
            body.encode(),
            "application/x-ndjson",
        )

    def chunks(self) -> list[tuple[int, str]]:
        """(first batch number, URI) of every chunk, in batch order."""
        found = []
        for obj in self.folder.storage.list(self.uri + "/"):
            folder, _, name = obj.uri.rpartition("/")
            m = _CHUNK_RE.fullmatch(name)
            if m and folder == self.uri:
                found.append((int(m.group(1)), obj.uri))
        return sorted(found)

    def read(self, uri: str) -> list[Batch]:
        data = self.folder.storage.read(uri)
        if data is None:
            raise UsageError(f"{uri} is gone: the job's input manifest is incomplete")
        try:
            return [_batch(json.loads(line)) for line in data.decode().splitlines() if line]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{uri} is corrupt: {exc!r}") from None

    def last(self) -> Batch | None:
        """The last recorded batch (the tail when the listing ended), or None."""
        chunks = self.chunks()
        return self.read(chunks[-1][1])[-1] if chunks else None

    def batches(self, *, start: int = 0, wanted: Collection[int] | None = None) -> Iterator[Batch]:
        """Recorded batches numbered ``start`` or more (and in ``wanted``), tail included.

        With ``wanted``, only the chunks that hold one of them are read.
        """
        chunks = self.chunks()
        picked = sorted(b for b in wanted if b >= start) if wanted is not None else None
        chosen = set(picked or ())
        for i, (first, uri) in enumerate(chunks):
            end = chunks[i + 1][0] if i + 1 < len(chunks) else None  # the next chunk's first
            if end is not None and end <= start:
                continue
            if picked is not None:
                at = bisect.bisect_left(picked, first)
                if at == len(picked) or (end is not None and picked[at] >= end):
                    continue
            for b in self.read(uri):
                if b.batch_no >= start and (picked is None or b.batch_no in chosen):
                    yield b
