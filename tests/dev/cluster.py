"""Driving ``python -m labelmill.dev.cluster`` from tests: start, wait, ask, stop.

Everything goes through the cluster's own interface, as a user would use
it: its command line (``up``, ``kill``, ``delete``, ``down``), the files it
writes in DIR (``env``, ``status.json``, ``events.jsonl``) and the
``producer`` command run with DIR/env.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3
import yaml

from labelmill.dev.cluster.node import pod_resources
from labelmill.job import Ledger
from tests import images
from tests.fixtures.procs import GiveUp, wait_until

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "labelmill.dev.cluster"]
PRODUCER = str(Path(sys.executable).parent / "producer")
UP_TIMEOUT_S = 180.0


class Cluster:
    """One ``up`` process, its DIR, and helpers to talk to what runs in it."""

    def __init__(self, root: Path, *args: str, time_scale: float = 10) -> None:
        self.root = root
        self.args = args
        self.time_scale = time_scale
        self.log = root.parent / "up.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life --------------------------------------------------------------
    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "up", "--dir", str(self.root), "--time-scale", str(self.time_scale),
                 "--model-arch", "tiny", *self.args],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.wait(lambda: (self.root / "ready").exists(), timeout=UP_TIMEOUT_S, what="up ready")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=200)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait(self, condition: Any, *, timeout: float, what: str) -> Any:
        """Wait for ``condition``; fail at once if ``up`` died, with its log."""

        def check() -> Any:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise GiveUp(f"up exited ({self.proc.returncode}):\n{self.tail()}")
            return condition()

        try:
            return wait_until(check, timeout=timeout, interval=0.25, what=what)
        except TimeoutError as exc:
            raise AssertionError(
                f"{exc}\n--- up ---\n{self.tail()}\n--- scaled objects ---\n{self._scalers()}"
            ) from None

    def _scalers(self) -> str:
        """KEDA's last poll per ScaledObject (metric, activity, reason or trigger error)."""
        try:
            return json.dumps(self.status().get("scaledobjects"), indent=1)
        except (OSError, ValueError) as exc:
            return f"status.json unreadable: {exc}"

    # -- what it reports ------------------------------------------------------
    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / "status.json").read_text())
        return data

    def tier(self, name: str) -> dict[str, Any]:
        tier: dict[str, Any] = self.status()["deployments"][name]
        return tier

    def at_zero(self, *names: str) -> bool:
        return all(self.tier(n)["replicas"] == 0 and not self.tier(n)["pods"] for n in names)

    def ready_pods(self, name: str) -> list[str]:
        return [p["name"] for p in self.tier(name)["pods"] if p.get("ready")]

    def events(self) -> list[dict[str, Any]]:
        path = self.root / "events.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def env(self) -> dict[str, str]:
        """The calling environment plus DIR/env, as after ``source DIR/env``."""
        out = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "LABELMILL_"))}
        for line in (self.root / "env").read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = subprocess.run(
                ["sh", "-c", f"printf %s {value}"], capture_output=True, text=True, check=True
            ).stdout
        return out

    def pids(self) -> list[int]:
        pids = [
            container["pid"]
            for tier in self.status()["deployments"].values()
            for pod in tier["pods"]
            for container in pod["containers"].values()
            if container["pid"]
        ]
        info = json.loads((self.root / "cluster.json").read_text())
        return [*pids, info["s3_pid"], info["pid"]]

    # -- acting on it ---------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60) -> None:
        res = subprocess.run(
            [*CLI, *args, "--dir", str(self.root)], cwd=REPO, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert res.returncode == 0, f"{args}: {res.stdout}{res.stderr}"

    def producer(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PRODUCER, *args], env=self.env(), capture_output=True, text=True, timeout=timeout
        )

    def ledger(self) -> Ledger:
        return Ledger.from_url(self.env()["LABELMILL_REDIS_URL"])

    def s3(self) -> Any:
        env = self.env()
        return boto3.client(
            "s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    # -- jobs -------------------------------------------------------------------
    def bucket_of_images(self, images: dict[str, bytes]) -> str:
        s3 = self.s3()
        bucket = f"lm-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        for key, body in images.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        return bucket

    def enqueue(self, bucket: str, *args: str) -> tuple[str, dict[str, Any], str]:
        """Enqueue ``s3://bucket/in/``; return the job id, its --json result and stderr."""
        job = f"j-{uuid.uuid4().hex[:8]}"
        res = self.producer(
            "enqueue", f"s3://{bucket}/in/", "--output", f"s3://{bucket}/out/",
            "--job-id", job, "--json", *args,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr
        return job, json.loads(res.stdout.strip().splitlines()[-1]), res.stderr

    def job_status(self, job: str) -> dict[str, Any]:
        res = self.producer("status", job, "--json", timeout=60)
        assert res.returncode == 0, res.stderr
        st: dict[str, Any] = json.loads(res.stdout)
        return st

    def wait_done(self, job: str, *, timeout: float) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            st = self.job_status(job)
            return st if st["state"] == "done" else None

        result: dict[str, Any] = self.wait(done, timeout=timeout, what=f"job {job} done")
        return result

    def lines(self, bucket: str, job: str) -> list[dict[str, Any]]:
        s3 = self.s3()
        out: list[dict[str, Any]] = []
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"out/{job}/part-"
        )  # more than one page of 1000 part files in some scenarios
        for page in pages:
            for obj in page.get("Contents", []):
                body = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read().decode()
                out += [json.loads(line) for line in body.splitlines()]
        return out


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def manifests(folder: str, *kinds: str) -> dict[str, dict[str, Any]]:
    """The objects of these kinds in ``REPO/folder/*.yaml``, by name (as ``kubectl apply -f``)."""
    out = {}
    for path in sorted((REPO / folder).glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") in kinds:
                out[doc["metadata"]["name"]] = doc
    return out


def requested_memory() -> dict[str, int]:
    """Each workload of k8s/ and the memory one of its pods requests (PodRequests)."""
    return {
        name: pod_resources(doc["spec"]["template"]["spec"]).memory
        for name, doc in manifests("k8s", "Deployment", "StatefulSet").items()
    }


def photos(n: int, prefix: str = "in") -> dict[str, bytes]:
    """``n`` small JPEGs under ``prefix/``."""
    return {f"{prefix}/img-{i:04d}.jpg": images.jpeg(96, 64, seed=i) for i in range(n)}


def assert_one_line_each(
    c: Cluster, bucket: str, job: str, objects: Mapping[str, bytes]
) -> list[dict[str, Any]]:
    """One line per object, none failed, and the job's counts agree with the lines."""
    lines = c.lines(bucket, job)
    assert Counter(str(r["uri"]) for r in lines) == Counter(f"s3://{bucket}/{k}" for k in objects)
    # (This module is not rewritten by pytest: the failures go in the message.)
    failed = [r for r in lines if r["status"] != "ok"]
    assert failed == [], failed[:5]
    st = c.job_status(job)
    n = len(objects)
    assert st["images"] == {"total": n, "ok": n, "error": 0, "skipped": 0, "carried": 0}
    assert st["batches"]["dead"] == 0
    return lines
