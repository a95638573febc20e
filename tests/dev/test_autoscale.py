"""KEDA's ScaledObject controller and its HPA as labelmill.dev.cluster.autoscale emulates them.

Expected numbers come from the manifests under keda/ wherever a rule is
about them, so a changed manifest changes the expectation, not the test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from labelmill.dev.cluster.autoscale import (
    DEFAULT_SCALE_DOWN,
    DEFAULT_SCALE_UP,
    Autoscaler,
    RedisTrigger,
    ScaledObjectSpec,
    ScalingPolicy,
    ScalingRules,
    redis_list_length,
)

KEDA = Path(__file__).resolve().parents[2] / "keda"


def keda_scaled_objects() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KEDA.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ScaledObject":
                found[doc["metadata"]["name"]] = doc
    return found


def manifest(name: str) -> dict[str, Any]:
    return keda_scaled_objects()[name]


def scaled_object(*, triggers: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    """A minimal ScaledObject: one redis trigger on ``k`` with listLength 10."""
    trigger = {
        "type": "redis",
        "metadata": {"address": "r:6379", "listName": "k", "listLength": "10"},
    }
    body: dict[str, Any] = {"scaleTargetRef": {"name": "t"}, "triggers": triggers or [trigger]}
    body.update(spec)
    return {"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "so"},
            "spec": body}  # fmt: skip


def with_behavior(behavior: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return scaled_object(advanced={"horizontalPodAutoscalerConfig": {"behavior": behavior}}, **spec)


def rules(doc: dict[str, Any]) -> ScalingRules:
    return ScalingRules(
        doc["stabilizationWindowSeconds"],
        doc["selectPolicy"],
        tuple(ScalingPolicy(p["type"], p["value"], p["periodSeconds"]) for p in doc["policies"]),
    )


# ---------------------------------------------------------------- manifests


def test_the_keda_manifests_parse_with_their_own_values() -> None:
    docs = keda_scaled_objects()
    assert {"workers", "tf-serving"} <= set(docs)
    for name, doc in docs.items():
        s = doc["spec"]
        spec = ScaledObjectSpec.from_manifest(doc)
        assert (spec.name, spec.target) == (name, s["scaleTargetRef"]["name"])
        assert spec.polling_interval_s == s["pollingInterval"]
        assert spec.cooldown_period_s == s["cooldownPeriod"]
        assert (spec.min_replicas, spec.max_replicas) == (
            s["minReplicaCount"],
            s["maxReplicaCount"],
        )
        expected = [
            RedisTrigger(
                list_name=t["metadata"]["listName"],
                list_length=float(t["metadata"]["listLength"]),
                activation_list_length=float(t["metadata"]["activationListLength"]),
                address=t["metadata"]["address"],
                database_index=int(t["metadata"]["databaseIndex"]),
                auth_ref=t["authenticationRef"]["name"],
            )
            for t in s["triggers"]
        ]
        assert list(spec.triggers) == expected
        behavior = s["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert spec.behavior.configured
        assert spec.behavior.scale_up == rules(behavior["scaleUp"])
        assert spec.behavior.scale_down == rules(behavior["scaleDown"])


def test_defaults_are_keda_s_and_kubernetes_s() -> None:
    spec = ScaledObjectSpec.from_manifest(scaled_object())
    assert (spec.polling_interval_s, spec.cooldown_period_s, spec.initial_cooldown_period_s) == (
        30, 300, 0,
    )  # fmt: skip
    assert (spec.min_replicas, spec.max_replicas, spec.hpa_min_replicas) == (0, 100, 1)
    assert not spec.behavior.configured
    up, down = spec.behavior.scale_up, spec.behavior.scale_down
    assert (up.stabilization_window_s, up.select_policy) == (0, "Max")
    assert set(up.policies) == {ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15)}
    assert (down.stabilization_window_s, down.select_policy) == (300, "Max")
    assert down.policies == (ScalingPolicy("Percent", 100, 15),)
    trigger = ScaledObjectSpec.from_manifest(
        scaled_object(triggers=[{"type": "redis", "metadata": {"address": "r:1", "listName": "k"}}])
    ).triggers[0]
    assert (trigger.list_length, trigger.activation_list_length) == (5, 0)  # redisMetadata
    assert (trigger.database_index, trigger.auth_ref) == (0, None)
    # A behavior with one field set keeps the other fields' defaults (copyHPAScalingRules).
    partial = ScaledObjectSpec.from_manifest(
        with_behavior({"scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 9}]}})
    ).behavior
    assert partial.configured and partial.scale_down == DEFAULT_SCALE_DOWN
    assert partial.scale_up == ScalingRules(
        DEFAULT_SCALE_UP.stabilization_window_s,
        DEFAULT_SCALE_UP.select_policy,
        (ScalingPolicy("Pods", 2, 9),),
    )


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (scaled_object(triggers=[{"type": "cpu", "metadata": {"value": "50"}}]), "only 'redis'"),
        (scaled_object(triggers=[{"type": "redis-streams", "metadata": {}}]), "only 'redis'"),
        (scaled_object(triggers=[{"type": "redis", "metadata": {"address": "r:1"}}]), "listName"),
        (
            scaled_object(
                triggers=[
                    {
                        "type": "redis",
                        "metadata": {"address": "r:1", "listName": "k", "listLength": "2.5"},
                    }
                ]
            ),
            "not an integer",
        ),
        (
            scaled_object(
                triggers=[
                    {
                        "type": "redis",
                        "metricType": "Value",
                        "metadata": {"address": "r:1", "listName": "k"},
                    }
                ]
            ),
            "metricType",
        ),
        (scaled_object(idleReplicaCount=0), "idleReplicaCount"),
        (scaled_object(minReplicaCount=5, maxReplicaCount=2), "minReplicaCount"),
        (
            with_behavior(
                {"scaleUp": {"policies": [{"type": "Pod", "value": 1, "periodSeconds": 1}]}}
            ),
            "Pods or Percent",
        ),
        (with_behavior({"scaleDown": {"selectPolicy": "Most"}}), "selectPolicy"),
        (with_behavior({"scaleDown": {"policies": []}}), "at least one policy"),
    ],
)
def test_what_is_not_emulated_is_refused(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScaledObjectSpec.from_manifest(doc)


# ---------------------------------------------------------------- KEDA


def test_activation_scales_from_zero_to_one_and_the_hpa_takes_over() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    (trigger,) = spec.triggers
    scaler = Autoscaler(spec)
    at_threshold = int(trigger.activation_list_length)
    idle = scaler.step(0, [at_threshold], 0)
    assert (idle.replicas, idle.active) == (0, False)  # activation needs metric > threshold
    backlog = int(trigger.list_length * 5)
    woke = scaler.step(15, [backlog], 0)
    assert (woke.replicas, woke.active, woke.hpa_desired) == (1, True, None)  # KEDA: 0 -> 1 only
    # The HPA skipped the step in which KEDA moved the target and is due at once.
    assert scaler.next_due() <= 15
    hpa = scaler.step(15.25, [backlog], 1)
    assert hpa.hpa_desired == hpa.replicas == math.ceil(backlog / trigger.list_length)


def test_no_scale_to_zero_before_the_cooldown_and_scale_to_zero_after() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    cooldown = spec.cooldown_period_s
    scaler = Autoscaler(spec)
    t, replicas = 0.0, scaler.step(0, [1], 1).replicas
    last_active = t
    while True:
        t = scaler.next_due()
        replicas = scaler.step(t, [0], replicas).replicas
        if replicas == 0:
            break
        assert t - last_active <= cooldown, "still up after the cooldown"
    # KEDA's scaleToZeroOrIdle: lastActiveTime + cooldownPeriod before now, at a poll.
    assert cooldown < t - last_active <= cooldown + spec.polling_interval_s


def test_with_no_activity_yet_the_initial_cooldown_counts_from_creation() -> None:
    # Deployments start at 1 replica; KEDA's default initialCooldownPeriod is 0.
    default = Autoscaler(ScaledObjectSpec.from_manifest(scaled_object(pollingInterval=10)))
    assert default.step(0, [0], 1).replicas == 1  # creation + 0 is not before now yet
    assert default.step(10, [0], 1).replicas == 0
    spec = ScaledObjectSpec.from_manifest(
        scaled_object(pollingInterval=10, initialCooldownPeriod=60)
    )
    delayed = Autoscaler(spec, created_at=0)
    assert [delayed.step(t, [0], 1).replicas for t in (0, 30, 60)] == [1, 1, 1]
    assert delayed.step(70, [0], 1).replicas == 0


def test_min_replica_count_keeps_keda_from_going_to_zero() -> None:
    scaler = Autoscaler(ScaledObjectSpec.from_manifest(scaled_object(minReplicaCount=2)))
    assert scaler.step(0, [0], 0).replicas == 2  # below minReplicaCount: raised
    assert all(scaler.step(t, [0], 2).replicas == 2 for t in range(30, 3600, 30))
    assert ScaledObjectSpec.from_manifest(scaled_object(minReplicaCount=2)).hpa_min_replicas == 2


# ---------------------------------------------------------------- HPA


def test_desired_is_ceil_of_metric_over_target() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    target = spec.triggers[0].list_length
    # From one replica, every metric below is outside the 10 % tolerance.
    for metric in (1, int(target * 1.5), int(target * 3.5)):
        scaler = Autoscaler(spec)
        decision = scaler.step(0, [metric], 1)
        assert decision.replicas == math.ceil(metric / target), metric


def test_inside_the_tolerance_the_count_stays() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    target, current = spec.triggers[0].list_length, 5
    within = int(target * current * 1.08)  # ceil() alone would add a pod
    assert math.ceil(within / target) == current + 1
    assert Autoscaler(spec).step(0, [within], current).replicas == current
    outside = int(target * current * 1.15)
    assert Autoscaler(spec).step(0, [outside], current).replicas == math.ceil(outside / target)


def test_the_hpa_takes_the_larger_of_two_metrics() -> None:
    second = {
        "type": "redis",
        "metadata": {"address": "r:6379", "listName": "k2", "listLength": "1"},
    }
    first = {**second, "metadata": {**second["metadata"], "listName": "k", "listLength": "10"}}
    spec = ScaledObjectSpec.from_manifest(scaled_object(triggers=[first, second]))
    scaler = Autoscaler(spec)
    woke = scaler.step(0, [0, 1], 0)  # only the second trigger is active
    assert (woke.replicas, woke.active, woke.metric) == (1, True, 1)
    d = scaler.step(1, [40, 3], 1)  # ceil(40 / 10) = 4 beats ceil(3 / 1) = 3
    assert (d.replicas, d.metric) == (4, 40)
    assert Autoscaler(spec).step(0, [0, 3], 1).replicas == 3


def test_scale_up_is_limited_by_the_policies() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    up = spec.behavior.scale_up
    assert up.select_policy == "Max" and {p.period_s for p in up.policies} == {30}
    period = up.policies[0].period_s

    def limit(start: int) -> int:
        return max(
            start + p.value if p.type == "Pods" else math.ceil(start * (1 + p.value / 100))
            for p in up.policies
        )

    scaler = Autoscaler(spec)
    huge = 10**6
    first = scaler.step(0, [huge], 1).replicas
    assert first == limit(1)
    # Within the period the replicas at its start (1) still bound the step.
    assert scaler.step(15, [huge], first).replicas == first
    second = scaler.step(period + 1, [huge], first).replicas
    assert second == min(limit(first), spec.max_replicas)


def test_select_policy_min_and_disabled() -> None:
    policies = [
        {"type": "Pods", "value": 1, "periodSeconds": 60},
        {"type": "Percent", "value": 100, "periodSeconds": 60},
    ]
    lowest = Autoscaler(ScaledObjectSpec.from_manifest(
        with_behavior({"scaleUp": {"selectPolicy": "Min", "policies": policies}})
    ))  # fmt: skip
    assert lowest.step(0, [1000], 4).replicas == 5  # min(4 + 1, 4 * 2)
    frozen = Autoscaler(ScaledObjectSpec.from_manifest(
        with_behavior({"scaleUp": {"selectPolicy": "Disabled"}})
    ))  # fmt: skip
    assert frozen.step(0, [1000], 4).replicas == 4


def test_scale_down_waits_for_the_stabilisation_window_then_the_rate_limit() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    down = spec.behavior.scale_down
    (policy,) = down.policies
    assert (policy.type, down.select_policy) == ("Percent", "Max")
    target = spec.triggers[0].list_length
    scaler = Autoscaler(spec)
    busy, trickle = int(target * 10), int(target)  # 10 pods' worth, then 1 pod's: still active
    replicas = scaler.step(0, [busy], 10).replicas
    assert replicas == 10
    first_drop = None
    t = 0.0
    while first_drop is None:
        t = scaler.next_due()
        d = scaler.step(t, [trickle], replicas)
        if d.replicas < replicas:
            first_drop = t
        replicas = d.replicas
    # The recommendation of 10 at t=0 leaves the window once now - window reaches it.
    assert first_drop == down.stabilization_window_s
    assert replicas == int(10 * (1 - policy.value / 100))  # at most Percent per period


def test_without_behavior_the_hpa_takes_its_legacy_path() -> None:
    scaler = Autoscaler(ScaledObjectSpec.from_manifest(scaled_object()))
    assert scaler.step(0, [10_000], 1).replicas == 4  # calculateScaleUpLimit: max(2 * 1, 4)
    assert scaler.step(15, [10_000], 4).replicas == 8
    # stabilizeRecommendation: the highest recommendation of the last 5 minutes
    # (1,000 at t=0 and 15) still wins over 1; the step is capped at 2 x current.
    assert scaler.step(30, [10], 8).replicas == 16
    # Past the window only the recommendation made at t=30 (1) is left.
    assert scaler.step(331, [10], 16).replicas == 1


def test_time_scale_shrinks_every_interval() -> None:
    spec = ScaledObjectSpec.from_manifest(manifest("workers"))
    scale = 10.0
    scaler = Autoscaler(spec, time_scale=scale)
    target = int(spec.triggers[0].list_length)
    replicas = scaler.step(0, [target * 2], 2).replicas
    assert scaler.next_due() == min(spec.polling_interval_s, 15) / scale
    t = 0.0
    while replicas:
        t = scaler.next_due()
        replicas = scaler.step(t, [0], replicas).replicas
    cooldown = spec.cooldown_period_s / scale
    assert cooldown < t <= cooldown + spec.polling_interval_s / scale
    # The scale-down window shrinks too: 1 pod's worth keeps it active, the count falls.
    scaler = Autoscaler(spec, time_scale=scale)
    replicas = scaler.step(0, [target * 10], 10).replicas
    t = 0.0
    while replicas == 10:
        t = scaler.next_due()
        replicas = scaler.step(t, [target], replicas).replicas
    assert t == spec.behavior.scale_down.stabilization_window_s / scale


# ---------------------------------------------------------------- redis scaler


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.mark.integration
def test_redis_list_length_reads_each_type_as_keda_does(client: redis.Redis) -> None:
    client.rpush("list", "a", "b", "c")
    client.sadd("set", "a", "b")
    client.zadd("zset", {"a": 1, "b": 2, "c": 3, "d": 4})
    client.hset("hash", mapping={"a": 1})
    client.set("string", "x")
    sizes = {k: redis_list_length(client, k) for k in ("list", "set", "zset", "hash", "missing")}
    assert sizes == {"list": 3, "set": 2, "zset": 4, "hash": 1, "missing": 0}
    # KEDA's script answers an error reply for a type it cannot size: the scaler errs.
    with pytest.raises(redis.ResponseError, match="unsupported key type"):
        redis_list_length(client, "string")
