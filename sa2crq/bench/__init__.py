"""Benchmarks: commands that print numbers (never timed tests)."""

from __future__ import annotations

import os
import platform


def hardware() -> str:
    """CPU model and count, for the record beside every number."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.machine()}"
