"""Reading a job's results back from storage: part files, in batch order."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from typing import Any

from labelmill.errors import UsageError
from labelmill.job import JobSpec
from labelmill.records import loads_lines
from labelmill.storage import ObjectStore, join_uri

PART_RE = re.compile(r"/part-(\d{9})\.jsonl$")
CSV_FIELDS = ["uri", "status", "label", "class_id", "score", "error_kind", "error_message"]


def part_files(storage: ObjectStore, job_uri: str) -> Iterator[tuple[int, str]]:
    """(batch number, URI) of each part file under a job's folder, in order."""
    base = job_uri.rstrip("/")
    for obj in storage.list(base + "/"):
        m = PART_RE.search(obj.uri)
        if m and obj.uri.rsplit("/", 1)[0] == base:
            yield int(m.group(1)), obj.uri


def read_part(storage: ObjectStore, uri: str) -> list[dict[str, Any]]:
    data = storage.read(uri)
    if data is None:
        return []
    try:
        return loads_lines(data)
    except ValueError as exc:
        raise UsageError(f"{uri} is corrupt: {exc}") from None


def records(storage: ObjectStore, job_uri: str) -> Iterator[dict[str, Any]]:
    """Every result record of a job, batch by batch."""
    for _no, uri in part_files(storage, job_uri):
        yield from read_part(storage, uri)


def load_job_file(storage: ObjectStore, job_uri: str) -> JobSpec | None:
    data = storage.read(join_uri(job_uri, "_job.json"))
    return JobSpec.from_dict(json.loads(data)) if data else None


def to_csv_row(r: dict[str, Any]) -> dict[str, Any]:
    top = r["labels"][0] if r.get("labels") else {}
    err = r.get("error") or {}
    return {
        "uri": r["uri"],
        "status": r["status"],
        "label": top.get("label", ""),
        "class_id": top.get("class_id", ""),
        "score": top.get("score", ""),
        "error_kind": err.get("kind", ""),
        "error_message": err.get("message", ""),
    }


def format_records(
    rows: Iterator[dict[str, Any]], fmt: str, *, errors_only: bool = False
) -> Iterator[str]:
    """Render records as JSON lines or CSV (header first), streaming."""
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        yield buf.getvalue()
    for r in rows:
        if errors_only and r["status"] != "error":
            continue
        if fmt == "csv":
            buf = io.StringIO()
            csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n").writerow(to_csv_row(r))
            yield buf.getvalue()
        else:
            yield json.dumps(r, ensure_ascii=False) + "\n"
