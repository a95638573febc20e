"""What this machine's CPU offers the model: bfloat16 in hardware, or not.

Read from the kernel's CPU flags (``/proc/cpuinfo``), the names ``lscpu``
prints. bfloat16 pays only with instructions made for it: AVX512_BF16
(``avx512_bf16``: Cooper Lake and later Xeons, AMD Zen 4 and later) or AMX
(``amx_bf16``: Sapphire Rapids and later). Without them oneDNN would emulate
bfloat16 with float32 arithmetic and conversions, slower than plain fp32, so
labelmill refuses ``--bf16`` there instead of pretending.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = {"amx_bf16": "AMX", "avx512_bf16": "AVX512_BF16"}
"""Kernel flag -> the name Intel and AMD give the instructions, best first."""
SHOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def _first_processor(cpuinfo: Path) -> dict[str, str]:
    """The fields of the first processor in ``/proc/cpuinfo``; empty where there is none."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The CPU's flags (``Features`` on ARM); empty where there is no ``/proc/cpuinfo``."""
    fields = _first_processor(cpuinfo)
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def bf16_instructions(flags: Iterable[str] | None = None) -> str | None:
    """``"AMX"`` or ``"AVX512_BF16"`` where the CPU has them, else None."""
    have = frozenset(cpu_flags() if flags is None else flags)
    return next((name for flag, name in BF16_FLAGS.items() if flag in have), None)


NO_BF16 = (
    "bf16 is not supported on this CPU: it has neither AVX512_BF16 nor AMX "
    "(no avx512_bf16 or amx_bf16 in /proc/cpuinfo's flags), and emulated bfloat16 "
    "is slower than fp32; serve in fp32"
)


def machine(cpuinfo: Path = CPUINFO) -> str:
    """The machine in one line, as ``lscpu`` names it: model, CPUs usable, vector flags."""
    fields = _first_processor(cpuinfo)
    model = fields.get("model name") or platform.processor() or platform.machine()
    have = cpu_flags(cpuinfo)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    shown = " ".join(f for f in SHOWN_FLAGS if f in have) or "none of " + " ".join(SHOWN_FLAGS)
    return f"{model}, {cpus} CPU(s); flags: {shown}"
