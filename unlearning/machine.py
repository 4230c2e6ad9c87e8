"""The machine a result was measured on, described the same way beside every result (the lab's
and the benchmarks')."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, cores, memory, kernel, Python and torch (version and threads); given the
    device the work ran on, that device and, on CUDA, the GPU's name."""
    description: dict[str, Any] = {
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
        "kernel": platform.release(), "python": platform.python_version(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device is not None:
        description["device"] = str(device)
        if device.type == "cuda":
            description["gpu"] = torch.cuda.get_device_name(device)
    return description


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):  # sysconf or the name unknown here
        return None
