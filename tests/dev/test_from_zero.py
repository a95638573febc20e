"""``k8s/`` and ``keda/`` on the local cluster: from zero, and on a node too small.

One cluster for the module (``up --time-scale 20 --model-arch tiny``): KEDA's
and the HPA's intervals, windows and cooldowns run twenty times faster;
grace periods, probes and Celery's own timeouts are real. The node has room
for one model pod and four workers, not for two model pods: the second
one the HPA asks for stays Pending. Run these alone with ``pytest -m cluster``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.dev.cluster import (
    Cluster,
    assert_one_line_each,
    manifests,
    photos,
    requested_memory,
)

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


SCALED = {name: doc["spec"] for name, doc in manifests("keda", "ScaledObject").items()}
TIERS = tuple(sorted(spec["scaleTargetRef"]["name"] for spec in SCALED.values()))
MODEL_TIER = "tf-serving"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # Room (by requests) for every fixed workload, one model pod and four
    # worker pods: never for a second model pod, whichever pods the
    # scheduler places first (kube-scheduler's queue sorts by priority, then
    # by the time a pod was queued: pkg/scheduler/framework/plugins/
    # queuesort/priority_sort.go, Less), so four workers must need less
    # than a model pod.
    memory = requested_memory()
    fixed = sum(m for n, m in memory.items() if n not in TIERS)
    assert 4 * memory["workers"] < memory[MODEL_TIER], "the node would fit two model pods"
    node = fixed + memory[MODEL_TIER] + 4 * memory["workers"]
    c = Cluster(tmp_path_factory.mktemp("cluster") / "c", "--node-memory", str(node), time_scale=20)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _at_zero(c: Cluster) -> bool:
    """The autoscaler set 0 and no pod of either tier is left but terminating ones."""
    return all(
        c.tier(t)["replicas"] == 0 and all(p["phase"] == "Terminating" for p in c.tier(t)["pods"])
        for t in TIERS
    )


def _scaled_up(c: Cluster, tier: str) -> bool:
    return any(
        e["deployment"] == tier and e["replicas"] >= 1 and e["ready"] >= 1 for e in c.events()
    )


@pytest.mark.timeout(300)
def test_from_zero_both_tiers_scale_up_finish_the_job_and_return_to_zero(
    cluster: Cluster,
) -> None:
    c = cluster
    assert len(TIERS) == 2 and MODEL_TIER in TIERS
    # The Deployments start at 1 (no replicas field); KEDA takes both to 0.
    c.wait(lambda: _at_zero(c), timeout=60, what="both scaled tiers at zero")
    small = photos(6)
    bucket = c.bucket_of_images(small)
    job, result, _ = c.enqueue(bucket, "--batch-size", "2")
    assert result["model_version"] is None  # nothing served a version: enqueue did not wait
    c.wait(lambda: all(_scaled_up(c, t) for t in TIERS), timeout=120,
           what="both tiers scaled up and ready")  # fmt: skip
    c.wait_done(job, timeout=120)
    assert_one_line_each(c, bucket, job, small)
    c.wait(lambda: _at_zero(c), timeout=120, what="both tiers back at zero")


@pytest.mark.timeout(300)
def test_on_a_node_too_small_the_second_model_pod_stays_pending_and_the_job_completes(
    cluster: Cluster,
) -> None:
    c = cluster
    target = int(SCALED[MODEL_TIER]["triggers"][0]["metadata"]["listLength"])
    n = target * 2  # one batch per image: the HPA asks for two model pods
    many = photos(n)
    bucket = c.bucket_of_images(many)
    job, _, _ = c.enqueue(bucket, "--batch-size", "1")

    def one_serving_one_pending() -> list[dict[str, Any]] | None:
        # Both may be Pending for a while: the last job's model pod still
        # holds its memory while it terminates.
        tier = c.tier(MODEL_TIER)
        pending = [p for p in tier["pods"] if p["phase"] == "Pending"]
        return pending if tier["replicas"] >= 2 and tier["ready"] == 1 and pending else None

    pending = c.wait(one_serving_one_pending, timeout=120, what="one model pod up, one Pending")
    assert [p["reason"] for p in pending] == [
        "Unschedulable: 0/1 nodes are available: 1 Insufficient memory"
    ]
    c.wait_done(job, timeout=180)
    assert_one_line_each(c, bucket, job, many)
    model = [e for e in c.events() if e["deployment"] == MODEL_TIER]
    assert max(e["ready"] for e in model) == 1
    assert any(e["replicas"] >= 2 and e["pending"] >= 1 for e in model)
