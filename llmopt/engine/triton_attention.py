"""Fused decode attention for the engine on the GPU: one Triton kernel per layer and decode step.

A decode step gives each row b (one sequence, in cache slot ``slots[b]``) one new token at
``positions[b]``. For every layer this module rotates the token's query and key (rotary embedding,
read from the model's tables at the row's position; or takes them rotated), writes its key and value
into the layer's cache ``[slots, KV, S, D]`` and attends: query head ``h * G + g`` of the row
(q ``[B, 1, KV * G, D]``) over the keys of KV head h at the positions the row may see,

    visible(b) = [max(0, p - window + 1), p + 1)   if p < attn_len, else nothing   (p = positions[b])

(``window`` = S for full-attention layers), ``softmax(scale * q . k)`` in fp32, output
``[B, 1, KV * G * D]`` in q's dtype (zeros for a row that sees nothing): the layout o_proj reads.
Nothing at or past ``attn_len`` is read. Idle rows of a bucket sit at the cache's scratch position
S - 1 and write there; their output is ignored. In every bucket but the last (attn_len < S) that
position is past attn_len, so they read nothing: a bucket's padding rows cost no KV traffic.

Flash-decoding. The sequence is cut into chunks of ``DecodeConfig.chunk`` positions and the
chunk kernel's grid is (chunks, KV heads, rows), so a batch-1 step still fills the GPU. Program
(c, h, b) streams the K/V tiles of chunk c that row b can see (none when its visible range misses
the chunk) once for all G query heads of KV head h: the G heads are the rows of the ``tl.dot``
(padded to 16). It keeps the online-softmax state per head, the running max m, the sum of
exponentials ``total`` and the unnormalised output acc, and writes it as an fp32 partial. The combine
kernel, one program per (query head, row), merges a row's chunks in one fixed-shape tile,

    M = max_c m_c,    out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) total_c

(zeros when nothing is visible). No atomics, and every reduction has a fixed shape and order, so
a step is bit-for-bit the same on every run. When one chunk covers ``attn_len`` the chunk kernel
writes the output itself (one launch). The grid and the chunk size depend only on the batch,
``attn_len``, the shapes and the SM count, never on data, and nothing syncs with the host: the
launches are captured as they are in the engine's CUDA graphs.

Rotary embedding. With the model's cos / signed-sin tables ``[positions, D]`` (``model.rotate``'s
half-split form: ``x * cos + roll(x, D/2) * signed_sin``) every program rotates q and the new key
itself, in fp32, rounded once to their dtype: the separate elementwise kernel this replaces cost
as much per layer as the attention at batch 1.

The cache write. The chunk-0 program of each (row, KV head) stores the new key and value. No
program reads position p back from memory: the tiles stop before it, and the chunk that holds it
adds the new key and value from registers as one more online-softmax step (in fp32), so programs
never race on it and need no barrier. Rows must be distinct slots (the engine's are).

Precision: scores, softmax and sums in fp32. 16-bit models feed q and the cached K, and the
probabilities with the cached V, to the tensor cores in their own dtype (the probabilities rounded
to it, as flash attention does), accumulating in fp32; fp32 models use full-precision fp32 dots.
Under Triton's interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels on the CPU) the dots
take fp32 operands, as in llmopt/quant/triton_kernels.py.

``llmopt::decode_attention`` is a torch custom op that mutates the caches, so torch.compile treats
it as one opaque call (writing into the cache tensors in place) and CUDA graphs capture it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from llmopt.quant.triton_kernels import pow2_at_least, sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

MIN_CHUNK, MAX_CHUNK = 64, 1024  # positions per program, when chosen automatically
MAX_CHUNKS = 64  # chunks per row at most: the combine holds a row's partials in one tile
# The chunk grows while the grid still gives every SM this many programs. 1, from a sweep of chunk
# sizes on an H200 (Llama-3-8B heads, batch 1/32/128 x attention length 256/1,024/4,096;
# examples/gpu_attention_bench.py, BENCHMARKS.md §5): it picks the best chunk or one within 2% in
# every case; 4 cut batch 32 too finely (19.4 µs per layer at length 256 against 13.6).
PROGRAMS_PER_SM = 1


@dataclass(frozen=True)
class DecodeConfig:
    chunk: int  # positions per program of the chunk kernel (a multiple of block_n)
    block_n: int  # positions per K/V tile
    num_warps: int = 4
    num_stages: int = 2


def available() -> bool:
    return triton is not None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def choose_config(row_heads: int, attn_len: int, head_dim: int, sms: int) -> DecodeConfig:
    """The largest power-of-two chunk from MIN_CHUNK to MAX_CHUNK positions that still gives every
    SM PROGRAMS_PER_SM programs (``row_heads`` = rows x KV heads programs per chunk): batch 1 cuts
    the sequence finely, batch 128 barely. Long contexts take longer chunks, at most MAX_CHUNKS."""
    chunk, enough = MIN_CHUNK, PROGRAMS_PER_SM * sms
    while chunk < min(attn_len, MAX_CHUNK) and row_heads * _cdiv(attn_len, 2 * chunk) >= enough:
        chunk *= 2
    chunk = max(chunk, pow2_at_least(_cdiv(attn_len, MAX_CHUNKS), 1))
    return DecodeConfig(chunk=chunk, block_n=64 if head_dim <= 128 else 32)


if triton is not None:

    @triton.jit
    def _attend_cached(q, k_rows, v_rows, lo, hi, scale, stride_cp, rd, d_ok,
                       BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_DTYPE: tl.constexpr):  # fmt: skip
        """Online softmax of the query tile q [BLOCK_G, BLOCK_D] (in DOT_DTYPE) over cached positions
        lo..hi-1 of one slot's KV head (``k_rows``/``v_rows`` point at its position 0). Returns per
        head the running max m of the scores, the sum of their exponentials relative to it and the
        unnormalised output; m stays at a finite floor when lo >= hi, so that e^(m - M) is never
        e^(-inf + inf)."""
        m = tl.full((BLOCK_G,), -1.0e30, dtype=tl.float32)
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        for start in range(lo, hi, BLOCK_N):
            rn = start + tl.arange(0, BLOCK_N)
            n_ok = rn < hi
            offs = rn[:, None] * stride_cp + rd[None, :]
            tile_ok = n_ok[:, None] & d_ok[None, :]
            keys = tl.load(k_rows + offs, mask=tile_ok, other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(keys), input_precision="ieee") * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            values = tl.load(v_rows + offs, mask=tile_ok, other=0.0).to(DOT_DTYPE)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), values, input_precision="ieee")
            m = m_new
        return m, total, acc

    @triton.jit
    def _add_new_token(m, total, acc, q, k_new, v_new, scale, visible):
        """The online-softmax state after one more key, the step's own (from registers, in fp32),
        when ``visible``; unchanged otherwise (its score is -inf)."""
        s = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        return m_new, total * alpha + p, acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]

    @triton.jit
    def _normalized(acc, total):
        """acc / total: zeros where a head saw nothing (total = 0, acc = 0)."""
        return acc / tl.where(total > 0, total, 1.0)

    @triton.jit
    def _rotated(x, x_swapped, cos, sin):
        """Rotary embedding in model.rotate's form, x * cos + roll(x, D/2) * signed_sin, in fp32,
        rounded once to x's dtype (``x_swapped`` is x read at (d + D/2) mod D)."""
        y = x.to(tl.float32) * cos + x_swapped.to(tl.float32) * sin
        return y.to(x.dtype)

    @triton.jit
    def _decode_attention_chunk_kernel(
        q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, pos_ptr, out_ptr, part_o_ptr, part_ml_ptr,
        cos_ptr, sin_ptr, attn_len, window, scale, n_chunks, n_part_rows,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_cs, stride_ch, stride_cp,
        stride_ob, stride_rope,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
        BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, ROTATE: tl.constexpr,
    ):  # fmt: skip
        # Program (chunk, KV head, row): the cache write (chunk 0 only) and the chunk's partial for
        # the G query heads of the KV head. Partials: part_o [rows, heads, chunks, D] and part_ml
        # [2, rows, heads, chunks] (m, then total); n_part_rows = rows * heads * chunks.
        chunk, head, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        slot = tl.load(slot_ptr + row)  # int64: slot * stride_cs may pass 2^31
        pos = tl.load(pos_ptr + row).to(tl.int32)
        rg, rd = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        g_ok, d_ok = rg < G, rd < D
        q_heads = head * G + rg
        q_rows = q_ptr + row * stride_qb + q_heads[:, None] * stride_qh
        q_mask = g_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows + rd[None, :], mask=q_mask, other=0.0)
        k_row = k_ptr + row * stride_kb + head * stride_kh
        k_new = tl.load(k_row + rd, mask=d_ok, other=0.0)
        if ROTATE:  # the new token's q and k rotated at its position
            swapped = (rd + D // 2) % D
            cos = tl.load(cos_ptr + pos * stride_rope + rd, mask=d_ok, other=0.0).to(tl.float32)
            sin = tl.load(sin_ptr + pos * stride_rope + rd, mask=d_ok, other=0.0).to(tl.float32)
            q_swapped = tl.load(q_rows + swapped[None, :], mask=q_mask, other=0.0)
            q = _rotated(q, q_swapped, cos[None, :], sin[None, :])
            k_new = _rotated(k_new, tl.load(k_row + swapped, mask=d_ok, other=0.0), cos, sin)
        cache_ty = k_cache_ptr.dtype.element_ty
        k_new = k_new.to(cache_ty)
        v_new = tl.load(v_ptr + row * stride_vb + head * stride_vh + rd, mask=d_ok, other=0.0).to(cache_ty)
        k_rows = k_cache_ptr + slot * stride_cs + head * stride_ch
        v_rows = v_cache_ptr + slot * stride_cs + head * stride_ch
        if chunk == 0:
            tl.store(k_rows + pos * stride_cp + rd, k_new, mask=d_ok)
            tl.store(v_rows + pos * stride_cp + rd, v_new, mask=d_ok)
        # Cached keys before the row's position (an idle row, past attn_len, sees none), then its own.
        lo = tl.maximum(chunk * CHUNK, pos - window + 1)
        hi = tl.minimum((chunk + 1) * CHUNK, tl.where(pos < attn_len, pos, 0))
        m, total, acc = _attend_cached(q.to(DOT_DTYPE), k_rows, v_rows, lo, hi, scale, stride_cp, rd, d_ok,
                                       BLOCK_G, BLOCK_D, BLOCK_N, DOT_DTYPE)  # fmt: skip
        own = (pos < attn_len) & (pos >= chunk * CHUNK) & (pos < (chunk + 1) * CHUNK)
        m, total, acc = _add_new_token(m, total, acc, q, k_new, v_new, scale, own)
        out_mask = g_ok[:, None] & d_ok[None, :]
        if SPLIT:
            part = (row * (tl.num_programs(1) * G) + q_heads) * n_chunks + chunk  # [BLOCK_G]
            tl.store(part_o_ptr + part[:, None] * D + rd[None, :], acc, mask=out_mask)
            tl.store(part_ml_ptr + part, m, mask=g_ok)
            tl.store(part_ml_ptr + n_part_rows + part, total, mask=g_ok)
        else:
            dst = out_ptr + row * stride_ob + q_heads[:, None] * D + rd[None, :]
            tl.store(dst, _normalized(acc, total[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _decode_attention_combine_kernel(
        part_o_ptr, part_ml_ptr, out_ptr, n_chunks, n_part_rows, stride_ob,
        D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Program (query head, row): the row's chunk partials for that head merged in one tile.
        head, row = tl.program_id(0), tl.program_id(1)
        rc, rd = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_D)
        c_ok, d_ok = rc < n_chunks, rd < D
        part = (row * tl.num_programs(0) + head) * n_chunks + rc
        m = tl.load(part_ml_ptr + part, mask=c_ok, other=float("-inf"))
        total = tl.load(part_ml_ptr + n_part_rows + part, mask=c_ok, other=0.0)
        acc = tl.load(part_o_ptr + part[:, None] * D + rd[None, :], mask=c_ok[:, None] & d_ok[None, :],
                      other=0.0)  # fmt: skip
        weight = tl.exp(m - tl.max(m, axis=0))
        out = _normalized(tl.sum(weight[:, None] * acc, axis=0), tl.sum(weight * total, axis=0))
        tl.store(out_ptr + row * stride_ob + head * D + rd, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def _dot_dtype(dtype: torch.dtype) -> Any:
    if os.environ.get("TRITON_INTERPRET") == "1" or dtype == torch.float32:
        return tl.float32
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    attn_len: int,
    window: int | None,
    scale: float,
    config: DecodeConfig | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One decode step of one layer: k, v [B, 1, KV, D] go into k_cache, v_cache [slots, KV, S, D]
    (in q's dtype) at (slots[b], :, positions[b]); returns q [B, 1, KV * G, D] attended over each
    row's visible keys (see the module docstring), [B, 1, KV * G * D] in q's dtype. ``slots`` and
    ``positions`` are integer [B, 1] (or [B]) tensors on the device, one distinct slot per row,
    positions < S. ``config`` (default: ``choose_config``) sets the chunking. ``rope``: the model's
    (cos, signed sin) tables [>= S, D] (``DecoderModel.build_rope``); q and k are then taken
    unrotated and rotated here at each row's position."""
    b, _, n_heads, d = q.shape
    n_kv = k.shape[2]
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "caches: same layout, rows of D"
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    cfg = config or choose_config(b * n_kv, attn_len, d, sm_count(q.device.index or 0))
    n_chunks = triton.cdiv(attn_len, cfg.chunk)
    split = n_chunks > 1
    out = torch.empty((b, 1, n_heads * d), device=q.device, dtype=q.dtype)
    if split:
        part_o = torch.empty((b, n_heads, n_chunks, d), device=q.device, dtype=torch.float32)
        part_ml = torch.empty((2, b, n_heads, n_chunks), device=q.device, dtype=torch.float32)
    else:
        part_o = part_ml = out  # not used
    group = n_heads // n_kv
    block_d = pow2_at_least(d, 16)
    if rope is not None:
        cos, sin = rope
        assert cos.stride() == sin.stride() and cos.stride(-1) == 1 and cos.shape[-1] == d, "tables: [P, D]"
    else:
        cos = sin = q  # not read
    _decode_attention_chunk_kernel[(n_chunks, n_kv, b)](
        q, k, v, k_cache, v_cache, slots.reshape(b), positions.reshape(b), out, part_o, part_ml, cos, sin,
        attn_len, k_cache.shape[2] if window is None else window, scale, n_chunks, b * n_heads * n_chunks,
        q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), cos.stride(0),
        G=group, D=d, BLOCK_G=pow2_at_least(group, 16), BLOCK_D=block_d, CHUNK=cfg.chunk,
        BLOCK_N=cfg.block_n, SPLIT=split, DOT_DTYPE=_dot_dtype(q.dtype), ROTATE=rope is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split:
        _decode_attention_combine_kernel[(n_heads, b)](
            part_o, part_ml, out, n_chunks, b * n_heads * n_chunks, out.stride(0),
            D=d, BLOCK_C=pow2_at_least(n_chunks, 1), BLOCK_D=block_d,
        )  # fmt: skip
    return out


@torch.library.custom_op("llmopt::decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    attn_len: int,
    window: int | None,
    scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
) -> torch.Tensor:
    rope = None if rope_cos is None or rope_sin is None else (rope_cos, rope_sin)
    return decode_attention(q, k, v, k_cache, v_cache, slots, positions, attn_len, window, scale, rope=rope)


@_decode_attention_op.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    attn_len: int,
    window: int | None,
    scale: float,
    rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None,
) -> torch.Tensor:
    return q.new_empty((q.shape[0], 1, q.shape[2] * q.shape[3]))
