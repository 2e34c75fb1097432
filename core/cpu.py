"""What the CPU this process runs on can do: the features that decide bf16 and int8 speed.

Read once from ``/proc/cpuinfo`` (Linux); elsewhere nothing is known and every feature is absent,
so the fast paths that need one are simply not chosen.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The vector and matrix units that int8 and bf16 kernels use, in the order a report lists them.
REPORTED_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")
# Native bf16 arithmetic: without one of these, bf16 matrix products are emulated (slower than fp32).
BF16_FEATURES = frozenset({"avx512_bf16", "amx_bf16"})
# int8 dot-product instructions: without them dynamic int8 gains little over fp32.
INT8_FEATURES = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def _cpuinfo_line(prefix: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_model() -> str:
    return _cpuinfo_line("model name") or platform.processor() or platform.machine() or "unknown"


@functools.cache
def cpu_features() -> frozenset[str]:
    """Every flag the CPU reports (empty where /proc/cpuinfo is not available)."""
    flags = _cpuinfo_line("flags")
    return frozenset(flags.split()) if flags else frozenset()


def reported_features() -> str:
    """The features that decide int8/bf16 speed, among those present, as one line."""
    present = cpu_features()
    if not present:
        return "unknown"
    return " ".join(flag for flag in REPORTED_FEATURES if flag in present) or "none of avx2/avx512/amx"


def has_native_bf16() -> bool:
    return bool(cpu_features() & BF16_FEATURES)


def has_int8_dot_product() -> bool:
    return bool(cpu_features() & INT8_FEATURES)
