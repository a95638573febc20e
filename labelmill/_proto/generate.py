"""Regenerate ``tfs_pb2.py`` and ``tfs_pb2.pyi`` from ``tfs.proto`` (needs grpcio-tools).

Run from the repository root: ``python -m labelmill._proto.generate``.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.resources import files
from pathlib import Path

PROTO = Path("labelmill/_proto/tfs.proto")
# Generated stubs follow protoc's style, not ours: keep linters and strict mypy off them.
PYI_HEADER = '# ruff: noqa\n# mypy: disable-error-code="type-arg"\n'


def main() -> int:
    from grpc_tools import protoc  # type: ignore[import-untyped]  # dev dependency

    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["protoc", "-I.", f"-I{well_known}", "--python_out=.", "--pyi_out=.", str(PROTO)]
    code = int(protoc.main(args))
    if code != 0:
        return code
    pyi = PROTO.with_name("tfs_pb2.pyi")
    pyi.write_text(PYI_HEADER + pyi.read_text())
    # So that `ruff format --check` over the repository stays quiet.
    return subprocess.call([sys.executable, "-m", "ruff", "format", "--quiet", str(pyi)])


if __name__ == "__main__":
    sys.exit(main())
