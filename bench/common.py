"""What the pipeline benchmarks share: sample photographs, cached model exports, a local stack.

The stack is the test suite's real servers (``tests.fixtures``): Redis,
SeaweedFS's S3 gateway, ``serving local`` and ``celery -A workers worker``,
each a separate process on free ports, so a benchmark measures exactly what
the integration tests exercise. Exports and generated photographs are cached
under ``bench/out/`` (ignored by git) between runs.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from labelmill.job import Ledger  # noqa: E402
from tests.fixtures.model_server import export_model, start_model_server  # noqa: E402
from tests.fixtures.procs import Proc  # noqa: E402
from tests.fixtures.servers import RedisServer, S3Server  # noqa: E402

OUT = ROOT / "bench" / "out"
CELERY = [
    sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "classify", "-l", "INFO",
    "--without-gossip", "--without-mingle", "--without-heartbeat",
]  # fmt: skip
TWELVE_MPX = (4032, 3024)


# --------------------------------------------------------------------------- inputs


def _sources() -> list[tuple[str, np.ndarray]]:
    """scikit-image's bundled photographs (those that need no download), as RGB."""
    from skimage import data

    names = (
        "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
        "camera", "coins", "moon", "immunohistochemistry", "brick", "grass", "colorwheel",
        "clock",
    )  # fmt: skip
    out = [(n, getattr(data, n)()) for n in names]
    left, right, _ = data.stereo_motorcycle()  # type: ignore[no-untyped-call]
    out += [("motorcycle_left", left), ("motorcycle_right", right)]
    rgb = []
    for name, pixels in out:
        img = Image.fromarray(pixels)
        rgb.append((name, np.asarray(img.convert("RGB"))))
    return rgb


def _variant(i: int, name: str, pixels: np.ndarray) -> tuple[str, Image.Image]:
    """The i-th variant of a photograph: as is, a crop, or rescaled (1 in 5 to 12 Mpx)."""
    img = Image.fromarray(pixels)
    w, h = img.size
    kind = i % 5
    if kind == 0:
        return f"{name}-orig", img
    if kind == 1:  # an off-centre crop, 60% of each side
        x, y = (i * 37) % max(1, w * 2 // 5), (i * 53) % max(1, h * 2 // 5)
        return f"{name}-crop", img.crop((x, y, x + w * 3 // 5, y + h * 3 // 5))
    if kind == 2:
        return f"{name}-hd", img.resize((1920, 1080), Image.Resampling.BICUBIC)
    if kind == 3:
        return f"{name}-12mpx", img.resize(TWELVE_MPX, Image.Resampling.BICUBIC)
    return f"{name}-small", img.resize((640, 480), Image.Resampling.BILINEAR)


def photographs(count: int) -> list[tuple[str, bytes]]:
    """``count`` JPEGs (q90) of mixed sizes, one in five 12 Mpx; cached in bench/out/photos."""
    folder = OUT / "photos" / str(count)
    index = folder / "index.json"
    if index.is_file():
        names = json.loads(index.read_text())
        return [(n, (folder / n).read_bytes()) for n in names]
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=OUT))  # renamed into place when complete
    sources = _sources()

    def make(i: int) -> str:
        name, pixels = sources[i % len(sources)]
        label, img = _variant(i // len(sources) + i, name, pixels)
        # A little jitter so that no two files are byte-identical.
        img = img.rotate(0.5 * (i % 7), resample=Image.Resampling.BILINEAR)
        filename = f"{i:05d}-{label}.jpg"
        buffer = BytesIO()
        img.save(buffer, "JPEG", quality=90)
        (tmp / filename).write_bytes(buffer.getvalue())
        return filename

    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        names = list(pool.map(make, range(count)))
    (tmp / "index.json").write_text(json.dumps(names))
    folder.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return [(n, (folder / n).read_bytes()) for n in names]


def describe(photos: Sequence[tuple[str, bytes]]) -> str:
    """A one-line summary of the inputs: how many of each kind, total megabytes."""
    kinds: dict[str, int] = {}
    for name, _ in photos:
        kind = name.rsplit("-", 1)[-1].removesuffix(".jpg")
        kinds[kind] = kinds.get(kind, 0) + 1
    mb = sum(len(d) for _, d in photos) / 1e6
    shown = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    return f"{len(photos)} JPEGs ({shown}), {mb:.0f} MB"


def model_base(arch: str) -> Path:
    """A model base folder with version 1 of ``arch`` (random weights, seed 1), cached."""
    base = OUT / "models" / arch / "inception"
    if not (base / "1" / "saved_model.pb").is_file():
        shutil.rmtree(base, ignore_errors=True)
        print(f"exporting {arch} (random weights) into {base} (once)...", flush=True)
        export_model(base, arch=arch, weights="random", seed=1, version=1)
    return base


# --------------------------------------------------------------------------- the stack


def vm_hwm_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a live process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_producer(env: dict[str, str], *args: str) -> tuple[dict[str, Any], float, float, float]:
    """Run ``producer ... --json``: (its JSON, wall seconds, peak RSS in MB, CPU seconds).

    The peak is the process's own VmHWM, sampled every 10 ms until it exits
    (so growth in its last 10 ms could be missed). Not ``wait4``'s
    ``ru_maxrss``: Linux keeps the high-water mark of the memory the child
    had before ``exec``, which is its parent's, so a benchmark that holds a
    million keys would report them as the producer's.
    """
    peak = 0.0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        # Popen returns once exec succeeded: from then on VmHWM is the producer's.
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer", *args, "--json"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=err,
        )
        exited = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not exited.is_set():
                try:
                    peak = max(peak, vm_hwm_mb(proc.pid))
                except (OSError, ValueError):  # gone, or a zombie without VmHWM
                    return
                exited.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it: rusage of this child alone
        seconds = time.perf_counter() - start
        exited.set()
        sampler.join()
        out.seek(0)
        err.seek(0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"producer {' '.join(args)} failed:\n{err.read().decode()[-3000:]}")
        result: dict[str, Any] = json.loads(out.read().decode().splitlines()[-1])
    return result, seconds, peak, usage.ru_utime + usage.ru_stime


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have exited and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children(pid: int) -> list[int]:
    """Direct children of a process (Celery's pool processes, for the main worker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


@dataclass
class Stack:
    """Redis, S3, ``serving local`` and Celery workers on free ports, torn down on exit."""

    tmp: Path
    env: dict[str, str]
    s3: S3Server
    redis: RedisServer
    model_target: str
    model_pid: int = 0
    bucket: str = "bench"
    workers: list[Proc] = field(default_factory=list)
    more_models: list[Proc] = field(default_factory=list)

    def start_model(self, arch: str, extra: Sequence[str], name: str) -> str:
        """One more ``serving local`` on ``arch`` (``extra``: its options); its target.

        Point workers at it with ``start_worker(extra={"LABELMILL_MODEL_SERVER": ...})``.
        """
        server = start_model_server(model_base(arch), self.tmp / f"model-{name}.log", extra)
        self.more_models.append(server.proc)
        return server.target

    def stop_models(self) -> None:
        for proc in self.more_models:
            proc.stop(timeout=30)
        self.more_models.clear()

    @property
    def model_pids(self) -> list[int]:
        return ([self.model_pid] if self.model_pid else []) + [p.pid for p in self.more_models]

    @property
    def ledger(self) -> Ledger:
        return Ledger.from_url(self.env["LABELMILL_REDIS_URL"])

    def upload(self, prefix: str, photos: Sequence[tuple[str, bytes]], threads: int = 16) -> None:
        client = self.s3.client(max_pool_connections=threads)

        def put(item: tuple[str, bytes]) -> None:
            client.put_object(Bucket=self.bucket, Key=f"{prefix}{item[0]}", Body=item[1])

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(put, photos))

    def start_worker(self, *, concurrency: int, extra: dict[str, str] | None = None) -> Proc:
        """``celery -A workers worker`` as in production; returns once it is ready."""
        name = f"w{len(self.workers)}"
        log = self.tmp / f"worker-{name}.log"
        proc = Proc(
            [*CELERY, "-c", str(concurrency), "-n", f"{name}@%h"],
            log=log,
            env={**self.env, **(extra or {})},
            cwd=ROOT,
        )
        proc.wait_ready(
            lambda: " ready." in log.read_text(errors="replace"), timeout=90, what="celery worker"
        )
        self.workers.append(proc)
        return proc

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.stop(timeout=30)
        self.workers.clear()

    def pool_pids(self) -> list[int]:
        return [c for w in self.workers for c in children(w.pid)]

    def cpu_by_part(self) -> dict[str, float]:
        """CPU seconds so far per part of the stack (``producer``: reaped children)."""
        parts = {
            "model server": self.model_pids,
            "worker pool processes": self.pool_pids(),
            "worker main processes": [w.pid for w in self.workers],
            "S3 (weed)": [self.s3.proc.pid] if self.s3.proc else [],
            "Redis": [self.redis.proc.pid] if self.redis.proc else [],
        }
        out = {name: sum(cpu_s(pid) for pid in pids) for name, pids in parts.items()}
        out["producer and other exited children"] = children_cpu_s()
        return out

    def cpu_s(self) -> float:
        """CPU seconds used so far by every process of the stack, and by reaped children.

        The difference across a job is the job's CPU cost on this machine
        (the producer is a reaped child), whatever else shares the cores.
        """
        pids = [p.pid for p in (self.redis.proc, self.s3.proc) if p is not None]
        pids += [w.pid for w in self.workers] + self.pool_pids() + self.model_pids
        return sum(cpu_s(pid) for pid in pids) + children_cpu_s()

    def start_producer(self, prefix: str, *args: str) -> tuple[str, subprocess.Popen[str]]:
        """Start ``producer enqueue`` of everything under ``prefix``: (job id, the process)."""
        job_id = f"bench-{uuid.uuid4().hex[:12]}"
        source, output = f"s3://{self.bucket}/{prefix}", f"s3://{self.bucket}/labels/"
        proc = subprocess.Popen(
            [sys.executable, "-m", "producer", "enqueue", source, "-o", output, "--json",
             "--job-id", job_id, *args],
            env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        return job_id, proc

    def wait_for(
        self,
        job_id: str,
        field_is: Callable[[Any], bool],
        *,
        field: str,
        proc: subprocess.Popen[str] | None,
        start: float,
        timeout: float,
        interval: float,
    ) -> float:
        """Seconds from ``start`` until the ledger's ``field`` of the job passes ``field_is``.

        The ledger is polled, not S3: polling S3 every few milliseconds would
        add SeaweedFS's work to what is measured. The ledger's marks follow the
        storage writes they stand for within a millisecond or two (a part file
        before ``batches_done`` counts it, ``_SUCCESS`` before ``state`` is
        ``done``), so the times are, if anything, a little long. Fails if
        ``proc`` (the producer) fails meanwhile.
        """
        r, key = self.ledger.r, self.ledger.job_key(job_id)
        while True:
            if field_is(r.hget(key, field)):
                return time.perf_counter() - start
            if proc is not None and proc.poll() not in (None, 0):
                raise RuntimeError(f"producer enqueue failed:\n{proc.communicate()[1]}")
            if time.perf_counter() - start > timeout:
                tails = "\n".join(w.log_tail(20) for w in self.workers)
                raise RuntimeError(f"job {job_id}: no {field} after {timeout:.0f}s:\n{tails}")
            time.sleep(interval)

    def wait_done(
        self, job_id: str, proc: subprocess.Popen[str] | None, start: float, timeout: float = 3600
    ) -> float:
        """Seconds from ``start`` until the job is done; its ``_SUCCESS`` checked in S3."""
        seconds = self.wait_for(job_id, lambda v: v == "done", field="state", proc=proc,
                                start=start, timeout=timeout, interval=0.02)  # fmt: skip
        client = self.s3.client()
        client.head_object(Bucket=self.bucket, Key=f"labels/{job_id}/_SUCCESS")
        client.close()
        return seconds

    def wait_first_part(
        self, job_id: str, proc: subprocess.Popen[str] | None, start: float, timeout: float = 120
    ) -> float:
        """Seconds from ``start`` until the job's first part file is written and counted."""
        seconds = self.wait_for(
            job_id,
            lambda v: int(v or 0) >= 1,
            field="batches_done",
            proc=proc,
            start=start,
            timeout=timeout,
            interval=0.005,
        )
        client = self.s3.client()
        found = client.list_objects_v2(Bucket=self.bucket, Prefix=f"labels/{job_id}/part-")
        client.close()
        assert found.get("KeyCount"), f"job {job_id}: a batch counted, no part file"
        return seconds

    def finish_producer(self, job_id: str, proc: subprocess.Popen[str]) -> int:
        """Wait for the producer; check the job has no error line; its image count."""
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"producer enqueue failed ({proc.returncode}):\n{err}")
        counts = self.ledger.counts(job_id)
        if counts.images_error:
            raise RuntimeError(f"job {job_id} has error lines: {counts.errors}")
        return int(json.loads(out)["images_total"])

    def run_job(self, prefix: str, *args: str, timeout: float = 3600) -> tuple[int, float]:
        """Enqueue everything under ``prefix``: (images, seconds until its ``_SUCCESS``).

        The clock starts as the ``producer enqueue`` process is started, so
        its Python start-up, preflight, model version lookup and input
        manifest count, and stops once the job's ``_SUCCESS`` is in storage:
        what a user waits for.
        """
        start = time.perf_counter()
        job_id, proc = self.start_producer(prefix, *args)
        try:
            seconds = self.wait_done(job_id, proc, start, timeout)
            return self.finish_producer(job_id, proc), seconds
        finally:
            if proc.poll() is None:
                proc.kill()


@contextmanager
def stack(arch: str, *, model_args: Sequence[str] = (), with_model: bool = True) -> Iterator[Stack]:
    """Start Redis, S3 and (``with_model``) ``serving local`` on ``arch``; no workers yet."""
    with ExitStack() as cleanup:
        tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="lm-bench-")))
        redis_server = RedisServer(shutil.which("redis-server") or "redis-server", tmp / "redis")
        redis_server.start()
        cleanup.callback(redis_server.stop)
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        s3 = S3Server(weed, tmp / "weed")
        s3.start()
        cleanup.callback(s3.stop)
        target, model_pid = "127.0.0.1:1", 0  # unreachable: a no-model run never calls it
        if with_model:
            server = start_model_server(model_base(arch), tmp / "model.log", model_args)
            cleanup.callback(server.proc.stop)
            target, model_pid = server.target, server.proc.pid
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
            **s3.env,
            "LABELMILL_REDIS_URL": redis_server.url,
            "LABELMILL_MODEL_SERVER": target,
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        client = s3.client()
        client.create_bucket(Bucket="bench")
        client.close()
        st = Stack(
            tmp=tmp, env=env, s3=s3, redis=redis_server, model_target=target, model_pid=model_pid
        )
        cleanup.callback(st.stop_models)
        cleanup.callback(st.stop_workers)
        yield st


@contextmanager
def profile(pids: Sequence[int], folder: Path, rate: int = 100) -> Iterator[None]:
    """``py-spy record`` each process while the block runs (collapsed stacks, GIL-idle too)."""
    spy = shutil.which("py-spy")
    if spy is None:  # not a project dependency: a profiling tool
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    folder.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            [spy, "record", "-p", str(pid), "-r", str(rate), "-f", "raw", "--idle", "--threads",
             "-o", str(folder / f"{pid}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for pid in pids
    ]  # fmt: skip
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for proc in procs:
            proc.wait(timeout=60)


def timed(label: str) -> Any:
    """Print how long a setup step took (to stderr, so tables stay clean)."""

    @contextmanager
    def _timer() -> Iterator[None]:
        start = time.perf_counter()
        print(f"{label}...", file=sys.stderr, flush=True)
        yield
        print(f"{label}: {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)

    return _timer()


def cores() -> int:
    return len(os.sched_getaffinity(0))
