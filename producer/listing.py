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

from labelmill.job import Batch, Position
from labelmill.retry import resumable
from labelmill.storage import ObjectInfo, ObjectStore

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


def batch_objects(
    objects: Iterable[ObjectInfo],
    batch_size: int,
    *,
    start: Position | None = None,
) -> Iterator[Batch]:
    """Group the listed images into batches of ``batch_size``; the last may be short.

    The final item is always a tail with no URIs (see below).

    ``start``: where a resumed listing stood; numbering and running totals
    carry on from it. Batches share one copy of the totals until they
    change (never mutate ``Batch.skipped``).
    """
    start = start or Position(batches_sent=0, listed=0, last_key="", images_total=0)
    skipped = Counter(start.skipped)
    totals = Counter(skipped)  # the copy handed out with batches
    changed = False
    current: list[str] = []
    etags: list[str | None] = []
    batch_no, listed, last = start.batches_sent, start.listed, start.last_key
    for obj in objects:
        uri = obj.uri
        listed += 1
        last = uri
        if not is_image_name(uri):
            skipped["not_image_name"] += 1
            changed = True
            continue
        current.append(uri)
        etags.append(obj.etag)
        if len(current) == batch_size:
            if changed:
                totals, changed = Counter(skipped), False
            yield Batch(batch_no, current, etags, listed, last, totals)
            batch_no += 1
            current, etags = [], []
    if current:
        yield Batch(batch_no, current, etags, listed, last, Counter(skipped))
        batch_no += 1
    # The tail: no URIs; its number is the job's batch count and it carries
    # the final totals (skipped objects after the last image included).
    yield Batch(batch_no, [], [], listed, last, Counter(skipped))


def last_batch(objects: Iterable[ObjectInfo], batch_size: int) -> Batch:
    """The tail of a whole listing: the batch count and the listing's totals."""
    (tail,) = deque(batch_objects(objects, batch_size), maxlen=1)  # there is always a tail
    return tail
