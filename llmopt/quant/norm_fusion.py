"""A decoder layer's residual adds and RMSNorms folded into its low-bit decode matmuls.

A layer computes ``h += o_proj(attention(norm(h)))`` then ``h += down(mlp(norm(h)))`` with
``norm(h) = h * rsqrt(mean(h²) + eps) * w``. At decode's few rows each add + norm is a small kernel of
its own between two matmuls, and at batch 1 those launches are a measurable part of the step
(BENCHMARKS.md §5). Here they are spread over the matmuls instead:

- the matmul that ends a residual branch (o_proj, down) returns ``h = residual + y``, the next matmul's
  input ``h * w`` (w: the next norm's weight) and ``partials``: the sums of ``h²`` over each
  ``PARTIAL_CHANNELS`` consecutive channels, (rows, ceil(N / 8)) in fp32;
- the matmul after the norm (q/k/v, gate/up) takes ``h * w`` as x and multiplies its sums by
  ``rsqrt(partials.sum(-1) / K + eps)``: ``W (h * w) * rstd`` is the norm's output through the matmul.

``cuda_gemv.fused_gemv`` does both inside the CUDA decode kernels (no extra launch); the functions
here are the same arithmetic in torch, which any kernel uses (``QuantKernel.matmul_normed`` /
``matmul_residual``) and the GPU check compares the CUDA kernels with. The chain starts from a plain
``h`` with ``norm_inputs`` (the first layer, or after a layer that does not fuse).
``LLMOPT_FUSED_NORM=0`` turns the fused path off (A/B runs).
"""

from __future__ import annotations

import os

import torch

from llmopt.quant import cuda_gemv

PARTIAL_CHANNELS = 8  # csrc/gemv_cuda.cu's kPartialChannels
DISABLE_ENV = "LLMOPT_FUSED_NORM"
Fused = tuple[torch.Tensor, torch.Tensor]  # (h * w, partials): a norm's input, as a fused matmul takes it


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def parts(n: int) -> int:
    return -(-n // PARTIAL_CHANNELS)


def square_partials(h: torch.Tensor) -> torch.Tensor:
    """(rows, ceil(N / 8)) fp32: the sums of h² over each 8 consecutive channels of h's rows (as stored)."""
    rows = h.reshape(-1, h.shape[-1]).float()
    pad = parts(rows.shape[1]) * PARTIAL_CHANNELS - rows.shape[1]
    rows = torch.nn.functional.pad(rows, (0, pad)) if pad else rows
    return rows.square().view(rows.shape[0], -1, PARTIAL_CHANNELS).sum(-1)


def norm_inputs(h: torch.Tensor, weight: torch.Tensor) -> Fused:
    """What a fused matmul takes for ``norm(h)``: ``h * w`` (h's shape and type) and h's partials."""
    weighted = (h.float() * weight.float()).to(h.dtype)
    return weighted, square_partials(h)


def row_rstd(partials: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """(rows, 1) fp32: ``rsqrt(mean(h²) + eps)`` of each row, from its partials."""
    return torch.rsqrt(partials.sum(-1, keepdim=True) / k + eps)


def scale_rows(y: torch.Tensor, partials: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """A matmul's output over ``h * w`` (rows, N) turned into the one over ``norm(h)``."""
    return (y.float() * row_rstd(partials, k, eps)).to(y.dtype)


def add_residual(
    y: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``h = residual + y`` (y (rows, N) as rounded to its type) and, with the next norm's weight,
    that norm's fused inputs: ``(h, h * w, partials)``, or ``(h, None, None)``."""
    h = (residual.reshape(y.shape).float() + y.float()).to(y.dtype)
    if norm_weight is None:
        return h, None, None
    weighted, partials = norm_inputs(h, norm_weight)
    return h, weighted, partials


# The CUDA kernels as torch custom ops: opaque to torch.compile, launched as they are inside CUDA graphs.
# int8 passes zero=None and group=0. Eager code calls the functions (the op wrapper costs host time).


def _cuda_normed(x, weight, scale, zero, group, partials, eps):
    out = x.new_empty((x.shape[0], weight.shape[0]))
    partials = partials.contiguous()
    return cuda_gemv.fused_gemv(x, weight, scale, zero, group, out, partials_in=partials, eps=eps)


def _cuda_residual(x, weight, scale, zero, group, residual, norm_weight):
    m, n = x.shape[0], weight.shape[0]
    out = x.new_empty((m, n))
    if norm_weight is None:
        weighted, partials = x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    else:
        weighted, partials = x.new_empty((m, n)), x.new_empty((m, parts(n)), dtype=torch.float32)
    cuda_gemv.fused_gemv(
        x, weight, scale, zero, group, out, residual=residual.reshape(m, n).contiguous(),
        norm_weight=norm_weight, weighted=weighted if norm_weight is not None else None,
        partials_out=partials if norm_weight is not None else None,
    )  # fmt: skip
    return out, weighted, partials


@torch.library.custom_op("llmopt::gemv_normed", mutates_args=())
def _normed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group: int,
    partials: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    return _cuda_normed(x, weight, scale, zero, group, partials, eps)


@_normed_op.register_fake
def _(x, weight, scale, zero, group, partials, eps):
    return x.new_empty((x.shape[0], weight.shape[0]))


@torch.library.custom_op("llmopt::gemv_residual", mutates_args=())
def _residual_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group: int,
    residual: torch.Tensor,
    norm_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda_residual(x, weight, scale, zero, group, residual, norm_weight)


@_residual_op.register_fake
def _(x, weight, scale, zero, group, residual, norm_weight):
    m, n = x.shape[0], weight.shape[0]
    if norm_weight is None:
        return x.new_empty((m, n)), x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    return x.new_empty((m, n)), x.new_empty((m, n)), x.new_empty((m, parts(n)), dtype=torch.float32)


def cuda_normed_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
    partials: torch.Tensor, eps: float,
) -> torch.Tensor:  # fmt: skip
    """``scale_rows(x @ dequant(W).T, ...)`` in one CUDA decode kernel (``cuda_gemv.fused_max_rows`` rows)."""
    args = (x, weight, scale, zero, group, partials, eps)
    return torch.ops.llmopt.gemv_normed(*args) if torch.compiler.is_compiling() else _cuda_normed(*args)


def cuda_residual_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
    residual: torch.Tensor, norm_weight: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """``add_residual(x @ dequant(W).T, ...)`` in one CUDA decode kernel."""
    args = (x, weight, scale, zero, group, residual, norm_weight)
    h, weighted, partials = (
        torch.ops.llmopt.gemv_residual(*args) if torch.compiler.is_compiling() else _cuda_residual(*args)
    )
    return (h, None, None) if norm_weight is None else (h, weighted, partials)
