"""Residual-stream rotation: an exact change of basis that makes weights easier to quantize.

A decoder's residual stream can be expressed in any orthonormal basis Q without changing what the
model computes, provided every norm in front of a linear is a pure RMSNorm (no centring, no bias):

- the norms' scales γ are first folded into the linears they feed (``W ← W diag(γ)``, ``γ ← 1``),
  so each norm is ``x / rms(x)``, which commutes with Q because ``rms(x Q) = rms(x)``;
- what reads the stream turns with it: ``W ← W Q`` for q/k/v, gate/up and the output head;
- what writes the stream turns back: ``W ← Qᵀ W`` for o_proj and down_proj, and the input
  embeddings become ``E Q``.

The result is an ordinary checkpoint of the same architecture (norm scales all ones, head untied
when γ of the final norm was folded into it), which loads anywhere unchanged. Quantization error
drops because a random rotation spreads the few large input channels that set each output
channel's range (int8) or group's range (int4) over all channels (QuaRot / SpinQuant's
observation, applied here to weights only, with no online transform at run time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from llmopt.errors import InputError

DEFAULT_SEED = 0
# Architectures whose norms are plain RMSNorm scaled by their weight (Gemma's, for one, scale by
# 1 + weight, which this folding would get wrong).
ROTATABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class _Block:
    norm: nn.Module
    readers: list[nn.Linear]  # linears fed by this norm's output
    writer: nn.Linear  # linear whose output is added to the residual stream


def random_orthogonal(n: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """A random n×n orthogonal matrix (float64), Haar-distributed, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        "rmsnorm" in type(module).__name__.lower()
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and getattr(module, "bias", None) is None
    )


def _blocks(model: Any) -> tuple[list[_Block], nn.Module, nn.Embedding, nn.Linear]:
    """The model's (norm → readers, writer) blocks, final norm, input embeddings and head, or an
    InputError naming what does not fit the Llama-style layout this rotation needs."""
    model_type = getattr(model.config, "model_type", "?")
    if model_type not in ROTATABLE_MODEL_TYPES:
        raise InputError(
            f"Rotation supports {', '.join(ROTATABLE_MODEL_TYPES)} models, not '{model_type}'. "
            "Quantize without --rotate."
        )
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    final_norm = getattr(body, "norm", None)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if layers is None or final_norm is None or not isinstance(head, nn.Linear) or head.bias is not None:
        raise InputError(
            f"Rotation supports Llama-style decoders (model.layers, model.norm, a bias-free head); "
            f"{type(model).__name__} is not one. Quantize without --rotate."
        )
    blocks: list[_Block] = []
    for i, layer in enumerate(layers):
        try:
            attn, mlp = layer.self_attn, layer.mlp
            blocks.append(_Block(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], attn.o_proj))
            blocks.append(_Block(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp.down_proj))
        except AttributeError as exc:
            raise InputError(
                f"Rotation needs q/k/v/o and gate/up/down projections behind input_layernorm and "
                f"post_attention_layernorm; layer {i} of {type(model).__name__} differs ({exc}). "
                "Quantize without --rotate."
            ) from exc
    for norm in [b.norm for b in blocks] + [final_norm]:
        if not _is_rms_norm(norm):
            raise InputError(
                f"Rotation needs RMSNorm without a bias in front of every linear; found "
                f"{type(norm).__name__}. Quantize without --rotate."
            )
    for b in blocks:
        if b.writer.bias is not None:
            raise InputError(
                "Rotation needs the layers writing to the residual stream (o_proj, down_proj) to have "
                "no bias. Quantize without --rotate."
            )
    return blocks, final_norm, embed, head


def unsupported_reason(model: Any) -> str | None:
    """Why ``model``'s residual stream cannot be rotated, or None if it can."""
    try:
        _blocks(model)
    except InputError as exc:
        return str(exc)
    return None


@torch.no_grad()
def rotate_residual_(model: Any, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """Rotate ``model``'s residual stream in place (see the module docstring); returns Q (float64).

    The model's outputs are unchanged up to float rounding. Weights are computed in float64 and
    stored back in each tensor's own dtype. A tied head is untied (the final norm's scale is folded
    into it, so it no longer equals the embeddings)."""
    blocks, final_norm, embed, head = _blocks(model)
    dim = embed.weight.shape[1]
    Q = random_orthogonal(dim, seed).to(embed.weight.device)  # drawn on the CPU: the same Q anywhere

    def turn_in(linear: nn.Linear, norm: nn.Module) -> None:
        gamma: torch.Tensor = norm.weight  # type: ignore[assignment]
        w = linear.weight.double() * gamma.double().unsqueeze(0)
        linear.weight.data = (w @ Q).to(linear.weight.dtype)

    def turn_out(linear: nn.Linear) -> None:
        linear.weight.data = (Q.t() @ linear.weight.double()).to(linear.weight.dtype)

    if head.weight is embed.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    embed.weight.data = (embed.weight.double() @ Q).to(embed.weight.dtype)
    for block in blocks:
        for linear in block.readers:
            turn_in(linear, block.norm)
        block.norm.weight.data.fill_(1.0)  # type: ignore[operator]
        turn_out(block.writer)
    turn_in(head, final_norm)
    final_norm.weight.data.fill_(1.0)  # type: ignore[operator]
    return Q


__all__ = ["random_orthogonal", "rotate_residual_", "unsupported_reason"]
