"""``producer watch``: live progress until a job ends, then a summary."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from labelmill.job import JobState, Ledger
from labelmill.job.status import status_dict

ENDED = tuple(s for s in JobState if s.ended)


def exit_code(status: dict[str, Any]) -> int:
    """0 done cleanly, 1 done with error lines, 4 cancelled."""
    if status["state"] == JobState.CANCELLED:
        return 4
    return 1 if status["images"]["error"] else 0


def watch_json(
    ledger: Ledger,
    job_id: str,
    *,
    interval_s: float,
    emit: Callable[[str], None] = print,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Print one status object per line until the job ends; return the last."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = status_dict(ledger.counts(job_id))
        emit(json.dumps(status))
        if status["state"] in ENDED:
            return status
        if deadline is not None and time.monotonic() > deadline:
            return status
        time.sleep(interval_s)


def watch_live(
    ledger: Ledger, job_id: str, console: Console, *, interval_s: float
) -> dict[str, Any]:
    """A progress bar with images/s and ETA until the job ends."""
    status = status_dict(ledger.counts(job_id))
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[errors]} failed"),
        TextColumn("{task.fields[carried]}"),
        TextColumn("{task.fields[rate]} img/s"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task(job_id, total=None, errors=0, rate="0.0", carried="")
        while True:
            images = status["images"]
            total = images["total"] if status["enqueue_complete"] else None
            bar.update(
                task,
                completed=images["ok"] + images["error"],
                total=total,
                errors=images["error"],
                rate=f"{status['images_per_s']:.1f}",
                carried=f"{images['carried']} carried" if status["incremental"] else "",
                description=f"{job_id} [{status['state']}]",
            )
            if status["state"] in ENDED:
                return status
            time.sleep(interval_s)
            status = status_dict(ledger.counts(job_id))


def summary(
    console: Console,
    status: dict[str, Any],
    lines: Iterable[dict[str, Any]],
    *,
    max_lines: int = 100_000,
) -> None:
    """Counts, the most frequent top labels (of the result ``lines``), errors, where results are."""
    images = status["images"]
    console.print(
        f"[bold]{status['job_id']}[/] {status['state']}: {images['ok']} ok, "
        f"{images['error']} failed, {images['skipped']} skipped (not images), "
        f"{images['total']} enqueued"
    )
    if status.get("incremental"):
        inc = status["incremental"]
        console.print(
            f"compared with base job {inc['base']}: {inc['carried']} carried, {inc['new']} new, "
            f"{inc['changed']} changed, {inc['retried']} errors retried, {inc['gone']} gone"
        )
    model = status["model"]
    # None until the job's first batch meets an AVAILABLE model server.
    version = model["version"] if model["version"] is not None else "not pinned yet"
    console.print(f"model {model['name']} version {version} weights {model['weights'] or '?'}")
    if model.get("note"):
        console.print(f"[yellow]{model['note']}[/]")
    top: Counter[str] = Counter()
    for n, r in enumerate(lines):
        if n >= max_lines:
            break
        if r["status"] == "ok" and r["labels"]:
            top[r["labels"][0]["label"]] += 1
    if top:
        table = Table(title="Top labels")
        table.add_column("label")
        table.add_column("images", justify="right")
        for label, count in top.most_common(10):
            table.add_row(label, str(count))
        console.print(table)
    if status["errors"]:
        table = Table(title="Errors by kind")
        table.add_column("kind")
        table.add_column("images", justify="right")
        for kind, count in status["errors"].items():
            table.add_row(kind, str(count))
        console.print(table)
    console.print(f"results: {status['output']}/")
