"""Shared helpers for the deployment tests: the repository's manifests, parsed.

Everything here is offline and pure: no cluster, no Docker, no network.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KEDA = ROOT / "keda"


PATCHES = K8S / "patches"


def manifest_files() -> list[Path]:
    """Every manifest under k8s/ (examples and secret templates included) and keda/.

    Not the patches of ``k8s/patches/``: those are applied with ``kubectl patch``.
    """
    found = [*K8S.rglob("*.yaml"), *KEDA.rglob("*.yaml")]
    return sorted(p for p in found if PATCHES not in p.parents)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in manifest_files():
        for doc in documents(path):
            yield path, doc


def find(kind: str, name: str) -> dict[str, Any]:
    """The one object of ``kind`` named ``name``."""
    found = [d for _, d in all_documents() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture(scope="session")
def objects() -> list[tuple[Path, dict[str, Any]]]:
    return list(all_documents())
