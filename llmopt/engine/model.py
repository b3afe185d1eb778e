"""llmopt's own decoder for the Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, SmolLM).

The model is built from a loaded transformers model by *taking over its modules*: the embedding,
the norms' weights and every projection (``nn.Linear`` or llmopt's ``QuantLinear``) are reused
as they are, so a quantized checkpoint runs through the foundation's kernels and no weight is
copied. Float q/k/v and gate/up projections are fused into one matmul each (the activation is
read once, launches halve); the originals are released layer by layer, so the peak stays at one
layer above the model's size.

Every forward works on rows that map to a contiguous range of cache slots, at explicit
positions: prefill of one sequence (rows = 1, T tokens) and decode of a slot bucket (rows = B,
T = 1) are the same code. Keys and values go straight into the slot's cache; attention reads the
slot's first ``attn_len`` positions under a mask built from each row's own position (and the
layer's sliding window), so rows of different lengths share one step. On the GPU a decode step's
cache write and attention are one Triton kernel per layer instead (``triton_attention.py``), and
where the low-bit decode kernels take it the residual adds and RMSNorms are folded into the matmuls
around them (``quant/norm_fusion.py``; ``FusedRows`` says where, per projection).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.engine.kv_cache import KVCache
from llmopt.quant import norm_fusion
from llmopt.quant.kernels import stack_channels
from llmopt.quant.linear import QuantLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "proportional")


@dataclass(frozen=True)
class ArchSpec:
    """What the forward needs to know about the architecture, read from the HF config."""

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_eps: float
    windows: tuple[int | None, ...]  # per layer: sliding window in tokens, or None for full attention
    qk_norm: bool

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


def unsupported_reason(hf_model: Any) -> str | None:
    """Why llmopt's own model code cannot run this transformers model, or None if it can."""
    config = hf_model.config
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture '{model_type}' is not one of llmopt's own ({', '.join(SUPPORTED_MODEL_TYPES)})"
    rotary = getattr(getattr(hf_model, "model", None), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", None)
    if rotary is None or rope_type not in STATIC_ROPE_TYPES:
        return f"rope type '{rope_type}' depends on the sequence length"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation '{config.hidden_act}' is not SiLU"
    return None


def arch_spec(config: Any) -> ArchSpec:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    else:
        windows = tuple(window for _ in range(n_layers))
    return ArchSpec(
        model_type=config.model_type,
        n_layers=n_layers,
        hidden=config.hidden_size,
        n_heads=config.num_attention_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        vocab_size=config.vocab_size,
        rms_eps=config.rms_norm_eps,
        windows=windows,
        qk_norm=config.model_type == "qwen3",
    )


@functools.cache
def _cpu_decode_ops() -> bool:
    from llmopt.quant.cpu_kernels import decode_ops_available

    return decode_ops_available()


def cpu_fast_path(x: torch.Tensor) -> bool:
    """Eager fp32 on the CPU, where llmopt's C++ ops (quant/csrc/decode_cpu.cpp) replace several
    small torch ops each: per-op dispatch is what an eager CPU decode step mostly spends."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and _cpu_decode_ops()
    )


def triton_decode_path(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether decode steps write the cache and attend in llmopt's fused Triton kernel
    (``triton_attention.py``) instead of index_put + SDPA: on CUDA with Triton installed, unless
    LLMOPT_TRITON_ATTENTION=0 (torch's path, for A/B runs). Decided once, when the model is built."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if os.environ.get("LLMOPT_TRITON_ATTENTION", "1") == "0":
        return False
    from llmopt.engine import triton_attention  # registers llmopt::decode_attention

    return triton_attention.available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly transformers' Llama RMSNorm: normalise in fp32, cast back, then scale. In fp32 that
    is one op: llmopt's on the CPU in eager mode, else torch's fused one."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        if cpu_fast_path(x):
            return torch.ops.llmopt.rms_norm_cpu(x, weight, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout transformers uses: ``x * cos + rotate_half(x) * sin``
    with ``rotate_half(x) = cat(-x2, x1)``, computed as ``x * cos + roll(x, D/2) * signed_sin``
    where ``signed_sin = cat(-sin1, sin2)``: the same arithmetic in three ops instead of seven (eager
    CPU decode pays per op). cos/signed_sin are [B, T, 1, D]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Projections(nn.Module):
    """Several linears over the same input as one matmul: float weights concatenated, or quantized
    ones stacked where their kernel's layout allows (else each module runs as loaded). ``interleave``
    (layers of one size): their channels alternate instead of following one another (``stack_channels``),
    which lets a gate/up kernel pair its outputs for the SiLU product (``gated``)."""

    def __init__(self, modules: list[Any], interleave: bool = False) -> None:
        super().__init__()
        self.sizes = [int(m.out_features) for m in modules]
        interleave = interleave and len(set(self.sizes)) == 1
        fusable = all(type(m) is nn.Linear for m in modules) and len({m.weight.dtype for m in modules}) == 1
        self.interleaved = False  # (one stacked part with alternating channels)
        if fusable and len(modules) > 1:
            weight = stack_channels([m.weight.detach() for m in modules], 0, interleave)
            has_bias = any(m.bias is not None for m in modules)
            fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta")
            fused.weight = nn.Parameter(weight, requires_grad=False)
            if has_bias:
                biases = [
                    m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                    for m in modules
                ]
                fused.bias = nn.Parameter(stack_channels(biases, 0, interleave), requires_grad=False)
            for m in modules:  # release the originals now: the fused copy replaces them
                m.weight = None
                m.bias = None
            self.parts = nn.ModuleList([fused])
            self.interleaved = interleave
        elif len(modules) > 1 and all(isinstance(m, QuantLinear) for m in modules):
            fused_quant = QuantLinear.fuse(modules, interleave)  # the integers stacked: one low-bit matmul
            if fused_quant is not None:
                for m in modules:  # the stacked copy replaces them
                    m.release()
            self.parts = nn.ModuleList([fused_quant] if fused_quant is not None else modules)
            self.interleaved = interleave and fused_quant is not None
        else:
            self.parts = nn.ModuleList(modules)

    def _outputs(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The stacked part's output as each layer's."""
        if self.interleaved:
            return y.unflatten(-1, (-1, len(self.sizes))).unbind(-1)
        return tuple(y.split(self.sizes, dim=-1))

    def forward(
        self, x: torch.Tensor, sumsq: torch.Tensor | None = None, eps: float = 0.0
    ) -> tuple[torch.Tensor, ...]:
        """Each layer's output over x, or over ``norm(h)`` given x, sumsq = ``norm_fusion.norm_inputs(h, w)``
        (quantized parts only)."""
        if sumsq is None:
            outputs = [part(x) for part in self.parts]
        else:
            assert all(isinstance(part, QuantLinear) for part in self.parts), (
                "only quantized layers fold a norm in"
            )
            outputs = [cast(QuantLinear, part).forward_normed(x, sumsq, eps) for part in self.parts]
        return self._outputs(outputs[0]) if len(outputs) < len(self.sizes) else tuple(outputs)

    def gated(self, x: torch.Tensor, sumsq: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
        """``silu(gate) * up`` of [gate, up] projections, over x or ``norm(h)`` (as ``forward``): inside the
        low-bit kernel where its channels are interleaved (``QuantLinear.forward_gated``), else from the two
        outputs."""
        part = self.parts[0]
        if self.interleaved and isinstance(part, QuantLinear):
            return part.forward_gated(x, sumsq, eps)
        gate, up = self.forward(x, sumsq, eps)
        return F.silu(gate) * up

    def gated_rows(self, dtype: torch.dtype) -> int:
        """Up to how many rows ``gated`` runs inside the kernel (``QuantLinear.gated_rows``); 0 otherwise."""
        part = self.parts[0]
        return part.gated_rows(dtype) if self.interleaved and isinstance(part, QuantLinear) else 0


def fused_norm_rows(module: nn.Module, dtype: torch.dtype, residual: bool = False) -> int:
    """Up to how many rows ``module`` (a projection or Projections) takes a norm or residual folded in
    (``QuantLinear.fused_norm_rows``); 0 for float layers."""
    if isinstance(module, Projections):
        return min(fused_norm_rows(part, dtype, residual) for part in module.parts)
    return module.fused_norm_rows(dtype, residual) if isinstance(module, QuantLinear) else 0


@dataclass(frozen=True)
class FusedRows:
    """Per projection of a layer, up to how many rows it runs with the norm / residual folded in."""

    qkv: int = 0
    o_proj: int = 0
    gate_up: int = 0
    down_proj: int = 0


class DecoderLayer(nn.Module):
    def __init__(self, hf_layer: Any, spec: ArchSpec, index: int, fused_decode: bool) -> None:
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.spec = spec
        self.index = index
        self.fused_decode = fused_decode  # decode (T = 1) through llmopt::decode_attention
        self.window = spec.windows[index]
        self.attn_norm = hf_layer.input_layernorm.weight
        self.mlp_norm = hf_layer.post_attention_layernorm.weight
        self.qkv = Projections([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = Projections([mlp.gate_proj, mlp.up_proj], interleave=True)  # (the SiLU product: gated)
        self.down_proj = mlp.down_proj
        self.q_norm = attn.q_norm.weight if spec.qk_norm else None
        self.k_norm = attn.k_norm.weight if spec.qk_norm else None
        self.scale = spec.head_dim**-0.5
        self.fused_rows = FusedRows()

    def fuse_norms(self, dtype: torch.dtype) -> None:
        """Fold the norms and residual adds into the low-bit decode matmuls where their kernels can
        (``norm_fusion``), unless LLMOPT_FUSED_NORM=0, and the SiLU product into gate/up's unless
        LLMOPT_FUSED_SILU=0. Decided once, here: it looks at the weights."""
        self.gate_up.gated_rows(dtype)
        if norm_fusion.enabled():
            self.fused_rows = FusedRows(
                qkv=fused_norm_rows(self.qkv, dtype),
                o_proj=fused_norm_rows(self.o_proj, dtype, residual=True),
                gate_up=fused_norm_rows(self.gate_up, dtype),
                down_proj=fused_norm_rows(self.down_proj, dtype, residual=True),
            )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        rope_tables: tuple[torch.Tensor, torch.Tensor],
        masks: dict[int | None, torch.Tensor],
        cache: KVCache,
        slot_start: int | None,
        slots: torch.Tensor,
        positions: torch.Tensor,
        attn_len: int,
        normed: norm_fusion.Fused | None = None,
        next_norm: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, norm_fusion.Fused | None]:
        """``rope``: cos / signed sin at the rows' positions [B, T, 1, D]; ``rope_tables`` the whole
        tables, which the fused decode kernel reads itself (``rope`` is then unused). ``slot_start``
        None: the rows' slots are only known as the tensor ``slots`` (a prefill captured in a CUDA
        graph, where the slot is an input): attention gathers their cache rows.
        ``normed``: this layer's first norm of x as the previous layer's fused down_proj made it;
        ``next_norm``: the next layer's first norm weight, given when that layer fuses it (at these
        rows), so that this layer's down_proj makes its input. Returns the new x and that input."""
        spec = self.spec
        b, t, _ = x.shape
        q, k, v = self.qkv(*self._norm_args(self.fused_rows.qkv, x, self.attn_norm, normed))
        q = q.view(b, t, spec.n_heads, spec.head_dim)
        k = k.view(b, t, spec.n_kv_heads, spec.head_dim)
        v = v.view(b, t, spec.n_kv_heads, spec.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = rms_norm(q, self.q_norm, spec.rms_eps)
            k = rms_norm(k, self.k_norm, spec.rms_eps)
        if t == 1 and self.fused_decode:
            # Decode on the GPU: rotary, cache write and flash-decoding attention in Triton (masks itself).
            out = torch.ops.llmopt.decode_attention(
                q, k, v, cache.keys[self.index], cache.values[self.index], slots, positions, attn_len,
                self.window, self.scale, rope_tables[0], rope_tables[1],
            )  # fmt: skip
            return self._mlp(x, out, next_norm)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if t == 1 and cpu_fast_path(x) and cache.keys[self.index].dtype == torch.float32:
            # Decode on the CPU: cache write and attention in one op.
            out = torch.ops.llmopt.decode_attention_cpu(
                q, k, v, cache.keys[self.index], cache.values[self.index], slots, positions,
                masks[self.window], self.scale,
            )  # fmt: skip
            return self._mlp(x, out, next_norm)
        # Write into the whole cache tensor at absolute slot indices: writing through a slice view
        # makes torch.compile copy the slice back (gigabytes per step at batch 32).
        k_all, v_all = cache.keys[self.index], cache.values[self.index]
        k_all[slots, :, positions] = k.to(k_all.dtype)  # [B, T, KV, D] into [slots, KV, S, D]
        v_all[slots, :, positions] = v.to(v_all.dtype)
        if slot_start is None:
            k_cache = k_all[:, :, :attn_len].index_select(0, slots.view(-1))
            v_cache = v_all[:, :, :attn_len].index_select(0, slots.view(-1))
        else:
            k_cache, v_cache = cache.layer(self.index, slot_start, b)
        # Grouped-query attention without copying the cache: the G query heads of one KV head
        # become G*T rows of that head.
        g = spec.group
        q = q.view(b, t, spec.n_kv_heads, g, spec.head_dim).permute(0, 2, 3, 1, 4)
        q = q.reshape(b, spec.n_kv_heads, g * t, spec.head_dim)
        out = F.scaled_dot_product_attention(
            q,
            k_cache[:, :, :attn_len],
            v_cache[:, :, :attn_len],
            attn_mask=masks[self.window],
            scale=self.scale,
        )
        out = out.view(b, spec.n_kv_heads, g, t, spec.head_dim).permute(0, 3, 1, 2, 4).reshape(b, t, -1)
        return self._mlp(x, out, next_norm)

    def _mlp(
        self, x: torch.Tensor, attention: torch.Tensor, next_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, norm_fusion.Fused | None]:
        """x + o_proj(attention), then the MLP block with its residual."""
        x, normed = self._residual(self.o_proj, self.fused_rows.o_proj, attention, x, self.mlp_norm,
                                   self._fuses(self.fused_rows.gate_up, x))  # fmt: skip
        activation = self.gate_up.gated(*self._norm_args(self.fused_rows.gate_up, x, self.mlp_norm, normed))
        return self._residual(self.down_proj, self.fused_rows.down_proj, activation, x, next_norm,
                              next_norm is not None)  # fmt: skip

    @staticmethod
    def _fuses(limit: int, x: torch.Tensor) -> bool:
        return x.shape[0] * x.shape[1] <= limit

    def _norm_args(
        self, limit: int, x: torch.Tensor, weight: torch.Tensor, normed: norm_fusion.Fused | None
    ) -> tuple[torch.Tensor] | tuple[torch.Tensor, torch.Tensor, float]:
        """What a projection (``Projections.forward`` / ``gated``) takes for ``rms_norm(x, weight)``: the
        norm's inputs to fold in, where it takes these rows (from ``normed`` when the previous matmul made
        them), else the norm's output."""
        eps = self.spec.rms_eps
        if not self._fuses(limit, x):
            return (rms_norm(x, weight, eps),)
        weighted, sumsq = normed if normed is not None else norm_fusion.norm_inputs(x, weight)
        return weighted, sumsq, eps

    def _residual(
        self,
        proj: nn.Module,
        limit: int,
        inputs: torch.Tensor,
        x: torch.Tensor,
        next_weight: torch.Tensor | None,
        next_fused: bool,
    ) -> tuple[torch.Tensor, norm_fusion.Fused | None]:
        """x + proj(inputs), and the next norm's fused input if the next matmul takes it (``next_fused``)."""
        if not self._fuses(limit, x):
            return x + proj(inputs), None
        assert isinstance(proj, QuantLinear)
        h, weighted, sumsq = proj.forward_residual(inputs, x, next_weight if next_fused else None)
        return h, None if weighted is None or sumsq is None else (weighted, sumsq)


class DecoderModel(nn.Module):
    """The whole decoder over a slot cache. ``forward`` returns logits for the rows' last tokens."""

    def __init__(self, hf_model: Any) -> None:
        super().__init__()
        reason = unsupported_reason(hf_model)
        if reason:
            raise ValueError(reason)
        self.config = hf_model.config
        self.spec = arch_spec(hf_model.config)
        inner = hf_model.model
        self.embed = inner.embed_tokens
        self.fused_decode = triton_decode_path(self.device, self.dtype)
        layers = [
            DecoderLayer(layer, self.spec, i, self.fused_decode) for i, layer in enumerate(inner.layers)
        ]
        for layer in layers:
            layer.fuse_norms(self.dtype)
        self.layers = nn.ModuleList(layers)
        self.norm = inner.norm.weight
        self.lm_head = hf_model.lm_head
        rotary = inner.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def build_rope(self, n_positions: int) -> None:
        """cos/sin tables for positions 0..n_positions-1, computed in fp32 as transformers does."""
        positions = torch.arange(n_positions, device=self.device, dtype=torch.float32)
        inv_freq: torch.Tensor = self.inv_freq  # type: ignore[assignment]
        freqs = torch.outer(positions, inv_freq.to(self.device))
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope_cos = (emb.cos() * self.attention_scaling).to(self.dtype)
        sin = emb.sin() * self.attention_scaling
        half = sin.shape[-1] // 2
        self.rope_sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)  # see rotate()

    def masks(self, positions: torch.Tensor, attn_len: int) -> dict[int | None, torch.Tensor]:
        """Additive masks [B, 1, G*T, attn_len] (0 or -inf, in the model's dtype, built once per
        forward rather than converted by every layer): key s is visible to a row at position p
        when s <= p (and s > p - window for a sliding-window layer)."""
        keys = torch.arange(attn_len, device=positions.device)
        b, t = positions.shape
        masks: dict[int | None, torch.Tensor] = {}
        for window in set(self.spec.windows):
            pos = positions.unsqueeze(-1)
            visible = keys <= pos
            if window is not None:
                visible = visible & (keys > pos - window)
            visible = visible.unsqueeze(1).expand(b, self.spec.group, t, attn_len)
            visible = visible.reshape(b, 1, self.spec.group * t, attn_len)
            zeros = torch.zeros(visible.shape, dtype=self.dtype, device=positions.device)
            masks[window] = zeros.masked_fill(~visible, float("-inf"))
        return masks

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slot_start: int,
        attn_len: int,
        last_index: torch.Tensor | None = None,
        want_logits: bool = True,
        slot_index: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """tokens/positions [B, T] for slots slot_start..slot_start+B-1; logits [B, V] (fp32) of each
        row's token at ``last_index`` (default: the last column), or None when the caller only
        fills the cache (a prefill chunk that does not end its prompt). ``slot_index`` [B] (device)
        names the rows' slots instead of ``slot_start``, so that a captured graph can serve any slot."""
        assert self.rope_cos is not None and self.rope_sin is not None, "call build_rope() first"
        x = self.embed(tokens)
        tables = (self.rope_cos, self.rope_sin)
        fused = self.fused_decode and tokens.shape[1] == 1
        rope = tables  # the fused decode kernel reads the tables at each row's position itself
        if not fused:
            rope = (self.rope_cos[positions].unsqueeze(2), self.rope_sin[positions].unsqueeze(2))
        masks = {} if fused else self.masks(positions, attn_len)  # the fused decode kernel masks itself
        first: int | None = slot_start
        if slot_index is not None:
            slots, first = slot_index.view(-1, 1), None
        else:
            slots = torch.arange(slot_start, slot_start + x.shape[0], device=x.device).unsqueeze(1)
        n_rows = tokens.numel()
        layers = cast(list[DecoderLayer], list(self.layers))
        normed: norm_fusion.Fused | None = None  # the next layer's first norm, made by a fused down_proj
        for layer, following in zip(layers, [*layers[1:], None], strict=True):
            # The next layer's first norm weight, when it folds that norm into its q/k/v at these rows.
            next_norm = following.attn_norm if following and n_rows <= following.fused_rows.qkv else None
            x, normed = layer(
                x, rope, tables, masks, cache, first, slots, positions, attn_len, normed, next_norm
            )
        if not want_logits:
            return None
        rows = torch.arange(x.shape[0], device=x.device)
        x = x[:, -1] if last_index is None else x[rows, last_index]
        x = rms_norm(x, self.norm, self.spec.rms_eps)
        return self.lm_head(x).float()
