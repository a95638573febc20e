"""Every manifest validates: Kubernetes objects against the 1.37 OpenAPI schemas
(kubernetes-validate, strict: unknown fields fail), KEDA objects against
cloudcoil's KEDA models with a round trip that catches silently dropped fields.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from kubernetes_validate import ValidationError, validate

from tests.k8s.conftest import all_documents

K8S_VERSION = "1.37"


def _keda_model(kind: str) -> Any:
    from cloudcoil.models.keda import v1alpha1

    return getattr(v1alpha1, kind)


def check_keda(doc: dict[str, Any]) -> None:
    """Validate a KEDA object; raise if the model rejects or drops any field."""
    model = _keda_model(doc["kind"]).model_validate(doc)
    dumped = model.model_dump(mode="json", by_alias=True, exclude_none=True)
    missing = _dropped(doc, dumped)
    if missing:
        raise ValueError(f"fields not in KEDA's schema: {missing}")


def _dropped(src: Any, dumped: Any, path: str = "") -> list[str]:
    if isinstance(src, dict):
        if not isinstance(dumped, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in src.items():
            if key not in dumped:
                out.append(f"{path}.{key}")
            else:
                out.extend(_dropped(value, dumped[key], f"{path}.{key}"))
        return out
    if isinstance(src, list):
        if not isinstance(dumped, list) or len(src) != len(dumped):
            return [path]
        return [
            m
            for i, (a, b) in enumerate(zip(src, dumped, strict=True))
            for m in _dropped(a, b, f"{path}[{i}]")
        ]
    return [] if str(src) == str(dumped) else [f"{path} ({src!r} != {dumped!r})"]


def check(doc: dict[str, Any]) -> None:
    if doc["apiVersion"].startswith("keda.sh/"):
        check_keda(doc)
    else:
        validate(doc, K8S_VERSION, strict=True)


DOCS = [(p, d) for p, d in all_documents()]


@pytest.mark.parametrize(
    ("path", "doc"),
    DOCS,
    ids=[f"{p.parent.name}/{p.name}:{d['kind']}/{d['metadata']['name']}" for p, d in DOCS],
)
def test_manifest_validates(path: Path, doc: dict[str, Any]) -> None:
    check(doc)


def test_every_object_has_a_namespace() -> None:
    for path, doc in DOCS:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "labelmill", f"{path}: {doc['kind']}"


def _with_typo(doc: dict[str, Any], kind: str) -> dict[str, Any]:
    bad = copy.deepcopy(doc)
    if kind == "Deployment":
        container = bad["spec"]["template"]["spec"]["containers"][0]
        container["imagePullPolicyy"] = container.pop("imagePullPolicy")
    else:
        bad["spec"]["cooldownPeriodd"] = bad["spec"].pop("cooldownPeriod")
    return bad


def test_a_typo_in_a_kubernetes_field_fails() -> None:
    doc = next(d for _, d in DOCS if d["kind"] == "Deployment")
    with pytest.raises(ValidationError):
        check(_with_typo(doc, "Deployment"))


def test_a_typo_in_a_keda_field_fails() -> None:
    doc = next(d for _, d in DOCS if d["kind"] == "ScaledObject")
    with pytest.raises(ValueError, match="cooldownPeriodd"):
        check(_with_typo(doc, "ScaledObject"))


def test_a_typo_in_a_nested_keda_field_fails() -> None:
    doc = copy.deepcopy(next(d for _, d in DOCS if d["kind"] == "ScaledObject"))
    doc["spec"]["triggers"][0]["authenticationReff"] = doc["spec"]["triggers"][0].pop(
        "authenticationRef"
    )
    with pytest.raises(ValueError, match="authenticationReff"):
        check(doc)
