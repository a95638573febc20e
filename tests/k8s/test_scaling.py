"""Scaling simulation: the ScaledObjects' numbers against a model of the work.

Deterministic, one-second steps. KEDA polls the outstanding set every
``pollingInterval``: active when it exceeds ``activationListLength``; from 0 it
scales to 1, and back to 0 only after ``cooldownPeriod`` inactive. The HPA
(every 15 s) computes desired = ceil(current * (metric / current) / target)
= ceil(metric / target) with the 10% tolerance, limits scale-up by the
behaviour's policies and takes the highest recommendation of the scale-down
stabilisation window. Service model: a TF Serving pod (4 cores) runs ~14
images/s (docs/serving.md: ~7 img/s per 2 cores, Inception-v3 fp32), shared by
the batches in flight; a batch also spends fixed time fetching, decoding and
writing. Pods need time to start (TF Serving loads the model). Scale-in picks
the busiest worker pods (the worst case); a terminating pod takes no new batch
and must finish its batches within the soft-shutdown timeout, itself inside
terminationGracePeriodSeconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from labelmill.queue import make_celery
from labelmill.settings import Settings
from tests.k8s.conftest import find

HPA_SYNC_S = 15
TOLERANCE = 0.1
IMAGES_PER_BATCH = Settings().batch_size
TFS_IMAGES_PER_S = 14.0  # 4-core pod; docs/serving.md measured 7.3 img/s on 2 cores
FIXED_BATCH_S = 1.5  # fetch + decode + write + ledger, outside the model server
WORKER_START_S = 30
TFS_START_S = 120


@dataclass
class Scaled:
    """One ScaledObject plus the HPA KEDA creates for it."""

    name: str
    target: float
    activation: float
    min_replicas: int
    max_replicas: int
    polling_s: int
    cooldown_s: int
    down_window_s: int
    up_policies: list[dict[str, Any]]
    down_policies: list[dict[str, Any]]
    replicas: int = 0
    last_active: float = -1e9
    recommendations: list[tuple[int, int]] = field(default_factory=list)
    events: list[tuple[int, int]] = field(default_factory=list)  # (t, change)

    @classmethod
    def from_yaml(cls, name: str) -> Scaled:
        spec = find("ScaledObject", name)["spec"]
        meta = spec["triggers"][0]["metadata"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        return cls(
            name=name,
            target=float(meta["listLength"]),
            activation=float(meta.get("activationListLength", 0)),
            min_replicas=spec.get("minReplicaCount", 0),
            max_replicas=spec["maxReplicaCount"],
            polling_s=spec.get("pollingInterval", 30),
            cooldown_s=spec.get("cooldownPeriod", 300),
            down_window_s=behavior["scaleDown"]["stabilizationWindowSeconds"],
            up_policies=behavior["scaleUp"]["policies"],
            down_policies=behavior["scaleDown"]["policies"],
        )

    def _changed_since(self, t: int, period: int, sign: int) -> int:
        return sum(c for when, c in self.events if when > t - period and c * sign > 0)

    def _limit(self, t: int, policies: list[dict[str, Any]], up: bool) -> int:
        limits = []
        for p in policies:
            base = self.replicas - self._changed_since(t, p["periodSeconds"], 1 if up else -1)
            if p["type"] == "Pods":
                limits.append(base + p["value"] if up else base - p["value"])
            elif up:
                limits.append(math.ceil(base * (1 + p["value"] / 100)))
            else:
                limits.append(math.ceil(base * (1 - p["value"] / 100)))
        return max(limits) if up else min(limits)

    def keda_poll(self, t: int, metric: float) -> None:
        active = metric > self.activation
        if active:
            self.last_active = t
            if self.replicas == 0:
                self._set(t, max(self.min_replicas, 1))
        elif self.replicas > self.min_replicas and t - self.last_active >= self.cooldown_s:
            self._set(t, self.min_replicas)

    def hpa_sync(self, t: int, metric: float) -> None:
        if self.replicas == 0:
            return  # KEDA owns 0 <-> 1
        ratio = metric / (self.target * self.replicas)
        desired = self.replicas if abs(ratio - 1) <= TOLERANCE else math.ceil(metric / self.target)
        desired = min(max(desired, max(self.min_replicas, 1)), self.max_replicas)
        self.recommendations.append((t, desired))
        self.recommendations = [
            (w, d) for w, d in self.recommendations if w > t - self.down_window_s
        ]
        if desired < self.replicas:
            desired = max(d for _, d in self.recommendations)
            desired = max(desired, self._limit(t, self.down_policies, up=False))
        elif desired > self.replicas:
            desired = min(desired, self._limit(t, self.up_policies, up=True))
        self._set(t, desired)

    def _set(self, t: int, n: int) -> None:
        if n != self.replicas:
            self.events.append((t, n - self.replicas))
            self.replicas = n


@dataclass
class Batch:
    started: int
    work: float  # model-server seconds left (at full speed of one pod)
    fixed: float = FIXED_BATCH_S


@dataclass
class Pod:
    ready_at: int
    slots: int
    batches: list[Batch] = field(default_factory=list)
    terminating_since: int | None = None


def simulate(
    backlog: int, *, trickle: float = 0.0, trickle_until: int = 0, seconds: int = 4 * 3600
) -> dict[str, Any]:
    """Run the model; ``trickle`` batches/s keep arriving until ``trickle_until``."""
    workers, tfs = Scaled.from_yaml("workers"), Scaled.from_yaml("tf-serving")
    worker_spec = find("Deployment", "workers")["spec"]["template"]["spec"]
    grace = worker_spec["terminationGracePeriodSeconds"]
    concurrency = int(
        next(
            a for a in worker_spec["containers"][0]["command"] if a.startswith("--concurrency=")
        ).split("=")[1]
    )
    soft = make_celery(Settings()).conf.worker_soft_shutdown_timeout
    assert soft < grace
    queued, done = backlog, 0
    wpods: list[Pod] = []
    tpods: list[int] = []  # ready times
    history: dict[str, Any] = {
        "max_workers": 0, "max_tfs": 0, "tfs_zero_while_outstanding": [], "late": [],
        "longest_batch": 0.0, "removed_busy": 0, "drained_at": None,
    }  # fmt: skip
    per_batch_s = IMAGES_PER_BATCH / TFS_IMAGES_PER_S
    total, carry = backlog, 0.0
    for t in range(seconds):
        if t < trickle_until:
            carry += trickle
            queued += int(carry)
            total += int(carry)
            carry -= int(carry)
        inflight = sum(len(p.batches) for p in wpods)
        outstanding = queued + inflight
        if t % workers.polling_s == 0:
            workers.keda_poll(t, outstanding)
        if t % tfs.polling_s == 0:
            tfs.keda_poll(t, outstanding)
        if t % HPA_SYNC_S == 0:
            workers.hpa_sync(t, outstanding)
            tfs.hpa_sync(t, outstanding)
        # Reconcile pods with the replica counts.
        live = [p for p in wpods if p.terminating_since is None]
        while len(live) < workers.replicas:
            pod = Pod(ready_at=t + WORKER_START_S, slots=concurrency)
            wpods.append(pod)
            live.append(pod)
        if len(live) > workers.replicas:
            # Worst case: the busiest pods go first.
            for pod in sorted(live, key=lambda p: -len(p.batches))[: len(live) - workers.replicas]:
                pod.terminating_since = t
                history["removed_busy"] += bool(pod.batches)
        while len(tpods) < tfs.replicas:
            tpods.append(t + TFS_START_S)
        tpods = sorted(tpods)[: tfs.replicas]  # a not-yet-ready pod goes first
        ready_tfs = sum(1 for r in tpods if r <= t)
        if outstanding and tfs.replicas == 0 and t > tfs.polling_s + HPA_SYNC_S:
            history["tfs_zero_while_outstanding"].append(t)
        # Workers take batches once the model is available (they wait for it).
        for pod in wpods:
            if pod.terminating_since is None and pod.ready_at <= t and ready_tfs:
                while queued and len(pod.batches) < pod.slots:
                    queued -= 1
                    pod.batches.append(Batch(started=t, work=per_batch_s))
        # One second of service: the model servers' capacity shared by every batch.
        waiting = [b for p in wpods for b in p.batches if b.work > 0]
        if waiting and ready_tfs:
            share = min(1.0, ready_tfs / len(waiting))
            for b in waiting:
                b.work -= share
        for pod in wpods:
            for b in [b for b in pod.batches if b.work <= 0]:
                b.fixed -= 1
                if b.fixed <= 0:
                    pod.batches.remove(b)
                    done += 1
                    history["longest_batch"] = max(history["longest_batch"], t + 1 - b.started)
            ending = pod.terminating_since
            if ending is not None and pod.batches and t + 1 - ending > soft:
                history["late"].append((t, len(pod.batches)))
        wpods = [p for p in wpods if not (p.terminating_since is not None and not p.batches)]
        history["max_workers"] = max(history["max_workers"], workers.replicas)
        history["max_tfs"] = max(history["max_tfs"], tfs.replicas)
        if done == total and t >= trickle_until and history["drained_at"] is None:
            history["drained_at"] = t
        if history["drained_at"] is not None and workers.replicas == tfs.replicas == 0:
            history["idle_at"] = t
            break
    history.update(
        total=total, done=done, queued=queued, grace=grace, soft=soft, workers=workers, tfs=tfs
    )
    return history


def test_a_backlog_of_10000_batches_scales_out_and_drains() -> None:
    h = simulate(10_000)
    assert h["max_workers"] == h["workers"].max_replicas
    assert h["max_tfs"] == h["tfs"].max_replicas
    assert h["done"] == 10_000 and h["queued"] == 0
    # 20 model servers at 14 img/s: ~20 minutes of work, plus ramp-up.
    assert h["drained_at"] < 45 * 60, h["drained_at"]
    assert "idle_at" in h, "both tiers go back to zero once the work is done"


def test_scale_in_never_cuts_a_batch_short() -> None:
    # A backlog, then a steady trickle: the workers scale in while still busy.
    h = simulate(10_000, trickle=1.0, trickle_until=3600)
    assert h["done"] == h["total"]
    assert h["removed_busy"] > 0, "the worst case was exercised: busy pods were removed"
    assert h["late"] == [], "a removed pod's batch outlived the soft shutdown"
    assert h["soft"] < h["grace"]


def test_tf_serving_never_drops_to_zero_while_work_is_outstanding() -> None:
    for backlog in (1, 10, 500, 10_000):
        h = simulate(backlog)
        assert h["tfs_zero_while_outstanding"] == [], backlog
        assert h["done"] == backlog


def test_arithmetic_in_the_docs() -> None:
    w, t = Scaled.from_yaml("workers"), Scaled.from_yaml("tf-serving")
    assert t.target == 2 * w.target, "two worker pods per model server"

    def desired(s: Scaled, n: int) -> int:
        return min(s.max_replicas, math.ceil(n / s.target)) if n > s.activation else 0

    assert [desired(w, n) for n in (0, 1, 100, 800, 10_000)] == [0, 1, 5, 40, 40]
    assert [desired(t, n) for n in (0, 1, 100, 800, 10_000)] == [0, 1, 3, 20, 20]
