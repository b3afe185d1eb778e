"""Peak memory of a phase: device memory allocated on GPU, resident set size on CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        with contextlib.suppress(OSError):  # Linux: reset the process's peak RSS (VmHWM) to its current RSS
            CLEAR_REFS.write_text("5")


def peak_bytes(device: torch.device) -> int:
    """Peak since the last ``reset_peak``: GPU bytes allocated by torch, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak GPU memory allocated by the process during the run"
    return "peak resident memory (RSS) of the process during the run"
