"""From a listing of objects to numbered batches of image URIs and their ETags.

Batching is a pure function of the listing (lexicographic, as S3 lists) and
of where it starts: a resumed listing numbers on from a recorded position.
What each batch held is recorded in the job's input manifest before it is
sent (``labelmill.job.inputs``); `retry` and `reconcile` read it back there,
since the prefix may list differently by then.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Iterator

from labelmill.job import Batch, JobSpec, Position
from labelmill.job.folder import JobFolder
from labelmill.job.model import (
    CARRIED,
    CHANGED,
    GONE,
    INCREMENTAL_COUNTS,
    NEW,
    RETRIED,
    Carried,
)
from labelmill.job.picture import Entry, base_spec, picture
from labelmill.retry import patiently, resumable
from labelmill.storage import ObjectInfo, ObjectStore

# Carried objects one line of an incremental job's input manifest holds at most.
CARRIED_PER_LINE = 32_768

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def is_image_name(uri: str) -> bool:
    """Whether the last segment's extension, as :func:`os.path.splitext` sees it, is an image's.

    Written out with ``rpartition`` (four times faster: it runs once per key):
    the extension starts at the last dot unless only dots precede it (``.jpg``
    is a hidden file's name, not an extension).
    """
    name = uri[uri.rfind("/") + 1 :]  # empty for a folder marker
    stem, dot, ext = name.rpartition(".")
    return bool(dot) and bool(stem.lstrip(".")) and dot + ext.lower() in IMAGE_EXTENSIONS


def listed(
    storage: ObjectStore, source: str, *, after: str | None = None, retry_budget_s: float
) -> Iterator[ObjectInfo]:
    """Every object under ``source`` after URI ``after``, in key order, through outages.

    A listing of a billion keys runs for hours: when the store fails, it is
    waited out (``retry_budget_s`` per stretch without progress) and the
    listing resumed after the last URI seen.
    """
    return resumable(
        lambda last: storage.list(source, start_after=last),
        key=lambda info: info.uri,
        after=after,
        budget_s=retry_budget_s,
        what=f"list {source}",
    )


class Base:
    """A base job's picture, compared with a listing as both advance in key order.

    Neither is held in memory: each step looks at the head of the picture
    only. ``carry`` is False when the base used another model version:
    then every object it labelled counts as changed.
    """

    def __init__(self, entries: Iterable[Entry], *, carry: bool = True) -> None:
        self._entries = iter(entries)
        self._head = next(self._entries, None)
        self.carry = carry

    def gone_before(self, uri: str) -> int:
        """Pass the base's objects before ``uri``: the listing has none of them any more."""
        gone = 0
        while self._head is not None and self._head.uri < uri:
            gone += 1
            self._head = next(self._entries, None)
        return gone

    def compare(self, obj: ObjectInfo) -> tuple[str, Entry | None]:
        """What ``obj`` is to the base (call :meth:`gone_before` first): carried, new, ..."""
        head = self._head
        if head is None or head.uri != obj.uri:
            return NEW, None
        self._head = next(self._entries, None)
        if not head.ok:
            return RETRIED, None
        if self.carry and obj.etag is not None and obj.etag == head.etag:
            return CARRIED, head
        return CHANGED, None

    def rest(self) -> int:
        """Pass what is left of the base: gone, once the listing has ended."""
        gone = 0 if self._head is None else 1 + sum(1 for _ in self._entries)
        self._head = None
        return gone


def open_base(storage: ObjectStore, spec: JobSpec, *, after: str | None, budget_s: float) -> Base:
    """The picture of ``spec``'s base job after URI ``after``, read through outages."""
    assert spec.base is not None
    base = patiently(
        lambda: base_spec(storage, spec.output, spec.base or "", source=spec.input),
        budget_s,
        spec.output,
    )
    folder = JobFolder.of(storage, base)
    entries = resumable(
        lambda last: picture(folder, base, after=last),
        key=lambda e: e.uri,
        after=after,
        budget_s=budget_s,
        what=f"read base job {base.job_id}",
    )
    return Base(entries, carry=base.model_version == spec.model_version)


def batch_objects(
    objects: Iterable[ObjectInfo],
    batch_size: int,
    *,
    start: Position | None = None,
    base: Base | None = None,
) -> Iterator[Batch]:
    """Group the listed images into batches of ``batch_size``; the last may be short.

    The final item is always a tail with no URIs (see below).

    ``start``: where a resumed listing stood; numbering and running totals
    carry on from it. Batches share one copy of the totals until they
    change (never mutate ``Batch.skipped``).

    ``base``: an incremental job's base, positioned after ``start``. Objects
    it labelled and that have not changed are not batched but *carried*:
    each line records those carried since the line before. A line carries
    at most ``CARRIED_PER_LINE``; when a stretch of unchanged objects is
    longer, the batch being filled goes out short (or, empty, as a line of
    carried objects only), so memory stays flat and a resume loses nothing.
    """
    start = start or Position(batches_sent=0, listed=0, last_key="", images_total=0)
    skipped = Counter(start.skipped)
    totals = Counter(skipped)  # the copy handed out with batches
    changed = False
    compared = Counter(start.incremental)
    if base is not None:
        compared.update(dict.fromkeys(INCREMENTAL_COUNTS, 0))  # every count, zero or not
    current: list[str] = []
    etags: list[str | None] = []
    carried: list[Carried] = []
    batch_no, listed, last = start.batches_sent, start.listed, start.last_key

    def line() -> Batch:
        nonlocal batch_no, current, etags, carried, totals, changed
        if changed:
            totals, changed = Counter(skipped), False
        b = Batch(batch_no, current, etags, listed, last, totals, carried, dict(compared))
        batch_no += 1 if current else 0
        current, etags, carried = [], [], []
        return b

    for obj in objects:
        uri = obj.uri
        listed += 1
        last = uri
        if base is not None and (gone := base.gone_before(uri)):
            compared[GONE] += gone
        if not is_image_name(uri):
            skipped["not_image_name"] += 1
            changed = True
            continue
        if base is not None:
            verdict, entry = base.compare(obj)
            compared[verdict] += 1
            if entry is not None:
                carried.append(Carried(uri, obj.etag, entry.job_id, entry.batch))
                if len(carried) >= CARRIED_PER_LINE:
                    yield line()
                continue
        current.append(uri)
        etags.append(obj.etag)
        if len(current) == batch_size:
            yield line()
    if current or carried:
        yield line()
    if base is not None:  # counted in the tail only: a resume after the line above counts them
        compared[GONE] += base.rest()
    # The tail: no URIs; its number is the job's batch count and it carries
    # the final totals (skipped objects after the last image included).
    changed = True
    yield line()


def last_batch(objects: Iterable[ObjectInfo], batch_size: int) -> Batch:
    """The tail of a whole listing: the batch count and the listing's totals."""
    (tail,) = deque(batch_objects(objects, batch_size), maxlen=1)  # there is always a tail
    return tail
