"""The local stack: every labelmill service as a process on this machine.

``python -m labelmill.dev.stack up`` writes a Procfile under the stack folder
(default ``.stack/``) and runs it with honcho: Redis (AOF on), SeaweedFS's S3
gateway, ``serving local`` on the exported model, Celery workers and Flower.
It waits until each service answers, prints where everything is, and either
stays in the foreground (Ctrl-C stops everything) or detaches (``--detach``;
``down`` stops it). Data and one log file per service stay in the folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from labelmill.hardware import NO_BF16, bf16_instructions

LOCAL_ACCESS_KEY = "labelmill"
LOCAL_SECRET_KEY = "labelmill-local-secret"  # local development stack only


@dataclass(frozen=True)
class Ports:
    redis: int = 6379
    s3: int = 8333
    model: int = 8500
    flower: int = 5555
    weed_master: int = 9333
    weed_volume: int = 8081  # not 8080: `producer browse` serves there
    weed_filer: int = 8888
    browse: int = 8080

    @classmethod
    def from_base(cls, base: int) -> Ports:
        """Consecutive ports from ``base`` (for a second stack or a test)."""
        names = [f.name for f in fields(cls)]
        return cls(**{name: base + i for i, name in enumerate(names)})

    def all(self) -> dict[str, int]:
        # SeaweedFS also listens on each of its ports + 10000 for gRPC.
        named = dict(vars(self))
        for name in ("s3", "weed_master", "weed_volume", "weed_filer"):
            named[f"{name}_grpc"] = named[name] + 10000
        return named


class StackError(Exception):
    """A one-line reason the stack cannot start or stop."""


def _bin(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name} not found; run `make install` (see README: troubleshooting)")
    return found


def env_for(ports: Ports) -> dict[str, str]:
    """The variables every labelmill process of the local stack uses."""
    return {
        "LABELMILL_REDIS_URL": f"redis://127.0.0.1:{ports.redis}/0",
        "LABELMILL_MODEL_SERVER": f"127.0.0.1:{ports.model}",
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{ports.s3}",
        "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


def procfile(
    root: Path, ports: Ports, *, workers: int, model_base: Path, bf16: bool = False
) -> str:
    """One line per service; each appends its output to ``logs/<name>.log``."""
    logs = root / "logs"
    data = root / "data"
    q = shlex.quote
    redis = [
        _bin("redis-server"), "--bind", "127.0.0.1", "--port", str(ports.redis),
        "--dir", str(data / "redis"), "--appendonly", "yes", "--appendfsync", "everysec",
        "--maxmemory-policy", "noeviction", "--save", "",
    ]  # fmt: skip
    weed = [
        _bin("weed"), "server", f"-dir={data / 's3'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={ports.weed_master}", f"-volume.port={ports.weed_volume}",
        f"-filer.port={ports.weed_filer}", "-master.volumeSizeLimitMB=256",
        "-s3", f"-s3.port={ports.s3}", f"-s3.config={root / 's3.json'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
        "-master.electionTimeout=1s", "-master.telemetry=false",
    ]  # fmt: skip
    model = [
        sys.executable, "-m", "serving", "local", "--model-base-path", str(model_base),
        "--host", "127.0.0.1", "--port", str(ports.model), *(["--bf16"] if bf16 else []),
    ]  # fmt: skip
    worker = [
        sys.executable, "-m", "celery", "-A", "workers", "worker", "-Q", "classify",
        "-c", str(workers), "-n", "local@%h", "-l", "INFO",
    ]  # fmt: skip
    flower = [
        sys.executable, "-m", "celery", "-A", "workers", "flower", "--address=127.0.0.1",
        f"--port={ports.flower}", "--purge_offline_workers=60",
    ]  # fmt: skip
    browse = [
        sys.executable, "-m", "producer", "browse", "--host", "127.0.0.1",
        "--port", str(ports.browse),
    ]  # fmt: skip
    lines = []
    for name, argv in (
        ("redis", redis),
        ("s3", weed),
        ("model", model),
        ("worker", worker),
        ("flower", flower),
        ("browse", browse),
    ):
        cmd = " ".join(q(a) for a in argv)
        # weed reads master.toml from its working directory.
        cd = f"cd {q(str(data / 's3'))} && " if name == "s3" else ""
        lines.append(f"{name}: {cd}exec {cmd} >> {q(str(logs / (name + '.log')))} 2>&1")
    return "\n".join(lines) + "\n"


def s3_config() -> str:
    return json.dumps(
        {
            "identities": [
                {
                    "name": "labelmill",
                    "credentials": [{"accessKey": LOCAL_ACCESS_KEY, "secretKey": LOCAL_SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        },
        indent=2,
    )


def ensure_model(base: Path, *, log: Callable[[str], None] = print) -> str:
    """Export Inception-v3 as version 1 under ``base`` unless a version exists.

    ImageNet weights where the internet allows; otherwise seeded random
    weights, and then it says plainly that labels are meaningless. Returns
    the weights tag of the newest export.
    """
    marker = base.parent / f"{base.name}.weights"
    if any(p.name.isdigit() for p in base.glob("*")):
        return marker.read_text().strip() if marker.exists() else "unknown"
    cmd = [sys.executable, "-m", "serving", "export", "--out", str(base), "--version", "1"]
    cmd += ["--arch", "inception_v3"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    log("exporting Inception-v3 with ImageNet weights (needs internet)...")
    res = subprocess.run([*cmd, "--weights", "imagenet"], env=env, capture_output=True, text=True)
    weights = "imagenet"
    if res.returncode != 0:
        reason = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "export failed"
        log(reason)
        log("exporting with RANDOM weights instead: labels will be meaningless")
        subprocess.run([*cmd, "--weights", "random", "--seed", "1"], env=env, check=True)
        weights = "random:seed=1"
    marker.write_text(weights + "\n")
    return weights


def port_free(port: int) -> bool:
    """Nothing listens on ``port`` (one left in TIME_WAIT by a closed connection is free)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(
    check: Callable[[], bool], what: str, timeout: float, honcho: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if honcho.poll() is not None:
            raise StackError(f"the stack stopped while waiting for {what}; see the logs folder")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        if time.monotonic() > deadline:
            raise StackError(f"{what} not healthy after {timeout:.0f}s; see the logs folder")
        time.sleep(0.25)


def _checks(root: Path, ports: Ports) -> list[tuple[str, Callable[[], bool], float]]:
    import boto3
    import redis
    from botocore.config import Config

    from labelmill.model_client import ModelClient

    env = env_for(ports)

    def redis_ok() -> bool:
        return bool(redis.Redis(port=ports.redis, socket_timeout=1).ping())

    def s3_ok() -> bool:
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL_S3"],
            aws_access_key_id=LOCAL_ACCESS_KEY,
            aws_secret_access_key=LOCAL_SECRET_KEY,
            region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1}),
        )
        s3.list_buckets()
        return True

    def model_ok() -> bool:
        with ModelClient(env["LABELMILL_MODEL_SERVER"], timeout_s=2) as c:
            return "AVAILABLE" in c.model_versions().values()

    def worker_ok() -> bool:
        return " ready." in (root / "logs" / "worker.log").read_text(errors="replace")

    def flower_ok() -> bool:
        with socket.create_connection(("127.0.0.1", ports.flower), timeout=1):
            return True

    def browse_ok() -> bool:
        with socket.create_connection(("127.0.0.1", ports.browse), timeout=1):
            return True

    return [
        ("redis", redis_ok, 30),
        ("s3", s3_ok, 90),
        ("model", model_ok, 300),
        ("worker", worker_ok, 90),
        ("flower", flower_ok, 60),
        ("browse", browse_ok, 60),
    ]


def up(
    root: Path, ports: Ports, *, workers: int, model_base: Path, detach: bool, bf16: bool = False
) -> int:
    """Start every service; return when healthy (detach) or when stopped."""
    if bf16 and bf16_instructions() is None:
        raise StackError(NO_BF16)
    root = root.resolve()
    pidfile = root / "stack.pid"
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        raise StackError(
            f"the stack is already running (pid {pidfile.read_text().strip()}); `make down` first"
        )
    busy = [f"{n}={p}" for n, p in ports.all().items() if not port_free(p)]
    if busy:
        raise StackError(f"ports in use: {', '.join(busy)} (see README: troubleshooting)")
    if not any(p.name.isdigit() for p in model_base.glob("*")):
        raise StackError(
            f"no model version under {model_base}; run `serving export --out {model_base}`"
        )
    for sub in ("logs", "data/redis", "data/s3"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "s3.json").write_text(s3_config())
    # One volume per bucket instead of seven: quick to start on a small machine.
    (root / "data" / "s3" / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
    (root / "Procfile").write_text(
        procfile(root, ports, workers=workers, model_base=model_base, bf16=bf16)
    )
    env = {**os.environ, **env_for(ports), "PYTHONUNBUFFERED": "1"}
    # `source .stack/env` in a new shell: the services' addresses, and the
    # venv's commands (`producer`, `serving`, `celery`) on the PATH.
    venv_bin = shlex.quote(str(Path(sys.executable).parent))
    (root / "env").write_text(
        "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env_for(ports).items())
        + f'export PATH={venv_bin}:"$PATH"\n'
    )
    honcho_log = open(root / "logs" / "honcho.log", "ab")  # noqa: SIM115 - lives with the process
    honcho = subprocess.Popen(
        [_bin("honcho"), "start", "-f", str(root / "Procfile"), "-d", str(Path.cwd())],
        env=env,
        stdout=honcho_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pidfile.write_text(str(honcho.pid))
    try:
        for name, check, timeout in _checks(root, ports):
            print(f"  waiting for {name}...", flush=True)
            _wait(check, name, timeout, honcho)
    except BaseException:
        _stop(honcho.pid)
        pidfile.unlink(missing_ok=True)
        raise
    print(
        f"labelmill stack ready (logs in {root / 'logs'}):\n"
        f"  redis   redis://127.0.0.1:{ports.redis}/0\n"
        f"  s3      http://127.0.0.1:{ports.s3}  (key {LOCAL_ACCESS_KEY})\n"
        f"  model   127.0.0.1:{ports.model}  ({model_base})\n"
        f"  flower  http://127.0.0.1:{ports.flower}\n"
        f"  browse  http://127.0.0.1:{ports.browse}\n"
        f"  use it: source {root / 'env'}",
        flush=True,
    )
    if detach:
        return 0

    def stop(*_: object) -> None:
        # Only signal here: honcho stops its children, and wait() below reaps it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(honcho.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    code = honcho.wait()
    pidfile.unlink(missing_ok=True)
    return code


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _stop(pid: int, timeout: float = 60) -> None:
    """SIGTERM honcho's process group (honcho stops its children), then SIGKILL."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def down(root: Path) -> int:
    pidfile = root / "stack.pid"
    if not pidfile.exists():
        print("the stack is not running")
        return 0
    _stop(int(pidfile.read_text()))
    pidfile.unlink(missing_ok=True)
    print("the stack is stopped")
    return 0


def add_stack_options(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--model-base``, ``--port-base``: shared with ``labelmill.dev.demo``."""
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--model-base", type=Path, default=None, help="default: export one into DIR/models"
    )
    parser.add_argument(
        "--port-base", type=int, default=None, help="use consecutive ports from this one"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m labelmill.dev.stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path(".stack"))
    parser.add_argument("--detach", action="store_true")
    add_stack_options(parser)
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="serve in bfloat16 (serving local --bf16); refused on CPUs without AVX512_BF16/AMX",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "down":
            return down(args.dir)
        ports = Ports.from_base(args.port_base) if args.port_base else Ports()
        if args.bf16 and bf16_instructions() is None:
            raise StackError(NO_BF16)  # before a model export, not after
        model_base = args.model_base
        if model_base is None:
            model_base = args.dir.resolve() / "models" / "inception"
            ensure_model(model_base)
        return up(
            args.dir,
            ports,
            workers=args.workers,
            model_base=model_base,
            detach=args.detach,
            bf16=args.bf16,
        )
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
