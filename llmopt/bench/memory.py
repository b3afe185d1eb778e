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


def baseline_bytes(device: torch.device) -> int:
    """What the process holds before a candidate is loaded: 0 on GPU (torch counts only its own
    allocations), the current RSS on CPU (libraries, earlier work), subtracted from CPU peaks."""
    if device.type == "cuda":
        return 0
    _return_free_heap()
    return _status_kib("VmRSS:") * 1024


def _return_free_heap() -> None:
    """Hand memory the allocator holds but no longer uses back to the OS (glibc's malloc_trim), so
    the baseline is what is live: otherwise a previous candidate's freed memory inflates it, the
    allocator trims it later during the run, and the peak above baseline comes out negative."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def _status_kib(field: str) -> int:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_bytes(device: torch.device) -> int:
    """Peak since the last ``reset_peak``: GPU bytes allocated by torch, or the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if peak := _status_kib("VmHWM:"):
        return peak * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def memory_label(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak GPU memory allocated by the process during the run"
    return "peak resident memory (RSS) during the run, above the process's RSS before the model was loaded"
