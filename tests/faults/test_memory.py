"""A worker in a memory cgroup at the manifest's limit, fed 100-megapixel images.

The worker runs as k8s/40-workers.yaml runs it: the container's memory limit
becomes the cgroup's, its ``--concurrency`` the pool size, and nothing else
is set, so the worker derives its memory budget from the cgroup itself. Each
of two pool processes gets a batch of four 100-megapixel PNGs (400 MB each
once decoded): unbounded, its eight fetch threads would decode them together
and the kernel would kill the worker. The test checks that it is not killed
and that every image gets its line.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.faults.helpers import check_job, put_many
from tests.fixtures.cgroup import memory_cgroup, quantity_bytes
from tests.fixtures.stack import Pipeline
from tests.k8s.conftest import find

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SIDE = 10_000  # 100 megapixels


def worker_container() -> dict[str, Any]:
    pod = find("Deployment", "workers")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return dict(container)


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A 10,000 x 10,000 RGB PNG of smooth gradients: a few MB encoded, 400 MB decoded."""
    ramp = np.linspace(0, 255, SIDE, dtype=np.float32)
    rows = np.broadcast_to(ramp[:, None], (SIDE, SIDE)).astype(np.uint8)
    cols = np.broadcast_to(ramp[None, :], (SIDE, SIDE)).astype(np.uint8)
    img = Image.merge("RGB", [Image.fromarray(a) for a in (rows, cols, rows[::-1])])
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def test_a_worker_at_the_manifest_s_memory_limit_survives_100_megapixel_images(
    pipeline: Pipeline, huge_png: bytes
) -> None:
    p = pipeline
    container = worker_container()
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    concurrency = next(
        int(a.split("=", 1)[1]) for a in container["command"] if a.startswith("--concurrency=")
    )
    inputs = put_many(p, {f"huge/{i:02d}.png": huge_png for i in range(4 * concurrency)})
    out = f"s3://{p.bucket}/out/"
    job = p.enqueue(f"s3://{p.bucket}/huge/", out, "--batch-size", "4")["job_id"]
    with memory_cgroup(limit) as cgroup:
        worker = p.start_worker(concurrency=concurrency, wrap=cgroup.wrap)
        try:
            p.wait_done(job, timeout=300)
            assert worker.alive(), "the worker died"
        finally:
            p.stop_workers()
        assert cgroup.oom_kills() == 0, "the kernel killed a worker process"
        peak = cgroup.peak_bytes()
    checked = check_job(p, job, inputs, out)
    assert all(r["status"] == "ok" for r in checked.output.lines)
    text = Path(worker.log_path).read_text(errors="replace")
    assert "memory budget" in text and f"container limit {limit // 2**20} MiB" in text
    assert peak < limit
