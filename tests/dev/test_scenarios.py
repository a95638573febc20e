"""What a cluster does to a running job, on the local cluster running ``k8s/`` and ``keda/``.

One cluster for the module (``up --time-scale 60 --model-arch tiny``): KEDA's
and the HPA's intervals, windows and cooldowns run sixty times faster, so
the HPA follows a job's falling backlog within a second or two; grace
periods, probes, leases and Celery's own timeouts are real. Run these alone
with ``pytest -m cluster``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labelmill.dev.cluster.substitutions import MODELS_BUCKET, VENV_BIN
from labelmill.errors import ServiceError
from labelmill.hardware import bf16_instructions
from labelmill.model_client import ModelClient
from tests import images
from tests.dev.cluster import REPO, Cluster, assert_one_line_each, photos, requested_memory

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

WORKERS, MODEL_TIER = "workers", "tf-serving"
SERVING_PORT = 8500  # TF Serving's gRPC port, in the pod


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Room (by requests) for every fixed workload, three worker pods and two
    # model pods.
    memory = requested_memory()
    fixed = sum(m for n, m in memory.items() if n not in (WORKERS, MODEL_TIER))
    node = fixed + 3 * memory[WORKERS] + 2 * memory[MODEL_TIER]
    c = Cluster(tmp_path_factory.mktemp("cluster") / "c", "--node-memory", str(node),
                time_scale=60)  # fmt: skip
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _serving(c: Cluster) -> ModelClient:
    return ModelClient(c.env()["LABELMILL_MODEL_SERVER"], "inception", timeout_s=5)


def _worker_events(c: Cluster) -> list[dict[str, Any]]:
    return [e for e in c.events() if e["deployment"] == WORKERS]


def _scaled_in_while_busy(c: Cluster) -> bool:
    """The HPA removed workers, after its peak, while work was outstanding."""
    events = _worker_events(c)
    if not events:
        return False
    replicas = [e["replicas"] for e in events]
    peak = max(replicas)
    return any(
        e["replicas"] < peak and (e["outstanding"] or 0) > 0 for e in events[replicas.index(peak) :]
    )


@pytest.mark.timeout(400)
def test_scale_in_and_a_deleted_worker_pod_lose_nothing_and_count_nothing_twice(
    cluster: Cluster,
) -> None:
    c = cluster
    objects = photos(1200)
    bucket = c.bucket_of_images(objects)
    # The HPA scales in only once the backlog has stayed under what the tier
    # is sized for during its whole scale-down window; on a fast CPU a job
    # can drain within that window (1200 batches did, once). So more jobs
    # are enqueued whenever the backlog runs low, until a scale-in has been
    # seen with work outstanding. Their buckets are filled beforehand.
    more = photos(400)
    spare = [c.bucket_of_images(more) for _ in range(5)]
    job, _, _ = c.enqueue(bucket, "--batch-size", "1")
    jobs = [(job, bucket, objects)]
    # A worker pod that holds the job's batches is deleted: preStop, the
    # stop signal (Celery's soft shutdown), then SIGKILL after the grace period.
    pods = c.wait(lambda: c.ready_pods(WORKERS), timeout=120, what="a ready worker pod")
    c.ctl("delete", pods[0])
    ledger = c.ledger()
    while not _scaled_in_while_busy(c):
        c.wait(
            lambda: _scaled_in_while_busy(c) or ledger.outstanding_total() < 300,
            timeout=180,
            what="a scale-in with work outstanding, or the backlog running low",
        )
        if _scaled_in_while_busy(c):
            break
        assert spare, f"no scale-in with work outstanding: {_worker_events(c)}"
        extra = spare.pop()
        jobs.append((c.enqueue(extra, "--batch-size", "1")[0], extra, more))
    for job, bucket, objects in jobs:
        c.wait_done(job, timeout=240)
        assert_one_line_each(c, bucket, job, objects)


@pytest.mark.timeout(300)
def test_a_model_version_pushed_mid_job_is_served_to_the_next_job_only(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    env = c.env()
    new = tmp_path / "inception"
    subprocess.run(
        [str(VENV_BIN / "serving"), "export", "--out", str(new), "--version", "2",
         "--arch", "tiny", "--weights", "random", "--seed", "2"],
        env={**env, "TF_CPP_MIN_LOG_LEVEL": "3"}, check=True, capture_output=True, timeout=180,
    )  # fmt: skip
    objects = photos(200)
    bucket = c.bucket_of_images(objects)
    job, _, _ = c.enqueue(bucket, "--batch-size", "1")
    c.wait(lambda: c.job_status(job)["model"]["version"] == 1, timeout=120,
           what="the job pinned to version 1")  # fmt: skip
    subprocess.run(
        [sys.executable, str(REPO / "deploy/scripts/model_sync.py"), "push", str(new),
         f"s3://{MODELS_BUCKET}/models/inception"],
        env=env, check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    c.wait_done(job, timeout=240)
    lines = assert_one_line_each(c, bucket, job, objects)
    assert {r["model"]["version"] for r in lines} == {1}

    # The model-sync sidecar (every 30 s) brings version 2 to running pods and
    # TF Serving loads it beside version 1 (the two newest); a tier back at
    # zero fetches both when the next job wakes it. Either way the next job
    # pins version 2 once every ready pod serves it: the producer asks the
    # headless Service, that is whichever pod its channel picks, and each
    # pod's sidecar syncs on its own clock.
    def versions_of_every_ready_pod() -> str | list[dict[int, str]] | None:
        tier = c.tier(MODEL_TIER)
        if tier["replicas"] == 0 and not tier["pods"]:
            return "the tier at zero"
        seen = []
        for pod in tier["pods"]:
            if not pod["ready"]:
                continue
            try:
                with ModelClient(f"{pod['ip']}:{SERVING_PORT}", "inception", timeout_s=5) as client:
                    seen.append(client.model_versions())
            except ServiceError:
                return None
        return seen if seen and all(v.get(2) == "AVAILABLE" for v in seen) else None

    seen = c.wait(versions_of_every_ready_pod, timeout=120,
                  what="version 2 served by every ready pod (or the tier at zero)")  # fmt: skip
    if seen != "the tier at zero":  # the two newest stay loaded
        assert all(v.get(1) == "AVAILABLE" for v in seen), seen
    next_objects = photos(4)
    bucket2 = c.bucket_of_images(next_objects)
    job2, _, _ = c.enqueue(bucket2, "--batch-size", "2")
    c.wait_done(job2, timeout=180)
    assert {
        r["model"]["version"] for r in assert_one_line_each(c, bucket2, job2, next_objects)
    } == {2}


def _model_pods(c: Cluster) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in c.tier(MODEL_TIER)["pods"]}


@pytest.mark.timeout(300)
def test_a_tf_serving_rollout_mid_job_fails_no_batch_and_new_pods_take_the_traffic(
    cluster: Cluster,
) -> None:
    c = cluster
    objects = photos(300)
    bucket = c.bucket_of_images(objects)
    job, _, _ = c.enqueue(bucket, "--batch-size", "1")
    before = c.wait(lambda: [p for p, s in _model_pods(c).items() if s["ready"]], timeout=120,
                    what="a ready model pod")  # fmt: skip
    c.ctl("restart", f"deployment/{MODEL_TIER}")

    def rolled() -> bool:
        rs = c.tier(MODEL_TIER)["replica_sets"]
        pods = _model_pods(c)
        # One ReplicaSet left (the new one, at whatever count KEDA set) and
        # none of the old pods, not even terminating.
        return len(rs) == 1 and not set(before) & set(pods)

    c.wait(rolled, timeout=180, what="the rollout complete, the old pods gone")
    c.wait_done(job, timeout=120)
    assert_one_line_each(c, bucket, job, objects)
    # Only the new pods are left to serve: the next job runs on them.
    next_objects = photos(6)
    bucket2 = c.bucket_of_images(next_objects)
    job2, _, _ = c.enqueue(bucket2, "--batch-size", "2")
    c.wait_done(job2, timeout=60)
    assert_one_line_each(c, bucket2, job2, next_objects)


@pytest.mark.timeout(300)
def test_the_bf16_patch_serves_in_bfloat16_only_on_a_node_whose_cpu_has_it(
    cluster: Cluster,
) -> None:
    """``k8s/patches/tf-serving-bf16.yaml``, applied as ``kubectl patch --patch-file`` does.

    The patch lands on a model tier that KEDA has scaled to zero, so the pod
    that the job wakes is a patched one and stays up while the job runs plus
    the cooldown. (Patched mid-idle with an old pod still up, the new pod
    raced KEDA's scale to zero: a 20-image job ends on the old pod within a
    second, and the patched pod could be deleted before it was ever ready.)
    """
    c = cluster
    c.wait(lambda: c.tier(MODEL_TIER)["replicas"] == 0, timeout=120,
           what="the model tier scaled to zero")  # fmt: skip
    before = {rs["hash"] for rs in c.tier(MODEL_TIER)["replica_sets"]}
    c.ctl("patch", f"deployment/{MODEL_TIER}", "--patch-file",
          str(REPO / "k8s" / "patches" / "tf-serving-bf16.yaml"))  # fmt: skip
    undone = False
    try:
        objects = photos(20)
        bucket = c.bucket_of_images(objects)
        job, _, _ = c.enqueue(bucket, "--batch-size", "2")

        def patched_pods() -> list[dict[str, Any]]:
            old = tuple(f"{MODEL_TIER}-{h}-" for h in before)
            return [p for p in c.tier(MODEL_TIER)["pods"] if not p["name"].startswith(old)]

        if bf16_instructions() is None:
            # NFD gives this node no AVX512BF16 label: the patched pod waits
            # for a node that has one.
            c.wait(
                lambda: any(
                    "didn't match Pod's node affinity/selector" in p["reason"]
                    for p in patched_pods()
                ),
                timeout=60,
                what="the patched model pod Pending on its node selector",
            )
            c.ctl("undo", f"deployment/{MODEL_TIER}")  # the job then runs on fp32 pods
            undone = True
        else:
            # KEDA may run one or two model pods for the job: each is patched
            # (the old ReplicaSet is at zero).
            ready = c.wait(lambda: [p for p in patched_pods() if p["ready"]], timeout=120,
                           what="a patched model pod ready")  # fmt: skip
            pid = ready[0]["containers"][MODEL_TIER]["pid"]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"--mixed_precision=bfloat16" in argv
        c.wait_done(job, timeout=180)
        assert_one_line_each(c, bucket, job, objects)
    finally:
        if not undone:
            c.ctl("undo", f"deployment/{MODEL_TIER}")


@pytest.mark.timeout(360)
def test_an_oom_killed_worker_container_restarts_and_its_batches_run_again_within_2_minutes(
    cluster: Cluster,
) -> None:
    """The kernel kills at the limit (the cgroup, not the test); nothing else is faked.

    A patch lowers the worker container's limit and lifts the worker's own
    memory budget (which would otherwise keep it under the limit), and huge
    PNGs (no draft decoding) do the rest; ``undo`` then rolls the manifest's
    own settings back out, as an operator would.
    """
    c = cluster
    small = {"requests": {"memory": "256Mi"}, "limits": {"memory": "384Mi"}}
    budget = {"name": "LABELMILL_MEMORY_BUDGET_MB", "value": "8192"}
    worker = {"name": "worker", "resources": small, "env": [budget]}
    patch = {"spec": {"template": {"spec": {"containers": [worker]}}}}
    c.ctl("patch", f"deployment/{WORKERS}", "-p", json.dumps(patch))

    def rolled_out() -> bool:
        # Only the patched template's ReplicaSet, and no pod of an older one
        # left to take the job with the manifest's own limit (a terminating
        # worker takes no new batch: Celery's shutdown stops its consumer).
        tier = c.tier(WORKERS)
        *older, rs = tier["replica_sets"]
        return all(r["replicas"] == 0 for r in older) and all(
            p["name"].startswith(f"{WORKERS}-{rs['hash']}-") or p["phase"] == "Terminating"
            for p in tier["pods"]
        )

    c.wait(rolled_out, timeout=120, what="the patched workers rolled out")
    objects = {f"in/big-{i}.png": images.blank_png(9500, 9500) for i in range(4)}
    objects |= {f"in/small-{i}.jpg": images.jpeg(96, 64, seed=i) for i in range(4)}
    bucket = c.bucket_of_images(objects)
    job, _, _ = c.enqueue(bucket, "--batch-size", "4")

    def oom_killed() -> str | None:
        for pod in c.tier(WORKERS)["pods"]:
            worker = pod["containers"]["worker"]
            if worker["last_reason"] == "OOMKilled":
                return str(pod["name"])
        return None

    pod = c.wait(oom_killed, timeout=180, what="a worker container OOM-killed")
    c.wait(lambda: any(p["name"] == pod and p["restarts"] >= 1 for p in c.tier(WORKERS)["pods"]),
           timeout=60, what=f"{pod} restarted")  # fmt: skip
    c.ctl("undo", f"deployment/{WORKERS}")
    c.wait_done(job, timeout=120)  # the dead container's batches ran again elsewhere
    assert_one_line_each(c, bucket, job, objects)
