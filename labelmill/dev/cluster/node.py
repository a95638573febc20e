"""The one node: its allocatable resources, kube-scheduler's fit check, and memory cgroups.

- Quantities: k8s.io/apimachinery/pkg/api/resource/quantity.go
  ``ParseQuantity``: a decimal number, then an optional binary suffix (Ki,
  Mi, Gi, Ti, Pi, Ei), decimal suffix (n, u, m, k, M, G, T, P, E) or
  exponent (``e3``); CPU is counted in millicores and rounded up
  (``MilliValue``), memory in bytes, also rounded up (``Value``).
- A container that sets a limit and no request requests its limit
  (pkg/apis/core/v1/defaults.go ``SetDefaults_Pod``).
- A pod's request: pkg/api/v1/resource/helpers.go ``PodRequests``: the
  containers' sum plus every sidecar's (restartable init container), or,
  when larger, an init container's own request plus the sidecars started
  before it. ``PodLimits`` adds limits up the same way (the kubelet's pod
  cgroup limit, pkg/kubelet/cm/helpers_linux.go ``ResourceConfigForPod``).
- NodeResourcesFit: pkg/scheduler/framework/plugins/noderesources/fit.go
  ``fitsRequest``: a pod fits when, for each resource it requests, what the
  pods already bound to the node request plus its own is at most the
  node's allocatable; otherwise it stays Pending with "0/1 nodes are
  available: 1 Insufficient memory." Pods bound to the node count until
  they have terminated. kube-scheduler takes Pending pods by priority, then
  by creation time (pkg/scheduler/framework/plugins/queuesort/
  priority_sort.go ``Less``); every pod here has the same priority.
- NodeAffinity's ``nodeSelector`` check: pkg/scheduler/framework/plugins/
  nodeaffinity/node_affinity.go ``Filter``: every key of the pod's
  ``nodeSelector`` must be a label of the node with the same value, else
  the pod stays Pending with ``ErrReasonPod``, "node(s) didn't match Pod's
  node affinity/selector". The node's labels are the well-known ones
  (kubernetes.io/hostname, /os, /arch) and those Node Feature Discovery
  gives the CPU features labelmill selects on (``feature.node.kubernetes.io/
  cpu-cpuid.<feature>``, named as NFD's cpuid source names them), read
  from this machine's CPU flags.
- Memory cgroups, as the kubelet lays them out (pkg/kubelet/cm/
  cgroup_manager_linux.go, qos_container_manager_linux.go): one parent for
  every pod (``kubepods``) capped at the node's allocatable memory, one
  cgroup per pod capped at the sum of its limits when every container has
  one, and one per container at its ``limits.memory``. Past a limit the
  kernel kills; the runtime reports ``OOMKilled`` when the container's
  cgroup recorded an OOM kill (containerd: internal/cri/server/events.go).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol, TypeVar

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class QuantityError(ValueError):
    """Not a Kubernetes quantity."""


def parse_quantity(text: str | int | float) -> Decimal:
    """A quantity's exact value ("250m" -> 0.25, "4Gi" -> 4294967296)."""
    m = _QUANTITY.fullmatch(str(text).strip())
    if m is None:
        raise QuantityError(f"quantities must match the regular expression {_QUANTITY.pattern!r}")
    try:
        number = Decimal(m.group(1))
    except InvalidOperation:
        raise QuantityError(f"{text!r} is not a quantity") from None
    suffix = m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix in _DECIMAL:
        return number.scaleb(_DECIMAL[suffix])
    return number.scaleb(int(suffix[1:]))


def cpu_millis(text: str | int | float) -> int:
    return int((parse_quantity(text) * 1000).to_integral_value(ROUND_CEILING))


def memory_bytes(text: str | int | float) -> int:
    return int(parse_quantity(text).to_integral_value(ROUND_CEILING))


def format_bytes(n: int) -> str:
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return str(n)


@dataclass(frozen=True)
class Resources:
    cpu_m: int = 0
    memory: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu_m + other.cpu_m, self.memory + other.memory)

    def max(self, other: Resources) -> Resources:
        return Resources(max(self.cpu_m, other.cpu_m), max(self.memory, other.memory))

    def describe(self) -> str:
        return f"cpu {self.cpu_m / 1000:g}, memory {format_bytes(self.memory)}"


def container_resources(container: Mapping[str, Any], which: str) -> Resources:
    """``requests`` (defaulting to the limits) or ``limits`` of one container."""
    res = container.get("resources") or {}
    limits = res.get("limits") or {}
    values = dict(limits) if which == "limits" else {**limits, **(res.get("requests") or {})}
    return Resources(
        cpu_millis(values["cpu"]) if "cpu" in values else 0,
        memory_bytes(values["memory"]) if "memory" in values else 0,
    )


def pod_resources(spec: Mapping[str, Any], which: str = "requests") -> Resources:
    """PodRequests / PodLimits of a pod spec."""
    total = Resources()
    for c in spec.get("containers") or []:
        total = total + container_resources(c, which)
    sidecars = Resources()
    init_max = Resources()
    for c in spec.get("initContainers") or []:
        own = container_resources(c, which)
        if c.get("restartPolicy") == "Always":
            sidecars = sidecars + own
            init_max = init_max.max(sidecars)
        else:
            init_max = init_max.max(own + sidecars)
    return (total + sidecars).max(init_max)


def pod_memory_limit(spec: Mapping[str, Any]) -> int | None:
    """The pod cgroup's limit: PodLimits' memory when every container sets one."""
    everyone = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
    if any("memory" not in ((c.get("resources") or {}).get("limits") or {}) for c in everyone):
        return None
    return pod_resources(spec, "limits").memory


# Kernel CPU flag -> NFD's cpuid feature name (source/cpu/cpuid.go, the names of
# klauspost/cpuid), for the features a labelmill pod may select on.
NFD_CPUID = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
    "amx_bf16": "AMXBF16",
    "amx_tile": "AMXTILE",
}
NFD_CPUID_PREFIX = "feature.node.kubernetes.io/cpu-cpuid."
NOT_SELECTED = "node(s) didn't match Pod's node affinity/selector"


def node_labels(name: str, cpu_flags: Iterable[str]) -> dict[str, str]:
    """The labels the kubelet and NFD would give this machine's node."""
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": arch,
    }
    flags = set(cpu_flags)
    labels |= {NFD_CPUID_PREFIX + nfd: "true" for flag, nfd in NFD_CPUID.items() if flag in flags}
    return labels


@dataclass(frozen=True)
class Node:
    name: str
    allocatable: Resources
    labels: Mapping[str, str] = field(default_factory=dict)

    def selects(self, node_selector: Mapping[str, str]) -> bool:
        """NodeAffinity's Filter for a pod's ``nodeSelector``."""
        return all(self.labels.get(k) == v for k, v in node_selector.items())

    def insufficient(self, request: Resources, bound: Iterable[Resources]) -> list[str]:
        """fitsRequest: the resources this pod does not fit in ([] when it fits)."""
        used = Resources()
        for r in bound:
            used = used + r
        out = []
        if request.cpu_m and used.cpu_m + request.cpu_m > self.allocatable.cpu_m:
            out.append("cpu")
        if request.memory and used.memory + request.memory > self.allocatable.memory:
            out.append("memory")
        return out


class Schedulable(Protocol):
    """What the scheduler reads from a pod, and ``bind``."""

    requests: Resources
    bound: bool
    unschedulable: str
    created: float

    @property
    def node_selector(self) -> Mapping[str, str]: ...
    def bind(self) -> None: ...
    def gone(self) -> bool: ...
    def being_deleted(self) -> bool: ...


P = TypeVar("P", bound=Schedulable)


def schedule(node: Node, pods: Sequence[P]) -> list[P]:
    """Bind every Pending pod whose requests fit, oldest first; return those newly unschedulable.

    Each Pending pod is tried on its own: one that does not fit does not hold
    back a smaller one behind it (kube-scheduler moves it to its
    unschedulable queue and goes on).
    """
    bound = [p.requests for p in pods if p.bound and not p.gone()]
    newly: list[P] = []
    for pod in sorted((p for p in pods if not p.bound), key=lambda p: p.created):
        if pod.being_deleted():
            continue
        why = ""
        if not node.selects(pod.node_selector):
            why = f"0/1 nodes are available: 1 {NOT_SELECTED}"
        elif short := node.insufficient(pod.requests, bound):
            why = "0/1 nodes are available: " + ", ".join(f"1 Insufficient {r}" for r in short)
        if why:
            if pod.unschedulable != why:
                newly.append(pod)
            pod.unschedulable = why
            continue
        bound.append(pod.requests)
        pod.bind()
    return newly


def machine_memory_available() -> int:
    """What this machine can give now: MemAvailable, capped by our own cgroup's limit.

    Within the cgroup, what is used is the working set, as the kubelet counts
    it for its ``memory.available`` signal: usage less the inactive file
    cache, which the kernel reclaims before it would kill anything
    (pkg/kubelet/eviction/helpers.go, makeSignalObservations: available =
    capacity - workingSet; cadvisor container/libcontainer/handler.go,
    setMemoryStats: workingSet = usage - inactive_file). A cgroup that has
    written gigabytes of files is not out of memory.
    """
    available = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
    cgroup = _own_cgroup()
    if cgroup is not None:
        path, v2 = cgroup
        with contextlib.suppress(OSError, ValueError):
            limit = (path / ("memory.max" if v2 else "memory.limit_in_bytes")).read_text().strip()
            usage = (path / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text()
            if limit != "max":
                working_set = int(usage) - _inactive_file(path / "memory.stat", v2)
                available = min(available, int(limit) - max(working_set, 0))
    return available


def _inactive_file(stat: Path, v2: bool) -> int:
    """The cgroup's inactive file cache, hierarchy included (v1: ``total_inactive_file``)."""
    key = "inactive_file" if v2 else "total_inactive_file"
    for line in stat.read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def _own_cgroup() -> tuple[Path, bool] | None:
    """This process's memory cgroup folder, and whether it is cgroup v2."""
    v2 = (CGROUP_ROOT / "cgroup.controllers").exists()
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if v2 and hierarchy == "0" and controllers == "":
            return CGROUP_ROOT / path.lstrip("/"), True
        if not v2 and "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/"), False
    return None


class CgroupError(OSError):
    """No memory cgroup can be made here."""


class MemoryCgroups:
    """``kubepods`` under this process's own cgroup, and a cgroup per pod and container."""

    def __init__(self, allocatable_bytes: int) -> None:
        own = _own_cgroup()
        if own is None:
            raise CgroupError("this process is in no memory cgroup")
        parent, self.v2 = own
        self.root = parent / f"labelmill-kubepods-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir()
            if self.v2:
                # Children get the memory controller only if the parent hands it down.
                (self.root / "cgroup.subtree_control").write_text("+memory")
            self._limit(self.root, allocatable_bytes)
        except OSError as exc:
            with contextlib.suppress(OSError):
                self.root.rmdir()
            raise CgroupError(f"cannot make a memory cgroup under {parent}: {exc}") from None
        self._oom_seen: dict[Path, int] = {}

    def _limit(self, path: Path, limit: int) -> None:
        if self.v2:
            (path / "memory.max").write_text(str(limit))
            swap = path / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")  # the kubelet runs pods without swap by default
            return
        (path / "memory.limit_in_bytes").write_text(str(limit))
        swap = path / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))

    def pod(self, name: str, limit: int | None) -> Path:
        path = self.root / f"pod-{name}"
        path.mkdir(exist_ok=True)
        if self.v2:
            (path / "cgroup.subtree_control").write_text("+memory")
        if limit:
            self._limit(path, limit)
        return path

    def container(self, pod: Path, name: str, limit: int | None) -> Path:
        path = pod / name
        path.mkdir(exist_ok=True)
        if limit:
            self._limit(path, limit)
        if self.v2:
            (path / "memory.oom.group").write_text("1")  # kill the container whole
        self._oom_seen.setdefault(path, self.oom_kills(path))
        return path

    @staticmethod
    def wrap(path: Path, argv: list[str]) -> list[str]:
        """``argv`` run inside cgroup ``path``: the shell joins it, then execs the command."""
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(path / "cgroup.procs"), *argv]

    def oom_kills(self, path: Path) -> int:
        name = "memory.events" if self.v2 else "memory.oom_control"
        with contextlib.suppress(OSError):
            for line in (path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def oom_killed_since_last(self, path: Path) -> bool:
        """Whether the kernel OOM-killed in ``path`` since the last call."""
        now = self.oom_kills(path)
        before = self._oom_seen.get(path, 0)
        self._oom_seen[path] = now
        return now > before

    def peak(self) -> int:
        """The most memory every pod together has held."""
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError, ValueError):
            return int((self.root / name).read_text().split()[0])
        return 0

    def remove(self, path: Path | None = None) -> None:
        """Remove ``path`` (default: everything) once its processes are gone, deepest first."""
        top = self.root if path is None else path
        if not top.exists():
            return
        folders = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for folder in [*folders, top]:
            with contextlib.suppress(OSError):
                folder.rmdir()


def kill_all(path: Path) -> None:
    """SIGKILL every process left in ``path`` and the cgroups below it."""
    for procs in path.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(int(pid), 9)
