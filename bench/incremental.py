"""Incremental ``producer enqueue`` over 1,000,000 keys, beside a plain enqueue of the same listing.

The source is a local folder of empty ``.jpg`` files, 1000 folders of 1000
(kept under ``bench/out/`` between runs). The base job is written
synthetically, not by inference: ``_job.json``, a part file per batch of
32 with a result line per object (its ETag as the listing gives it, except
for one object in ``--changed-every``, which the incremental run must send
again) and ``_manifest.json``. Then, in one run, each as its own process
timed wall to wall with its peak RSS (``common.run_producer``):

- ``producer enqueue SRC --output DST --json``: a plain job (no workers;
  the window holds every batch);
- ``producer enqueue SRC --output DST --json --incremental``: finds the
  base, merges the listing with the base's lines in key order, sends the
  changed objects and records the rest as carried.

Targets (issue "Many jobs, one cluster"): the incremental run's peak RSS
under 200 MB, and flat (the same at 1/10 of the keys, within 15 %); its
time within 1.5x the plain run's.

    python bench/incremental.py [--keys 1000000] [--changed-every 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, ROOT, cores, run_producer
from summary import report

from labelmill.job.folder import JobFolder
from labelmill.job.model import JobSpec
from labelmill.job.record import SCHEMA, Label, ModelInfo, OkRecord
from labelmill.settings import Settings
from labelmill.storage import Storage
from labelmill.storage.local import local_etag
from tests.fixtures.servers import RedisServer

MAX_RSS_MB = 200.0
MAX_TIME_RATIO = 1.5
PER_FOLDER = 1000
BATCH = 32


def ensure_folder(keys: int) -> Path:
    """``keys`` empty image files, ``PER_FOLDER`` to a folder (made once)."""
    folder = OUT / "incremental-src" / str(keys)
    done = folder / ".complete"
    if done.exists():
        return folder / "src"
    shutil.rmtree(folder, ignore_errors=True)
    print(f"creating {keys} files (once)...", file=sys.stderr, flush=True)
    for i in range(keys):
        sub = folder / "src" / f"{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0:
            sub.mkdir(parents=True)
        (sub / f"{i % PER_FOLDER:04d}.jpg").touch()
    done.touch()
    return folder / "src"


def write_base(source: Path, output: Path, job_id: str, changed_every: int) -> int:
    """A finished job over ``source`` in ``output``; returns how many lines carry a stale ETag."""
    storage = Storage(Settings())
    src = f"file://{source}/"
    spec = JobSpec(job_id, src, f"file://{output}", BATCH, "inception", 1, time.time())
    folder = JobFolder(storage, spec.output, job_id)
    folder.write_spec(spec, {})
    model = ModelInfo("inception", 1, "random:0")
    labels = [Label(f"class {k}", k, 0.2) for k in range(5)]
    uris = sorted(str(p) for p in source.rglob("*.jpg"))  # the listing's order: equal-length names
    stale = 0
    for batch_no in range(0, (len(uris) + BATCH - 1) // BATCH):
        records = []
        for n, path in enumerate(uris[batch_no * BATCH : (batch_no + 1) * BATCH]):
            etag = local_etag(os.stat(path))
            if (batch_no * BATCH + n) % changed_every == 0:
                etag, stale = "stale", stale + 1
            records.append(OkRecord(f"file://{path}", etag, labels, model, job_id, batch_no))
        folder.write_part(batch_no, records)
    manifest = {
        "schema": SCHEMA,
        "job_id": job_id,
        "spec": spec.as_dict(),
        "finished_at": "2026-01-01T00:00:00+00:00",
    }
    folder.write_manifest(manifest)
    return stale


def producer(env: dict[str, str], *args: str) -> tuple[dict[str, Any], float, float]:
    result, seconds, peak_mb, _cpu = run_producer(env, *args)
    return result, seconds, peak_mb


def measure(env: dict[str, str], keys: int, changed_every: int, work: Path) -> dict[str, float]:
    source = ensure_folder(keys)
    output = work / f"labels-{keys}"
    output.mkdir(parents=True)
    stale = write_base(source, output, "base", changed_every)
    src, dst = f"{source}/", f"{output}/"
    plain, plain_s, plain_rss = producer(env, "enqueue", src, "-o", dst)
    assert plain["images_total"] == keys, plain
    inc, inc_s, inc_rss = producer(env, "enqueue", src, "-o", dst, "--incremental")
    assert inc["base"] == "base", inc
    assert inc["incremental"]["carried"] == keys - stale, inc
    assert inc["images_total"] == inc["incremental"]["changed"] == stale, inc
    return {
        "plain_s": plain_s,
        "plain_rss": plain_rss,
        "inc_s": inc_s,
        "inc_rss": inc_rss,
        "sent": stale,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--changed-every", type=int, default=100)
    args = parser.parse_args()
    work = OUT / "incremental-tmp"
    shutil.rmtree(work, ignore_errors=True)
    redis_server = RedisServer(shutil.which("redis-server") or "redis-server", work / "redis")
    try:
        redis_server.start()
        env = {
            **os.environ,
            "LABELMILL_REDIS_URL": redis_server.url,
            "LABELMILL_MODEL_VERSION": "1",  # no model server needed
            "LABELMILL_MAX_OUTSTANDING": str(args.keys),  # no workers: the window holds all
            "PYTHONPATH": str(ROOT),
        }
        small = measure(env, args.keys // 10, args.changed_every, work)
        big = measure(env, args.keys, args.changed_every, work)
    finally:
        redis_server.stop()
        shutil.rmtree(work, ignore_errors=True)

    ratio = big["inc_s"] / big["plain_s"]
    flat = big["inc_rss"] < small["inc_rss"] * 1.15
    met = big["inc_rss"] < MAX_RSS_MB and flat and ratio <= MAX_TIME_RATIO
    table = Table(
        title=f"incremental vs plain enqueue, local folder, {args.keys:,} keys, "
        f"1 in {args.changed_every} changed, {cores()} cores"
    )
    for column in (
        "keys", "plain s", "incremental s", "time ratio", "plain RSS MB", "incremental RSS MB",
        "sent again",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for keys, row in ((args.keys // 10, small), (args.keys, big)):
        table.add_row(
            f"{keys:,}",
            f"{row['plain_s']:.1f}",
            f"{row['inc_s']:.1f}",
            f"{row['inc_s'] / row['plain_s']:.2f}",
            f"{row['plain_rss']:.0f}",
            f"{row['inc_rss']:.0f}",
            f"{row['sent']:,.0f}",
        )
    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(table)
    report(f"enqueue --incremental, {args.keys:,} keys, vs plain",
           f"{ratio:.2f}x, {big['inc_rss']:.0f} MB",
           f"<= {MAX_TIME_RATIO}x, < {MAX_RSS_MB:.0f} MB, flat", met)  # fmt: skip
    console.print(
        f"target: incremental RSS < {MAX_RSS_MB:.0f} MB and flat (10x keys, < 15 % more), "
        f"time <= {MAX_TIME_RATIO}x plain: {'met' if met else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
