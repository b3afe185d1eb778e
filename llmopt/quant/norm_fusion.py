"""A decoder layer's residual adds and RMSNorms folded into its low-bit decode matmuls.

A layer computes ``h += o_proj(attention(norm(h)))`` then ``h += down(mlp(norm(h)))`` with
``norm(h) = h * rsqrt(mean(h²) + eps) * w``. At decode's few rows each add + norm is a small kernel of
its own between two matmuls, and at batch 1 those launches are a measurable part of the step
(BENCHMARKS.md §5). Here they are spread over the matmuls instead:

- the matmul that ends a residual branch (o_proj, down) returns ``h = residual + y``, the next matmul's
  input ``h * w`` (w: the next norm's weight) and ``sumsq``, each row's sum of ``h²`` (fp32);
- the matmul after the norm (q/k/v, gate/up) takes ``h * w`` as x and multiplies its sums by
  ``rsqrt(sumsq / K + eps)``: ``W (h * w) * rstd`` is the norm's output through the matmul.

``cuda_gemv.fused_gemv`` does both inside the CUDA decode kernels (no extra launch; the residual matmul
needs a ticket counter, ``new_counter``, one per layer); the functions here are the same arithmetic in
torch, which any kernel uses (``QuantKernel.matmul_normed`` / ``matmul_residual``) and the GPU check
compares the CUDA kernels with. The chain starts from a plain ``h`` with ``norm_inputs`` (the first
layer, or after a layer that does not fuse). ``LLMOPT_FUSED_NORM=0`` turns the fused path off (A/B runs).

The MLP's ``silu(gate) * up`` folds into its gate/up matmul the same way: the engine stacks gate's and
up's channels interleaved (``kernels.stack_channels``), so each output pair is one of the kernel's channel
pairs, and the kernel writes ``silu_product`` of its outputs, half as wide (``cuda_gated_matmul``; also
after a folded-in norm). That saves the standalone SiLU-product kernel per layer. ``LLMOPT_FUSED_SILU=0``
turns it off (A/B runs).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from llmopt.quant import cuda_gemv

DISABLE_ENV = "LLMOPT_FUSED_NORM"
DISABLE_SILU_ENV = "LLMOPT_FUSED_SILU"
Fused = tuple[torch.Tensor, torch.Tensor]  # (h * w, sumsq): a norm's input, as a fused matmul takes it


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def silu_enabled() -> bool:
    return os.environ.get(DISABLE_SILU_ENV, "1") != "0"


def silu_product(y: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of an output whose last dimension interleaves gate and up (2c: gate's channel
    c, 2c + 1: up's), half as wide."""
    return F.silu(y[..., 0::2]) * y[..., 1::2]


def new_counter(device: torch.device) -> torch.Tensor:
    """A residual matmul's ticket counter for the CUDA kernels: zero, and zero again after every call."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def row_sumsq(h: torch.Tensor) -> torch.Tensor:
    """(rows,) fp32: each row's sum of h² (h as stored, rows = all but the last dimension)."""
    return h.reshape(-1, h.shape[-1]).float().square().sum(-1)


def norm_inputs(h: torch.Tensor, weight: torch.Tensor) -> Fused:
    """What a fused matmul takes for ``norm(h)``: ``h * w`` (h's shape and type), h's row sums of squares."""
    weighted = (h.float() * weight.float()).to(h.dtype)
    return weighted, row_sumsq(h)


def row_rstd(sumsq: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """(rows, 1) fp32: ``rsqrt(mean(h²) + eps)`` of each row, from its sum of squares."""
    return torch.rsqrt(sumsq.reshape(-1, 1) / k + eps)


def scale_rows(y: torch.Tensor, sumsq: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    """A matmul's output over ``h * w`` (rows, N) turned into the one over ``norm(h)``."""
    return (y.float() * row_rstd(sumsq, k, eps)).to(y.dtype)


def add_residual(
    y: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``h = residual + y`` (y (rows, N) as rounded to its type) and, with the next norm's weight,
    that norm's fused inputs: ``(h, h * w, sumsq)``, or ``(h, None, None)``."""
    h = (residual.reshape(y.shape).float() + y.float()).to(y.dtype)
    if norm_weight is None:
        return h, None, None
    weighted, sumsq = norm_inputs(h, norm_weight)
    return h, weighted, sumsq


# The CUDA kernels as torch custom ops: opaque to torch.compile, launched as they are inside CUDA graphs.
# int8 passes zero=None and group=0. Eager code calls the functions (the op wrapper costs host time). The
# residual op takes the layer's counter and leaves it as it found it (zero), so it is declared pure: a
# declared mutation would make torch.compile copy it around every call.


def _cuda_normed(x, weight, scale, zero, group, sumsq, eps, gated=False):
    out = x.new_empty((x.shape[0], weight.shape[0] // (2 if gated else 1)))
    sumsq = None if sumsq is None else sumsq.contiguous()
    return cuda_gemv.fused_gemv(x, weight, scale, zero, group, out, sumsq_in=sumsq, eps=eps, gated=gated)


def _cuda_residual(x, weight, scale, zero, group, residual, norm_weight, counter):
    m, n = x.shape[0], weight.shape[0]
    out = x.new_empty((m, n))
    fused = norm_weight is not None
    weighted = x.new_empty((m, n) if fused else 0)
    sumsq = x.new_empty(m if fused else 0, dtype=torch.float32)
    cuda_gemv.fused_gemv(
        x, weight, scale, zero, group, out, residual=residual.reshape(m, n).contiguous(),
        norm_weight=norm_weight, weighted=weighted if fused else None, sumsq_out=sumsq if fused else None,
        counter=counter if fused else None,
    )  # fmt: skip
    return out, weighted, sumsq


@torch.library.custom_op("llmopt::gemv_normed", mutates_args=())
def _normed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group: int,
    sumsq: torch.Tensor | None,
    eps: float,
    gated: bool = False,
) -> torch.Tensor:
    return _cuda_normed(x, weight, scale, zero, group, sumsq, eps, gated)


@_normed_op.register_fake
def _(x, weight, scale, zero, group, sumsq, eps, gated=False):
    return x.new_empty((x.shape[0], weight.shape[0] // (2 if gated else 1)))


@torch.library.custom_op("llmopt::gemv_residual", mutates_args=())
def _residual_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group: int,
    residual: torch.Tensor,
    norm_weight: torch.Tensor | None,
    counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cuda_residual(x, weight, scale, zero, group, residual, norm_weight, counter)


@_residual_op.register_fake
def _(x, weight, scale, zero, group, residual, norm_weight, counter):
    m, n = x.shape[0], weight.shape[0]
    fused = norm_weight is not None
    return (
        x.new_empty((m, n)),
        x.new_empty((m, n) if fused else 0),
        x.new_empty(m if fused else 0, dtype=torch.float32),
    )


def cuda_normed_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
    sumsq: torch.Tensor, eps: float,
) -> torch.Tensor:  # fmt: skip
    """``scale_rows(x @ dequant(W).T, ...)`` in one CUDA decode kernel (``cuda_gemv.fused_max_rows`` rows)."""
    return _normed_call(x, weight, scale, zero, group, sumsq, eps, False)


def cuda_gated_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
    sumsq: torch.Tensor | None = None, eps: float = 0.0,
) -> torch.Tensor:  # fmt: skip
    """``silu_product(x @ dequant(W).T)`` in one CUDA decode kernel (``cuda_gemv.gated_max_rows`` rows), over
    ``norm(h)`` given ``sumsq`` (as ``cuda_normed_matmul``)."""
    return _normed_call(x, weight, scale, zero, group, sumsq, eps, True)


def _normed_call(*args) -> torch.Tensor:
    """``llmopt::gemv_normed`` under torch.compile, the function itself in eager code."""
    return torch.ops.llmopt.gemv_normed(*args) if torch.compiler.is_compiling() else _cuda_normed(*args)


def cuda_residual_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
    residual: torch.Tensor, norm_weight: torch.Tensor | None, counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """``add_residual(x @ dequant(W).T, ...)`` in one CUDA decode kernel; ``counter``: ``new_counter``'s."""
    args = (x, weight, scale, zero, group, residual, norm_weight, counter)
    h, weighted, sumsq = (
        torch.ops.llmopt.gemv_residual(*args) if torch.compiler.is_compiling() else _cuda_residual(*args)
    )
    return (h, None, None) if norm_weight is None else (h, weighted, sumsq)
