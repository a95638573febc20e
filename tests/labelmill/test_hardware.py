"""Reading the CPU's bfloat16 instructions from /proc/cpuinfo."""

from __future__ import annotations

from pathlib import Path

from labelmill.hardware import bf16_instructions, cpu_flags, machine

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16

processor\t: 1
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2
"""


def test_the_first_processor_s_flags_and_model(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    assert cpu_flags(info) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16"}
    assert machine(info).startswith("AMD EPYC 9R14, ")
    assert machine(info).endswith("flags: avx2 avx512f avx512_bf16")


def test_bf16_needs_avx512_bf16_or_amx() -> None:
    assert bf16_instructions(["avx2", "avx512f"]) is None
    assert bf16_instructions(["avx512f", "avx512_bf16"]) == "AVX512_BF16"
    assert bf16_instructions(["avx512_bf16", "amx_bf16", "amx_tile"]) == "AMX"


def test_no_cpuinfo_means_no_flags(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert bf16_instructions(cpu_flags(tmp_path / "missing")) is None
