"""``quantize_model_``: quantize a live model in place (no checkpoint), for benchmarks and experiments.

The modules it installs are the same ``QuantLinear`` modules, with the same integers and scales, that
loading a checkpoint written by ``llmopt quantize`` would give; only the round trip through disk is
skipped (the random-weight benchmark shapes live in memory only).
"""

from __future__ import annotations

from typing import Any

import torch

from llmopt.quant.checkpoint import plan_layers
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import QuantSpec, quantize_int4, quantize_int8


@torch.no_grad()
def quantize_model_(model: Any, spec: QuantSpec) -> Any:
    """Replace every linear layer the plan covers with a QuantLinear, on the layer's own device."""
    plan = plan_layers(model, spec)
    dtype = next(model.parameters()).dtype
    for name, layer in plan.layers.items():
        linear = model.get_submodule(name)
        weight, device = linear.weight, linear.weight.device
        shape = LayerShape(layer.scheme, linear.in_features, linear.out_features, layer.group_size)
        scale_dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
        zero_point = None
        if layer.bits == 8:
            q, scale = quantize_int8(weight, scale_dtype)
        else:
            assert layer.group_size is not None
            q, scale, zero_point = quantize_int4(weight, layer.group_size, scale_dtype)
        quant = QuantLinear.from_quantized(shape, q, scale, zero_point, linear.bias, device, dtype)
        model.set_submodule(name, quant)
        del linear, weight, q, scale, zero_point
    if plan.head_tied and plan.head is not None:
        model.config.tie_word_embeddings = False  # the head is its own int8 tensor now
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model
