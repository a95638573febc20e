"""``producer enqueue`` over 100,000 objects: keys/s and peak RSS, beside a bare listing.

Two sources hold the same names (``00000.jpg`` ... with tiny bodies): a bucket
on SeaweedFS's S3 gateway and a local folder. For each, in the same run:

- the bare listing: boto3's ``list_objects_v2`` paginator with its defaults
  (or ``os.scandir``), counting keys in this process. For S3 also the same
  listing through labelmill's boto3 session, which leaves timestamps as
  text: "ratio, same parser" is the producer's own overhead on top of it;
- ``producer enqueue --json`` as its own process, a real job (no workers:
  the window, ``--max-outstanding``, holds every batch), timed wall to wall
  with its peak RSS (``common.run_producer``);
- the same at 10,000 keys, to show the RSS stays flat.

Targets: S3 at least 0.8 of the bare listing rate; a local folder at least
50,000 keys/s; peak RSS under 150 MB and the same at 10k as at 100k.

The bucket and the folder are kept under ``bench/out/`` between runs
(uploading 100k objects took 3 minutes here).

    python bench/enqueue.py [--keys 100000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT, ROOT, cores, run_producer
from summary import report

from labelmill.storage.s3 import session as s3_session
from tests.fixtures.servers import RedisServer, S3Server

BUCKET = "enqueue"
S3_MIN_RATIO = 0.8
LOCAL_MIN_KEYS_S = 50_000
MAX_RSS_MB = 150.0


def prefix(keys: int) -> str:
    """Each size has a prefix of its own: a bucket kept from a larger run is not miscounted."""
    return f"k{keys}/"


def key(keys: int, i: int) -> str:
    return f"{prefix(keys)}{i:05d}.jpg"


def ensure_bucket(s3: S3Server, keys: int) -> None:
    """``keys`` tiny objects in the bucket (kept between runs with the server's data)."""
    client = s3.client(max_pool_connections=64)
    try:
        client.head_bucket(Bucket=BUCKET)
        marker = client.list_objects_v2(
            Bucket=BUCKET, Prefix=prefix(keys), StartAfter=key(keys, keys - 2)
        )
        if marker.get("KeyCount", 0) >= 1:
            return
    except Exception:  # no bucket yet
        client.create_bucket(Bucket=BUCKET)
    print(f"uploading {keys} objects (once)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        put = lambda i: client.put_object(Bucket=BUCKET, Key=key(keys, i), Body=b"x")  # noqa: E731
        list(pool.map(put, range(keys)))
    print(f"uploaded in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)


def ensure_folder(keys: int) -> Path:
    folder = OUT / "enqueue-local" / str(keys)
    done = folder / ".complete"
    if done.exists():
        return folder / "k"
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "k").mkdir(parents=True)
    for i in range(keys):
        (folder / "k" / f"{i:05d}.jpg").write_bytes(b"x")
    done.touch()
    return folder / "k"


def bare_s3(client: Any, prefix: str) -> tuple[int, float]:
    start = time.perf_counter()
    n = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        n += len(page.get("Contents", ()))
    return n, time.perf_counter() - start


def bare_local(folder: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with os.scandir(folder) as it:
        names = sorted(e.name for e in it if e.is_file())
    return len(names), time.perf_counter() - start


def producer(env: dict[str, str], *args: str) -> tuple[dict[str, Any], float, float]:
    """Run ``producer ... --json``: (its JSON with ``cpu_s`` added, wall seconds, peak RSS MB)."""
    result, seconds, peak_mb, cpu = run_producer(env, *args)
    result["cpu_s"] = cpu
    return result, seconds, peak_mb


def startup_s(env: dict[str, str]) -> float:
    """Seconds for ``producer enqueue --help``: the interpreter and the imports."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "producer", "enqueue", "--help"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000, help="the RSS comparison size")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    big, small = args.keys, args.small
    # Keys are k100000/00000.jpg...: a power of ten below 100,000 is a prefix of zeros.
    assert big <= 100_000 and small < big and len(str(small).strip("0")) == 1, (big, small)
    small_prefix = prefix(big) + "0" * (5 - len(str(small)) + 1)

    weed_dir = OUT / "enqueue-weed"
    weed_dir.mkdir(parents=True, exist_ok=True)
    s3 = S3Server(shutil.which("weed") or str(Path(sys.executable).parent / "weed"), weed_dir)
    tmp = OUT / "enqueue-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    redis_server = RedisServer(shutil.which("redis-server") or "redis-server", tmp / "redis")
    rows: list[tuple[str, float, float | None, float, float, float, float, float, float, float]]
    rows = []
    started_before = weed_dir / ".started"
    # A server restarted on kept data already has its canary object, and
    # must wait for it (volumes back) before serving reads.
    s3._canary = started_before.exists()
    try:
        s3.start()
        started_before.touch()
        redis_server.start()
        ensure_bucket(s3, big)
        folder = ensure_folder(big)
        out_dir = tmp / "labels"
        out_dir.mkdir(parents=True)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            **s3.env,
            "LABELMILL_REDIS_URL": redis_server.url,
            "LABELMILL_MODEL_VERSION": "1",  # no model server needed
            "LABELMILL_MAX_OUTSTANDING": str(big),
            "PYTHONPATH": str(ROOT),
        }
        client = s3.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket="labels")
        sources = {
            "S3": (f"s3://{BUCKET}/{prefix(big)}", f"s3://{BUCKET}/{small_prefix}", "s3://labels/"),
            # A local source must be a folder: the small one is a folder of its own.
            "local folder": (f"{folder}/", f"{ensure_folder(small)}/", f"{out_dir}/"),
        }
        for name, (source, small_source, output) in sources.items():
            bare_rates, rates, dry_rates, rss_big, rss_small = [], [], [], [], []
            warm, cpu, same_parser = [], [], []
            for _ in range(args.rounds):
                if name == "S3":
                    n, secs = bare_s3(s3.client(), prefix(big))
                    # The same listing through labelmill's session (timestamps
                    # left as text): what the producer's own work costs on top.
                    m, same = bare_s3(s3.client(session=s3_session()), prefix(big))
                    assert m == big, m
                    same_parser.append(m / same)
                else:
                    n, secs = bare_local(folder)
                assert n == big, n
                bare_rates.append(n / secs)
                res, secs, rss = producer(env, "enqueue", source, "-o", output, "--dry-run")
                dry_rates.append(res["images_total"] / secs)
                res, secs, rss = producer(env, "enqueue", source, "-o", output)
                assert res["images_total"] == big, res
                rates.append(big / secs)
                rss_big.append(rss)
                cpu.append(res["cpu_s"])
                warm.append(big / max(secs - startup_s(env), 1e-3))
                res, secs, rss = producer(env, "enqueue", small_source, "-o", output)
                assert res["images_total"] == small, res
                rss_small.append(rss)
                redis_server.client().flushall()
            # Paired by round, like the other benchmarks.
            ratio = statistics.median([e / b for e, b in zip(rates, bare_rates, strict=True)])
            own = [e / b for e, b in zip(rates, same_parser, strict=True)] if same_parser else []
            rows.append(
                (
                    name,
                    ratio,
                    statistics.median(own) if own else None,
                    statistics.median(bare_rates),
                    statistics.median(dry_rates),
                    statistics.median(rates),
                    max(rss_small),
                    max(rss_big),
                    statistics.median(warm),
                    statistics.median(cpu),
                )
            )
    finally:
        redis_server.stop()
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    table = Table(
        title=f"producer enqueue, {big} keys (batches of 32, no workers), {cores()} cores"
    )
    for column in (
        "source", "bare listing keys/s", "--dry-run keys/s", "enqueue keys/s", "ratio",
        "ratio, same parser",
        "keys/s after start-up", "producer CPU s", f"RSS MB {small // 1000}k",
        f"RSS MB {big // 1000}k", "target", "met",
    ):  # fmt: skip
        table.add_column(column, justify="right")
    for name, ratio, own_ratio, bare, dry, rate, rss_s, rss_b, warm_rate, cpu_s in rows:
        if name == "S3":
            target = f">= {S3_MIN_RATIO} of bare, < {MAX_RSS_MB:.0f} MB"
            met = ratio >= S3_MIN_RATIO
        else:
            target = f">= {LOCAL_MIN_KEYS_S} keys/s, < {MAX_RSS_MB:.0f} MB"
            met = rate >= LOCAL_MIN_KEYS_S
        met = met and rss_b < MAX_RSS_MB and rss_b < rss_s * 1.15
        result = f"{ratio:.2f} of bare" if name == "S3" else f"{rate:,.0f} keys/s"
        report(f"enqueue {big:,} keys, {name}", f"{result}, {rss_s:.0f} -> {rss_b:.0f} MB",
               f"{target}, flat", met)  # fmt: skip
        table.add_row(
            name,
            f"{bare:,.0f}",
            f"{dry:,.0f}",
            f"{rate:,.0f}",
            f"{ratio:.2f}",
            "" if own_ratio is None else f"{own_ratio:.2f}",
            f"{warm_rate:,.0f}",
            f"{cpu_s:.1f}",
            f"{rss_s:.0f}",
            f"{rss_b:.0f}",
            target,
            "yes" if met else "NO",
        )
    Console(width=None if sys.stdout.isatty() else 190).print(table)


if __name__ == "__main__":
    main()
