"""What a job is, as typed values: its states, its spec, its counts, its enqueue position."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """A job's life: ``enqueuing`` -> ``running`` -> ``done``; ``cancelled`` from either.

    ``retry`` and ``reconcile`` take a ``done`` job back to ``running``. The
    values are what Redis, ``producer status --json`` and the manifest hold.
    """

    ENQUEUING = "enqueuing"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (JobState.DONE, JobState.CANCELLED)


@dataclass(frozen=True)
class JobSpec:
    """What a job is: where from, where to, how, with which model version.

    ``model_version`` is None until the version is pinned: at enqueue when a
    model server answers then, or else by the job's first batch to meet an
    AVAILABLE server (``Ledger.pin_model_version``).
    """

    job_id: str
    input: str
    output: str
    batch_size: int
    model_name: str
    model_version: int | None
    created_at: float
    base: str | None = None  # an incremental job's base job (under the same output)

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "input": self.input,
            "output": self.output,
            "batch_size": self.batch_size,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "created_at": self.created_at,
            "base": self.base,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        return cls(
            job_id=str(d["job_id"]),
            input=str(d["input"]),
            output=str(d["output"]),
            batch_size=int(d["batch_size"]),
            model_name=str(d["model_name"]),
            model_version=None if d.get("model_version") is None else int(d["model_version"]),
            created_at=float(d["created_at"]),
            base=None if d.get("base") is None else str(d["base"]),
        )


# What an incremental job counts (``Position.incremental``): objects whose
# line it takes from its base, objects new since the base, changed since
# (ETag, or the model version), errors in the base tried again, and base
# objects no longer listed.
CARRIED, NEW, CHANGED, RETRIED, GONE = "carried", "new", "changed", "retried", "gone"
INCREMENTAL_COUNTS = (CARRIED, NEW, CHANGED, RETRIED, GONE)


@dataclass(frozen=True)
class Position:
    """How far the listing got: recorded after each group of batches is sent.

    A resumed ``enqueue`` lists again after ``last_key`` and numbers its
    batches from ``batches_sent``, carrying the totals on.
    """

    batches_sent: int
    listed: int  # objects listed, images or not
    last_key: str  # the last URI listed
    images_total: int  # images this job labels (listed, less skipped and carried)
    skipped: Mapping[str, int] = field(default_factory=dict)  # not images, by reason
    incremental: Mapping[str, int] = field(default_factory=dict)  # INCREMENTAL_COUNTS


@dataclass(frozen=True, slots=True)
class Carried:
    """An object an incremental job does not label: its line is in ``job_id``'s part file."""

    uri: str
    etag: str | None
    job_id: str  # the job that labelled it (the base, or the base's own base, ...)
    batch: int


@dataclass
class Batch:
    """One line of the input manifest: a batch, and where the listing stood after it.

    Besides batches with URIs there are two kinds of line without any: the
    *tail*, which ends a listing (its number is the job's batch count), and,
    in incremental jobs, lines that only record ``carried`` objects. Their
    number is the next batch's; they have no message and no part file.
    """

    batch_no: int
    uris: list[str]
    etags: list[str | None]  # what the listing saw, one per URI
    listed: int  # objects listed so far, batch included
    last_key: str  # the last URI listed so far
    skipped: Mapping[str, int] = field(default_factory=dict)  # running totals
    # Objects carried from the base since the previous line, in key order.
    carried: list[Carried] = field(default_factory=list)
    incremental: Mapping[str, int] = field(default_factory=dict)  # running totals

    @property
    def is_tail(self) -> bool:
        """Whether this line ends the listing."""
        return not self.uris and not self.carried

    @property
    def images(self) -> int:
        """Images this job labels, listed so far, this batch included."""
        return self.listed - sum(self.skipped.values()) - self.incremental.get(CARRIED, 0)

    def position(self) -> Position:
        """Where the listing stands once this batch is sent (what a resume starts from)."""
        return Position(
            batches_sent=self.batch_no + 1 if self.uris else self.batch_no,
            listed=self.listed,
            last_key=self.last_key,
            images_total=self.images,
            skipped=dict(self.skipped),
            incremental=dict(self.incremental),
        )


@dataclass(frozen=True)
class BatchStart:
    """What a worker needs to know when a batch is delivered."""

    spec: JobSpec | None  # None: the job is unknown (expired or never created)
    state: JobState | None  # None with the spec
    already_done: bool
    attempt: int


@dataclass
class JobCounts:
    """A snapshot of everything the ledger knows about a job."""

    spec: JobSpec
    state: JobState
    listed: int = 0
    last_key: str = ""
    images_total: int = 0
    images_ok: int = 0
    images_error: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    incremental: dict[str, int] = field(default_factory=dict)  # INCREMENTAL_COUNTS
    batches_sent: int = 0
    batches_total: int | None = None
    batches_done: int = 0
    batches_dead: int = 0
    enqueue_complete: bool = False
    model_weights: str = ""
    created_at: float = 0.0
    finished_at: float | None = None

    @property
    def images_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def batches_outstanding(self) -> int:
        return max(0, self.batches_sent - self.batches_done)
