"""KEDA's ScaledObject controller and the HPA it creates, driven by a manifest.

:class:`ScaledObjectSpec` reads a ``keda.sh/v1alpha1`` ScaledObject with
``redis`` triggers; :class:`Autoscaler` then does what the two controllers do
with it, on a caller's clock:

- KEDA polls every ``pollingInterval``: active when any trigger's metric
  exceeds its ``activationListLength``; it alone moves the target 0 -> 1 and
  back to 0 after ``cooldownPeriod`` inactive.
- The HPA syncs every 15 s while the target has replicas: ``ceil(metric /
  listLength)`` per trigger (inside the 10% tolerance it keeps the count), the
  largest proposal, the stabilisation windows, the scale-up/down policies,
  then ``[max(minReplicaCount, 1), maxReplicaCount]``.

Each rule cites the function it follows; paths are in kedacore/keda and
kubernetes/kubernetes. ``time_scale`` divides every interval, cooldown,
window and policy period (not the tolerance). Not emulated, and refused by
:meth:`ScaledObjectSpec.from_manifest`: idleReplicaCount, fallback,
scalingModifiers, the paused annotations, ``metricType: Value`` and trigger
types other than ``redis``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

# kube-controller-manager defaults: --horizontal-pod-autoscaler-sync-period 15s,
# -downscale-stabilization 5m, -tolerance 0.1
# (pkg/controller/podautoscaler/config/v1alpha1/defaults.go,
# RecommendedDefaultHPAControllerConfiguration).
HPA_SYNC_PERIOD_S = 15.0
HPA_DOWNSCALE_STABILIZATION_S = 300
HPA_TOLERANCE = 0.1

# KEDA defaults: apis/keda/v1alpha1/withtriggers_types.go (defaultPollingInterval),
# pkg/scaling/executor/scale_executor.go (defaultCooldownPeriod,
# defaultInitialCooldownPeriod), apis/keda/v1alpha1/scaledobject_types.go
# (defaultHPAMaxReplicas), pkg/scalers/redis_scaler.go (redisMetadata: listLength
# default=5, activationListLength and databaseIndex optional, i.e. 0).
KEDA_POLLING_INTERVAL_S = 30
KEDA_COOLDOWN_PERIOD_S = 300
KEDA_INITIAL_COOLDOWN_PERIOD_S = 0
KEDA_MAX_REPLICAS = 100
REDIS_LIST_LENGTH = 5

# The redis scaler's size-by-TYPE script (pkg/scalers/redis_scaler.go, NewRedisScaler):
# a missing key reads as an empty list (0); a type it cannot size (string,
# stream) is an error reply, so the scaler errs rather than reading 0.
REDIS_LENGTH_LUA = """
local key = KEYS[1]
local kind = redis.call('type', key).ok
if kind == 'zset' then return redis.call('zcard', key) end
if kind == 'set' then return redis.call('scard', key) end
if kind == 'hash' then return redis.call('hlen', key) end
if kind == 'list' or kind == 'none' then return redis.call('llen', key) end
return redis.error_reply('ERR unsupported key type: ' .. kind)
"""


def redis_list_length(client: redis.Redis, key: str) -> int:
    """The size KEDA's redis scaler reads for ``key``; raises ResponseError for other types."""
    return int(client.eval(REDIS_LENGTH_LUA, 1, key))


def _int(value: Any, what: str, *, minimum: int = 0) -> int:
    """An integer field, given as a YAML int or (as trigger metadata is) a string."""
    try:
        if isinstance(value, bool):
            raise ValueError
        n = value if isinstance(value, int) else int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not an integer") from None
    if n < minimum:
        raise ValueError(f"{what}: {n} is below {minimum}")
    return n


# ---------------------------------------------------------------- manifest


@dataclass(frozen=True)
class ScalingPolicy:
    type: str  # "Pods" or "Percent"
    value: int
    period_s: int


@dataclass(frozen=True)
class ScalingRules:
    stabilization_window_s: int
    select_policy: str  # "Max", "Min" or "Disabled"
    policies: tuple[ScalingPolicy, ...]

    @classmethod
    def parse(
        cls, doc: Mapping[str, Any] | None, default: ScalingRules, where: str
    ) -> ScalingRules:
        """Fill unset fields from ``default``, as the API server does
        (pkg/apis/autoscaling/v2/defaults.go, GenerateHPAScale{Up,Down}Rules, copyHPAScalingRules).
        """
        if doc is None:
            return default
        select = str(doc.get("selectPolicy", default.select_policy))
        if select not in ("Max", "Min", "Disabled"):
            raise ValueError(f"{where}.selectPolicy: {select!r} is not Max, Min or Disabled")
        window = default.stabilization_window_s
        if doc.get("stabilizationWindowSeconds") is not None:
            window = _int(doc["stabilizationWindowSeconds"], f"{where}.stabilizationWindowSeconds")
        policies = default.policies
        if doc.get("policies") is not None:
            policies = tuple(
                _policy(p, f"{where}.policies[{i}]") for i, p in enumerate(doc["policies"])
            )
            if not policies:
                raise ValueError(f"{where}.policies: at least one policy is required")
        return cls(window, select, policies)


def _policy(doc: Mapping[str, Any], where: str) -> ScalingPolicy:
    kind = doc.get("type")
    if kind not in ("Pods", "Percent"):
        raise ValueError(f"{where}.type: {kind!r} is not Pods or Percent")
    return ScalingPolicy(
        str(kind),
        _int(doc.get("value"), f"{where}.value", minimum=1),
        _int(doc.get("periodSeconds"), f"{where}.periodSeconds", minimum=1),
    )


# pkg/apis/autoscaling/v2/defaults.go: defaultHPAScaleUpRules / defaultHPAScaleDownRules
# (scale-down's window is left nil there; the controller fills in its 5 min flag,
# horizontal.go maybeInitScaleDownStabilizationWindow).
DEFAULT_SCALE_UP = ScalingRules(
    0, "Max", (ScalingPolicy("Pods", 4, 15), ScalingPolicy("Percent", 100, 15))
)
DEFAULT_SCALE_DOWN = ScalingRules(
    HPA_DOWNSCALE_STABILIZATION_S, "Max", (ScalingPolicy("Percent", 100, 15),)
)


@dataclass(frozen=True)
class HPABehavior:
    scale_up: ScalingRules = DEFAULT_SCALE_UP
    scale_down: ScalingRules = DEFAULT_SCALE_DOWN
    # False when the ScaledObject sets no behavior: KEDA then creates the HPA with
    # Behavior nil (controllers/keda/hpa.go, newHPAForScaledObject) and the HPA takes
    # its legacy path (horizontal.go, normalizeDesiredReplicas).
    configured: bool = False


@dataclass(frozen=True)
class RedisTrigger:
    list_name: str
    list_length: float  # the HPA's AverageValue target
    activation_list_length: float = 0
    address: str = ""
    database_index: int = 0
    auth_ref: str | None = None

    @classmethod
    def parse(cls, doc: Mapping[str, Any], where: str) -> RedisTrigger:
        if doc.get("type") != "redis":
            raise ValueError(f"{where}.type: {doc.get('type')!r} is not emulated (only 'redis')")
        # GetMetricTargetType (pkg/scalers/scaler.go): unset -> AverageValue.
        metric_type = doc.get("metricType") or "AverageValue"
        if metric_type != "AverageValue":
            raise ValueError(f"{where}.metricType: {metric_type!r} is not emulated (AverageValue)")
        meta: Mapping[str, Any] = doc.get("metadata") or {}
        if not meta.get("listName"):
            raise ValueError(f"{where}.metadata.listName is required")
        address = str(meta.get("address") or "")
        if not address and meta.get("host"):
            address = f"{meta['host']}:{meta.get('port', 6379)}"
        if not address:
            raise ValueError(f"{where}.metadata: address (or host and port) is required")
        # redisMetadata (pkg/scalers/redis_scaler.go): listLength and activationListLength
        # are int64, so "2.5" is refused as KEDA refuses it.
        length = _int(meta.get("listLength", REDIS_LIST_LENGTH), f"{where}.metadata.listLength")
        if length <= 0:
            raise ValueError(f"{where}.metadata.listLength must be positive")
        auth = doc.get("authenticationRef") or {}
        return cls(
            list_name=str(meta["listName"]),
            list_length=float(length),
            activation_list_length=float(
                _int(meta.get("activationListLength", 0), f"{where}.metadata.activationListLength")
            ),
            address=address,
            database_index=_int(meta.get("databaseIndex", 0), f"{where}.metadata.databaseIndex"),
            auth_ref=auth.get("name"),
        )


@dataclass(frozen=True)
class ScaledObjectSpec:
    name: str
    target: str
    triggers: tuple[RedisTrigger, ...]
    polling_interval_s: int = KEDA_POLLING_INTERVAL_S
    cooldown_period_s: int = KEDA_COOLDOWN_PERIOD_S
    initial_cooldown_period_s: int = KEDA_INITIAL_COOLDOWN_PERIOD_S
    min_replicas: int = 0
    max_replicas: int = KEDA_MAX_REPLICAS
    behavior: HPABehavior = HPABehavior()

    @classmethod
    def from_manifest(cls, doc: Mapping[str, Any]) -> ScaledObjectSpec:
        if doc.get("kind") != "ScaledObject":
            raise ValueError(f"kind {doc.get('kind')!r} is not ScaledObject")
        name = str(doc["metadata"]["name"])
        where = f"scaledobject/{name}"
        for key in doc["metadata"].get("annotations") or {}:
            if str(key).startswith("autoscaling.keda.sh/paused"):
                raise ValueError(f"{where}: annotation {key} is not emulated")
        spec: Mapping[str, Any] = doc.get("spec") or {}
        for unsupported in ("idleReplicaCount", "fallback"):
            if spec.get(unsupported) is not None:
                raise ValueError(f"{where}: spec.{unsupported} is not emulated")
        advanced: Mapping[str, Any] = spec.get("advanced") or {}
        if advanced.get("scalingModifiers"):
            raise ValueError(f"{where}: spec.advanced.scalingModifiers is not emulated")
        triggers = tuple(
            RedisTrigger.parse(t, f"{where}.spec.triggers[{i}]")
            for i, t in enumerate(spec.get("triggers") or [])
        )
        if not triggers:
            raise ValueError(f"{where}: spec.triggers is empty")
        behavior_doc = (advanced.get("horizontalPodAutoscalerConfig") or {}).get("behavior")
        behavior = HPABehavior()
        if behavior_doc is not None:
            b = f"{where}.spec.advanced.horizontalPodAutoscalerConfig.behavior"
            behavior = HPABehavior(
                ScalingRules.parse(behavior_doc.get("scaleUp"), DEFAULT_SCALE_UP, f"{b}.scaleUp"),
                ScalingRules.parse(
                    behavior_doc.get("scaleDown"), DEFAULT_SCALE_DOWN, f"{b}.scaleDown"
                ),
                configured=True,
            )

        def field(key: str, default: int, minimum: int = 0) -> int:
            value = spec.get(key)
            return default if value is None else _int(value, f"{where}.spec.{key}", minimum=minimum)

        out = cls(
            name=name,
            target=str((spec.get("scaleTargetRef") or {}).get("name") or ""),
            triggers=triggers,
            polling_interval_s=field("pollingInterval", KEDA_POLLING_INTERVAL_S, 1),
            cooldown_period_s=field("cooldownPeriod", KEDA_COOLDOWN_PERIOD_S),
            initial_cooldown_period_s=field(
                "initialCooldownPeriod", KEDA_INITIAL_COOLDOWN_PERIOD_S
            ),
            min_replicas=field("minReplicaCount", 0),
            max_replicas=field("maxReplicaCount", KEDA_MAX_REPLICAS, 1),
            behavior=behavior,
        )
        if not out.target:
            raise ValueError(f"{where}: spec.scaleTargetRef.name is required")
        if out.min_replicas > out.max_replicas:  # the CRD's CEL rule on ScaledObjectSpec
            raise ValueError(f"{where}: minReplicaCount must be <= maxReplicaCount")
        return out

    @property
    def hpa_min_replicas(self) -> int:
        """apis/keda/v1alpha1/scaledobject_types.go, GetHPAMinReplicas: max(minReplicaCount, 1)."""
        return max(self.min_replicas, 1)


# ---------------------------------------------------------------- controllers


@dataclass(frozen=True)
class Decision:
    replicas: int  # the target's replica count after this step
    active: bool  # KEDA's last activity verdict
    metric: int  # the largest of this step's trigger metrics
    hpa_desired: int | None  # what the HPA set, when it synced with replicas > 0
    reason: str


class Autoscaler:
    """One ScaledObject's KEDA scale loop plus its HPA, on the caller's clock."""

    def __init__(
        self,
        spec: ScaledObjectSpec,
        *,
        time_scale: float = 1.0,
        hpa_sync_period_s: float = HPA_SYNC_PERIOD_S,
        tolerance: float = HPA_TOLERANCE,
        created_at: float | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be positive")
        self.spec = spec
        self.time_scale = time_scale
        self.tolerance = tolerance
        self._poll_s = spec.polling_interval_s / time_scale
        self._sync_s = hpa_sync_period_s / time_scale
        self._created = created_at  # the ScaledObject's creationTimestamp; None: the first step
        self._next_poll = -math.inf
        self._next_sync = -math.inf
        self._active = False
        self._last_active: float | None = None  # status.lastActiveTime
        self._recommendations: list[tuple[float, int]] | None = None
        self._up_events: list[tuple[float, int]] = []  # (time, replicas added)
        self._down_events: list[tuple[float, int]] = []  # (time, replicas removed)

    def _s(self, seconds: float) -> float:
        return seconds / self.time_scale

    def next_due(self) -> float:
        """When :meth:`step` has work: the next KEDA poll or HPA sync, whichever is first."""
        return min(self._next_poll, self._next_sync)

    def step(
        self, now: float, metrics: Sequence[int], current: int, existing: int | None = None
    ) -> Decision:
        """Run whichever of KEDA's poll and the HPA's sync is due at ``now``.

        ``metrics`` are the triggers' values, in order; ``current`` the target's
        spec.replicas, ``existing`` its status.replicas (the pods that exist,
        Pending ones included; default ``current``). The HPA syncs on its own
        period; it skips a step in which KEDA has just moved the target (and
        runs at the next call).
        """
        if len(metrics) != len(self.spec.triggers):
            raise ValueError(
                f"{len(self.spec.triggers)} trigger metrics expected, got {len(metrics)}"
            )
        if self._created is None:
            self._created = now
        replicas, reasons = current, []
        if now >= self._next_poll:
            # pkg/scaling/scale_handler.go, startScaleLoop: checkScalers, then wait pollingInterval.
            self._next_poll = now + self._poll_s
            replicas, why = self._keda(now, metrics, current)
            reasons.append(why)
        hpa_desired = None
        if now >= self._next_sync and replicas == current:
            self._next_sync = now + self._sync_s
            hpa_desired, why = self._hpa(
                now, metrics, current, current if existing is None else existing
            )
            replicas = current if hpa_desired is None else hpa_desired
            reasons.append(why)
        return Decision(
            replicas=replicas,
            active=self._active,
            metric=max(metrics, default=0),
            hpa_desired=hpa_desired,
            reason="; ".join(reasons) or "nothing due",
        )

    # ------------------------------------------------------------ KEDA

    def _keda(self, now: float, metrics: Sequence[int], current: int) -> tuple[int, str]:
        # pkg/scaling/scale_handler.go, getScaledObjectState: active if any trigger is;
        # pkg/scalers/redis_scaler.go, GetMetricsAndActivity: listLen > activationListLength.
        triggers = self.spec.triggers
        self._active = any(
            m > t.activation_list_length for m, t in zip(metrics, triggers, strict=True)
        )
        low = self.spec.min_replicas
        # pkg/scaling/executor/scale_scaledobjects.go, RequestScale:
        if self._active:
            self._last_active = now  # result.LastActiveTime = now (both branches)
            if current == 0:
                # scaleFromZeroOrIdle: minReplicaCount if > 0, else 1; the HPA takes it from there.
                to = low if low > 0 else 1
                return to, f"keda: active, scaled from zero to {to}"
            return current, "keda: active"
        if current > 0 and low == 0:
            # scaleToZeroOrIdle: lastActiveTime + cooldownPeriod, or with no lastActiveTime
            # creationTimestamp + initialCooldownPeriod, must be Before(now) (strictly).
            if self._last_active is None:
                since = now if self._created is None else self._created
                wait = self.spec.initial_cooldown_period_s
            else:
                since, wait = self._last_active, self.spec.cooldown_period_s
            if since + self._s(wait) < now:
                return 0, "keda: inactive past cooldown, scaled to zero"
            return current, "keda: inactive, cooling down"
        if current < low:
            return low, f"keda: inactive, raised to minReplicaCount {low}"
        return current, "keda: inactive"

    # ------------------------------------------------------------ HPA

    def _hpa(
        self, now: float, metrics: Sequence[int], current: int, existing: int
    ) -> tuple[int | None, str]:
        # pkg/controller/podautoscaler/horizontal.go, reconcileAutoscaler.
        if self._recommendations is None:  # recordInitialRecommendation
            self._recommendations = [(now, current)]
        low, high = self.spec.hpa_min_replicas, self.spec.max_replicas
        if current == 0:  # minReplicas is never 0 for KEDA's HPA: "ScalingDisabled"
            return None, "hpa: scaling disabled at zero"
        if current > high:
            desired, why = high, f"above maxReplicas {high}"
        elif current < low:
            desired, why = low, f"below minReplicas {low}"
        else:
            # computeReplicasForMetrics: the largest proposal over the metrics.
            proposal = max(
                self._per_pod_replicas(m, t.list_length, current, existing)
                for m, t in zip(metrics, self.spec.triggers, strict=True)
            )
            if self.spec.behavior.configured:
                desired = self._normalize_with_behaviors(now, current, proposal)
            else:
                desired = self._normalize_legacy(now, current, proposal)
            why = f"metrics propose {proposal}"
        if desired != current:
            self._store_scale_event(now, current, desired)
        return desired, f"hpa: {why}, {current} -> {desired}"

    def _per_pod_replicas(self, metric: int, target: float, current: int, existing: int) -> int:
        # pkg/controller/podautoscaler/replica_calculator.go, GetExternalPerPodMetricReplicas
        # (an AverageValue external metric, horizontal.go computeStatusForExternalMetric):
        # the ratio is over status.replicas, the pods that exist; none at all is an
        # infinite ratio, outside any tolerance.
        ratio = metric / (target * existing) if existing else math.inf
        if abs(1.0 - ratio) > self.tolerance:
            return math.ceil(metric / target)
        return current

    def _normalize_with_behaviors(self, now: float, current: int, desired: int) -> int:
        # horizontal.go, normalizeDesiredReplicasWithBehaviors: stabilise, then rate-limit.
        return self._rate_limited(now, current, self._stabilized(now, current, desired))

    def _stabilized(self, now: float, current: int, desired: int) -> int:
        # horizontal.go, stabilizeRecommendationWithBehaviors: the lowest recommendation of
        # the scale-up window and the highest of the scale-down window (each including this
        # one) bound the result; it starts from current and moves only as far as both allow.
        assert self._recommendations is not None
        b = self.spec.behavior
        up_cutoff = now - self._s(b.scale_up.stabilization_window_s)
        down_cutoff = now - self._s(b.scale_down.stabilization_window_s)
        up, down = desired, desired
        for t, rec in self._recommendations:
            if t > up_cutoff:
                up = min(up, rec)
            if t > down_cutoff:
                down = max(down, rec)
        # Samples older than both windows are never read again (Kubernetes reuses one slot).
        self._recommendations = [
            (t, r) for t, r in self._recommendations if not (t < up_cutoff and t < down_cutoff)
        ]
        self._recommendations.append((now, desired))
        return min(max(current, up), down)

    def _rate_limited(self, now: float, current: int, desired: int) -> int:
        # horizontal.go, convertDesiredReplicasWithBehaviorRate: the policies' limit, never
        # past current in the wrong direction, then maxReplicas / minReplicas.
        if desired > current:
            limit = max(self._limit(now, current, up=True), current)
            return min(desired, self.spec.max_replicas, limit)
        if desired < current:
            limit = min(self._limit(now, current, up=False), current)
            return max(desired, self.spec.hpa_min_replicas, limit)
        return desired

    def _limit(self, now: float, current: int, *, up: bool) -> int:
        # horizontal.go, calculateScaleUpLimitWithScalingRules and
        # calculateScaleDownLimitWithBehaviors:
        # per policy, the replicas at the period's start = current - added + removed within
        # it (getReplicasChangePerPeriod); Pods: start +/- value; Percent: ceil(start * (1 +
        # value/100)) up, int(start * (1 - value/100)) down. Max picks the largest change
        # (up: max, down: min), Min the smallest; Disabled keeps current.
        rules = self.spec.behavior.scale_up if up else self.spec.behavior.scale_down
        if rules.select_policy == "Disabled":
            return current
        limits = []
        for p in rules.policies:
            cutoff = now - self._s(p.period_s)
            added = sum(n for t, n in self._up_events if t > cutoff)
            removed = sum(n for t, n in self._down_events if t > cutoff)
            start = current - added + removed
            if up:
                limits.append(
                    start + p.value if p.type == "Pods" else math.ceil(start * (1 + p.value / 100))
                )
            else:
                limits.append(
                    start - p.value if p.type == "Pods" else int(start * (1 - p.value / 100))
                )
        pick_largest = (rules.select_policy == "Max") == up
        return max(limits) if pick_largest else min(limits)

    def _store_scale_event(self, now: float, before: int, after: int) -> None:
        # horizontal.go, storeScaleEvent (+ markScaleEventsOutdated): events older than the
        # direction's longest policy period are dropped. Only the HPA's own changes count:
        # KEDA's 0 <-> 1 moves are not HPA events.
        if not self.spec.behavior.configured:
            return
        up = after > before
        rules = self.spec.behavior.scale_up if up else self.spec.behavior.scale_down
        events = self._up_events if up else self._down_events
        cutoff = now - self._s(max(p.period_s for p in rules.policies))
        events[:] = [(t, n) for t, n in events if not t < cutoff]
        events.append((now, abs(after - before)))

    def _normalize_legacy(self, now: float, current: int, desired: int) -> int:
        # With no behavior: horizontal.go, normalizeDesiredReplicas. stabilizeRecommendation
        # takes the highest recommendation of the downscale window (both directions);
        # convertDesiredReplicasWithRules caps a step at calculateScaleUpLimit,
        # max(2 * current, 4), then clamps to [minReplicas, maxReplicas].
        assert self._recommendations is not None
        cutoff = now - self._s(HPA_DOWNSCALE_STABILIZATION_S)
        kept = [(t, r) for t, r in self._recommendations if not t < cutoff]
        stabilized = max([desired, *(r for _, r in kept)])
        self._recommendations = [*kept, (now, desired)]
        ceiling = min(self.spec.max_replicas, int(max(2.0 * current, 4.0)))
        return max(self.spec.hpa_min_replicas, min(stabilized, ceiling))
