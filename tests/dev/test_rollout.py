"""The local cluster's Deployment controller: rolling updates and Recreate, on fake pods."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from labelmill.dev.cluster.controllers import Workload, rolling_bounds
from labelmill.dev.cluster.kubelet import template_hash
from labelmill.dev.cluster.manifests import strategic_merge

_uid = itertools.count()


class FakePod:
    """What the controller reads of a pod; the test decides when it is ready or gone."""

    def __init__(self, name: str, template: Mapping[str, Any]) -> None:
        self.name = name
        self.rs_hash = template_hash(dict(template))
        self.deleting = threading.Event()
        self.terminated = threading.Event()
        self.ready = False
        self.phase = "Running"
        self.ready_since: float | None = None
        self.restarts = 0
        self.created = float(next(_uid))
        self.uid = f"{self.created:08.0f}"
        self.deletion_cost = 0
        self.bound = True

    def is_ready(self) -> bool:
        return self.ready and not self.deleting.is_set()

    def delete(self) -> None:
        self.deleting.set()


def deployment(replicas: int, strategy: dict[str, Any] | None = None) -> Workload:
    doc = {
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}},
            **({"strategy": strategy} if strategy else {}),
        },
    }
    return Workload(doc)


def factory(name: str, _w: Workload, template: Mapping[str, Any]) -> Any:
    return FakePod(name, template)


def step(w: Workload, *, ready: bool = True, gone: bool = True) -> None:
    """One controller sync, then the kubelet: new pods get ready, deleted ones end."""
    w.reconcile(factory, lambda _m: None)
    for p in w.pods:
        if ready and not p.deleting.is_set():
            p.ready = True  # type: ignore[attr-defined]
        if gone and p.deleting.is_set():
            p.terminated.set()


def counts(w: Workload) -> list[tuple[int, int]]:
    """(replicas, live pods) per ReplicaSet, oldest first."""
    return [(rs["replicas"], rs["pods"]) for rs in w.rollout()]


def bump(w: Workload, value: str) -> None:
    patch = {"spec": {"template": {"metadata": {"annotations": {"restartedAt": value}}}}}
    assert w.set_template(strategic_merge(w.doc, patch)["spec"]["template"])


@pytest.mark.parametrize(
    ("strategy", "replicas", "bounds"),
    [
        ({}, 4, (1, 1)),  # 25 %: surge rounds up, unavailable down
        ({}, 1, (1, 0)),
        ({"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}}, 20, (5, 0)),
        ({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}, 3, (0, 1)),  # fencepost
        ({"rollingUpdate": {"maxSurge": 2, "maxUnavailable": "50%"}}, 5, (2, 2)),
    ],
)
def test_rolling_bounds_resolve_as_the_deployment_controller_does(
    strategy: dict[str, Any], replicas: int, bounds: tuple[int, int]
) -> None:
    assert rolling_bounds(strategy, replicas) == bounds


def test_a_rolling_update_keeps_within_surge_and_unavailable_at_every_step() -> None:
    w = deployment(4)
    for _ in range(3):
        step(w)
    assert counts(w) == [(4, 4)]
    bump(w, "1")
    seen = []
    for _ in range(20):
        w.reconcile(factory, lambda _m: None)
        live = [p for p in w.pods if not p.deleting.is_set()]
        ready = [p for p in live if p.is_ready()]
        seen.append(counts(w))
        assert len(live) <= 4 + 1  # maxSurge
        assert len(ready) >= 4 - 1 or len(live) < 4  # maxUnavailable
        step(w)
    assert counts(w) == [(4, 4)]
    assert {p.rs_hash for p in w.pods} == {w.rollout()[0]["hash"]}
    assert seen[0] == [(3, 3), (1, 1)]  # one new up, one old down at once


def test_with_max_unavailable_0_the_old_pod_stays_until_the_new_one_is_ready() -> None:
    w = deployment(1, {"type": "RollingUpdate",
                       "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}})  # fmt: skip
    step(w)
    bump(w, "1")
    for _ in range(3):
        step(w, ready=False)  # the new pod loads its model: not ready yet
        assert counts(w) == [(1, 1), (1, 1)]
    step(w)  # the new pod is ready after this one
    step(w)  # so the old one is deleted (and ends)
    assert counts(w) == [(0, 0), (1, 1)]
    step(w)
    assert counts(w) == [(1, 1)]


def test_recreate_removes_every_old_pod_before_the_first_new_one() -> None:
    w = deployment(2, {"type": "Recreate"})
    step(w)
    bump(w, "1")
    step(w, gone=False)
    assert counts(w) == [(0, 0), (0, 0)]  # old ones terminating, no new pod yet
    for p in w.pods:
        p.terminated.set()
    step(w)
    assert counts(w) == [(2, 2)]


def test_the_same_template_again_is_no_rollout() -> None:
    w = deployment(2)
    assert not w.set_template(dict(w.template))


def test_strategic_merge_merges_containers_and_env_by_name() -> None:
    doc = {"spec": {"containers": [
        {"name": "a", "image": "x", "env": [{"name": "K", "value": "1"}]},
        {"name": "b", "image": "y"},
    ], "nodeSelector": {"k": "v"}}}  # fmt: skip
    patch = {"spec": {"containers": [{"name": "a", "env": [{"name": "N", "value": "2"}]}],
                      "nodeSelector": None}}  # fmt: skip
    out = strategic_merge(doc, patch)
    assert out["spec"]["containers"][0]["env"] == [
        {"name": "K", "value": "1"}, {"name": "N", "value": "2"}
    ]  # fmt: skip
    assert out["spec"]["containers"][1] == {"name": "b", "image": "y"}
    assert "nodeSelector" not in out["spec"]
    assert doc["spec"]["nodeSelector"] == {"k": "v"}  # the original is left alone
