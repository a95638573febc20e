"""The worker tier never needs TensorFlow: not installed with it, not imported by it.

The worker image installs ``labelmill`` without extras; TensorFlow (hundreds
of megabytes, seconds to import) would make scale-from-zero slow. Two
checks: the installed requirement tree of the base distribution holds no
``tensorflow*`` package, and ``import workers.app`` succeeds in a process
where importing TensorFlow fails.
"""

from __future__ import annotations

import importlib.metadata as metadata
import subprocess
import sys
import textwrap
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("tensorflow", "tf-keras", "tf-nightly")


def requirement_tree(dist: str, extras: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Every distribution ``dist`` (with ``extras``) pulls in, mapped to who requires it.

    Markers are evaluated for this interpreter, so ``extra == "serving"``
    lines of a package count only when that extra is asked for. Packages not
    installed here (another platform's) are listed but not descended into.
    """
    seen: dict[str, set[str]] = {}
    todo = [(canonicalize_name(dist), extras, "<root>")]
    expanded: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, wanted, parent = todo.pop()
        seen.setdefault(name, set()).add(parent)
        if (name, wanted) in expanded:
            continue
        expanded.add((name, wanted))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker is not None and not any(
                req.marker.evaluate({"extra": e}) for e in (wanted or {""})
            ):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras), name))
    return seen


def test_base_distribution_requires_no_tensorflow() -> None:
    tree = requirement_tree("labelmill")
    assert "celery" in tree and "grpcio" in tree  # the walk really ran
    bad = {n: sorted(p) for n, p in tree.items() if n.startswith(FORBIDDEN)}
    assert not bad, f"the worker's dependencies pull in TensorFlow: {bad}"


def test_serving_extra_is_where_tensorflow_comes_from() -> None:
    # The same walk finds TensorFlow once the extra is asked for: the check above
    # would catch a dependency that brings it in.
    assert "tensorflow" in requirement_tree("labelmill", frozenset({"serving"}))


def test_worker_imports_without_tensorflow() -> None:
    script = textwrap.dedent(
        """
        import importlib.abc
        import sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "keras", "tensorflow_serving"):
                    raise ImportError(f"{name} is blocked: workers must not import it")
                return None

        sys.meta_path.insert(0, Block())
        import workers.app
        import workers.batch
        import labelmill.model_client

        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        assert not loaded, loaded
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
