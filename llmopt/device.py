"""The one place that asks torch about devices: backend choice, synchronisation, memory, description."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmopt.errors import InputError


@dataclass(frozen=True)
class DeviceInfo:
    type: str  # "cuda" or "cpu"
    name: str  # card name or CPU model
    threads: int  # torch intra-op threads (CPU) or SM count (CUDA)


def resolve_device(spec: str | None = None) -> torch.device:
    """Turn a user's device string ("auto", "cpu", "cuda", "cuda:1") into a torch.device."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InputError(f"Unknown device '{spec}'. Use 'auto', 'cpu' or 'cuda[:N]'.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device '{spec}' was asked for but no CUDA GPU is visible. Use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"Device type '{device.type}' is not supported. Use 'cpu' or 'cuda[:N]'.")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device) -> DeviceInfo:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return DeviceInfo("cuda", props.name, props.multi_processor_count)
    return DeviceInfo("cpu", platform.processor() or platform.machine(), torch.get_num_threads())


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can take now: free GPU memory, or the kernel's MemAvailable on CPU
    (all physical memory where /proc/meminfo is missing)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def to_device(data: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list or tensor on the device without a stream synchronisation: on CUDA it goes
    through pinned memory with a non-blocking copy (a pageable copy would wait for all queued
    work, which defeats launching a step ahead)."""
    tensor = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
