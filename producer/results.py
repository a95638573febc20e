"""A job's result lines as ``producer results`` prints them: JSON lines or CSV."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from typing import Any

CSV_FIELDS = ["uri", "status", "label", "class_id", "score", "error_kind", "error_message"]


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
    rows: Iterable[dict[str, Any]], fmt: str, *, errors_only: bool = False
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
