"""What a job's result lines add up to, computed by streaming its part files.

A :class:`JobView` reads each part file once and keeps only small
aggregates: top-1 label counts, a histogram of top-1 scores, the least
confident images, the errors by kind, and each label's highest-scoring
images (its gallery). Refreshing reads the part files written since; a part
file rewritten in between (``producer retry`` re-ran a dead batch) makes it
start over. Memory is bounded by the number of distinct labels, not lines.

Images are named by (batch, index): the line's place in the job's own part
files. A thumbnail request names nothing else, so it can only reach the
job's own inputs.
"""

from __future__ import annotations

import heapq
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from labelmill.job import JobSpec
from labelmill.job.folder import JobFolder
from labelmill.job.picture import read_ahead
from labelmill.storage import ObjectStore

BINS = 20  # the confidence histogram: top-1 scores in [0, 1) by 0.05
LEAST = 48  # least confident images kept
GALLERY = 120  # highest-scoring images kept per label
ERRORS = 100  # error lines kept per kind
REFRESH_S = 1.0  # the part files are listed at most this often


class _Label(msgspec.Struct):
    label: str
    class_id: int
    score: float


class _Error(msgspec.Struct):
    kind: str
    message: str


class _Line(msgspec.Struct):
    """The fields of a result line the page shows."""

    uri: str
    status: str
    batch: int
    labels: list[_Label] = []
    error: _Error | None = None


_LINES = msgspec.json.Decoder(_Line)


@dataclass(frozen=True, order=True)
class Image:
    """One image as the page shows it: sortable by score."""

    score: float
    batch: int
    index: int
    uri: str = field(compare=False)
    top: tuple[tuple[str, float], ...] = field(compare=False, default=())  # top-5
    error: tuple[str, str] | None = field(compare=False, default=None)  # kind, message

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "batch": self.batch,
            "index": self.index,
            "uri": self.uri,
            "score": round(self.score, 4),
            "top": [{"label": lb, "score": round(sc, 4)} for lb, sc in self.top],
        }
        if self.error:
            out["error"] = {"kind": self.error[0], "message": self.error[1]}
        return out


# A kept image: (score, batch, index, uri, top-5, error). (batch, index) is
# unique, so comparisons stop there; tuples compare in C, hold interned label
# names, and are built only for lines that enter a heap. The Image the page
# shows is built only for what it shows.
Kept = tuple[float, int, int, str, tuple[tuple[str, float], ...], tuple[str, str] | None]


def _kept(score: float, batch: int, index: int, line: _Line) -> Kept:
    top = tuple((sys.intern(lb.label), lb.score) for lb in line.labels)
    error = (line.error.kind, line.error.message) if line.error else None
    return (score, batch, index, line.uri, top, error)


def _image(kept: Kept) -> Image:
    return Image(*kept)


@dataclass
class Aggregates:
    labels: Counter[str] = field(default_factory=Counter)
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)
    least: list[Kept] = field(default_factory=list)  # a max-heap: scores negated
    galleries: dict[str, list[Kept]] = field(default_factory=dict)  # min-heaps by score
    errors: Counter[str] = field(default_factory=Counter)
    error_lines: dict[str, list[Kept]] = field(default_factory=dict)
    lines: int = 0

    def add(self, batch_no: int, index: int, line: _Line) -> None:
        self.lines += 1
        if line.status != "ok" or not line.labels:
            kind = line.error.kind if line.error else "?"
            self.errors[kind] += 1
            kept = self.error_lines.setdefault(kind, [])
            if len(kept) < ERRORS:
                kept.append(_kept(0.0, batch_no, index, line))
            return
        first = line.labels[0]
        score = first.score
        self.labels[first.label] += 1
        self.histogram[min(int(score * BINS), BINS - 1)] += 1
        least = self.least
        if len(least) < LEAST:
            heapq.heappush(least, _kept(-score, batch_no, index, line))
        elif -score > least[0][0]:
            heapq.heapreplace(least, _kept(-score, batch_no, index, line))
        gallery = self.galleries.get(first.label)
        if gallery is None:
            gallery = self.galleries[first.label] = []
        if len(gallery) < GALLERY:
            heapq.heappush(gallery, _kept(score, batch_no, index, line))
        elif score > gallery[0][0]:
            heapq.heapreplace(gallery, _kept(score, batch_no, index, line))


class JobView:
    """One job's aggregates, kept up to date by :meth:`refresh` (thread-safe)."""

    def __init__(self, storage: ObjectStore, spec: JobSpec) -> None:
        self.spec = spec
        self.folder = JobFolder.of(storage, spec)
        self._seen: dict[str, str | None] = {}  # part URI -> its ETag when read
        self._agg = Aggregates()
        self._lock = threading.Lock()
        self._refreshed = -REFRESH_S

    def refresh(self) -> None:
        """Read the part files written since the last refresh (all of them if one changed).

        At most once per ``REFRESH_S``: every open page polls, and listing a
        million-line job's part files is tens of thousands of keys.
        """
        with self._lock:
            if time.monotonic() - self._refreshed < REFRESH_S:
                return
            listed = {
                obj.uri: obj.etag
                for obj in self.folder.storage.list(self.folder.uri.rstrip("/") + "/part-")
            }
            if any(listed.get(uri, etag) != etag for uri, etag in self._seen.items()):
                self._seen, self._agg = {}, Aggregates()
            new = sorted(uri for uri in listed if uri not in self._seen)
            for uri, data in zip(new, read_ahead(self.folder.storage.read, new), strict=True):
                try:
                    lines = _LINES.decode_lines(data or b"")
                except msgspec.MsgspecError:
                    continue  # a corrupt part file shows as missing lines, not a broken page
                for index, line in enumerate(lines):
                    self._agg.add(line.batch, index, line)
                self._seen[uri] = listed[uri]
            self._refreshed = time.monotonic()

    def summary(self, top_labels: int = 30) -> dict[str, Any]:
        """The aggregates as the page's JSON: labels, histogram, least confident, errors."""
        with self._lock:
            agg = self._agg
            least = sorted(_image((-k[0], *k[1:])) for k in agg.least)
            return {
                "lines": agg.lines,
                "labels": [
                    {"label": lb, "count": n} for lb, n in agg.labels.most_common(top_labels)
                ],
                "label_kinds": len(agg.labels),
                "histogram": {
                    "edges": [round(i / BINS, 2) for i in range(BINS + 1)],
                    "counts": list(agg.histogram),
                },
                "least_confident": [image.as_dict() for image in least],
                "errors": [
                    {
                        "kind": kind,
                        "count": n,
                        "lines": [_image(k).as_dict() for k in agg.error_lines.get(kind, [])],
                    }
                    for kind, n in agg.errors.most_common()
                ],
            }

    def gallery(self, label: str) -> tuple[int, list[dict[str, Any]]]:
        """How many images got ``label`` first, and the highest-scoring of them, best first."""
        with self._lock:
            kept = sorted(self._agg.galleries.get(label, []), reverse=True)
            return self._agg.labels.get(label, 0), [_image(k).as_dict() for k in kept]

    def uri_of(self, batch_no: int, index: int) -> str | None:
        """The URI of line ``index`` of part ``batch_no`` (None: no such line)."""
        lines = _LINES.decode_lines(self.folder.storage.read(self.folder.part_uri(batch_no)) or b"")
        if not 0 <= index < len(lines):
            return None
        uri = lines[index].uri
        # The job's own input, twice over: from its part file, and under its input.
        return uri if uri.startswith(self.spec.input) else None
