"""The job's input manifest: the exact inputs of every batch, written before it is sent.

Under ``<output>/<job>/_inputs/`` the producer writes chunks of batches, each
object named by its first batch number (``000001000.jsonl``), one JSON line
per batch: its URIs, the ETags the listing saw, and where the listing stood
after it (objects listed, the last key, what was skipped). The chunk that
ends the listing carries the tail too, a line without URIs whose number is
the job's batch count. An incremental job's lines also list the objects it
carries from its base (``carried``, pointers to the lines that label them),
so that its input manifest is the index of its complete picture
(``labelmill.job.picture``).

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
from labelmill.job.model import Batch, Carried
from labelmill.storage import join_uri

INPUTS_DIR = "_inputs"
_CHUNK = "{:09d}.jsonl"
_CHUNK_RE = re.compile(r"(\d{9})(-\d{12})?\.jsonl")


def _line(b: Batch) -> dict[str, Any]:
    line = {
        "batch": b.batch_no,
        "uris": b.uris,
        "etags": b.etags,
        "listed": b.listed,
        "last_key": b.last_key,
        "skipped": dict(b.skipped),
    }
    if b.incremental:  # an incremental job's line: [uri, etag, job, batch] per carried object
        line["carried"] = [[c.uri, c.etag, c.job_id, c.batch] for c in b.carried]
        line["incremental"] = dict(b.incremental)
    return line


def _batch(d: dict[str, Any]) -> Batch:
    return Batch(
        batch_no=int(d["batch"]),
        uris=[str(u) for u in d["uris"]],
        etags=[None if e is None else str(e) for e in d["etags"]],
        listed=int(d["listed"]),
        last_key=str(d["last_key"]),
        skipped={str(k): int(v) for k, v in d["skipped"].items()},
        carried=[
            Carried(str(u), None if e is None else str(e), str(j), int(n))
            for u, e, j, n in d.get("carried", ())
        ],
        incremental={str(k): int(v) for k, v in d.get("incremental", {}).items()},
    )


def chunk_name(first: Batch) -> str:
    """A chunk's object name, from its first line.

    By batch number; a chunk that starts with a line without URIs (carried
    objects only, or the tail) shares its number with the batch after it, so
    the listing count is added: ``000000007-000000123456.jsonl`` sorts
    before ``000000007.jsonl``, as the lines do.
    """
    if first.uris:
        return _CHUNK.format(first.batch_no)
    return f"{first.batch_no:09d}-{first.listed:012d}.jsonl"


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
            f"{INPUTS_DIR}/{chunk_name(batches[0])}",
            body.encode(),
            "application/x-ndjson",
        )

    def chunks(self) -> list[tuple[int, str]]:
        """(first batch number, URI) of every chunk, in the order of their lines."""
        found = []
        for obj in self.folder.storage.list(self.uri + "/"):
            folder, _, name = obj.uri.rpartition("/")
            m = _CHUNK_RE.fullmatch(name)
            if m and folder == self.uri:
                found.append((int(m.group(1)), obj.uri))
        return sorted(found)  # the URIs break ties as chunk_name says

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
            # The next chunk's first number: this chunk's batches are numbered
            # below it, and lines without URIs may carry it too.
            end = chunks[i + 1][0] if i + 1 < len(chunks) else None
            if end is not None and end < start:
                continue
            if picked is not None:
                at = bisect.bisect_left(picked, first)
                if at == len(picked) or (end is not None and picked[at] >= end):
                    continue
            for b in self.read(uri):
                if b.batch_no >= start and (picked is None or b.batch_no in chosen):
                    yield b
