"""The dispatch point for low-bit matmuls: one kernel per QuantLinear, chosen once at load time.

A kernel owns the weight layout it needs: ``prepare`` turns the checkpoint's integers and scales
into the tensors it computes from (repacking as the op requires), ``matmul`` computes
``x @ dequant(W).T`` from them with no host synchronisation, so the forward can be captured in a
CUDA graph. Kernels are tried in priority order; later issues register faster ones ahead of these.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from llmopt.errors import UnsupportedError
from llmopt.quant import norm_fusion


@dataclass(frozen=True)
class LayerShape:
    scheme: str  # "int8" or "int4"
    in_features: int
    out_features: int
    group_size: int | None  # int4 only


class QuantKernel(ABC):
    name: str  # the op that does the work, e.g. "aten._weight_int8pack_mm"
    scheme: str
    slow_on: tuple[str, ...] = ()  # device types where this kernel is only a last resort (load warns)
    slow_hint: str = ""  # what to do about it
    decode_unread: tuple[str, ...] = ()  # buffers kept for other row counts, not read by a decode step

    @abstractmethod
    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool: ...

    @abstractmethod
    def prepare(
        self,
        q: torch.Tensor,
        scale: torch.Tensor,
        zero_point: torch.Tensor | None,
        shape: LayerShape,
        device: torch.device,
        dtype: torch.dtype,
    ) -> dict[str, torch.Tensor]:
        """Repack checkpoint integers (int8 values, (N, K)) and scales into this kernel's buffers."""

    @abstractmethod
    def matmul(self, x: torch.Tensor, buffers: dict[str, torch.Tensor], shape: LayerShape) -> torch.Tensor:
        """x (M, K) → (M, N) in x's dtype."""

    def concat(
        self, parts: list[dict[str, torch.Tensor]], interleave: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """One layer's buffers from several layers over the same input, stacked along N (how the
        engine fuses q/k/v and gate/up; ``interleave``: their channels alternate, ``stack_channels``),
        or None where this kernel's layout cannot be stacked."""
        return None

    # A norm and residual folded into the matmul (llmopt/quant/norm_fusion.py). The defaults do the same
    # arithmetic around ``matmul``; a kernel that folds them in reports up to how many rows it does.

    def fused_norm_rows(self, buffers: dict[str, torch.Tensor], shape: LayerShape, dtype: torch.dtype) -> int:
        """Up to how many rows ``matmul_normed`` / ``matmul_residual`` run fused (0: never). Asked once,
        when a model is built."""
        return 0

    def gated_rows(self, buffers: dict[str, torch.Tensor], shape: LayerShape, dtype: torch.dtype) -> int:
        """Up to how many rows ``matmul_gated`` computes the SiLU product in the kernel (0: never; its
        norm, if given, within ``fused_norm_rows``). Asked once, when a model is built."""
        return 0

    def matmul_gated(self, x: torch.Tensor, buffers: dict[str, torch.Tensor], shape: LayerShape,
                     sumsq: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:  # fmt: skip
        """x (M, K) → ``silu(gate) * up`` (M, N/2) of a layer whose channels are interleaved gate/up pairs
        (``norm_fusion.silu_product``); over ``norm(h)`` given ``sumsq`` (as ``matmul_normed``)."""
        y = (
            self.matmul(x, buffers, shape)
            if sumsq is None
            else self.matmul_normed(x, buffers, shape, sumsq, eps)
        )
        return norm_fusion.silu_product(y)

    def matmul_normed(self, x: torch.Tensor, buffers: dict[str, torch.Tensor], shape: LayerShape,
                      sumsq: torch.Tensor, eps: float) -> torch.Tensor:  # fmt: skip
        """x (M, K) = ``h * w`` with h's row sums of squares → the matmul of ``norm(h)``, (M, N)."""
        return norm_fusion.scale_rows(self.matmul(x, buffers, shape), sumsq, shape.in_features, eps)

    def matmul_residual(
        self, x: torch.Tensor, buffers: dict[str, torch.Tensor], shape: LayerShape, residual: torch.Tensor,
        norm_weight: torch.Tensor | None, counter: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        """x (M, K) → ``norm_fusion.add_residual`` of the matmul: (h, h * w, sumsq) or (h, None, None).
        ``counter``: the layer's ``norm_fusion.new_counter``, for kernels that fold this in."""
        return norm_fusion.add_residual(self.matmul(x, buffers, shape), residual, norm_weight)


def stack_channels(tensors: list[torch.Tensor], dim: int = 0, interleave: bool = False) -> torch.Tensor:
    """Several layers' per-channel tensors as one layer's, channels along ``dim``: one layer's after
    another, or interleaved (channel ``len(tensors) * c + i`` is layer i's channel c; equal sizes)."""
    if not interleave:
        return torch.cat(tensors, dim)
    assert len({t.shape for t in tensors}) == 1, "interleaved layers have the same shape"
    return torch.stack(tensors, dim + 1).flatten(dim, dim + 1).contiguous()


class RowMajorQuantKernel(QuantKernel, ABC):
    """A kernel whose buffers all hold one row per output channel: layers stack by concatenation."""

    def concat(
        self, parts: list[dict[str, torch.Tensor]], interleave: bool = False
    ) -> dict[str, torch.Tensor] | None:
        return {name: stack_channels([p[name] for p in parts], 0, interleave) for name in parts[0]}


CPU_FP32_DEQUANT_MIN_ROWS = 64  # at 1,024 rows both paths take ~25 ms for 1536x576 on 2 cores (BENCHMARKS.md)


def _op_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    # torch's CPU low-bit ops are vectorised for bf16 activations only: fp32 runs ~10x slower than
    # a plain fp32 matmul (measured, see BENCHMARKS.md). On CPU the op runs in bf16 and the result
    # is cast back, so fp32 models keep fp32 everywhere else.
    return torch.bfloat16 if device.type == "cpu" else dtype


class AtenInt8Kernel(RowMajorQuantKernel):
    name = "aten._weight_int8pack_mm"
    scheme = "int8"
    slow_on = ("cuda",)  # ~2.5% of copy bandwidth on an H200 (BENCHMARKS.md §5)
    slow_hint = "install triton (it comes with CUDA builds of torch)."

    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool:
        return shape.scheme == "int8" and device.type in ("cpu", "cuda")

    def prepare(self, q, scale, zero_point, shape, device, dtype):
        op_dtype = _op_dtype(device, dtype)
        return {
            "weight_int8": q.to(device=device, dtype=torch.int8).contiguous(),  # (N, K)
            "scales": scale.reshape(-1).to(device=device, dtype=op_dtype).contiguous(),  # (N,)
        }

    def matmul(self, x, buffers, shape):
        scales = buffers["scales"]
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[0] >= CPU_FP32_DEQUANT_MIN_ROWS:
            # Many rows (prefill, scoring): the matmul is compute-bound, and dequantizing the int8
            # weight to a transient fp32 tile costs no more than the bf16 op while keeping fp32
            # activations (the bf16 cast alone flips ~1% of a small model's top-1 predictions).
            weight = buffers["weight_int8"].to(torch.float32) * scales.to(torch.float32).unsqueeze(1)
            return x @ weight.T
        y = torch.ops.aten._weight_int8pack_mm(x.to(scales.dtype), buffers["weight_int8"], scales)
        return y.to(x.dtype)


class AtenInt4Kernel(QuantKernel):
    """torch's tinygemm int4 kernels: ``w = (q_u - 8) * scale + zero`` with q_u in [0, 15].

    From compressed-tensors' ``w = (q - zp) * scale`` with q = q_u - 8: zero = -zp * scale.
    """

    name = "aten._weight_int4pack_mm"
    scheme = "int4"
    slow_on = ("cuda",)  # collapses from 16 rows on (BENCHMARKS.md §5)
    slow_hint = "install triton (it comes with CUDA builds of torch)."
    inner_k_tile_choices = (8, 4, 2)  # CUDA layout parameter; K must be a multiple of inner_k_tiles * 16

    def _inner_k_tiles(self, in_features: int) -> int | None:
        return next((t for t in self.inner_k_tile_choices if in_features % (t * 16) == 0), None)

    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool:
        if shape.scheme != "int4" or shape.group_size not in (32, 64, 128, 256):
            return False
        if device.type == "cpu":
            return shape.in_features % 2 == 0 and shape.out_features % 16 == 0
        if device.type == "cuda":
            return self._inner_k_tiles(shape.in_features) is not None and shape.out_features % 8 == 0
        return False

    def prepare(self, q, scale, zero_point, shape, device, dtype):
        if zero_point is None:
            raise UnsupportedError("int4 checkpoints without zero points are not supported yet.")
        op_dtype = _op_dtype(device, dtype) if device.type == "cpu" else torch.bfloat16
        scale_f = scale.float()
        zero = -zero_point.float() * scale_f
        scales_and_zeros = torch.stack([scale_f, zero], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
        q_u = (q.to(torch.int32) + 8).to(device)  # (N, K) in [0, 15]
        if device.type == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_u, 1)
        else:
            nibbles = q_u.to(torch.uint8)
            packed = torch.ops.aten._convert_weight_to_int4pack(
                (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).contiguous(), self._inner_k_tiles(shape.in_features)
            )
        return {
            "weight_int4": packed,
            "scales_and_zeros": scales_and_zeros.to(device=device, dtype=op_dtype),
        }

    def matmul(self, x, buffers, shape):
        sz = buffers["scales_and_zeros"]
        xq = x.to(sz.dtype)
        if x.device.type == "cpu":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xq, buffers["weight_int4"], shape.group_size, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm(xq, buffers["weight_int4"], shape.group_size, sz)
        return y.to(x.dtype)


class DequantFallbackKernel(RowMajorQuantKernel):
    """Correct for any shape, but slow: rebuilds the float weight on every call. Used only where no
    real kernel fits (a warning says so at load time); it keeps the integers, not a float copy."""

    name = "llmopt.dequantize_then_matmul"
    scheme = "any"

    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool:
        return True

    def prepare(self, q, scale, zero_point, shape, device, dtype):
        buffers = {
            "weight_int": q.to(device=device, dtype=torch.int8),
            "scale": scale.to(device=device, dtype=dtype),
        }
        if zero_point is not None:
            buffers["zero_point"] = zero_point.to(device=device, dtype=torch.int8)
        return buffers

    def matmul(self, x, buffers, shape):
        q, scale = buffers["weight_int"], buffers["scale"]
        n, k = q.shape
        group = shape.group_size or k
        qg = q.view(n, k // group, group).to(x.dtype)
        if "zero_point" in buffers:
            qg = qg - buffers["zero_point"].to(x.dtype).unsqueeze(-1)
        weight = (qg * scale.to(x.dtype).reshape(n, -1, 1)).reshape(n, k)
        return x @ weight.T


_FALLBACK = DequantFallbackKernel()
_WARNED: set[tuple[str, str]] = set()
_KERNELS: list[QuantKernel] = []


def _builtin_kernels() -> list[QuantKernel]:
    """llmopt's own kernels first (each module offers only what its toolchain can run here), then
    torch's ops. Imported on first use, so loading a float model never touches Triton or a compiler."""
    from llmopt.quant import cpu_kernels, triton_kernels

    return [*triton_kernels.available(), *cpu_kernels.available(), AtenInt8Kernel(), AtenInt4Kernel()]


def registered_kernels() -> list[QuantKernel]:
    """The dispatch list, in priority order."""
    if not _KERNELS:
        _KERNELS.extend(_builtin_kernels())
    return _KERNELS


def register_kernel(kernel: QuantKernel, *, first: bool = True) -> None:
    """Add a kernel to the dispatch list (ahead of the built-in ones unless ``first=False``)."""
    kernels = registered_kernels()
    if first:
        kernels.insert(0, kernel)
    else:
        kernels.append(kernel)


def select_kernel(shape: LayerShape, device: torch.device, dtype: torch.dtype) -> QuantKernel:
    """The first registered kernel that supports this layer on this device."""
    for kernel in registered_kernels():
        if kernel.supports(shape, device, dtype):
            if device.type in kernel.slow_on and (device.type, kernel.name) not in _WARNED:
                _WARNED.add((device.type, kernel.name))
                warnings.warn(
                    f"{shape.scheme} layers on {device.type} run through {kernel.name}, which is many times "
                    f"slower than llmopt's own kernels at decode: {kernel.slow_hint}",
                    stacklevel=3,
                )
            return kernel
    warnings.warn(
        f"No fast {shape.scheme} kernel fits a {shape.out_features}x{shape.in_features} layer "
        f"(group size {shape.group_size}) on {device.type}; it runs through the slow {_FALLBACK.name}.",
        stacklevel=3,
    )
    return _FALLBACK
