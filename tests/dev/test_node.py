"""The local cluster's node: quantities, pod requests, the scheduler's fit, memory cgroups."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from labelmill.dev.cluster.clusterdns import PodAddresses
from labelmill.dev.cluster.kubelet import Pod, PodContext
from labelmill.dev.cluster.node import (
    CgroupError,
    MemoryCgroups,
    Node,
    QuantityError,
    Resources,
    cpu_millis,
    machine_memory_available,
    memory_bytes,
    node_labels,
    parse_quantity,
    pod_memory_limit,
    pod_resources,
    schedule,
)
from tests.dev.cluster import CLI, REPO
from tests.fixtures.procs import wait_until

Mi, Gi = 2**20, 2**30


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("250m", Decimal("0.25")),
        ("4", Decimal(4)),
        ("1.5", Decimal("1.5")),
        ("512Mi", Decimal(512 * Mi)),
        ("4Gi", Decimal(4 * Gi)),
        ("1G", Decimal(10**9)),
        ("1k", Decimal(1000)),
        ("1e3", Decimal(1000)),
        ("100n", Decimal("1E-7")),
    ],
)
def test_quantities_parse_as_apimachinery_does(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["4GB", "Gi", "1.2.3", "", "4 Gi", "-"])
def test_what_is_no_quantity_is_refused(text: str) -> None:
    with pytest.raises(QuantityError):
        parse_quantity(text)


def test_cpu_and_memory_round_up() -> None:
    assert cpu_millis("250m") == 250 and cpu_millis("0.0001") == 1 and cpu_millis(2) == 2000
    assert memory_bytes("1.5Ki") == 1536 and memory_bytes("0.5") == 1


def _c(name: str, req: dict[str, str] | None = None, lim: dict[str, str] | None = None,
       **extra: Any) -> dict[str, Any]:  # fmt: skip
    res: dict[str, Any] = {}
    if req:
        res["requests"] = req
    if lim:
        res["limits"] = lim
    return {"name": name, "resources": res, **extra}


def test_pod_requests_add_sidecars_and_take_the_largest_init_container() -> None:
    spec = {
        "initContainers": [
            _c("fetch", {"cpu": "1", "memory": "3Gi"}),  # alone: 1 cpu, 3Gi
            _c("sync", {"cpu": "100m", "memory": "128Mi"}, restartPolicy="Always"),
            _c("late", {"cpu": "2", "memory": "1Gi"}),  # with the sidecar: 2.1 cpu, 1.125Gi
        ],
        "containers": [
            _c("main", {"cpu": "500m", "memory": "1Gi"}),
            _c("limits-only", lim={"cpu": "250m", "memory": "256Mi"}),  # requests = limits
        ],
    }
    # containers + sidecar: 0.85 cpu, 1.375Gi; the init maxima: 2.1 cpu, 3Gi.
    assert pod_resources(spec) == Resources(2100, 3 * Gi)
    assert pod_memory_limit(spec) is None  # not every container has a limit


def test_the_pod_memory_limit_is_the_sum_when_every_container_has_one() -> None:
    spec = {
        "initContainers": [_c("sync", lim={"memory": "512Mi"}, restartPolicy="Always")],
        "containers": [_c("a", lim={"memory": "1Gi"}), _c("b", lim={"memory": "256Mi"})],
    }
    assert pod_memory_limit(spec) == 1792 * Mi


@dataclass
class FakePod:
    name: str
    requests: Resources
    created: float
    bound: bool = False
    unschedulable: str = ""
    node_selector: dict[str, str] = field(default_factory=dict)
    deleted: bool = False
    finished: bool = False
    binds: list[str] = field(default_factory=list)

    def bind(self) -> None:
        self.bound = True

    def gone(self) -> bool:
        return self.finished

    def being_deleted(self) -> bool:
        return self.deleted


def test_pods_bind_only_while_their_requests_fit_and_a_big_one_does_not_block_small_ones() -> None:
    node = Node("n", Resources(16000, 8 * Gi))
    running = FakePod("running", Resources(1000, 3 * Gi), 0, bound=True)
    big = FakePod("big", Resources(4000, 6 * Gi), 1)
    small = FakePod("small", Resources(500, 1 * Gi), 2)
    newly = schedule(node, [running, big, small])
    assert [p.name for p in newly] == ["big"]
    assert not big.bound and big.unschedulable == "0/1 nodes are available: 1 Insufficient memory"
    assert small.bound
    assert schedule(node, [running, big, small]) == []  # said once, still Pending
    assert not big.bound
    running.finished = small.finished = True  # their memory is free again
    schedule(node, [running, big, small])
    assert big.bound


def test_cpu_is_checked_like_memory() -> None:
    node = Node("n", Resources(4000, 64 * Gi))
    pods = [FakePod("a", Resources(4000, Gi), 0), FakePod("b", Resources(50, Gi), 1)]
    schedule(node, pods)
    assert pods[0].bound and not pods[1].bound
    assert pods[1].unschedulable.endswith("1 Insufficient cpu")


def test_a_node_selector_the_node_does_not_match_keeps_the_pod_pending() -> None:
    node = Node("n", Resources(4000, 64 * Gi), node_labels("n", ["avx2", "avx512f"]))
    bf16 = {"feature.node.kubernetes.io/cpu-cpuid.AVX512BF16": "true"}
    avx2 = {"feature.node.kubernetes.io/cpu-cpuid.AVX2": "true", "kubernetes.io/os": "linux"}
    pods = [FakePod("bf16", Resources(50, Gi), 0, node_selector=bf16),
            FakePod("avx2", Resources(50, Gi), 1, node_selector=avx2)]  # fmt: skip
    assert schedule(node, pods) == [pods[0]]
    assert not pods[0].bound and pods[1].bound
    assert pods[0].unschedulable == (
        "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector"
    )
    # On a CPU with bfloat16 instructions NFD labels the node, and the pod fits.
    node = Node("n", Resources(4000, 64 * Gi), node_labels("n", ["avx512f", "avx512_bf16"]))
    schedule(node, pods)
    assert pods[0].bound


def _cgroups(limit: int) -> MemoryCgroups:
    try:
        return MemoryCgroups(limit)
    except CgroupError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


HOG = "b = bytearray(400 * 2**20); b[::4096] = b'x' * len(b[::4096]); print('survived')"


@contextmanager
def _one_container_pod(
    tmp_path: Path, name: str, code: str, logs: list[str]
) -> Iterator[tuple[Pod, MemoryCgroups]]:
    """A bound pod of one worker-image container running ``python -c code`` at 128Mi."""
    cgroups = _cgroups(1 * Gi)
    ctx = PodContext(
        root=tmp_path, namespace="t", secrets={}, config_maps={}, service_refs={},
        service_env={}, literals={}, log=logs.append, pod_ip=PodAddresses().allocate,
        cgroups=cgroups,
    )  # fmt: skip
    template = {
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": name,
                    "image": "registry.example.com/labelmill/worker:test",
                    "command": ["python", "-c", code],
                    "resources": {"limits": {"memory": "128Mi"}},
                }
            ],
        },
    }
    pod = Pod(f"{name}-0", name, template, ctx)
    try:
        pod.bind()
        yield pod, cgroups
    finally:
        pod.delete()
        assert pod.terminated.wait(60)
        cgroups.remove()
    assert not cgroups.root.exists()


@pytest.mark.timeout(120)
def test_a_container_past_its_memory_limit_is_oom_killed_and_reported_so(tmp_path: Path) -> None:
    logs: list[str] = []
    with _one_container_pod(tmp_path, "hog", HOG, logs) as (pod, cgroups):
        hog = pod.containers[0]
        wait_until(lambda: hog.last_reason, timeout=60, what="the hog to end")
        assert hog.last_reason == "OOMKilled" and hog.last_exit == 137, logs
        assert "survived" not in (tmp_path / "pods/hog-0/logs/hog.log").read_text().splitlines()
        assert cgroups.peak() <= 128 * Mi + 8 * Mi


@pytest.mark.timeout(120)
def test_an_oom_kill_of_one_process_ends_the_whole_container(tmp_path: Path) -> None:
    """The parent outlives its OOM-killed child unless the kubelet ends the container."""
    parent = (
        "import subprocess, sys, time; "
        f"subprocess.run([sys.executable, '-c', {HOG!r}]); time.sleep(600)"
    )
    logs: list[str] = []
    with _one_container_pod(tmp_path, "pool", parent, logs) as (pod, _):
        pool = pod.containers[0]
        wait_until(lambda: pool.last_reason, timeout=60, what="the container to end")
        assert (pool.last_reason, pool.last_exit) == ("OOMKilled", 137), logs


@pytest.mark.parametrize("v2", [True, False])
def test_a_cgroups_file_cache_counts_as_available_as_the_kubelet_counts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, v2: bool
) -> None:
    """Usage less inactive file cache is the working set; the limit less that is available."""
    from labelmill.dev.cluster import node

    if v2:
        files = {"memory.max": 1 * Gi, "memory.current": 900 * Mi}
        stat = f"anon {100 * Mi}\nactive_file 0\ninactive_file {800 * Mi}\n"
    else:  # the cgroup's own counter first, then the hierarchy's total
        files = {"memory.limit_in_bytes": 1 * Gi, "memory.usage_in_bytes": 900 * Mi}
        stat = f"inactive_file {10 * Mi}\ntotal_rss {100 * Mi}\ntotal_inactive_file {800 * Mi}\n"
    for name, value in files.items():
        (tmp_path / name).write_text(f"{value}\n")
    (tmp_path / "memory.stat").write_text(stat)
    monkeypatch.setattr(node, "_own_cgroup", lambda: (tmp_path, v2))
    assert machine_memory_available() == 1 * Gi - 100 * Mi  # MemAvailable is far larger here
    (tmp_path / "memory.stat").write_text("active_file 0\n")
    assert machine_memory_available() == 1 * Gi - 900 * Mi


def test_up_refuses_a_node_bigger_than_the_machine(tmp_path: Path) -> None:
    res = subprocess.run(
        [*CLI, "up", "--dir", str(tmp_path), "--node-memory", "64Ti"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "more than this machine" in res.stderr
    assert not (tmp_path / "pods").exists()  # nothing was started


def test_up_refuses_a_quantity_it_cannot_read(tmp_path: Path) -> None:
    res = subprocess.run(
        [*CLI, "up", "--dir", str(tmp_path), "--node-cpu", "four"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_a_pod_being_deleted_is_not_killed_by_its_liveness_probe(tmp_path: Path) -> None:
    """The kubelet stops liveness probes before it stops the containers; readiness goes on."""
    alive, ready = tmp_path / "alive", tmp_path / "ready"
    alive.touch()
    # Ready once it handles SIGTERM; on SIGTERM both files go, and the
    # container takes 3 s to exit, as a worker finishing its batch does.
    code = (
        "import os, signal, sys, time\n"
        f"def stop(*_):\n    os.unlink({str(alive)!r}); os.unlink({str(ready)!r})\n"
        "    time.sleep(3); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(600)\n"
    )

    def probe(path: Path) -> dict[str, Any]:
        exists = f"import os, sys; sys.exit(not os.path.exists({str(path)!r}))"
        return {
            "exec": {"command": ["python", "-c", exists]},
            "periodSeconds": 1,
            "failureThreshold": 1,
        }

    logs: list[str] = []
    ctx = PodContext(
        root=tmp_path, namespace="t", secrets={}, config_maps={}, service_refs={},
        service_env={}, literals={}, log=logs.append, pod_ip=PodAddresses().allocate,
    )  # fmt: skip
    template = {
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "busy",
                    "image": "registry.example.com/labelmill/worker:test",
                    "command": ["python", "-c", code],
                    "livenessProbe": probe(alive),
                    "readinessProbe": probe(ready),
                }
            ],
        },
    }
    pod = Pod("busy-0", "busy", template, ctx)
    pod.bind()
    busy = pod.containers[0]
    try:
        wait_until(lambda: busy.ready, timeout=60, what="the container to be ready")
        pod.delete()
        # Readiness is still probed: the pod leaves its Services' endpoints.
        wait_until(lambda: not busy.ready, timeout=30, what="readiness to fail")
        assert pod.terminated.wait(60)
    finally:
        pod.delete()
        pod.terminated.wait(60)
    assert not any("liveness" in line for line in logs), logs
    assert busy.last_exit == 0, logs
