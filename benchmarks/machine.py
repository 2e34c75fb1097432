"""What every benchmark prints about the machine it ran on: timings only compare on the same CPU."""

from __future__ import annotations

import platform
from pathlib import Path

CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> str:
    """The vector and matrix features that decide int8/bf16 speed, among those the CPU reports."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    present = set(flags.split(":", 1)[1].split())
    return " ".join(flag for flag in CPU_FEATURES if flag in present) or "none of avx2/avx512/amx"
