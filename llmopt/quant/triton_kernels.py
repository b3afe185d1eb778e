"""Triton kernels for weight-only int8 and int4 matmuls on the GPU.

``int8_matmul`` / ``int4_matmul`` are llmopt's GPU low-bit matmuls. Decode's few rows go first to
the CUDA C++ kernels of ``cuda_gemv`` (int4 at 1-16 rows; int8 at 1-16 within its weight-size rules;
faster there, BENCHMARKS.md §5) when nvcc can build them; on Hopper GPUs int8 at 64-4,096 rows and
int4 at 33-512 go to CUTLASS's mixed-input GEMM (``cutlass_gemm``; int4 with groups of a multiple of
64, through the group-major copies of its scales that ``prepare`` adds there); everything else runs
here.

One Triton kernel family serves every row count: a tile of ``BLOCK_M`` rows of ``x`` meets a tile of
the low-bit weight that is loaded as integers, dequantized in registers and fed to ``tl.dot``
(tensor cores). Weights are read once per row tile, at their stored width, so decode (1–16 rows)
is bound by reading int8/int4 bytes instead of bf16 ones. When the output is too narrow to give
every SM work, the K dimension is split across programs (``split_k``): each writes an fp32
partial and one small kernel sums them in a fixed order, so results do not depend on timing
(no atomics: greedy decoding stays deterministic). Either operand order is available
(``TileConfig.weight_left``): with the dequantized weight tile on the left, the product is computed
transposed and Hopper's wgmma reads the weight from registers; ``choose_config`` picks it where the
sweeps measured it faster (int4 from 17 rows).

Layouts (made by ``prepare`` from the checkpoint's integers):
- int8: ``q`` (N, K) int8 as stored; per-output-channel ``scale`` (N,) applied once to the sum.
- int4: ``packed`` (N, K/2) uint8. In every group of G inputs, byte j holds input j in its low
  nibble and input j + G/2 in its high nibble, each as ``q + 8`` in [0, 15]; with the group's
  zero point stored as ``zp + 8``, ``w = (nibble - zero) * scale`` exactly as compressed-tensors'
  ``(q - zp) * scale``. Splitting each group in halves (instead of interleaving neighbours)
  lets the kernel dot each half with a contiguous slice of x without reshuffling registers.

The ops are torch custom ops (``llmopt::int8_mm``, ``llmopt::int4_mm``) so ``torch.compile``
treats them as opaque calls and CUDA graphs capture their launches. Under Triton's interpreter
(``TRITON_INTERPRET=1``, how CI runs them on a CPU) the same kernels run on CPU tensors; the only
difference is that ``tl.dot`` takes fp32 operands there (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.quant import cuda_gemv, cutlass_gemm, norm_fusion
from llmopt.quant.kernels import LayerShape, QuantKernel, RowMajorQuantKernel, stack_channels

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int  # int8: inputs per step; int4: inputs per step (a multiple of the group size)
    split_k: int
    num_warps: int
    num_stages: int
    weight_left: bool = False  # compute (W x^T)^T: the dequantized weight is the left mma operand


if triton is not None:

    @triton.jit
    def _nibbles_to_float(nib, zero, DTYPE: tl.constexpr):
        """``nib - zero`` (both in [0, 15]; ``zero`` broadcast against ``nib``) as DTYPE, exactly.

        Integer-to-float conversion instructions run at a quarter of the FMA rate, too slow for
        two values per byte at full memory speed. For 16-bit types the nibble is OR-ed into the
        mantissa of a power of two instead (bf16 0x4300 = 128.0, fp16 0x6400 = 1024.0: the bits
        read as 128 + nib, resp. 1024 + nib) and the offset is subtracted in float, exactly."""
        if DTYPE == tl.bfloat16:  # noqa: SIM300
            w = (nib.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
            z = (zero.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
            return w - z
        elif DTYPE == tl.float16:  # noqa: SIM300
            w = (nib.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
            z = (zero.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
            return w - z
        else:
            return (nib.to(tl.int32) - zero.to(tl.int32)).to(DTYPE)

    @triton.jit
    def _tile_coords(M, N, k_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The matmul kernels' grid: axis 0 over output columns, 1 over rows, 2 over K splits.
        (split index, row and column indices, their in-range masks, first input of the split; a
        split starts at a multiple of BLOCK_K, so splits never share a step)."""
        pid_k = tl.program_id(2)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return pid_k, rm, rn, rm < M, rn < N, pid_k * k_per_split

    @triton.jit
    def _int8_mm_kernel(
        x_ptr, w_ptr, scale_ptr, out_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_wn, stride_om, stride_os,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, WEIGHT_LEFT: tl.constexpr,
    ):  # fmt: skip
        # WEIGHT_LEFT computes the transposed product, W_tile @ x_tileᵀ: the weight tile, which
        # is dequantized in registers, becomes the left operand, the one Hopper's wgmma can read
        # from registers (the right one must come from shared memory).
        pid_k, rm, rn, m_ok, n_ok, k_start = _tile_coords(M, N, k_per_split, BLOCK_M, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        if WEIGHT_LEFT:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, k_per_split, BLOCK_K):
            kk = k_start + step + rk
            k_ok = kk < K
            if WEIGHT_LEFT:
                x_mask = m_ok[None, :] & k_ok[:, None]
                xt = tl.load(x_ptr + rm[None, :] * stride_xm + kk[:, None], mask=x_mask, other=0.0)
                w = tl.load(
                    w_ptr + rn[:, None] * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0
                )
                acc += tl.dot(w.to(DOT_DTYPE), xt.to(DOT_DTYPE), input_precision="ieee")
            else:
                x_mask = m_ok[:, None] & k_ok[None, :]
                x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0.0)
                w = tl.load(
                    w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0
                )
                acc += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision="ieee")
        _store_tile(acc, out_ptr, scale_ptr, rm, rn, m_ok, n_ok, pid_k, stride_om, stride_os,
                    SPLIT, True, WEIGHT_LEFT)  # fmt: skip

    @triton.jit
    def _store_tile(acc, out_ptr, scale_ptr, rm, rn, m_ok, n_ok, pid_k, stride_om, stride_os,
                    SPLIT: tl.constexpr, HAS_SCALE: tl.constexpr, WEIGHT_LEFT: tl.constexpr):  # fmt: skip
        """Write an (M, N) tile, or its transpose (N, M) when WEIGHT_LEFT: an fp32 partial per
        split, else the result (times the per-column scale, if any) in the output's dtype."""
        if WEIGHT_LEFT:
            mask = n_ok[:, None] & m_ok[None, :]
            offs = rm[None, :] * stride_om + rn[:, None]
        else:
            mask = m_ok[:, None] & n_ok[None, :]
            offs = rm[:, None] * stride_om + rn[None, :]
        if SPLIT:
            tl.store(out_ptr + pid_k * stride_os + offs, acc, mask=mask)
        else:
            if HAS_SCALE:
                scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
                acc = acc * scale[:, None] if WEIGHT_LEFT else acc * scale[None, :]
            tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _int4_mm_kernel(
        x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_wn, stride_sn, stride_om, stride_os,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, WEIGHT_LEFT: tl.constexpr,
    ):  # fmt: skip
        # A step covers BLOCK_K / GROUP whole groups, one at a time: the group's bytes hold its
        # first half of inputs in the low nibbles and its second half in the high nibbles, so
        # each half meets a contiguous slice of x and one scale/zero per output column.
        # WEIGHT_LEFT: the transposed product, as in _int8_mm_kernel.
        HALF: tl.constexpr = GROUP // 2
        pid_k, rm, rn, m_ok, n_ok, k_start = _tile_coords(M, N, k_per_split, BLOCK_M, BLOCK_N)
        rh = tl.arange(0, HALF)
        if WEIGHT_LEFT:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in range(0, k_per_split, BLOCK_K):
            for sub in tl.static_range(BLOCK_K // GROUP):
                k = k_start + step + sub * GROUP
                h_ok = k + rh < K  # K is a whole number of groups: all of a group, or none
                nk_ok = n_ok & (k + rn * 0 < K)
                scale = tl.load(scale_ptr + rn * stride_sn + k // GROUP, mask=nk_ok, other=0.0).to(DOT_DTYPE)
                zero = tl.load(zero_ptr + rn * stride_sn + k // GROUP, mask=nk_ok, other=0)
                if WEIGHT_LEFT:
                    packed = tl.load(w_ptr + rn[:, None] * stride_wn + (k // 2 + rh)[None, :],
                                     mask=n_ok[:, None] & h_ok[None, :], other=0)  # fmt: skip
                    w_lo = _nibbles_to_float(packed & 0xF, zero[:, None], DOT_DTYPE) * scale[:, None]
                    w_hi = _nibbles_to_float(packed >> 4, zero[:, None], DOT_DTYPE) * scale[:, None]
                    x_cols = x_ptr + rm[None, :] * stride_xm + (k + rh)[:, None]
                    x_mask = m_ok[None, :] & h_ok[:, None]
                    x_lo = tl.load(x_cols, mask=x_mask, other=0.0).to(DOT_DTYPE)
                    x_hi = tl.load(x_cols + HALF, mask=x_mask, other=0.0).to(DOT_DTYPE)
                    acc += tl.dot(w_lo, x_lo, input_precision="ieee")
                    acc += tl.dot(w_hi, x_hi, input_precision="ieee")
                else:
                    packed = tl.load(w_ptr + rn[None, :] * stride_wn + (k // 2 + rh)[:, None],
                                     mask=n_ok[None, :] & h_ok[:, None], other=0)  # fmt: skip
                    w_lo = _nibbles_to_float(packed & 0xF, zero[None, :], DOT_DTYPE) * scale[None, :]
                    w_hi = _nibbles_to_float(packed >> 4, zero[None, :], DOT_DTYPE) * scale[None, :]
                    x_rows = x_ptr + rm[:, None] * stride_xm + (k + rh)[None, :]
                    x_mask = m_ok[:, None] & h_ok[None, :]
                    x_lo = tl.load(x_rows, mask=x_mask, other=0.0).to(DOT_DTYPE)
                    x_hi = tl.load(x_rows + HALF, mask=x_mask, other=0.0).to(DOT_DTYPE)
                    acc += tl.dot(x_lo, w_lo, input_precision="ieee")
                    acc += tl.dot(x_hi, w_hi, input_precision="ieee")
        _store_tile(acc, out_ptr, scale_ptr, rm, rn, m_ok, n_ok, pid_k, stride_om, stride_os,
                    SPLIT, False, WEIGHT_LEFT)  # fmt: skip

    @triton.jit
    def _int4_dequant_kernel(
        w_ptr, scale_ptr, zero_ptr, out_ptr, N, stride_wn, stride_sn, stride_on,
        GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # One group of BLOCK_N rows per program: the bf16 weight for prefill-sized matmuls.
        HALF: tl.constexpr = GROUP // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        g = tl.program_id(1)
        rh = tl.arange(0, HALF)
        n_ok = rn < N
        packed = tl.load(
            w_ptr + rn[:, None] * stride_wn + (g * HALF + rh)[None, :], mask=n_ok[:, None], other=0
        )
        packed = packed.to(tl.int32)
        scale = tl.load(scale_ptr + rn * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        zero = tl.load(zero_ptr + rn * stride_sn + g, mask=n_ok, other=0).to(tl.int32)[:, None]
        dst = out_ptr + rn[:, None] * stride_on + g * GROUP + rh[None, :]
        ty = out_ptr.dtype.element_ty
        tl.store(dst, (((packed & 0xF) - zero).to(tl.float32) * scale).to(ty), mask=n_ok[:, None])
        tl.store(dst + HALF, (((packed >> 4) - zero).to(tl.float32) * scale).to(ty), mask=n_ok[:, None])

    @triton.jit
    def _int8_dequant_kernel(q_ptr, scale_ptr, out_ptr, N, K, stride_qn, stride_on,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # A BLOCK_N x BLOCK_K tile per program: q * scale in the output's dtype, rounded once from
        # fp32 (what torch's q * scale.to(dtype)[:, None] computes).
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rn < N)[:, None] & (rk < K)[None, :]
        q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=mask, other=0)
        ty = out_ptr.dtype.element_ty
        scale = tl.load(scale_ptr + rn, mask=rn < N, other=0.0).to(ty).to(tl.float32)
        tl.store(out_ptr + rn[:, None] * stride_on + rk[None, :], (q.to(tl.float32) * scale[:, None]).to(ty),
                 mask=mask)  # fmt: skip

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr):
        # One row per program: absmax over the row, then int8 = round-half-away(x * 127 / absmax).
        row = tl.program_id(0)
        rk = tl.arange(0, BLOCK_K)
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 127.0, 1e-30)
        for k0 in range(0, K, BLOCK_K):
            ok = k0 + rk < K
            v = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=ok, other=0.0).to(tl.float32) / scale
            q = tl.where(v >= 0, v + 0.5, v - 0.5).to(tl.int32)  # |v| <= 127: no clamp needed
            tl.store(q_ptr + row * stride_qm + k0 + rk, q.to(tl.int8), mask=ok)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _w8a8_mm_kernel(
        xq_ptr, xs_ptr, w_ptr, scale_ptr, out_ptr,
        M, N, K, k_per_split,
        stride_xm, stride_wn, stride_om, stride_os,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
    ):  # fmt: skip
        # int8 x int8 on the int8 tensor cores, exact int32 sums; the row scale (per token) and the
        # column scale (per output channel) are applied to the sum.
        pid_k, rm, rn, m_ok, n_ok, k_start = _tile_coords(M, N, k_per_split, BLOCK_M, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for step in range(0, k_per_split, BLOCK_K):
            kk = k_start + step + rk
            k_ok = kk < K
            x = tl.load(
                xq_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0
            )
            w = tl.load(
                w_ptr + rn[None, :] * stride_wn + kk[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0
            )
            acc += tl.dot(x, w, out_dtype=tl.int32)
        row_scale = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
        _store_tile(acc.to(tl.float32) * row_scale[:, None], out_ptr, scale_ptr, rm, rn, m_ok, n_ok, pid_k,
                    stride_om, stride_os, SPLIT, True, False)  # fmt: skip

    @triton.jit
    def _split_k_sum_kernel(
        part_ptr,
        scale_ptr,
        out_ptr,
        MN,
        N,
        SPLIT_K: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(SPLIT_K):  # fixed order: the same sum on every run
            acc += tl.load(part_ptr + s * MN + offs, mask=ok, other=0.0)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + offs % N, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def sm_count(device_index: int) -> int:
    """The GPU's SM count, which grid rules fill (8 under Triton's interpreter: any number works)."""
    if interpreting() or not torch.cuda.is_available():
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pow2_at_least(n: int, lo: int) -> int:
    """The smallest power of two >= n, and at least ``lo`` (a block size covering n)."""
    return max(lo, 1 << max(0, (n - 1).bit_length()))


# From this many rows on, a matmul is compute-bound: dequantizing the weight once into a transient
# 16-bit tile and running cuBLAS beats dequantizing inside every tile (Triton's tensor-core path
# reaches ~60% of cuBLAS there). Measured on an H200, BENCHMARKS.md §5.
DEQUANT_MIN_ROWS = 256


def choose_config(scheme: str, m: int, n: int, k: int, group: int | None, sms: int) -> TileConfig:
    """Tile sizes by row count and layer shape, from sweeps on an H200 over Llama-3-8B's layers
    (BENCHMARKS.md §5; examples/gpu_lowbit_kernels.py ``sweep`` and ``orient``).

    Up to 16 rows (decode): one 16-row tile of x, 128-wide weight tiles streamed in deep K steps
    (512 inputs for wide K, where fewer steps cut the loop's overhead), K split while there are
    fewer tiles than SMs. More rows: taller x tiles that reuse each dequantized weight tile.
    From 17 rows on, int4 computes the transposed product (``weight_left``): the dequantized
    weight tile is then the operand Hopper's wgmma takes from registers, 1.2-1.4x faster there;
    int8 measured slower that way at every row count, so it keeps x on the left."""
    left = scheme == "int4" and m > 16
    if m <= 16:
        block_m, block_n, num_stages = 16, 128, 3
        block_k = 512 if scheme == "int8" and k >= 8192 else 256
        num_warps = 4 if scheme == "int8" else 8
    elif m <= 32:
        block_m, block_k, num_stages = 32, 128, 3
        if scheme == "int8":
            block_n, num_warps = (256, 8) if k >= 8192 else (128, 4)
        else:
            block_n, num_warps = 128, 8
    elif m <= 64:
        block_m, block_n, block_k, num_warps, num_stages = 64, 128, 128, 4, 3
    else:
        block_m, block_n = 128, 128
        if scheme == "int8":
            block_k, num_warps, num_stages = (128, 8, 3) if n <= 4096 else (64, 4, 4)
        else:
            block_k, num_stages = 128, 3
            block_n, num_warps = (128, 8) if n <= 4096 else (64, 4)
    if scheme == "int4" and group is not None:
        block_k = max(block_k // group, 1) * group
    block_k = min(block_k, pow2_at_least(k, group or 32))
    split_k = _split_to_fill(-(-n // block_n) * -(-m // block_m), -(-k // block_k), sms)
    return TileConfig(block_m, block_n, block_k, split_k, num_warps, num_stages, left)


def _split_to_fill(tiles: int, steps: int, sms: int) -> int:
    """How many ways to split K so that tiles x splits fills the SMs (powers of 2, at most 16)."""
    split_k = 1
    while tiles * split_k < 0.9 * sms and split_k * 2 <= steps and split_k < 16:
        split_k *= 2
    return split_k


# Opt-in (LLMOPT_INT8_ACTIVATIONS=1): from this many rows on, int8 layers also quantize their
# activations, per row (token), to int8 and run on the int8 tensor cores (W8A8: twice bf16's peak
# rate, and no dequantization in the loop). With many rows the matmul turns compute-bound, and
# dequantizing the weight in the tile makes weight-only int8 slower than bf16 cuBLAS (Llama-3-8B
# shape on an H200, batch 128: 0.93x bf16 weight-only, 1.19x with W8A8; BENCHMARKS.md §5). It is not
# the default because the activations' rounding costs quality: smollm2's int8 checkpoint (emulated
# on the CPU) goes from perplexity -0.03% / top-1 agreement 98.5% to +1.15% / 92.9%.
W8A8_MIN_ROWS = 33


def int8_activations_enabled() -> bool:
    return os.environ.get("LLMOPT_INT8_ACTIVATIONS") == "1"


def choose_w8a8_config(m: int, n: int, k: int, sms: int) -> TileConfig:
    """Tiles for the W8A8 kernel, from a sweep on an H200 over Llama-3-8B's layers at 128 rows
    (BENCHMARKS.md §5): 128x128 tiles, 8 warps, 3 stages, 256 inputs per step for wide K (down)
    else 128; 64-row tiles up to 64 rows. K is split while there are fewer tiles than SMs."""
    block_m, num_warps, num_stages = (64, 4, 4) if m <= 64 else (128, 8, 3)
    block_n, block_k = 128, min(256 if k >= 8192 else 128, pow2_at_least(k, 32))
    split_k = _split_to_fill(-(-n // block_n) * -(-m // block_m), -(-k // block_k), sms)
    return TileConfig(block_m, block_n, block_k, split_k, num_warps, num_stages)


def _dot_dtype(x: torch.Tensor) -> Any:
    if interpreting() or x.dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16


def _splits(k: int, cfg: TileConfig) -> tuple[int, int]:
    """(inputs per split, number of splits); each split is a whole number of BLOCK_K steps."""
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    return k_per_split, triton.cdiv(k, k_per_split)


def _finish_split(partials: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor) -> None:
    m, n = out.shape
    block = 1024
    _split_k_sum_kernel[(triton.cdiv(m * n, block),)](
        partials, scale if scale is not None else partials, out, m * n, n,
        SPLIT_K=partials.shape[0], HAS_SCALE=scale is not None, BLOCK=block,
    )  # fmt: skip


def _prepare_out(x: torch.Tensor, n: int, out: torch.Tensor | None) -> torch.Tensor:
    return torch.empty((x.shape[0], n), device=x.device, dtype=x.dtype) if out is None else out


def _use_dequant(m: int, config: TileConfig | None) -> bool:
    return config is None and m >= DEQUANT_MIN_ROWS and not interpreting()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                config: TileConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``x @ (q * scale[:, None]).T``: x (M, K) float, q (N, K) int8, scale (N,). Writes into
    ``out`` (M, N) when given (its previous contents are never read)."""
    x = x.contiguous()
    (m, k), n = x.shape, q.shape[0]
    out = _prepare_out(x, n, out)
    if m == 0:
        return out
    if config is None and cuda_gemv.usable(x, q, k):  # decode rows: the CUDA kernels
        return cuda_gemv.int8_gemv(x, q, scale, out)
    if config is None and m >= W8A8_MIN_ROWS and int8_activations_enabled():
        return w8a8_matmul(x, q, scale, out=out)
    if config is None and cutlass_gemm.usable(x, q, scale, out):  # prefill, large batches on Hopper
        return cutlass_gemm.int8_gemm(x, q, scale, out)
    if _use_dequant(m, config):
        return torch.mm(x, int8_dequantize(q, scale, x.dtype).T, out=out)
    cfg = config or choose_config("int8", m, n, k, None, sm_count(x.device.index or 0))
    k_per_split, split = _splits(k, cfg)
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _int8_mm_kernel[grid](
        x, q, scale, target, m, n, k, k_per_split, x.stride(0), q.stride(0), out.stride(0), m * n,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
        DOT_DTYPE=_dot_dtype(x), WEIGHT_LEFT=cfg.weight_left, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if split > 1:  # the per-channel scale is applied once, after the sum
        _finish_split(target, scale, out)
    return out


def int8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight ``q * scale[:, None]`` in ``dtype``, at the copy rate (torch's broadcasting
    multiply with a dtype change ran at under a quarter of it on an H200, BENCHMARKS.md §5)."""
    n, k = q.shape
    out = torch.empty((n, k), device=q.device, dtype=dtype)
    block_n, block_k = 16, 512
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _int8_dequant_kernel[grid](
        q, scale, out, n, k, q.stride(0), out.stride(0), BLOCK_N=block_n, BLOCK_K=block_k
    )
    return out


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (q (M, K) int8, scale (M,) float32) with ``x ≈ q * scale[:, None]``,
    scale = absmax / 127, rounding half away from zero."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), device=x.device, dtype=torch.int8)
    scale = torch.empty((m,), device=x.device, dtype=torch.float32)
    if m:
        _quantize_rows_kernel[(m,)](
            x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=min(1024, pow2_at_least(k, 32))
        )
    return q, scale


def w8a8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None,
                config: TileConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``quantize_rows(x)`` times ``(q * scale[:, None]).T`` on the int8 tensor cores: x (M, K)
    float, q (N, K) int8, scale (N,). The only error beyond the weight's is the activations'
    rounding to int8 per row."""
    (m, k), n = x.shape, q.shape[0]
    out = _prepare_out(x, n, out)
    if m == 0:
        return out
    xq, xs = quantize_rows(x)
    cfg = config or choose_w8a8_config(m, n, k, sm_count(x.device.index or 0))
    k_per_split, split = _splits(k, cfg)
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _w8a8_mm_kernel[grid](
        xq, xs, q, scale, target, m, n, k, k_per_split, xq.stride(0), q.stride(0), out.stride(0), m * n,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split > 1:
        _finish_split(target, scale, out)
    return out


def int4_dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                    dtype: torch.dtype) -> torch.Tensor:  # fmt: skip
    """The (N, K) weight in ``dtype`` from the half-split int4 layout."""
    n = packed.shape[0]
    out = torch.empty((n, packed.shape[1] * 2), device=packed.device, dtype=dtype)
    block_n = 64
    _int4_dequant_kernel[(triton.cdiv(n, block_n), scale.shape[1])](
        packed,
        scale,
        zero,
        out,
        n,
        packed.stride(0),
        scale.stride(0),
        out.stride(0),
        GROUP=group,
        BLOCK_N=block_n,
    )
    return out


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    out: torch.Tensor | None = None,
    config: TileConfig | None = None,
    group_major: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T`` for the half-split int4 layout: packed (N, K/2) uint8, scale and zero
    (N, K/G). Writes into ``out`` (M, N) when given. ``group_major``: the layer's
    ``cutlass_gemm.group_major`` scales, where it keeps them (prefill and large batches on Hopper)."""
    x = x.contiguous()
    (m, k), n = x.shape, packed.shape[0]
    out = _prepare_out(x, n, out)
    if m == 0:
        return out
    if config is None and cuda_gemv.usable(x, packed, k, group):  # decode rows: the CUDA kernels
        return cuda_gemv.int4_gemv(x, packed, scale, zero, group, out)
    if (
        config is None
        and group_major is not None
        and cutlass_gemm.usable_int4(x, packed, *group_major, group, out)
    ):  # prefill, large batches on Hopper
        return cutlass_gemm.int4_gemm(x, packed, *group_major, group, out)
    if _use_dequant(m, config):
        return torch.mm(x, int4_dequantize(packed, scale, zero, group, x.dtype).T, out=out)
    cfg = config or choose_config("int4", m, n, k, group, sm_count(x.device.index or 0))
    k_per_split, split = _splits(k, cfg)
    target = out if split == 1 else torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), split)
    _int4_mm_kernel[grid](
        x, packed, scale, zero, target, m, n, k, k_per_split,
        x.stride(0), packed.stride(0), scale.stride(0), out.stride(0), m * n,
        GROUP=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=split > 1,
        DOT_DTYPE=_dot_dtype(x), WEIGHT_LEFT=cfg.weight_left, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )  # fmt: skip
    if split > 1:
        _finish_split(target, None, out)
    return out


def pack_int4_halves(q: torch.Tensor, group: int) -> torch.Tensor:
    """(N, K) int4 values in [-8, 7] → (N, K/2) uint8 in the half-split layout above."""
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8).view(n, k // group, 2, group // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


# torch custom ops: opaque to torch.compile, launched as-is inside CUDA graphs. Eager code calls the
# functions themselves: the custom-op wrapper costs host time on every call (prefill is eager).


@torch.library.custom_op("llmopt::int8_mm", mutates_args=())
def _int8_mm_op(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return int8_matmul(x, q, scale)


@_int8_mm_op.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))


@torch.library.custom_op("llmopt::int4_mm", mutates_args=())
def _int4_mm_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    scale_g: torch.Tensor | None = None,
    zero_g: torch.Tensor | None = None,
) -> torch.Tensor:
    by_group = (scale_g, zero_g) if scale_g is not None and zero_g is not None else None
    return int4_matmul(x, packed, scale, zero, group, group_major=by_group)


@_int4_mm_op.register_fake
def _(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    scale_g: torch.Tensor | None = None,
    zero_g: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], packed.shape[0]))


def _runs_here(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


class TritonInt8Kernel(RowMajorQuantKernel):
    """``llmopt::int8_mm``: decode rows through the CUDA kernels (cuda_gemv) where they build, the
    Triton tiles otherwise and for more rows, cuBLAS on a dequantized copy for prefill."""

    name = "llmopt.int8_mm"
    scheme = "int8"

    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            shape.scheme == "int8"
            and _runs_here(device)
            and dtype in (torch.bfloat16, torch.float16, torch.float32)
        )

    def prepare(self, q, scale, zero_point, shape, device, dtype):
        return {
            "weight_int8": q.to(device=device, dtype=torch.int8).contiguous(),  # (N, K)
            "scales": scale.reshape(-1).to(device=device).contiguous(),  # (N,), the checkpoint's dtype
        }

    def matmul(self, x, buffers, shape):
        args = (x, buffers["weight_int8"], buffers["scales"])
        return torch.ops.llmopt.int8_mm(*args) if torch.compiler.is_compiling() else int8_matmul(*args)

    def fused_norm_rows(self, buffers, shape, dtype):
        return cuda_gemv.fused_max_rows(dtype, buffers["weight_int8"], shape.in_features)

    def matmul_normed(self, x, buffers, shape, sumsq, eps):
        args = (buffers["weight_int8"], buffers["scales"], None, 0)
        return norm_fusion.cuda_normed_matmul(x, *args, sumsq, eps)

    def gated_rows(self, buffers, shape, dtype):
        return cuda_gemv.gated_max_rows(dtype, buffers["weight_int8"], shape.in_features)

    def matmul_gated(self, x, buffers, shape, sumsq=None, eps=0.0):
        return norm_fusion.cuda_gated_matmul(
            x, buffers["weight_int8"], buffers["scales"], None, 0, sumsq, eps
        )

    def matmul_residual(self, x, buffers, shape, residual, norm_weight, counter=None):
        assert counter is not None
        args = (buffers["weight_int8"], buffers["scales"], None, 0)
        return norm_fusion.cuda_residual_matmul(x, *args, residual, norm_weight, counter)


GROUP_MAJOR = ("scales_by_group", "zeros_by_group")  # TritonInt4Kernel's buffers for cutlass_gemm.int4_gemm


class TritonInt4Kernel(RowMajorQuantKernel):
    """``llmopt::int4_mm``: as TritonInt8Kernel, for the half-split int4 layout."""

    name = "llmopt.int4_mm"
    scheme = "int4"
    decode_unread = GROUP_MAJOR  # read by cutlass_gemm, past decode's rows

    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool:
        g = shape.group_size
        return (
            shape.scheme == "int4"
            and g is not None
            and g >= 32
            and g & (g - 1) == 0
            and shape.in_features % g == 0
            and _runs_here(device)
            and dtype in (torch.bfloat16, torch.float16, torch.float32)
        )

    def prepare(self, q, scale, zero_point, shape, device, dtype):
        group = shape.group_size
        assert group is not None
        n, k = q.shape
        zp = zero_point if zero_point is not None else torch.zeros(n, k // group, dtype=torch.int8)
        buffers = {
            "weight_int4": pack_int4_halves(q.to(device), group),
            "scales": scale.reshape(n, k // group).to(device=device).contiguous(),
            "zeros": (zp.reshape(n, k // group).to(torch.int16) + 8)
            .to(device=device, dtype=torch.uint8)
            .contiguous(),
        }
        if cutlass_gemm.int4_wanted(torch.device(device), dtype, group):  # prefill / large batches on Hopper
            copies = cutlass_gemm.group_major(buffers["scales"], buffers["zeros"], dtype)
            buffers |= dict(zip(GROUP_MAJOR, copies, strict=True))
        return buffers

    def concat(
        self, parts: list[dict[str, torch.Tensor]], interleave: bool = False
    ) -> dict[str, torch.Tensor] | None:
        """As RowMajorQuantKernel's, but the group-major copies (K/G, N) stack along their columns."""
        return {
            name: stack_channels([p[name] for p in parts], int(name in GROUP_MAJOR), interleave)
            for name in parts[0]
        }

    def matmul(self, x, buffers, shape):
        assert shape.group_size is not None
        args = (x, buffers["weight_int4"], buffers["scales"], buffers["zeros"], shape.group_size)
        by_group = tuple(buffers[name] for name in GROUP_MAJOR) if GROUP_MAJOR[0] in buffers else None
        if torch.compiler.is_compiling():
            return torch.ops.llmopt.int4_mm(*args, *(by_group or (None, None)))
        return int4_matmul(*args, group_major=by_group)

    def fused_norm_rows(self, buffers, shape, dtype):
        return cuda_gemv.fused_max_rows(dtype, buffers["weight_int4"], shape.in_features, shape.group_size)

    def _fused_args(self, buffers, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        assert shape.group_size is not None
        return buffers["weight_int4"], buffers["scales"], buffers["zeros"], shape.group_size

    def matmul_normed(self, x, buffers, shape, sumsq, eps):
        return norm_fusion.cuda_normed_matmul(x, *self._fused_args(buffers, shape), sumsq, eps)

    def gated_rows(self, buffers, shape, dtype):
        return cuda_gemv.gated_max_rows(dtype, buffers["weight_int4"], shape.in_features, shape.group_size)

    def matmul_gated(self, x, buffers, shape, sumsq=None, eps=0.0):
        return norm_fusion.cuda_gated_matmul(x, *self._fused_args(buffers, shape), sumsq, eps)

    def matmul_residual(self, x, buffers, shape, residual, norm_weight, counter=None):
        assert counter is not None
        args = self._fused_args(buffers, shape)
        return norm_fusion.cuda_residual_matmul(x, *args, residual, norm_weight, counter)


def available() -> list[QuantKernel]:
    """The Triton kernels, where Triton is installed (the GPU machine; CI too, for the interpreter)."""
    if triton is None:
        return []
    return [TritonInt8Kernel(), TritonInt4Kernel()]
