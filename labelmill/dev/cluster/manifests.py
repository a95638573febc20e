"""Reading ``k8s/``, ``k8s/secrets/*.example.yaml`` and ``keda/`` as ``kubectl apply -f`` would.

``kubectl apply -f DIR`` is not recursive: ``k8s/jobs/`` and ``k8s/secrets/``
are not applied by it; the Secrets come from the example files instead
(their placeholders replaced, see substitutions.py). Kinds without a local
meaning are skipped and logged.
"""

from __future__ import annotations

import json
import secrets as random_secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from labelmill.dev.cluster.expansion import object_data
from labelmill.dev.cluster.substitutions import PLACEHOLDER_PREFIX

RUN_KINDS = {"Deployment", "StatefulSet"}
DATA_KINDS = {"ConfigMap", "Secret", "Service"}
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}
SKIPPED_KINDS = {
    "Namespace": "the namespace is implied",
    "ServiceAccount": "no API server to authenticate to",
    "NetworkPolicy": "loopback has no network policy enforcement",
    "PodDisruptionBudget": "there are no voluntary disruptions (drains) here",
}


@dataclass
class Manifests:
    workloads: list[dict[str, Any]] = field(default_factory=list)
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    services: list[dict[str, Any]] = field(default_factory=list)
    scaled_objects: list[dict[str, Any]] = field(default_factory=list)
    trigger_auths: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespace: str = "labelmill"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [
        d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind")
    ]


def load(k8s: Path, keda: Path, log: Callable[[str], None]) -> Manifests:
    out = Manifests()
    files = [*sorted(k8s.glob("*.yaml")), *sorted((k8s / "secrets").glob("*.example.yaml"))]
    files += sorted(keda.glob("*.yaml"))
    for sub in sorted(p for p in k8s.iterdir() if p.is_dir() and p.name != "secrets"):
        log(f"skip {sub}/: not applied by `kubectl apply -f {k8s}` (not recursive)")
    for path in files:
        for doc in _docs(path):
            kind, name = doc["kind"], doc["metadata"]["name"]
            out.namespace = doc["metadata"].get("namespace", out.namespace)
            if kind in RUN_KINDS:
                out.workloads.append(doc)
            elif kind == "ConfigMap":
                out.config_maps[name] = object_data(doc)
            elif kind == "Secret":
                out.secrets[name] = object_data(doc)
            elif kind == "Service":
                out.services.append(doc)
            elif kind == "ScaledObject":
                out.scaled_objects.append(doc)
            elif kind == "TriggerAuthentication":
                out.trigger_auths[name] = doc
            else:
                why = SKIPPED_KINDS.get(kind, "no local meaning")
                log(f"skip {kind}/{name} ({path.name}): {why}")
    return out


def fill_placeholders(
    secrets: dict[str, dict[str, str]],
    overrides: Mapping[str, Mapping[str, str]],
    store: Path,
) -> None:
    """Replace placeholder Secret values, reusing the ones of an earlier ``up``."""
    saved: dict[str, dict[str, str]] = {}
    if store.exists():
        saved = json.loads(store.read_text())
    for name, data in secrets.items():
        for key, value in data.items():
            if name in overrides and key in overrides[name]:
                data[key] = overrides[name][key]
            elif value.startswith(PLACEHOLDER_PREFIX) or PLACEHOLDER_PREFIX in value:
                made = saved.get(name, {}).get(key) or value.replace(
                    value[value.index(PLACEHOLDER_PREFIX) :], random_secrets.token_hex(16)
                )
                data[key] = made
                saved.setdefault(name, {})[key] = made
    store.write_text(json.dumps(saved, indent=2) + "\n")
    store.chmod(0o600)


# The list fields of a pod spec that a strategic merge patch merges by "name"
# (their patchMergeKey in k8s.io/api/core/v1/types.go).
MERGE_BY_NAME = {"containers", "initContainers", "env", "volumes", "volumeMounts", "ports"}


def strategic_merge(doc: Any, patch: Any, field: str = "") -> Any:
    """``patch`` applied to ``doc`` as kubectl's default strategic merge patch does.

    k8s.io/apimachinery/pkg/util/strategicpatch ``StrategicMergePatch``: maps
    merge key by key, ``null`` removes a key; the lists of
    :data:`MERGE_BY_NAME` merge item by item on ``name`` (``containerPort``
    for ports); any other list, and any other value, is replaced. The
    ``$patch`` directives are not supported.
    """
    if isinstance(doc, dict) and isinstance(patch, dict):
        out = dict(doc)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = strategic_merge(doc.get(key), value, key)
        return out
    if field in MERGE_BY_NAME and isinstance(doc, list) and isinstance(patch, list):
        key = "containerPort" if field == "ports" else "name"
        out_list = list(doc)
        for item in patch:
            match = next(
                (i for i, old in enumerate(out_list) if old.get(key) == item.get(key)), None
            )
            if match is None:
                out_list.append(item)
            else:
                out_list[match] = strategic_merge(out_list[match], item)
        return out_list
    return patch
