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
import json
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

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


R = TypeVar("R", bound=RankedPod)


def _log_rank(t: float, now: float) -> int:
    # controller_utils.go logarithmicRankDiff (LogarithmicScaleDown, on by default).
    d = (now - t) * 1e9
    return int(math.log2(d)) if d > 0 else -1


def deletion_order(pods: Sequence[R], now: float | None = None) -> list[R]:
    """``pods`` sorted so that the first ones are the ones to delete.

    ActivePodsWithRanks.Less: 1 unassigned first (every pod here is on this
    node); 2 Pending < Unknown < Running; 3 not ready < ready; 4 lower
    pod-deletion-cost first; 5 more pods on the same node first (one node
    here: equal); 6 ready for less time first (log2 buckets, then UID);
    7 more container restarts first; 8 newer first (log2 buckets, then UID).
    """
    now = time.time() if now is None else now

    def less(a: R, b: R) -> bool:
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

    def compare(a: R, b: R) -> int:
        return -1 if less(a, b) else 1 if less(b, a) else 0

    return sorted(pods, key=functools.cmp_to_key(compare))


PodFactory = Callable[[str, "Workload", Mapping[str, Any]], Pod]


def scaled_value(value: int | str | None, total: int, *, round_up: bool, default: str) -> int:
    """intstr.GetScaledValueFromIntOrPercent: an int, or a percentage of ``total``."""
    raw = default if value is None else value
    if isinstance(raw, int):
        return raw
    percent = float(str(raw).rstrip("%")) / 100
    return math.ceil(percent * total) if round_up else math.floor(percent * total)


def rolling_bounds(strategy: Mapping[str, Any], replicas: int) -> tuple[int, int]:
    """(maxSurge, maxUnavailable): deployment/util ``ResolveFenceposts``, defaults 25 % each.

    Surge rounds up, unavailable down; both 0 would stall a rollout, so
    unavailable becomes 1.
    """
    rolling = strategy.get("rollingUpdate") or {}
    surge = scaled_value(rolling.get("maxSurge"), replicas, round_up=True, default="25%")
    unavailable = scaled_value(
        rolling.get("maxUnavailable"), replicas, round_up=False, default="25%"
    )
    if surge == 0 and unavailable == 0:
        unavailable = 1
    return surge, unavailable


class ReplicaSet:
    """One pod template of a Deployment (its pod-template-hash) and the count it should run."""

    def __init__(self, template: Mapping[str, Any]) -> None:
        self.template = template
        self.hash = template_hash(dict(template))
        self.replicas = 0
        self.created = time.monotonic()


class Workload:
    """A Deployment (its ReplicaSets) or a StatefulSet, and its pods (terminating ones included).

    Deployment rollouts follow pkg/controller/deployment/rolling.go
    ``rolloutRolling``: ``reconcileNewReplicaSet`` raises the new ReplicaSet
    while every ReplicaSet's count together stays within replicas +
    maxSurge (deployment/util ``NewRSNewReplicas``); ``reconcileOldReplicaSets``
    removes old pods, first the unhealthy ones (``cleanupUnhealthyReplicas``),
    then available ones, oldest ReplicaSet first, only while at least
    replicas - maxUnavailable stay available
    (``scaleDownOldReplicaSetsForRollingUpdate``). ``Recreate``
    (recreate.go ``rolloutRecreate``) removes every old pod before the new
    ReplicaSet gets any. A pod is available when it is ready
    (``minReadySeconds`` 0). The ReplicaSet controller then keeps each
    ReplicaSet's pods at its count.
    """

    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.kind = str(doc["kind"])
        self.name = str(doc["metadata"]["name"])
        self.namespace = str(doc["metadata"].get("namespace", "default"))
        self.doc: dict[str, Any] = json.loads(json.dumps(doc))
        spec = self.doc.setdefault("spec", {})
        self.replicas = int(spec["replicas"]) if spec.get("replicas") is not None else 1
        self.claim_templates = [
            t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []
        ]
        self.pods: list[Pod] = []
        self.replica_sets: list[ReplicaSet] = [ReplicaSet(spec.get("template", {}))]
        self.replica_sets[0].replicas = self.replicas
        # Pod templates by revision, newest last (revisionHistoryLimit is not applied).
        self.revisions: list[Mapping[str, Any]] = [self.replica_sets[0].template]

    @property
    def template(self) -> Mapping[str, Any]:
        return self.replica_sets[-1].template

    def set_template(self, template: Mapping[str, Any]) -> bool:
        """A new pod template (``kubectl apply``/``patch``); True when it starts a rollout."""
        self.doc["spec"]["template"] = template
        new = template_hash(dict(template))
        self.revisions = [t for t in self.revisions if template_hash(dict(t)) != new]
        self.revisions.append(template)
        if new == self.replica_sets[-1].hash:
            return False
        same = [rs for rs in self.replica_sets if rs.hash == new]  # a rollback reuses it
        self.replica_sets = [rs for rs in self.replica_sets if rs.hash != new]
        self.replica_sets.append(same[0] if same else ReplicaSet(template))
        return True

    def undo(self) -> bool:
        """``kubectl rollout undo``: the previous revision's template, rolled out again."""
        if len(self.revisions) < 2:
            return False
        return self.set_template(self.revisions[-2])

    def active(self) -> list[Pod]:
        return [p for p in self.pods if not p.deleting.is_set()]

    def _of(self, rs: ReplicaSet, pods: Sequence[Pod] | None = None) -> list[Pod]:
        return [p for p in (self.active() if pods is None else pods) if p.rs_hash == rs.hash]

    def _available(self, rs: ReplicaSet) -> int:
        return sum(1 for p in self._of(rs) if p.is_ready())

    def ready_count(self) -> int:
        return sum(1 for p in self.active() if p.is_ready())

    def pending_count(self) -> int:
        """Pods the scheduler has not placed (yet)."""
        return sum(1 for p in self.active() if not p.bound)

    def rollout(self) -> list[dict[str, Any]]:
        """Each ReplicaSet, newest last: hash, count, pods that exist, ready pods."""
        return [
            {"hash": rs.hash, "replicas": rs.replicas, "pods": len(self._of(rs)),
             "ready": self._available(rs)}
            for rs in self.replica_sets
        ]  # fmt: skip

    def reconcile(self, make_pod: PodFactory, log: Callable[[str], None]) -> None:
        self.pods = [p for p in self.pods if not p.terminated.is_set()]
        if self.kind == "StatefulSet":
            self._reconcile_ordered(make_pod, log)
            return
        self._rollout()
        for rs in self.replica_sets:
            self._reconcile_replica_set(rs, make_pod, log)
        # An old ReplicaSet at 0 whose pods are all gone has nothing left to do.
        self.replica_sets = [
            rs for rs in self.replica_sets[:-1] if rs.replicas or self._of(rs, self.pods)
        ] + self.replica_sets[-1:]

    def _rollout(self) -> None:
        new, old = self.replica_sets[-1], self.replica_sets[:-1]
        strategy = self.doc["spec"].get("strategy") or {}
        if not any(rs.replicas for rs in old):
            new.replicas = self.replicas
            return
        if strategy.get("type") == "Recreate":
            for rs in old:
                rs.replicas = 0
            if not any(self._of(rs, self.pods) for rs in old):
                new.replicas = self.replicas
            return
        surge, unavailable = rolling_bounds(strategy, self.replicas)
        # reconcileNewReplicaSet / NewRSNewReplicas
        if new.replicas > self.replicas:
            new.replicas = self.replicas
        else:
            total = sum(rs.replicas for rs in self.replica_sets)
            room = max(self.replicas + surge - total, 0)
            new.replicas += min(room, self.replicas - new.replicas)
        # reconcileOldReplicaSets
        all_pods = sum(rs.replicas for rs in self.replica_sets)
        min_available = self.replicas - unavailable
        new_unavailable = new.replicas - self._available(new)
        budget = all_pods - min_available - new_unavailable
        if budget <= 0:
            return
        for rs in sorted(old, key=lambda r: r.created):  # cleanupUnhealthyReplicas
            unhealthy = min(rs.replicas - self._available(rs), budget)
            if unhealthy > 0:
                rs.replicas -= unhealthy
                budget -= unhealthy
        available = sum(self._available(rs) for rs in self.replica_sets)
        down = min(available - min_available, budget)
        for rs in sorted(old, key=lambda r: r.created):
            if down <= 0:
                break
            step = min(rs.replicas, down)
            rs.replicas -= step
            down -= step

    def _reconcile_replica_set(
        self, rs: ReplicaSet, make_pod: PodFactory, log: Callable[[str], None]
    ) -> None:
        active = self._of(rs)
        if len(active) < rs.replicas:
            for _ in range(rs.replicas - len(active)):
                name = f"{self.name}-{rs.hash}-{secrets.token_hex(3)[:5]}"
                log(f"{self.kind.lower()}/{self.name}: create pod {name}")
                self.pods.append(make_pod(name, self, rs.template))
        elif len(active) > rs.replicas:
            victims = deletion_order(active)[: len(active) - rs.replicas]
            for pod in victims:
                log(f"{self.kind.lower()}/{self.name}: delete pod {pod.name} (scale down)")
                pod.delete()

    def _reconcile_ordered(self, make_pod: PodFactory, log: Callable[[str], None]) -> None:
        by_name = {p.name: p for p in self.pods}
        for i in range(self.replicas):
            name = f"{self.name}-{i}"
            pod = by_name.get(name)
            if pod is None:
                log(f"statefulset/{self.name}: create pod {name}")
                self.pods.append(make_pod(name, self, self.template))
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
