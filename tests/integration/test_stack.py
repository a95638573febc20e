"""`python -m labelmill.dev.stack up/down`: the whole local stack as processes."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest

from labelmill.dev.stack import Ports, port_free
from tests import images
from tests.fixtures.procs import wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _free_block(n: int = len(fields(Ports))) -> int:
    """A base port whose n consecutive ports (and their +10000 twins) are free."""
    # A random start, so that two test runs on one machine do not collide.
    start = random.randrange(20000, 28000)
    for base in range(start, start + 8000, 37):
        ports = [base + i for i in range(n)] + [base + i + 10000 for i in range(n)]
        if all(port_free(p) for p in ports):
            return base
    raise RuntimeError("no free port block")


def _env(stack_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for line in (stack_dir / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        if key != "PATH":  # the venv's commands: tested in a new shell below
            env[key] = shlex.split(value)[0]
    return env


def test_stack_up_runs_a_job_and_down_stops_only_its_processes(
    tmp_path: Path, tiny_model_base: Path, redis_server: object
) -> None:
    stack_dir = tmp_path / "stack"
    base = _free_block()
    ports = Ports.from_base(base)
    cmd = [sys.executable, "-m", "labelmill.dev.stack"]
    up = subprocess.run(
        [*cmd, "up", "--detach", "--dir", str(stack_dir), "--port-base", str(base),
         "--workers", "1", "--model-base", str(tiny_model_base)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "labelmill stack ready" in up.stdout
        for name in ("redis", "s3", "model", "worker", "flower", "browse"):
            assert (stack_dir / "logs" / f"{name}.log").exists()
        assert (stack_dir / "data" / "redis" / "appendonlydir").exists()  # AOF on

        # A second `up` refuses: the stack is already running.
        again = subprocess.run([*cmd, "up", "--detach", "--dir", str(stack_dir)],
                               cwd=REPO, capture_output=True, text=True, check=False)  # fmt: skip
        assert again.returncode == 2 and "already running" in again.stderr

        # A real job through the stack's own services.
        src = tmp_path / "photos"
        src.mkdir()
        for i in range(5):
            (src / f"p{i}.jpg").write_bytes(images.jpeg(64, 48, seed=i))
        env = _env(stack_dir)
        run = subprocess.run(
            [sys.executable, "-m", "producer", "enqueue", str(src), "--output",
             str(tmp_path / "labels"), "--json"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        job = json.loads(run.stdout)["job_id"]
        watch = subprocess.run(
            [sys.executable, "-m", "producer", "watch", job, "--json", "--interval", "0.2"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert watch.returncode == 0, watch.stderr
        assert json.loads(watch.stdout.splitlines()[-1])["images"]["ok"] == 5

        with urllib.request.urlopen(f"http://127.0.0.1:{ports.flower}/", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{ports.browse}/jobs/{job}") as r:
            assert r.status == 200 and job in r.read().decode()

        # The commands the stack and the demo print work as printed in a new
        # shell that sourced the env file: nothing else on its PATH.
        shell = subprocess.run(
            ["bash", "-c", f"source {shlex.quote(str(stack_dir / 'env'))} && "
             f"producer status {job} --json"],
            cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert shell.returncode == 0, shell.stderr
        assert json.loads(shell.stdout)["state"] == "done"
    finally:
        down = subprocess.run([*cmd, "down", "--dir", str(stack_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert down.returncode == 0
    wait_until(
        lambda: all(
            port_free(p) for p in (ports.redis, ports.s3, ports.model, ports.flower, ports.browse)
        ),
        timeout=30,
        what="the stack's ports to be released",
    )
    # Only what it started: the test session's own Redis is still up.
    assert redis_server.client().ping()  # type: ignore[attr-defined]


def test_the_demo_labels_its_sample_photographs_and_says_the_weights_are_random(
    tmp_path: Path, tiny_model_base: Path
) -> None:
    """``make demo``'s program, on the tiny model (random weights) and ports of its own."""
    from labelmill.dev.demo import SAMPLES

    stack_dir = tmp_path / "stack"
    cmd = [sys.executable, "-m", "labelmill.dev.stack"]
    try:
        demo = subprocess.run(
            [sys.executable, "-m", "labelmill.dev.demo", "--dir", str(stack_dir),
             "--port-base", str(_free_block()), "--model-base", str(tiny_model_base),
             "--workers", "1"],
            cwd=REPO, env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True,
            timeout=300, check=False,
        )  # fmt: skip
        assert demo.returncode == 0, demo.stdout + demo.stderr
        rows = {
            cells[0]: cells[1:]
            for line in demo.stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 3
        }
        shown = {name for name in rows if name != "image"}
        extra = {"chelsea-12mp.jpg", "astronaut.png", "broken.jpg"}
        assert shown == {f"{name}.jpg" for name in SAMPLES} | extra, demo.stdout
        assert rows["broken.jpg"][0].startswith("error:"), rows["broken.jpg"]
        assert all(
            float(score) > 0 for name, (_, score) in rows.items() if name in shown - {"broken.jpg"}
        )
        assert "RANDOM weights" in demo.stdout
    finally:
        down = subprocess.run([*cmd, "down", "--dir", str(stack_dir)], cwd=REPO,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert down.returncode == 0, down.stderr
