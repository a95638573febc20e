"""Copy TF Serving model versions between object storage and a local folder.

Runs in the worker image (``pull``: the TF Serving pod's init container) and
in the export image (``push``: after ``serving export``)::

    python model_sync.py pull s3://models/inception /models/inception --keep 2
    python model_sync.py pull s3://models/inception /models/inception --keep 2 --watch 30
    python model_sync.py push /work/models/inception s3://models/inception

A version is an integer folder (``1/``, ``2/``...). ``pull`` copies the
``--keep`` newest complete versions into hidden ``.pull-N`` folders and renames
each to ``N`` when complete, the same atomic appearance that ``serving export``
gives, so TF Serving never loads half a model; local versions older than those
are removed. A version in storage is complete once its ``saved_model.pb`` is
there: ``push`` uploads that file last, so a pull that runs during a push
skips the version until the next round. ``--watch S`` (the TF Serving pod's
sidecar) pulls again every S seconds until SIGTERM; a failed round is logged
and tried again. Credentials come from the AWS SDK's chain (IRSA / workload
identity, or ``AWS_*`` variables). Exit codes: 0 ok, 2 bad arguments or no
version found, 3 storage unreachable or refusing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from labelmill.errors import ImageError, ServiceError, UsageError
from labelmill.settings import Settings
from labelmill.storage import Storage

MAX_FILE_BYTES = 4 * 1024**3
# TF Serving's loader reads this file first; its presence marks a version complete.
MARKER = "saved_model.pb"


def versions(storage: Storage, prefix: str) -> dict[int, list[str]]:
    """Object URIs under ``prefix`` grouped by integer version folder, complete versions only."""
    base = prefix.rstrip("/") + "/"
    found: dict[int, list[str]] = {}
    for obj in storage.list(base):
        top = obj.uri[len(base) :].split("/", 1)[0]
        if top.isdigit():
            found.setdefault(int(top), []).append(obj.uri)
    return {v: uris for v, uris in found.items() if f"{base}{v}/{MARKER}" in uris}


def pull(storage: Storage, prefix: str, dest: Path, keep: int) -> list[int]:
    """Copy the ``keep`` newest versions under ``prefix`` into ``dest``; return them.

    Local versions older than the oldest one kept are removed.
    """
    base = prefix.rstrip("/") + "/"
    found = versions(storage, prefix)
    chosen = sorted(found)[-keep:]
    dest.mkdir(parents=True, exist_ok=True)
    for old in sorted(p for p in dest.iterdir() if p.is_dir() and p.name.isdigit()):
        if chosen and int(old.name) < chosen[0]:
            shutil.rmtree(old, ignore_errors=True)
            print(f"removed version {old.name} from {dest} (keeping {keep})")
    for v in chosen:
        final = dest / str(v)
        if final.exists():
            continue
        tmp = dest / f".pull-{v}"
        shutil.rmtree(tmp, ignore_errors=True)
        for uri in found[v]:
            rel = uri[len(base) + len(str(v)) + 1 :]
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            data, _etag = storage.get(uri, max_bytes=MAX_FILE_BYTES)
            target.write_bytes(data)
        tmp.rename(final)
        print(f"pulled version {v} ({len(found[v])} files) to {final}")
    return chosen


def push(storage: Storage, src: Path, prefix: str) -> list[int]:
    """Upload every integer version folder of ``src`` under ``prefix``."""
    base = prefix.rstrip("/") + "/"
    pushed = []
    for folder in sorted(p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
        # The marker last: a concurrent pull sees the version only when it is whole.
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in sorted(files, key=lambda p: p.relative_to(folder).as_posix() == MARKER):
            rel = path.relative_to(src).as_posix()
            storage.put(base + rel, path.read_bytes(), content_type="application/octet-stream")
        pushed.append(int(folder.name))
        print(f"pushed version {folder.name} to {base}{folder.name}/")
    return pushed


def watch(storage: Storage, prefix: str, dest: Path, keep: int, every_s: float) -> int:
    """Pull every ``every_s`` seconds until SIGTERM or SIGINT; exit 0 then."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"watching {prefix} every {every_s:g} s", flush=True)
    while not stop.is_set():
        try:
            pull(storage, prefix, dest, keep)
        except (ServiceError, ImageError, UsageError, OSError) as exc:
            print(f"model_sync: {type(exc).__name__}: {exc} (trying again)", file=sys.stderr)
        sys.stdout.flush()
        stop.wait(every_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model_sync", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_pull = sub.add_parser("pull", help="object storage -> local folder")
    p_pull.add_argument("source")
    p_pull.add_argument("dest", type=Path)
    p_pull.add_argument("--keep", type=int, default=2)
    p_pull.add_argument(
        "--watch", type=float, default=0, metavar="S", help="pull again every S seconds"
    )
    p_push = sub.add_parser("push", help="local folder -> object storage")
    p_push.add_argument("source", type=Path)
    p_push.add_argument("dest")
    args = parser.parse_args(argv)
    storage = Storage(Settings())
    if args.cmd == "pull" and args.watch > 0:
        return watch(storage, args.source, args.dest, args.keep, args.watch)
    try:
        if args.cmd == "pull":
            got = pull(storage, args.source, args.dest, args.keep)
        else:
            got = push(storage, args.source, args.dest)
    except UsageError as exc:
        print(f"model_sync: {exc}", file=sys.stderr)
        return 2
    except (ServiceError, ImageError) as exc:
        print(f"model_sync: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    if not got:
        where = args.source
        print(f"model_sync: no integer version folder under {where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
