"""What `kubectl apply` and a rollout do with the manifests, checked offline.

Each test here would have caught a fault that only shows on a real cluster:
steps documented in an order that fails, replica counts that a re-apply
resets under the autoscaler, and rollouts or scale-outs that take far longer
than the autoscaler assumes.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.conftest import KEDA, ROOT, documents, find

DOCS = [ROOT / "README.md", ROOT / "docs" / "kubernetes.md"]
APPLY = re.compile(r"kubectl(?: -n [\w-]+)? apply((?: -f [^\s`'\"]+)+)")
CREATE_SECRET = re.compile(r"kubectl -n ([\w-]+) create secret \w+ ([\w-]+)")


def _section(path: Path) -> str:
    """The shell blocks a reader runs, in order (README: those of its Kubernetes section)."""
    text = path.read_text()
    if path.name == "README.md":
        start = text.index("\n## Kubernetes")
        end = text.find("\n## ", start + 1)
        text = text[start : end if end > 0 else None]
    return "\n".join(re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S))


def _applied_files(arg: str) -> list[Path]:
    """What `kubectl apply -f ARG` reads: a file, or a folder's YAML files, not recursing."""
    path = ROOT / arg
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
    assert path.is_file(), f"kubectl apply -f {arg}: no such file"
    return [path]


def _needs(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """(kind, name) of the namespaced objects a workload's pods cannot start without."""
    spec = doc.get("spec", {})
    pod = spec.get("template", {}).get("spec", {}) if "template" in spec else {}
    if doc["kind"] == "Job":
        pod = spec["template"]["spec"]
    needs = []
    if pod.get("serviceAccountName"):
        needs.append(("ServiceAccount", pod["serviceAccountName"]))
    for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref and not ref.get("optional", False):
                needs.append(("Secret", ref["name"]))
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            needs.append(("ConfigMap", volume["configMap"]["name"]))
    if doc["kind"] == "TriggerAuthentication":
        needs += [("Secret", ref["name"]) for ref in spec.get("secretTargetRef", [])]
    return needs


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_kubectl_steps_work_in_the_order_written(path: Path) -> None:
    text = _section(path)
    steps = sorted(
        [(m.start(), "apply", m.group(1)) for m in APPLY.finditer(text)]
        + [(m.start(), m.group(1), m.group(2)) for m in CREATE_SECRET.finditer(text)]
    )
    assert steps, f"{path.name}: no kubectl apply steps found"
    existing: set[tuple[str, str]] = set()
    namespaces: set[str] = set()
    applied_keda = False
    for _, verb, flags in steps:
        if verb != "apply":  # kubectl -n NS create secret generic NAME
            assert verb in namespaces, (
                f"{path.name}: secret {flags} created before namespace {verb}"
            )
            existing.add(("Secret", flags))
            continue
        for arg in flags.split()[1::2]:
            for file in _applied_files(arg):
                for doc in documents(file):
                    kind, name = doc["kind"], doc["metadata"]["name"]
                    if kind == "Namespace":
                        namespaces.add(name)
                        continue
                    ns = doc["metadata"].get("namespace")
                    assert ns in namespaces, (
                        f"{path.name}: `kubectl apply{flags}` creates {kind}/{name} "
                        f"before the namespace {ns!r} exists"
                    )
                    for need in _needs(doc):
                        assert need in existing, (
                            f"{path.name}: `kubectl apply{flags}` runs {kind}/{name} "
                            f"before {need[0]}/{need[1]} exists"
                        )
                    existing.add((kind, name))
                    applied_keda |= file.parent == KEDA
    assert applied_keda, f"{path.name}: the steps never apply keda/"


def _scaled_targets() -> list[str]:
    return [
        doc["spec"]["scaleTargetRef"]["name"]
        for file in sorted(KEDA.glob("*.yaml"))
        for doc in documents(file)
        if doc["kind"] == "ScaledObject"
    ]


@pytest.mark.parametrize("target", _scaled_targets())
def test_a_reapply_leaves_the_autoscaled_replica_count_alone(target: str) -> None:
    # kubectl apply's three-way merge sets every field the manifest names; a
    # Deployment whose manifest names spec.replicas is scaled back to it by
    # every `kubectl apply -f k8s/`, in the middle of a job. Left out, the API
    # server defaults it once (1) and the HPA owns it from then on.
    deployment = find("Deployment", target)
    assert "replicas" not in deployment["spec"], (
        f"Deployment/{target} sets spec.replicas, which KEDA's HPA owns"
    )


def _resolve(value: int | str, total: int, *, round_up: bool) -> int:
    # kubernetes pkg/controller/deployment/util/deployment_util.go, ResolveFenceposts:
    # maxSurge percentages round up, maxUnavailable percentages round down.
    if isinstance(value, int):
        return value
    fraction = int(value.rstrip("%")) * total / 100
    return math.ceil(fraction) if round_up else math.floor(fraction)


@pytest.mark.parametrize("target", _scaled_targets())
def test_a_rollout_at_full_scale_takes_a_few_waves(target: str) -> None:
    deployment = find("Deployment", target)
    scaled = next(
        doc
        for file in sorted(KEDA.glob("*.yaml"))
        for doc in documents(file)
        if doc["kind"] == "ScaledObject" and doc["spec"]["scaleTargetRef"]["name"] == target
    )
    pods = scaled["spec"]["maxReplicaCount"]
    rolling = deployment["spec"].get("strategy", {}).get("rollingUpdate", {})
    # Kubernetes' defaults for a RollingUpdate Deployment: 25 % and 25 %.
    surge = _resolve(rolling.get("maxSurge", "25%"), pods, round_up=True)
    unavailable = _resolve(rolling.get("maxUnavailable", "25%"), pods, round_up=False)
    per_wave = surge + unavailable
    assert per_wave > 0
    waves = math.ceil(pods / per_wave)
    assert waves <= 4, f"{target}: {pods} pods roll out in {waves} waves of {per_wave}"


def test_a_new_model_server_gets_traffic_within_one_scale_up_period() -> None:
    # Workers balance over TF Serving's pods by re-resolving DNS when a
    # connection ends; a server-side max_connection_age bounds how long a new
    # pod waits for its share. It must be shorter than the period in which the
    # HPA adds pods, or scale-out adds pods that sit idle.
    deployment = find("Deployment", "tf-serving")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    args = next(c["args"] for c in containers if c["name"] == "tf-serving")
    channel = next(a for a in args if a.startswith("--grpc_channel_arguments="))
    options = dict(kv.split("=", 1) for kv in channel.split("=", 1)[1].split(","))
    age_s = int(options["grpc.max_connection_age_ms"]) / 1000
    scaled = documents(KEDA / "tf-serving-scaledobject.yaml")[0]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    period_s = min(p["periodSeconds"] for p in behavior["scaleUp"]["policies"])
    assert age_s <= period_s, f"max_connection_age {age_s:g} s > scale-up period {period_s} s"
