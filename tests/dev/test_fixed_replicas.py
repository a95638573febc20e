"""``k8s/`` alone on the local cluster: every pod runs, a job completes, ``down`` stops all.

Without ``keda/`` nothing sets the replica counts, so each Deployment runs
what the API server would give it: ``spec.replicas``, or 1 where the
manifest leaves it out (the same as ``kubectl apply -f k8s/`` on a real
cluster before KEDA is installed).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from tests import images
from tests.dev.cluster import (
    CLI,
    REPO,
    Cluster,
    alive,
    assert_one_line_each,
    manifests,
    photos,
)
from tests.fixtures.procs import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.integration]


def _expected_replicas() -> dict[str, int]:
    """Each workload of k8s/ and the count the API server gives it (defaults.go: 1)."""
    return {
        name: int(doc["spec"].get("replicas", 1))
        for name, doc in manifests("k8s", "Deployment", "StatefulSet").items()
    }


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    no_keda = tmp_path_factory.mktemp("no-keda")
    # A node with room for one pod of each workload (their requests add up to
    # about 6Gi); what a node too small does is tested with the autoscaler.
    c = Cluster(
        tmp_path_factory.mktemp("cluster") / "c", "--keda", str(no_keda), "--node-memory", "8Gi"
    )
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_every_workload_runs_its_replicas_and_reports_ready(cluster: Cluster) -> None:
    c = cluster
    expected = _expected_replicas()
    assert expected, "k8s/ declares no workload"

    def all_ready() -> bool:
        tiers = c.status()["deployments"]
        return all(tiers[n]["ready"] == k for n, k in expected.items())

    c.wait(all_ready, timeout=120, what="every workload ready")
    tiers = c.status()["deployments"]
    assert {n: t["replicas"] for n, t in tiers.items()} == expected
    res = subprocess.run(
        [*CLI, "status", "--dir", str(c.root)], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    for name, tier in tiers.items():
        for pod in tier["pods"]:
            line = next(x for x in res.stdout.splitlines() if pod["name"] in x)
            assert "Running" in line and "restarts 0" in line, res.stdout
        assert f"/{name}: {expected[name]}/{expected[name]} ready" in res.stdout


def test_every_container_runs_in_the_nodes_memory_cgroup(cluster: Cluster) -> None:
    """kubepods at the node's allocatable memory, each container below it at its limit."""
    node = cluster.status()["node"]
    root = node["memory_cgroup"]
    if root is None:
        why = "no memory cgroup can be made here (up said so)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    limit = Path(root, "memory.max" if v2 else "memory.limit_in_bytes").read_text()
    assert int(limit) == node["allocatable"]["memory"]
    containers = [
        (pod["name"], name, c["pid"])
        for tier in cluster.status()["deployments"].values()
        for pod in tier["pods"]
        for name, c in pod["containers"].items()
        if c["pid"]
    ]
    assert containers
    for pod, name, pid in containers:
        own = Path(f"/proc/{pid}/cgroup").read_text()
        assert f"/pod-{pod}/{name}\n" in own, (pod, name, own)


def test_a_job_enqueued_with_dir_env_gets_one_line_per_image(cluster: Cluster) -> None:
    c = cluster
    photos = {f"in/img-{i:02d}.jpg": images.jpeg(320, 240, seed=i) for i in range(9)}
    bucket = c.bucket_of_images(photos)
    job, result, _ = c.enqueue(bucket, "--batch-size", "4")
    assert result["model_version"] == 1
    c.wait_done(job, timeout=120)
    assert_one_line_each(c, bucket, job, photos)


def test_a_killed_container_is_restarted_and_status_says_how_it_ended(cluster: Cluster) -> None:
    c = cluster
    (pod,) = c.ready_pods("workers")
    c.ctl("kill", pod, "--container", "worker")

    def restarted() -> dict[str, object] | None:
        found = [p for p in c.tier("workers")["pods"] if p["name"] == pod]
        worker = found[0]["containers"]["worker"] if found else None
        return worker if worker and worker["restarts"] == 1 and found[0]["ready"] else None

    worker = c.wait(restarted, timeout=120, what=f"{pod} restarted and ready")
    # SIGKILL: the runtime reports 128 + 9, and the kubelet the reason Error.
    assert worker["last_exit"] == 137 and worker["last_reason"] == "Error"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def test_workers_dial_the_headless_model_service_by_dns_and_follow_a_replaced_pod(
    cluster: Cluster,
) -> None:
    """tf-serving is headless: the workers' channel resolves every ready model pod.

    Nothing stands between a worker and a model pod (no proxy), so a job that
    completes after the model pod was replaced shows that the worker's own
    channel found the new pod's address.
    """
    c = cluster
    worker = c.tier("workers")["pods"][0]["containers"]["worker"]
    target = _environ(worker["pid"])["LABELMILL_MODEL_SERVER"]
    m = re.fullmatch(r"dns://([\d.]+):(\d+)/([\w.-]+):(\d+)", target)
    assert m, target
    server, port, name = m.group(1), int(m.group(2)), m.group(3)
    assert f"{server}:{port}" == json.loads((c.root / "cluster.json").read_text())["dns"]

    def answer() -> list[str]:
        reply = dns.query.udp(dns.message.make_query(name, "A"), server, port=port, timeout=5)
        return sorted(r.address for rrset in reply.answer for r in rrset)

    def one_ready_pod_answered() -> str | None:
        ready = sorted(p["ip"] for p in c.tier("tf-serving")["pods"] if p["ready"])
        return ready[0] if len(ready) == 1 and answer() == ready else None

    first = c.wait(one_ready_pod_answered, timeout=60, what="DNS answers the ready model pod")
    (pod,) = c.ready_pods("tf-serving")
    c.ctl("delete", pod)
    c.wait(lambda: first not in answer(), timeout=30, what="the deleted pod out of DNS")
    second = c.wait(
        lambda: (ip := one_ready_pod_answered()) != first and ip,
        timeout=180,
        what="the replacement pod ready and in DNS",
    )
    assert second != first
    objects = photos(4)
    bucket = c.bucket_of_images(objects)
    job, _, _ = c.enqueue(bucket, "--batch-size", "2")
    c.wait_done(job, timeout=120)
    assert_one_line_each(c, bucket, job, objects)


def test_down_stops_every_process_it_started(cluster: Cluster) -> None:
    c = cluster
    pids = c.pids()
    assert len(pids) > 2
    c.ctl("down", timeout=200)
    assert c.proc is not None and c.proc.wait(timeout=30) == 0
    wait_until(lambda: not any(alive(p) for p in pids), timeout=30, what="every pod gone")
    assert not (c.root / "ready").exists()
