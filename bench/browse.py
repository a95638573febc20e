"""``producer browse`` on a million-line job: what one page costs the server and the browser.

A job of ``--lines`` result lines is written synthetically (part files of
32 lines, 1000 distinct labels, scores spread over [0, 1), one error line
in 100) to a local folder. In this process, side by side:

- reading every part file with ``json`` and counting top-1 labels: the
  least any aggregate can cost;
- a :class:`JobView` refresh over the same files (everything the page
  shows), and its summary and one gallery;

with peak RSS (this process's VmHWM, before and after) and the size of the
page's JSON, which is what the browser receives, whatever the job's size.

Targets: the view within 1.5x the bare json count, its memory growth under
150 MB at 1M lines, the page's JSON under 200 kB.

    python bench/browse.py [--lines 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, cores, vm_hwm_mb
from summary import report

from labelmill.job.folder import JobFolder
from labelmill.job.model import JobSpec
from labelmill.job.record import ErrorRecord, Label, ModelInfo, OkRecord, Record
from labelmill.settings import Settings
from labelmill.storage import Storage
from producer.browse.view import JobView

BATCH = 32
MAX_RATIO = 1.5
MAX_GROWTH_MB = 150.0
MAX_PAGE_KB = 200.0


def write_job(folder: Path, lines: int) -> JobSpec:
    """A finished job's part files, made up (kept between runs)."""
    spec = JobSpec("bench-browse", "file:///photos/", f"file://{folder}", BATCH, "inception", 1, 0)
    done = folder / f".complete-{lines}"
    if done.exists():
        return spec
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    job = JobFolder(Storage(Settings()), spec.output, spec.job_id)
    model = ModelInfo("inception", 1, "imagenet")
    for batch in range((lines + BATCH - 1) // BATCH):
        records: list[Record] = []
        for n in range(batch * BATCH, min(lines, (batch + 1) * BATCH)):
            uri = f"file:///photos/{n // 1000:05d}/{n % 1000:04d}.jpg"
            if n % 100 == 99:
                records.append(ErrorRecord(uri, "decode", "cannot decode", spec.job_id, batch))
                continue
            score = (n * 7919 % 1000) / 1000
            labels = [Label(f"class {(n * 31 + k) % 1000}", k, score / (k + 1)) for k in range(5)]
            records.append(OkRecord(uri, "e", labels, model, spec.job_id, batch))
        job.write_part(batch, records)
    done.touch()
    return spec


def bare_count(job: JobFolder) -> tuple[int, float]:
    start = time.perf_counter()
    top: Counter[str] = Counter()
    for _no, uri in job.parts():
        for line in (job.storage.read(uri) or b"").splitlines():
            d = json.loads(line)
            if d["status"] == "ok":
                top[d["labels"][0]["label"]] += 1
    return sum(top.values()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    folder = OUT / "browse-job"
    spec = write_job(folder, args.lines)
    storage = Storage(Settings())
    job = JobFolder.of(storage, spec)
    ok, bare_s = bare_count(job)
    before = vm_hwm_mb(os.getpid())
    view = JobView(storage, spec)
    start = time.perf_counter()
    view.refresh()
    refresh_s = time.perf_counter() - start
    summary = view.summary()
    count, gallery = view.gallery(summary["labels"][0]["label"])
    growth = vm_hwm_mb(os.getpid()) - before
    page_kb = len(json.dumps({"summary": summary})) / 1024
    assert summary["lines"] == args.lines and sum(s["count"] for s in summary["errors"]) > 0
    assert sum(Counter({x["label"]: x["count"] for x in summary["labels"]}).values()) <= ok
    ratio = refresh_s / bare_s
    met = ratio <= MAX_RATIO and growth < MAX_GROWTH_MB and page_kb < MAX_PAGE_KB
    table = Table(title=f"producer browse, a job of {args.lines:,} lines (local), {cores()} cores")
    for column in (
        "bare json count s", "JobView refresh s", "ratio", "memory growth MB",
        "page JSON kB", "gallery", "target", "met",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    table.add_row(
        f"{bare_s:.1f}",
        f"{refresh_s:.1f}",
        f"{ratio:.2f}",
        f"{growth:.0f}",
        f"{page_kb:.0f}",
        f"{len(gallery)} of {count:,}",
        f"<= {MAX_RATIO}x, < {MAX_GROWTH_MB:.0f} MB, < {MAX_PAGE_KB:.0f} kB",
        "yes" if met else "NO",
    )
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    report(f"browse aggregates, {args.lines:,} lines, vs json count",
           f"{ratio:.2f}x, {growth:.0f} MB, {page_kb:.0f} kB",
           f"<= {MAX_RATIO}x, < {MAX_GROWTH_MB:.0f} MB, < {MAX_PAGE_KB:.0f} kB", met)  # fmt: skip


if __name__ == "__main__":
    main()
