"""The result record: one JSON object per input image, one line in a part file.

A part file is a pure function of (job, batch, model version): records carry
no timestamps, and keys are written in a fixed order, so a redelivered batch
overwrites its part file with identical bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from labelmill.errors import ErrorKind

SCHEMA = 1
TOP_K = 5


@dataclass(frozen=True)
class ModelInfo:
    """Which model produced a label: name, served version and weights tag."""

    name: str
    version: int
    weights: str

    @property
    def random_weights(self) -> bool:
        return self.weights.startswith("random")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "version": self.version, "weights": self.weights}
        if self.random_weights:
            # Never let random-weight labels pass for real ones.
            out["note"] = "random weights: labels are meaningless"
        return out


@dataclass(frozen=True)
class Label:
    label: str
    class_id: int
    score: float


def ok_record(
    *,
    uri: str,
    etag: str | None,
    labels: Sequence[Label],
    model: ModelInfo,
    job_id: str,
    batch: int,
) -> dict[str, Any]:
    """The record of an image that was classified."""
    return {
        "schema": SCHEMA,
        "uri": uri,
        "etag": etag,
        "status": "ok",
        "labels": [
            {"label": lb.label, "class_id": lb.class_id, "score": round(lb.score, 6)}
            for lb in labels
        ],
        "model": model.as_dict(),
        "job_id": job_id,
        "batch": batch,
    }


def error_record(
    *, uri: str, kind: ErrorKind, message: str, job_id: str, batch: int
) -> dict[str, Any]:
    """The record of an image that could not be classified, with a kind and reason."""
    return {
        "schema": SCHEMA,
        "uri": uri,
        "status": "error",
        "error": {"kind": kind, "message": message},
        "job_id": job_id,
        "batch": batch,
    }


def dumps_lines(records: Iterable[dict[str, Any]]) -> bytes:
    """Serialise records as JSON lines (UTF-8, one object per line)."""
    return b"".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode() + b"\n" for r in records
    )


def loads_lines(data: bytes) -> list[dict[str, Any]]:
    """Parse a part file; raises ValueError on a corrupt line."""
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def part_name(batch_no: int) -> str:
    return f"part-{batch_no:09d}.jsonl"
