"""Learned rounding: each decoder block's integers and ranges tuned against the block's output.

The method is signed-gradient rounding (Cheng et al., 2023, "Optimize Weight Rounding via Signed
Gradient Descent for the Quantization of LLMs"). For every quantized linear of a block:

- each weight gets a learned offset ``v`` in [-0.5, 0.5] that is added to ``w / scale`` before
  rounding, so it can round the other way when that serves the block's output;
- each group's (int4) or channel's (int8) range gets learned multipliers in [0.5, 1] (int4: of its
  minimum and its maximum; int8: of its absolute maximum), so ranges can clip outliers;
- rounding passes gradients straight through, and scales are rounded to the checkpoint's dtype
  inside the forward, so what is learned is exactly what is stored.

The loss is the mean squared error between the block's output with quantized weights, fed the
output of the blocks already quantized, and the float block's output on float inputs: each block
also corrects the error that reaches it. Blocks are done one at a time, front to back, with
signed gradient descent (learning rate ``1/steps``, decaying linearly to 0) on random batches of
calibration windows. Should a block's final loss over all windows not beat round-to-nearest's, the
block keeps round-to-nearest (full range). Layers outside the decoder blocks (the output head) get
GPTQ with Hessians from the quantized model's final hidden states.

On smollm2-135m, int4 group 64 (BENCHMARKS.md §1): perplexity +3.5% against GPTQ's +5.8%, with 200
steps of 8 windows of 512 tokens on 32,768 calibration tokens: 87 s on an H200, but an estimated
1.5 hours on a 2-core CPU (each step is a forward and backward pass of a block over 4,096 tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from llmopt.errors import UnsupportedError
from llmopt.quant.checkpoint import Codes, quantize_weight
from llmopt.quant.ctformat import LayerQuant

Progress = Callable[[str, int, int], None]

RANGE_FLOOR = 0.5  # a range multiplier never goes below this
_DROPPED_KWARGS = ("hidden_states", "cache", "past_key_values", "past_key_value", "use_cache")


@dataclass(frozen=True)
class LearnSpec:
    steps: int = 200  # signed-gradient steps per block
    batch: int = 8  # calibration windows per step
    seed: int = 0  # which windows each step draws


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


class LearnedQuantizer(nn.Module):
    """One linear's learnable rounding offsets and range multipliers, with the float weight fixed.

    ``dequantized()`` is the differentiable quantized weight; ``codes()`` the integers and scales
    in the format of ``schemes.quantize_int8`` / ``quantize_int4``."""

    w: torch.Tensor  # (N, groups, group) float weight; int8: one group of K per row
    lo: torch.Tensor  # (N, groups) range before the learned multipliers
    hi: torch.Tensor

    def __init__(self, weight: torch.Tensor, layer: LayerQuant, scale_dtype: torch.dtype) -> None:
        super().__init__()
        n, k = weight.shape
        self.bits, self.scale_dtype = layer.bits, scale_dtype
        group: int = layer.group_size if layer.bits == 4 and layer.group_size else k
        w = weight.detach().float().reshape(n, k // group, group)
        self.register_buffer("w", w)
        if self.bits == 8:
            self.register_buffer("hi", w.abs().amax(dim=-1))
            self.register_buffer("lo", -self.hi)
        else:
            self.register_buffer("lo", w.amin(dim=-1).clamp(max=0))  # the range holds 0: zero is exact
            self.register_buffer("hi", w.amax(dim=-1).clamp(min=0))
        self.v = nn.Parameter(torch.zeros_like(w))
        self.lo_mult = nn.Parameter(torch.ones_like(self.lo))
        self.hi_mult = nn.Parameter(torch.ones_like(self.hi))

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q in the unsigned/symmetric integer range, scale, zero point), differentiable."""
        if self.bits == 8:
            scale = (self.hi * self.hi_mult / 127.0).clamp(min=1e-10)
        else:
            scale = ((self.hi * self.hi_mult - self.lo * self.lo_mult) / 15.0).clamp(min=1e-10)
        scale = scale + (scale.to(self.scale_dtype).float() - scale).detach()  # stored precision
        s = scale.unsqueeze(-1)
        if self.bits == 8:
            zero = torch.zeros_like(scale)
            q = _round_ste(self.w / s + self.v).clamp(-127, 127)
        else:
            zero = _round_ste(-self.lo * self.lo_mult / scale).clamp(0, 15)
            q = (_round_ste(self.w / s + self.v) + zero.unsqueeze(-1)).clamp(0, 15)
        return q, scale, zero

    def dequantized(self) -> torch.Tensor:
        q, scale, zero = self._grid()
        return ((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(self.w.shape[0], -1)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One signed-gradient step, then the parameters are clamped to their ranges."""
        self.v.sub_(lr * self.v.grad.sign()).clamp_(-0.5, 0.5)  # type: ignore[union-attr]
        for mult in (self.lo_mult, self.hi_mult):
            if mult.grad is not None:  # int8's range is symmetric: only hi_mult is used
                mult.sub_(lr * mult.grad.sign()).clamp_(RANGE_FLOOR, 1.0)

    @torch.no_grad()
    def reset(self) -> None:
        """Back to round-to-nearest on the full range."""
        self.v.zero_()
        self.lo_mult.fill_(1.0)
        self.hi_mult.fill_(1.0)

    @torch.no_grad()
    def codes(self) -> Codes:
        q, scale, zero = self._grid()
        n = self.w.shape[0]
        if self.bits == 8:
            return q.reshape(n, -1).to(torch.int8).cpu(), scale.to(self.scale_dtype).cpu(), None
        return (
            (q - 8).reshape(n, -1).to(torch.int8).cpu(),
            scale.to(self.scale_dtype).cpu(),
            (zero - 8).to(torch.int8).cpu(),
        )


class _StopAtFirstBlock(Exception):
    pass


def unsupported_reason(model: Any) -> str | None:
    """Why learned rounding cannot run on ``model``, or None: it needs a decoder with a list of
    blocks (``.layers``) and a final norm (``.norm``), as Llama-style models have."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList) or not hasattr(decoder, "norm"):
        name = type(model).__name__
        return f"learned rounding needs a decoder with .layers and a final .norm, which {name} lacks"
    return None


def decoder_blocks(model: Any) -> tuple[list[str], nn.ModuleList]:
    """(module names, modules) of the decoder blocks, or UnsupportedError naming what to use."""
    if reason := unsupported_reason(model):
        raise UnsupportedError(f"{reason[0].upper()}{reason[1:]}. Use --method gptq.")
    blocks = model.get_decoder().layers
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(block)] for block in blocks], blocks


class _BlockInputs:
    """The first block's calibration inputs and the keyword arguments every block is called with
    (rotary tables, masks), sliced to a batch of windows where they hold one row per window."""

    def __init__(self, model: Any, first_block: nn.Module, windows: torch.Tensor) -> None:
        captured: dict[str, Any] = {}

        def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = {k: v for k, v in kwargs.items() if k not in _DROPPED_KWARGS}
            raise _StopAtFirstBlock

        hook = first_block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                model(windows, use_cache=False)
        except _StopAtFirstBlock:
            pass
        finally:
            hook.remove()
        self.hidden: torch.Tensor = captured["hidden"].detach()
        self.kwargs: dict[str, Any] = captured["kwargs"]
        self.n = windows.shape[0]

    def kwargs_for(self, rows: torch.Tensor | slice) -> dict[str, Any]:
        def cut(v: Any) -> Any:
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == self.n:
                return v[rows]
            if isinstance(v, tuple):
                return tuple(cut(t) for t in v)
            return v

        return {k: cut(v) for k, v in self.kwargs.items()}


def _batched(fn: Callable[[torch.Tensor, slice], torch.Tensor], x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch], slice(i, i + batch)) for i in range(0, x.shape[0], batch)])


@torch.no_grad()
def _head_hessian(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """GPTQ's ``H = 2/n Σ x xᵀ`` of the head's input: the final norm of the quantized blocks' output."""
    x = model.get_decoder().norm(hidden).reshape(-1, hidden.shape[-1]).float()
    return (x.t() @ x).mul_(2.0 / x.shape[0])


def learn_codes(
    model: Any,
    layers: dict[str, LayerQuant],
    windows: torch.Tensor,
    scale_dtype: torch.dtype,
    spec: LearnSpec | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, Codes], list[tuple[float, float]]]:
    """Codes of every layer in ``layers`` (module name → quantization) by learned rounding on the
    calibration ``windows`` (n, seq_len) token ids; plus each block's loss over all windows
    (round-to-nearest, learned). The model (float32, on any device) is left unchanged."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)  # only the quantizers learn
    try:
        return _learn_codes(model, layers, windows, scale_dtype, spec or LearnSpec(), progress)
    finally:
        for p in trainable:
            p.requires_grad_(True)


class _BlockLearner:
    """One block's quantizers, learned against ``target``, the float block's output."""

    def __init__(
        self, block: nn.Module, quantizers: dict[str, LearnedQuantizer], inputs: _BlockInputs, batch: int
    ) -> None:
        self.block, self.quantizers, self.inputs, self.batch = block, quantizers, inputs, batch

    def run(self, x: torch.Tensor, rows: torch.Tensor | slice) -> torch.Tensor:
        weights = {f"{name}.weight": qz.dequantized() for name, qz in self.quantizers.items()}
        return functional_call(self.block, weights, (x,), self.inputs.kwargs_for(rows))

    @torch.no_grad()
    def output(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output with the current quantized weights, over all windows."""
        return _batched(self.run, x, self.batch)

    def learn(
        self, x: torch.Tensor, target: torch.Tensor, steps: int, generator: torch.Generator
    ) -> tuple[float, float, torch.Tensor]:
        """Learn, then keep round-to-nearest if that was better: (loss before, loss after, over all
        windows; the block's output with the weights kept, the next block's input)."""
        before = torch.nn.functional.mse_loss(self.output(x), target).item()
        for step in range(steps):
            rows = torch.randperm(self.inputs.n, generator=generator)[: self.batch].to(x.device)
            loss = torch.nn.functional.mse_loss(self.run(x[rows], rows), target[rows])
            for qz in self.quantizers.values():
                qz.zero_grad(set_to_none=True)
            loss.backward()
            lr = (1.0 - step / steps) / steps
            for qz in self.quantizers.values():
                qz.step(lr)
        out = self.output(x)
        after = torch.nn.functional.mse_loss(out, target).item()
        if after > before:  # never worse than round-to-nearest
            for qz in self.quantizers.values():
                qz.reset()
            out, after = self.output(x), before
        return before, after, out


def _float_block(block: nn.Module, inputs: _BlockInputs, x: torch.Tensor, rows: slice) -> torch.Tensor:
    return block(x, **inputs.kwargs_for(rows))


def _learn_codes(
    model: Any,
    layers: dict[str, LayerQuant],
    windows: torch.Tensor,
    scale_dtype: torch.dtype,
    spec: LearnSpec,
    progress: Progress | None,
) -> tuple[dict[str, Codes], list[tuple[float, float]]]:
    say = progress or (lambda *_: None)
    block_names, blocks = decoder_blocks(model)
    device = next(model.parameters()).device
    inputs = _BlockInputs(model, blocks[0], windows.to(device))
    generator = torch.Generator().manual_seed(spec.seed)
    codes: dict[str, Codes] = {}
    losses: list[tuple[float, float]] = []
    fp_in, q_in = inputs.hidden, inputs.hidden.clone()
    for index, (block_name, block) in enumerate(zip(block_names, blocks, strict=True)):
        prefix = block_name + "."
        quantizers = {
            name.removeprefix(prefix): LearnedQuantizer(model.get_submodule(name).weight, layer, scale_dtype)
            for name, layer in layers.items()
            if name.startswith(prefix)
        }
        learner = _BlockLearner(block, quantizers, inputs, spec.batch)
        with torch.no_grad():
            target = _batched(functools.partial(_float_block, block, inputs), fp_in, spec.batch)
        before, after, q_in = learner.learn(q_in, target, spec.steps, generator)
        losses.append((before, after))
        codes.update({prefix + name: qz.codes() for name, qz in quantizers.items()})
        fp_in = target
        say("learning rounding", index + 1, len(blocks))
    rest = [name for name in layers if name not in codes]
    if rest:
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), "")
        if rest != [head_name]:
            raise UnsupportedError(
                f"Learned rounding covers the decoder blocks and the output head, not {', '.join(rest)}. "
                "Use --method gptq."
            )
        hessian = _head_hessian(model, q_in)
        q, scale, zero = quantize_weight(head.weight, layers[head_name], hessian, scale_dtype)
        codes[head_name] = (q.cpu(), scale.cpu(), zero.cpu() if zero is not None else None)
    return codes, losses


__all__ = ["LearnSpec", "LearnedQuantizer", "decoder_blocks", "learn_codes", "unsupported_reason"]
