"""Measured properties of the machine that the floor formula needs, and the run's environment."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from llmopt import __version__
from llmopt.bench.metrics import median
from llmopt.device import describe, synchronize


def measure_copy_bandwidth_gb_s(
    device: torch.device, megabytes: int | None = None, repeats: int = 7
) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (GB/s, median of repeats).
    On a GPU each repeat times 20 back-to-back copies with CUDA events, after a warm-up long enough
    for the clocks to settle (a cold first copy reads up to 15% slow)."""
    size_mb = megabytes or (1024 if device.type == "cuda" else 256)
    n = size_mb * (1 << 20) // 4
    src = torch.randn(n, device=device)  # never time on zeros
    dst = torch.empty_like(src)
    moved = 2 * src.numel() * src.element_size()
    if device.type == "cuda":
        for _ in range(50):
            dst.copy_(src)
        rates = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                dst.copy_(src)
            end.record()
            end.synchronize()
            rates.append(20 * moved / (start.elapsed_time(end) / 1000) / 1e9)
        return median(rates)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start_s = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start_s)
    return moved / median(times) / 1e9


def git_sha() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        proc = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = proc.stdout.strip()
    return sha if proc.returncode == 0 and len(sha) == 40 else None  # a copy without history has none


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    info = describe(device)
    env: dict[str, Any] = {
        "device": info.type,
        "device_name": info.name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "llmopt": __version__,
        "git_sha": git_sha(),
        "cpu": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["sm_count"] = info.threads
        try:
            env["driver"] = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.TimeoutExpired, IndexError):
            env["driver"] = None
    return env
