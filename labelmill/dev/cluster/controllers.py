"""The Deployment (ReplicaSet) and StatefulSet controllers.

- A Deployment without ``spec.replicas`` gets 1 (pkg/apis/apps/v1/defaults.go
  ``SetDefaults_Deployment``); KEDA's HPA then owns the number.
- ReplicaSet: pkg/controller/replicaset/replica_set.go ``manageReplicas``
  keeps the active pods (not being deleted, controller_utils.go
  ``FilterActivePods``) at ``replicas``: a deleted pod is replaced while it
  still terminates. Scale-down victims: ``getPodsToDelete`` sorted by
  pkg/controller/controller_utils.go ``ActivePodsWithRanks.Less`` (see
  :func:`deletion_order`).
- StatefulSet (podManagementPolicy OrderedReady): pkg/controller/statefulset/
  stateful_set_control.go ``updateStatefulSet``: pods ``<name>-0``... are
  created one at a time, each only once every lower ordinal is Running and
  Ready, and a pod's name is reused only once its predecessor is gone;
  scale-down removes the highest ordinal first, one at a time.
"""

from __future__ import annotations

import functools
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from labelmill.dev.cluster.kubelet import Pod, template_hash

_PHASE_ORDINAL = {"Pending": 0, "Unknown": 1, "Running": 2}


class RankedPod(Protocol):
    """What the ranking reads from a pod."""

    @property
    def phase(self) -> str: ...
    def is_ready(self) -> bool: ...
    @property
    def ready_since(self) -> float | None: ...
    @property
    def restarts(self) -> int: ...
    @property
    def created(self) -> float: ...
    @property
    def uid(self) -> str: ...
    @property
    def deletion_cost(self) -> int: ...


def _log_rank(t: float, now: float) -> int:
    # controller_utils.go logarithmicRankDiff (LogarithmicScaleDown, on by default).
    d = (now - t) * 1e9
    return int(math.log2(d)) if d > 0 else -1


def deletion_order(pods: Sequence[RankedPod], now: float | None = None) -> list[RankedPod]:
    """``pods`` sorted so that the first ones are the ones to delete.

    ActivePodsWithRanks.Less: 1 unassigned first (every pod here is on this
    node); 2 Pending < Unknown < Running; 3 not ready < ready; 4 lower
    pod-deletion-cost first; 5 more pods on the same node first (one node
    here: equal); 6 ready for less time first (log2 buckets, then UID);
    7 more container restarts first; 8 newer first (log2 buckets, then UID).
    """
    now = time.time() if now is None else now

    def less(a: RankedPod, b: RankedPod) -> bool:
        pa, pb = _PHASE_ORDINAL.get(a.phase, 0), _PHASE_ORDINAL.get(b.phase, 0)
        if pa != pb:
            return pa < pb
        ra, rb = a.is_ready(), b.is_ready()
        if ra != rb:
            return not ra
        if a.deletion_cost != b.deletion_cost:
            return a.deletion_cost < b.deletion_cost
        if ra and rb and a.ready_since != b.ready_since:
            ta, tb = a.ready_since, b.ready_since
            if ta is None or tb is None:
                return ta is None
            diff = _log_rank(ta, now) - _log_rank(tb, now)
            return a.uid < b.uid if diff == 0 else diff < 0
        if a.restarts != b.restarts:
            return a.restarts > b.restarts
        if a.created != b.created:
            diff = _log_rank(a.created, now) - _log_rank(b.created, now)
            return a.uid < b.uid if diff == 0 else diff < 0
        return False

    def compare(a: RankedPod, b: RankedPod) -> int:
        return -1 if less(a, b) else 1 if less(b, a) else 0

    return sorted(pods, key=functools.cmp_to_key(compare))


PodFactory = Callable[[str, "Workload"], Pod]


class Workload:
    """A Deployment or a StatefulSet and its pods (terminating ones included)."""

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.kind = str(doc["kind"])
        self.name = str(doc["metadata"]["name"])
        self.namespace = str(doc["metadata"].get("namespace", "default"))
        spec = doc.get("spec", {})
        self.template: Mapping[str, Any] = spec.get("template", {})
        self.replicas = int(spec["replicas"]) if spec.get("replicas") is not None else 1
        self.claim_templates = [
            t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []
        ]
        self.pods: list[Pod] = []
        self._hash = template_hash(dict(self.template))

    def active(self) -> list[Pod]:
        return [p for p in self.pods if not p.deleting.is_set()]

    def ready_count(self) -> int:
        return sum(1 for p in self.active() if p.is_ready())

    def pending_count(self) -> int:
        """Pods the scheduler has not placed (yet)."""
        return sum(1 for p in self.active() if not p.bound)

    def reconcile(self, make_pod: PodFactory, log: Callable[[str], None]) -> None:
        self.pods = [p for p in self.pods if not p.terminated.is_set()]
        if self.kind == "StatefulSet":
            self._reconcile_ordered(make_pod, log)
            return
        active = self.active()
        if len(active) < self.replicas:
            for _ in range(self.replicas - len(active)):
                name = f"{self.name}-{self._hash}-{secrets.token_hex(3)[:5]}"
                log(f"{self.kind.lower()}/{self.name}: create pod {name}")
                self.pods.append(make_pod(name, self))
        elif len(active) > self.replicas:
            victims = deletion_order(active)[: len(active) - self.replicas]
            for pod in victims:
                assert isinstance(pod, Pod)
                log(f"{self.kind.lower()}/{self.name}: delete pod {pod.name} (scale down)")
                pod.delete()

    def _reconcile_ordered(self, make_pod: PodFactory, log: Callable[[str], None]) -> None:
        by_name = {p.name: p for p in self.pods}
        for i in range(self.replicas):
            name = f"{self.name}-{i}"
            pod = by_name.get(name)
            if pod is None:
                log(f"statefulset/{self.name}: create pod {name}")
                self.pods.append(make_pod(name, self))
                return
            if pod.deleting.is_set() or not (pod.phase == "Running" and pod.is_ready()):
                return  # wait for it before the next ordinal
        extra = sorted(
            (p for p in self.active() if int(p.name.rsplit("-", 1)[1]) >= self.replicas),
            key=lambda p: -int(p.name.rsplit("-", 1)[1]),
        )
        if extra and not any(p.deleting.is_set() for p in self.pods):
            log(f"statefulset/{self.name}: delete pod {extra[0].name} (scale down)")
            extra[0].delete()
