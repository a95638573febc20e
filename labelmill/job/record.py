"""The result record: one per input image, one JSON line in a part file, and its tally.

A part file is a pure function of (job, batch, model version): records carry
no timestamps, and keys are written in a fixed order, so a redelivered batch
overwrites its part file with identical bytes.

The worker counts a batch with :func:`tally` before it updates the ledger;
``reconcile`` counts the part files it reads back with the same function.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labelmill.errors import ErrorKind

SCHEMA = 1
TOP_K = 5
DEAD: ErrorKind = "dead"


def random_weights(weights: str | None) -> bool:
    return bool(weights) and str(weights).startswith("random")


def weights_dict(name: str, version: int | None, weights: str | None) -> dict[str, Any]:
    """A model's ``{"name", "version", "weights"}``, and a note on random weights."""
    out: dict[str, Any] = {"name": name, "version": version, "weights": weights}
    if random_weights(weights):
        # Never let random-weight labels pass for real ones.
        out["note"] = "random weights: labels are meaningless"
    return out


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced a label: name, served version and weights tag."""

    name: str
    version: int
    weights: str

    def as_dict(self) -> dict[str, Any]:
        return weights_dict(self.name, self.version, self.weights)


@dataclass(frozen=True)
class Label:
    label: str
    class_id: int
    score: float


def _line(uri: str, body: Mapping[str, Any], job_id: str, batch: int) -> dict[str, Any]:
    """A record's JSON object, keys in their fixed order: schema, uri, body, job, batch."""
    return {"schema": SCHEMA, "uri": uri, **body, "job_id": job_id, "batch": batch}


@dataclass(frozen=True)
class OkRecord:
    """An image that was classified."""

    uri: str
    etag: str | None
    labels: Sequence[Label]
    model: ModelInfo
    job_id: str
    batch: int

    def as_dict(self) -> dict[str, Any]:
        labels = [
            {"label": lb.label, "class_id": lb.class_id, "score": round(lb.score, 6)}
            for lb in self.labels
        ]
        body = {"etag": self.etag, "status": "ok", "labels": labels, "model": self.model.as_dict()}
        return _line(self.uri, body, self.job_id, self.batch)


@dataclass(frozen=True)
class ErrorRecord:
    """An image that could not be classified, with a kind and a reason."""

    uri: str
    kind: ErrorKind
    message: str
    job_id: str
    batch: int
    detail: Mapping[str, str | None] = field(default_factory=dict)  # more keys of ``error``

    def as_dict(self) -> dict[str, Any]:
        error = {"kind": self.kind, "message": self.message, **self.detail}
        return _line(self.uri, {"status": "error", "error": error}, self.job_id, self.batch)


Record = OkRecord | ErrorRecord


def from_dict(d: Mapping[str, Any]) -> Record:
    """A record read back from a part file; ValueError if it is not one."""
    try:
        if d["status"] == "ok":
            m = d["model"]
            return OkRecord(
                uri=str(d["uri"]),
                etag=d.get("etag"),
                labels=tuple(
                    Label(str(x["label"]), int(x["class_id"]), float(x["score"]))
                    for x in d["labels"]
                ),
                model=ModelInfo(str(m["name"]), int(m["version"]), str(m["weights"])),
                job_id=str(d["job_id"]),
                batch=int(d["batch"]),
            )
        if d["status"] == "error":
            error = d["error"]
            return ErrorRecord(
                uri=str(d["uri"]),
                kind=error["kind"],
                message=str(error["message"]),
                job_id=str(d["job_id"]),
                batch=int(d["batch"]),
                detail={k: v for k, v in error.items() if k not in ("kind", "message")},
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a result record: {exc!r}") from None
    raise ValueError(f"not a result record: status {d.get('status')!r}")


@dataclass
class Tally:
    """What one batch's records add to the job's counts."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    weights: str | None = None  # the first classified image's weights tag
    versions: set[int] = field(default_factory=set)  # model versions that answered

    @property
    def images(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def dead(self) -> bool:
        """The batch was declared dead: every image carries the ``dead`` error."""
        return self.images > 0 and self.errors[DEAD] == self.images


def tally(records: Iterable[Record]) -> Tally:
    t = Tally()
    for r in records:
        if isinstance(r, OkRecord):
            t.ok += 1
            t.weights = t.weights or r.model.weights
            t.versions.add(r.model.version)
        else:
            t.errors[r.kind] += 1
    return t


def dumps_lines(records: Iterable[Record]) -> bytes:
    """Serialise records as JSON lines (UTF-8, one object per line)."""
    return b"".join(
        json.dumps(r.as_dict(), ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
        for r in records
    )


def loads_lines(data: bytes) -> list[dict[str, Any]]:
    """Parse a part file into its JSON objects; raises ValueError on a corrupt line.

    One parse of the lines as an array (a third faster than one per line:
    an incremental run reads every line of its base); when that does not
    give one value per line, the lines are parsed one by one to say which
    is corrupt.
    """
    lines = [line for line in data.splitlines() if line.strip()]
    try:
        values = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        values = None
    if values is None or len(values) != len(lines):
        values = [json.loads(line) for line in lines]
    return list(values)
