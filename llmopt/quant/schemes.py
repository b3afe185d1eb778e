"""Quantization schemes and their math: pure functions on weight tensors.

- int8: per-output-channel, symmetric, weight-only. ``w ≈ q * scale[n]``, q in [-127, 127].
- int4: group-wise along the input dimension, asymmetric with an integer zero point per group
  (the compressed-tensors convention): ``w ≈ (q - zp) * scale``, q and zp in [-8, 7]. The range
  of each group is chosen by a search that shrinks [min, max] towards the group's own values and
  keeps the candidate with the least squared error (optionally weighted by how large each input
  channel's activations are), instead of plain round-to-nearest on the full range.

Scales are rounded to the checkpoint's storage dtype *before* the weights are rounded, so the
integers are exact for the scales that are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from llmopt.errors import UnsupportedError

Scheme = Literal["int8", "int4"]
SCHEMES: tuple[str, ...] = ("int8", "int4")
METHODS: tuple[str, ...] = ("auto", "gptq", "learned", "rtn")
GROUP_SIZES: tuple[int, ...] = (32, 64, 128, 256)  # what the int4 kernels accept
DEFAULT_GROUP_PREFERENCE: tuple[int, ...] = (128, 64, 32)
INT4_SEARCH_STEPS = 24  # candidate ranges per group, from the full range down to 55% of it


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how. ``group_size=None`` picks the default for int4."""

    scheme: str = "int8"
    group_size: int | None = None  # int4 only
    keep_head: bool = False  # leave lm_head in 16-bit
    # "gptq" (calibrated), "learned" (rounding learned per block, quant/learned.py), "rtn"
    # (round-to-nearest, streams); "auto": learned for int4 on a GPU, else gptq, when they fit
    method: str = "auto"
    rotate: bool | None = None  # residual-stream rotation (quant/rotation.py); None: on for int8 with GPTQ

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UnsupportedError(f"Unknown method '{self.method}'. Use one of: {', '.join(METHODS)}.")
        if self.scheme not in SCHEMES:
            raise UnsupportedError(f"Unknown scheme '{self.scheme}'. Use one of: {', '.join(SCHEMES)}.")
        if self.group_size is not None:
            if self.scheme != "int4":
                raise UnsupportedError("--group-size applies to int4 only; int8 is per output channel.")
            if self.group_size not in GROUP_SIZES:
                raise UnsupportedError(
                    f"Group size {self.group_size} is not supported. Use one of: "
                    f"{', '.join(map(str, GROUP_SIZES))}."
                )


def choose_group_size(in_features: list[int], requested: int | None) -> int:
    """The requested group size, checked to divide every layer, or the largest of 128/64/32 that does."""
    if requested is not None:
        bad = sorted({k for k in in_features if k % requested})
        if bad:
            raise UnsupportedError(
                f"Group size {requested} does not divide the input width of every layer "
                f"(not: {', '.join(map(str, bad))}). Pick a size that does, or leave --group-size out."
            )
        return requested
    for g in DEFAULT_GROUP_PREFERENCE:
        if all(k % g == 0 for k in in_features):
            return g
    raise UnsupportedError(
        "No int4 group size (128, 64 or 32) divides every layer's input width "
        f"({', '.join(map(str, sorted(set(in_features))))}). Use --scheme int8 instead."
    )


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8. Returns (q int8 (N, K), scale (N, 1) in scale_dtype)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-10).to(scale_dtype)
    q = torch.round(w / scale.float()).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float().reshape(-1, 1)


def quantize_int4(
    weight: torch.Tensor,
    group_size: int,
    scale_dtype: torch.dtype,
    channel_importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4 with a per-group range search.

    Returns (q int8 in [-8, 7] (N, K), scale (N, K/G) in scale_dtype, zero_point int8 (N, K/G)).
    ``channel_importance`` (K,), if given, weights each input channel's squared error (e.g. the
    mean squared activation seen on calibration text).
    """
    n, k = weight.shape
    w = weight.float().reshape(n, k // group_size, group_size)  # (N, G, gs)
    importance = (
        channel_importance.float().reshape(1, k // group_size, group_size)
        if channel_importance is not None
        else torch.ones(1, 1, 1, device=w.device)
    )
    lo_full = w.amin(dim=-1).clamp(max=0)  # the range always holds 0, so zero is exact
    hi_full = w.amax(dim=-1).clamp(min=0)
    best_err = torch.full(lo_full.shape, float("inf"), device=w.device)
    best_scale = torch.zeros(lo_full.shape, dtype=scale_dtype, device=w.device)
    best_zp = torch.zeros(lo_full.shape, dtype=torch.int8, device=w.device)
    for step in range(INT4_SEARCH_STEPS):
        shrink = 1.0 - 0.45 * step / max(INT4_SEARCH_STEPS - 1, 1)
        scale, zp = int4_params(lo_full * shrink, hi_full * shrink, scale_dtype)
        q = _int4_round(w, scale, zp)
        err = (((q - zp.unsqueeze(-1)) * scale.float().unsqueeze(-1) - w).square() * importance).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp.to(torch.int8), best_zp)
    q = _int4_round(w, best_scale, best_zp.float()).to(torch.int8).reshape(n, k)
    return q, best_scale, best_zp


def int4_params(
    lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    scale = ((hi - lo) / 15.0).clamp(min=1e-10).to(scale_dtype)
    zp = (-8.0 - torch.round(lo / scale.float())).clamp(-8, 7)
    return scale, zp


def _int4_round(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    return (torch.round(w / scale.float().unsqueeze(-1)) + zp.unsqueeze(-1)).clamp(-8, 7)


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int
) -> torch.Tensor:
    n, k = q.shape
    qg = q.float().reshape(n, k // group_size, group_size)
    return ((qg - zero_point.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)).reshape(n, k)
