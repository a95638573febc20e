"""A job's complete picture: one entry per labelled object, in key order.

A plain job's picture is its part files' lines, read in batch order: the
batches were cut from a listing in key order, so their lines are too. An
incremental job labels only what is new or changed since its base; the
rest its input manifest records as *carried*, each a pointer to the part
file that holds its line (``labelmill.job.inputs``). Its picture is the
merge of its own lines and those pointers, both in key order: two streams,
whatever the length of the chain of jobs before it, since a pointer always
names the job that labelled the object, not the base that carried it.

The next incremental job merges this picture with a fresh listing
(``producer.listing.batch_objects``); ``producer results --with-base``
resolves the pointers (:class:`LineFinder`).

Finding a base reads the jobs' ``_manifest.json`` under the output: Redis
forgets jobs after a week, storage does not.
"""

from __future__ import annotations

import heapq
import json
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import dropwhile
from typing import Any, TypeVar

import msgspec

from labelmill.errors import UsageError
from labelmill.job.folder import MANIFEST_FILE, JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.model import JobSpec
from labelmill.storage import ObjectStore, join_uri

# Part files read ahead of the merge: S3 answers each GET in milliseconds,
# and a base of a billion images has tens of millions of part files.
READ_AHEAD = 8

T = TypeVar("T")
U = TypeVar("U")


class Entry(msgspec.Struct, frozen=True):
    """One object of a picture: the fields of its result line that say what and where.

    Decoded straight from the part files' lines, the rest of each line
    (labels, model) skipped unparsed: ten times faster than ``json``, and an
    incremental run reads every line of its base.
    """

    uri: str
    status: str  # "ok" or "error": errors are tried again by the next run
    job_id: str  # the job whose part file holds the line
    batch: int
    etag: str | None = None  # as listed when it was labelled (error lines have none)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_ENTRIES = msgspec.json.Decoder(Entry)


def read_ahead(read: Callable[[T], U], items: Iterable[T], depth: int = READ_AHEAD) -> Iterator[U]:
    """``map(read, items)``, in order, with up to ``depth`` reads in flight."""
    with ThreadPoolExecutor(depth, thread_name_prefix="read-ahead") as pool:
        pending: deque[Future[U]] = deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _in_key_order(entries: Iterator[Entry], where: str) -> Iterator[Entry]:
    """``entries``, checked: a merge of streams out of order would lose objects silently."""
    previous = ""
    for e in entries:
        if e.uri <= previous:
            raise _out_of_order(where, e.uri, previous)
        previous = e.uri
        yield e


def _out_of_order(where: str, uri: str, previous: str) -> UsageError:
    return UsageError(f"{where}: {uri} comes after {previous}; lines are not in key order")


def _own(folder: JobFolder) -> Iterator[Entry]:
    """Every line of the job's part files, as entries, in batch order (checked)."""
    uris = [uri for _no, uri in folder.parts()]
    previous = ""
    for uri, data in zip(uris, read_ahead(folder.storage.read, uris), strict=True):
        try:
            entries = _ENTRIES.decode_lines(data or b"")
        except msgspec.MsgspecError as exc:
            raise UsageError(f"{uri} is corrupt: {exc}") from None
        for e in entries:
            if e.uri <= previous:
                raise _out_of_order(folder.uri, e.uri, previous)
            previous = e.uri
            yield e


def _carried(folder: JobFolder) -> Iterator[Entry]:
    for b in InputLog(folder).batches():
        for c in b.carried:
            yield Entry(c.uri, "ok", c.job_id, c.batch, c.etag)


def picture(folder: JobFolder, spec: JobSpec, *, after: str | None = None) -> Iterator[Entry]:
    """The job's complete picture, in key order (after URI ``after``, when given)."""
    entries = _own(folder)
    if spec.base is not None:
        carried = _in_key_order(_carried(folder), f"{folder.uri} (carried)")
        entries = heapq.merge(entries, carried, key=lambda e: e.uri)
    if after:
        entries = dropwhile(lambda e: e.uri <= after, entries)
    return entries


class LineFinder:
    """The line behind each entry of a picture, read as the picture goes.

    Pointers into one job come in key order, so in batch order: each part
    file is read once, and one per job is held.
    """

    def __init__(self, storage: ObjectStore, output: str) -> None:
        self.storage = storage
        self.output = output
        self._held: dict[str, tuple[int, dict[str, dict[str, Any]]]] = {}

    def line(self, e: Entry) -> dict[str, Any]:
        held = self._held.get(e.job_id)
        if held is None or held[0] != e.batch:
            folder = JobFolder(self.storage, self.output, e.job_id)
            lines = folder.read_part(folder.part_uri(e.batch))
            held = self._held[e.job_id] = (e.batch, {d["uri"]: d for d in lines})
        found = held[1].get(e.uri)
        if found is None:
            raise UsageError(
                f"{e.uri}: its line is not in part {e.batch} of job {e.job_id} under "
                f"{self.output} (was that job's folder changed or removed?)"
            )
        return found


def complete_lines(storage: ObjectStore, spec: JobSpec) -> Iterator[dict[str, Any]]:
    """Every line of the job's complete picture, carried lines included, in key order."""
    folder = JobFolder.of(storage, spec)
    if spec.base is None:
        yield from folder.lines()
        return
    finder = LineFinder(storage, spec.output)
    for e in picture(folder, spec):
        yield finder.line(e)


# -- bases ---------------------------------------------------------------------
def read_manifest(storage: ObjectStore, output: str, job_id: str) -> dict[str, Any] | None:
    """A job's ``_manifest.json`` under ``output`` (None until the job is done)."""
    data = storage.read(join_uri(join_uri(output, job_id), MANIFEST_FILE))
    if data is None:
        return None
    try:
        manifest = json.loads(data)
        JobSpec.from_dict(manifest["spec"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{output}/{job_id}/{MANIFEST_FILE} is corrupt: {exc!r}") from None
    return dict(manifest)


def base_spec(storage: ObjectStore, output: str, job_id: str, *, source: str) -> JobSpec:
    """The spec of ``job_id`` as a base for a job over ``source``; UsageError if it cannot be."""
    manifest = read_manifest(storage, output, job_id)
    if manifest is None:
        raise UsageError(
            f"base job {job_id} has no {MANIFEST_FILE} under {output}: "
            "only a finished job can be a base"
        )
    spec = JobSpec.from_dict(manifest["spec"])
    if spec.input != source:
        raise UsageError(f"base job {job_id} labelled {spec.input}, not {source}")
    return spec


def find_base(
    storage: ObjectStore, output: str, *, source: str, model_name: str, model_version: int
) -> JobSpec | None:
    """The newest finished job under ``output`` over ``source`` with this model version."""
    best: tuple[str, JobSpec] | None = None
    for job_id in storage.folders(output):
        manifest = read_manifest(storage, output, job_id)
        if manifest is None:
            continue
        spec = JobSpec.from_dict(manifest["spec"])
        same = (spec.input, spec.model_name, spec.model_version) == (
            source,
            model_name,
            model_version,
        )
        if same and spec.job_id == job_id:
            finished = str(manifest.get("finished_at") or "")
            if best is None or (finished, job_id) > (best[0], best[1].job_id):
                best = (finished, spec)
    return best[1] if best else None
