"""producer/watch.py's summary on an in-memory store."""

from __future__ import annotations

import io

from rich.console import Console

from producer.watch import summary


def _status(version: int | None) -> dict[str, object]:
    return {
        "job_id": "j1",
        "state": "running",
        "images": {"total": 3, "ok": 0, "error": 0, "skipped": 0},
        "errors": {},
        "model": {"name": "inception", "version": version, "weights": None},
        "output": "s3://out/labels/j1",
    }


def test_a_job_without_a_version_yet_says_so() -> None:
    out = io.StringIO()
    summary(Console(file=out, width=200), _status(None), [])
    assert "version not pinned yet" in out.getvalue()
    out = io.StringIO()
    summary(Console(file=out, width=200), _status(2), [])
    assert "version 2 " in out.getvalue()
