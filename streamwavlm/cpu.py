"""The CPU's features as oneDNN, which runs every precision path, is allowed to use them.

The flags come from ``/proc/cpuinfo``; oneDNN's ISA cap (``ONEDNN_MAX_CPU_ISA``, or its older name
``DNNL_MAX_CPU_ISA``) then hides the instructions above the level it names. A cap matters twice: a user who sets
it (to reproduce a result or to pin the kernels) must get the choice of precision that the capped library
really runs, and it lets this machine run, and the tests check, the code paths of older CPUs: ``AVX2`` is a
Zen 2/3 or Haswell-class server (no VNNI, no bf16), ``AVX512_CORE`` a Skylake-SP one (AVX-512 without VNNI).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# The features the precision paths depend on (_GATED), and which of them each cap level leaves on (oneDNN's ISA
# names, docs/precision.md). A cap not listed here (DEFAULT, ALL, a future name) is treated as no cap.
_GATED = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx_vnni", "avx_ne_convert", "avx512_vnni",
          "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_BF16 = (*_AVX512, "avx512_vnni", "avx512_bf16")
_AMX = (*_BF16, "amx_tile", "amx_bf16", "amx_int8")
CAP_ALLOWS: dict[str, tuple[str, ...]] = {
    "SSE41": (), "AVX": (), "AVX2": (),
    "AVX2_VNNI": ("avx_vnni",), "AVX2_VNNI_2": ("avx_vnni", "avx_ne_convert"),
    "AVX512_CORE": _AVX512, "AVX512_CORE_VNNI": (*_AVX512, "avx512_vnni"),
    "AVX512_CORE_BF16": _BF16, "AVX512_CORE_FP16": _BF16, "AVX10_1_512": _BF16,
    "AVX512_CORE_AMX": _AMX, "AVX10_1_512_AMX": _AMX, "AVX512_CORE_AMX_FP16": _AMX,
    "AVX10_1_512_AMX_FP16": _AMX, "AVX10_2_512": _BF16, "AVX10_2_512_AMX_2": _AMX,
}


@functools.cache
def _cpuinfo() -> tuple[str, ...]:
    """The lines of ``/proc/cpuinfo``, read once (none where it does not exist)."""
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return ()


def hardware_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where that does not exist)."""
    for line in _cpuinfo():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_name() -> str:
    """The CPU's model name, for reports and the precision cache's key."""
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def x86() -> bool:
    """Whether this is an x86-64 CPU, the only kind whose flags (and int8 kernels) this module knows."""
    return platform.machine().lower() in ("x86_64", "amd64")


def isa_cap() -> str | None:
    """oneDNN's ISA cap from the environment (upper case), or ``None`` when none is set or it names no cap."""
    value = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return value if value in CAP_ALLOWS else None


def capped(flags: frozenset[str], cap: str | None) -> frozenset[str]:
    """``flags`` without the gated features that ``cap`` hides from oneDNN."""
    if cap is None:
        return flags
    return frozenset(f for f in flags if f not in _GATED or f in CAP_ALLOWS[cap])


def cpu_flags() -> frozenset[str]:
    """The flags oneDNN may use here: the hardware's, limited by :func:`isa_cap`."""
    return capped(hardware_flags(), isa_cap())


def int8_saturates(flags: frozenset[str] | None = None) -> bool:
    """Whether oneDNN's u8 x s8 products run without VNNI, through ``vpmaddubsw``, which adds two byte
    products into a saturating 16-bit sum (255 x 127 x 2 > 32767): then weights need 7 bits, not 8.
    Measured with the ``AVX2`` and ``AVX512_CORE`` caps: 8-bit weights gave errors of 99 % on a row of equal
    inputs and twice the error on random ones (``tests/test_cpu_caps.py``)."""
    if not x86():
        return False
    flags = cpu_flags() if flags is None else flags
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def bf16_runs(flags: frozenset[str] | None = None) -> bool:
    """Whether oneDNN can run bf16 at all here (natively or by conversion): torch's oneDNN bf16 paths need
    AVX-512 BW/VL/DQ or AVX-NE-CONVERT, and raise on anything less (an AVX2-only CPU)."""
    flags = cpu_flags() if flags is None else flags
    return bool(set(_AVX512) <= flags or flags & {"avx_ne_convert", "avx512_bf16", "amx_bf16"})
