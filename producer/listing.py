"""From a listing of objects to numbered batches of image URIs.

Batching is a pure function of the listing (lexicographic, as S3 lists), so
the same prefix always gives the same batches: `retry` and `reconcile` rely on
it to find the URIs of a batch whose part file is missing.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from labelmill.storage import ObjectInfo

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


def skip_reason(uri: str) -> str | None:
    """Why an object is not enqueued (``None``: it is an image name)."""
    name = uri.rsplit("/", 1)[-1]  # empty for a folder marker
    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
        return None
    return "not_image_name"


@dataclass
class Batch:
    """One batch and where the listing stood when it was complete."""

    batch_no: int
    uris: list[str]
    listed: int  # objects listed so far, batch included
    last_key: str  # the last URI listed so far
    skipped: Counter[str] = field(default_factory=Counter)  # running totals


def batches(
    objects: Iterable[ObjectInfo],
    batch_size: int,
    *,
    first_batch_no: int = 0,
    listed: int = 0,
    skipped: Counter[str] | None = None,
    last_key: str = "",
) -> Iterator[Batch]:
    """Group image objects into batches of ``batch_size``; the last may be short.

    The final item is always a tail with no URIs (see below).

    ``listed`` and ``skipped`` carry running totals over from a resumed listing.
    """
    skipped = Counter(skipped or {})
    current: list[str] = []
    batch_no = first_batch_no
    last = last_key
    for obj in objects:
        listed += 1
        last = obj.uri
        reason = skip_reason(obj.uri)
        if reason:
            skipped[reason] += 1
            continue
        current.append(obj.uri)
        if len(current) == batch_size:
            yield Batch(batch_no, current, listed, last, Counter(skipped))
            batch_no += 1
            current = []
    if current:
        yield Batch(batch_no, current, listed, last, Counter(skipped))
        batch_no += 1
    # The tail: no URIs; its number is the job's batch count and it carries
    # the final totals (skipped objects after the last image included).
    yield Batch(batch_no, [], listed, last, Counter(skipped))
