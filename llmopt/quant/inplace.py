"""``quantize_model_``: quantize a live model in place (no checkpoint), for benchmarks and experiments.

The modules it installs are the same ``QuantLinear`` modules, with the same integers and scales, that
loading a checkpoint written by ``llmopt quantize`` would give; only the round trip through disk is
skipped (the random-weight benchmark shapes live in memory only).
"""

from __future__ import annotations

from typing import Any

import torch

from llmopt.quant.checkpoint import plan_layers, quantize_weight
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import QuantSpec


@torch.no_grad()
def quantize_model_(model: Any, spec: QuantSpec, scale_dtype: torch.dtype | None = None) -> Any:
    """Replace every linear layer the plan covers with a QuantLinear, on the layer's own device.

    ``scale_dtype``: the scales' dtype; by default the weights' own 16-bit dtype, as ``llmopt
    quantize`` stores them (pass the checkpoint's dtype for a model that was loaded upcast)."""
    plan = plan_layers(model, spec)
    dtype = next(model.parameters()).dtype
    for name, layer in plan.layers.items():
        linear = model.get_submodule(name)
        weight, device = linear.weight, linear.weight.device
        shape = LayerShape(layer.scheme, linear.in_features, linear.out_features, layer.group_size)
        q, scale, zero_point = quantize_weight(weight, layer, scale_dtype=scale_dtype)
        quant = QuantLinear.from_quantized(shape, q, scale, zero_point, linear.bias, device, dtype)
        model.set_submodule(name, quant)
        del linear, weight, q, scale, zero_point
    if plan.head_tied and plan.head is not None:
        model.config.tie_word_embeddings = False  # the head is its own int8 tensor now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model
