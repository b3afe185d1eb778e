"""Write and read llmopt's quantized checkpoints (HF layout, compressed-tensors config).

Writing streams the source one tensor at a time, so memory stays bounded by the largest tensor and
one output shard. Reading builds the model without weights, swaps each quantized ``nn.Linear`` for a
``QuantLinear`` holding only the packed integers and scales, then assigns the remaining tensors.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmopt.errors import InvalidModelError, UnsupportedError
from llmopt.models.files import PICKLE_INDEX, SAFETENSORS_INDEX, ModelFiles, iter_tensors, tensor_names
from llmopt.quant.ctformat import LayerQuant, build_quantization_config, layer_quant_for
from llmopt.quant.gptq import gptq_quantize_int4, gptq_quantize_int8
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.packing import pack_int32, unpack_int32
from llmopt.quant.schemes import QuantSpec, choose_group_size, quantize_int4, quantize_int8
from llmopt.quant.writer import ShardWriter

PROVENANCE_FILE = "llmopt.json"
Progress = Callable[[str, int, int], None]  # (stage, done, total)
_COMPUTE_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_SKIP_COPY = {"config.json", SAFETENSORS_INDEX, PICKLE_INDEX, PROVENANCE_FILE, "llmopt-builtin.json"}


@dataclass
class QuantPlan:
    """Which linear layers get which quantization, decided from the model's structure alone."""

    layers: dict[str, LayerQuant]  # module name → quantization
    in_features: dict[str, int]
    body: LayerQuant
    head: LayerQuant | None  # None when --keep-head
    head_name: str
    embed_name: str
    head_tied: bool  # the head's weight is the input embedding table (not stored separately)
    ignore: list[str] = field(default_factory=list)


def build_empty_model(config: Any, trust_remote_code: bool, dtype: torch.dtype | None = None) -> Any:
    """The model's modules with parameters on the meta device (buffers such as rotary tables stay real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
    except (ValueError, KeyError) as exc:
        raise UnsupportedError(f"transformers cannot build this model's architecture ({exc}).") from exc


def load_config(files: ModelFiles, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(files.root, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as exc:
        raise InvalidModelError(
            f"'{files.root}/config.json' is not a config transformers understands ({exc})."
        ) from exc
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # llmopt reads it itself; transformers must not act on it
    return config


def _module_name(model: nn.Module, target: nn.Module | None) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise UnsupportedError(
        "This model has no input/output embedding llmopt can find; it cannot be quantized."
    )


def plan_quantization(files: ModelFiles, spec: QuantSpec, trust_remote_code: bool = False) -> QuantPlan:
    """Decide, from config and tensor names only, what each linear layer becomes."""
    if files.is_llmopt_quantized or (files.config.get("quantization_config") or {}):
        raise UnsupportedError(
            f"'{files.root}' is already quantized. Quantize the original 16-bit model instead."
        )
    config = load_config(files, trust_remote_code)
    plan = plan_layers(build_empty_model(config, trust_remote_code), spec)
    stored = set(tensor_names(files))
    plan.head_tied = f"{plan.head_name}.weight" not in stored
    missing = [n for n in plan.in_features if n != plan.head_name and f"{n}.weight" not in stored]
    if missing:
        raise UnsupportedError(
            f"The checkpoint stores linear weights under other names than the model's modules "
            f"(e.g. '{missing[0]}.weight'); llmopt cannot quantize it. Re-save it with save_pretrained()."
        )
    return plan


def plan_layers(model: Any, spec: QuantSpec) -> QuantPlan:
    """What each ``nn.Linear`` of a model (real or on the meta device) becomes under ``spec``."""
    head_name = _module_name(model, model.get_output_embeddings())
    embed_name = _module_name(model, model.get_input_embeddings())
    linears = {name: m.in_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    body_names = [n for n in linears if n != head_name]
    if spec.scheme == "int8":
        body = LayerQuant(8, None)
    else:
        body = LayerQuant(4, choose_group_size([linears[n] for n in body_names], spec.group_size))
    head = None if spec.keep_head else LayerQuant(8, None)
    layers = dict.fromkeys(body_names, body)
    if head is not None:
        layers[head_name] = head
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ignore = [head_name] if head is None else []
    return QuantPlan(layers, linears, body, head, head_name, embed_name, tied, ignore=ignore)


def quantize_weight(
    weight: torch.Tensor,
    layer: LayerQuant,
    hessian: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scale, zero point or None) of one linear's weight: GPTQ when its Hessian is given, else
    round-to-nearest. Scales keep the stored weight's 16-bit dtype unless told (fp32: fp32 scales).

    Round-to-nearest runs on the GPU when there is one (an 8B model quantizes in seconds, not
    minutes); results are identical up to float rounding order."""
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32
    if hessian is None:
        weight = weight.to(_COMPUTE_DEVICE)
    if layer.bits == 8:
        if hessian is not None:
            return (*gptq_quantize_int8(weight, hessian, scale_dtype), None)
        return (*quantize_int8(weight, scale_dtype), None)
    assert layer.group_size is not None
    if hessian is not None:
        return gptq_quantize_int4(weight, hessian, layer.group_size, scale_dtype)
    return quantize_int4(weight, layer.group_size, scale_dtype)


Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (q, scale, zero point or None)


def _quantized_tensors(
    name: str, weight: torch.Tensor, layer: LayerQuant, codes: Codes | None
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one linear, in compressed-tensors' pack-quantized layout
    (``codes``: already computed, e.g. by GPTQ; else round-to-nearest now)."""
    q, scale, zero_point = codes if codes is not None else quantize_weight(weight, layer)
    out = {"weight_scale": scale, "weight_packed": pack_int32(q, layer.bits)}
    if zero_point is not None:
        out["weight_zero_point"] = pack_int32(zero_point.T.contiguous(), 4).T.contiguous()
    out["weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
    return {f"{name}.{k}": v.cpu() for k, v in out.items()}


def write_quantized_checkpoint(
    files: ModelFiles,
    plan: QuantPlan,
    out: Path,
    provenance: dict[str, Any],
    progress: Progress | None = None,
    max_shard_bytes: int | None = None,
    codes: dict[str, Codes] | None = None,
    replace: dict[str, torch.Tensor] | None = None,
) -> int:
    """Stream the source through the plan into ``out`` (an empty directory). Returns weight bytes written.

    ``codes`` (module name → integers and scales, e.g. from GPTQ) are written as given; other
    planned layers are rounded to nearest as their tensors stream past. ``replace`` (tensor name →
    tensor, e.g. a rotated model's embeddings and norms) overrides source tensors, cast to the
    source's dtype; names the source lacks (a rotated 16-bit head that was tied) are added, in the
    embeddings' dtype, and untie the head."""
    codes = codes or {}
    replace = dict(replace or {})
    say = progress or (lambda *_: None)
    writer = ShardWriter(out, max_shard_bytes) if max_shard_bytes else ShardWriter(out)
    embed_dtype = torch.float32
    weights = {f"{n}.weight": n for n in plan.layers}
    total = len(tensor_names(files))
    for done, (name, tensor) in enumerate(iter_tensors(files), start=1):
        module = weights.get(name)
        if name == f"{plan.embed_name}.weight":
            embed_dtype = tensor.dtype
        if name in replace:
            tensor = replace.pop(name).to(tensor.dtype)
        if module is not None:
            for k, v in _quantized_tensors(module, tensor, plan.layers[module], codes.get(module)).items():
                writer.add(k, v)
        else:
            writer.add(name, tensor)
        if name == f"{plan.embed_name}.weight" and plan.head_tied and plan.head is not None:
            for k, v in _quantized_tensors(
                plan.head_name, tensor, plan.head, codes.get(plan.head_name)
            ).items():
                writer.add(k, v)
        say("quantizing", done, total)
    added = list(replace)  # not in the source: only a tied head that is now its own tensor may be
    unexpected = [n for n in added if not (plan.head_tied and n == f"{plan.head_name}.weight")]
    if unexpected:
        raise InvalidModelError(
            f"The model's parameter names do not match its checkpoint's tensor names ({unexpected[0]} "
            "has no stored tensor), so a rotated model cannot be written over it. Quantize with --no-rotate."
        )
    for name in added:
        writer.add(name, replace.pop(name).to(embed_dtype))
    writer.finish()

    config = dict(files.config)
    config["quantization_config"] = build_quantization_config(
        plan.body, plan.head, plan.head_name, plan.ignore
    )
    if plan.head_tied and (plan.head is not None or added):
        config["tie_word_embeddings"] = False  # the head is now its own (int8 or rotated) tensor
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for item in files.root.iterdir():
        if item.is_file() and item.name not in _SKIP_COPY and item not in files.weight_files:
            shutil.copy2(item, out / item.name)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    return writer.total_bytes


def read_provenance(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_quantized_model(
    files: ModelFiles, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
) -> nn.Module:
    """Build the model with QuantLinear modules in place of quantized linears, then load the rest."""
    qconfig = files.config["quantization_config"]
    config = load_config(files, trust_remote_code)
    model = build_empty_model(config, trust_remote_code, dtype=dtype)
    state: dict[str, torch.Tensor] = dict(iter_tensors(files))
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or f"{name}.weight_packed" not in state:
            continue
        layer = layer_quant_for(qconfig, name)
        if layer is None:
            raise InvalidModelError(f"'{name}' has packed weights but quantization_config does not cover it.")
        model.set_submodule(name, _quant_linear(name, module, layer, state, device, dtype))
    missing = [k for k, v in model.state_dict().items() if v.is_meta and k not in state]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if tied:
        missing = [
            k for k in missing if not k.startswith(_module_name(model, model.get_output_embeddings()) + ".")
        ]
    if missing:
        raise InvalidModelError(
            f"'{files.root}' lacks tensors the model needs (e.g. '{missing[0]}'). Re-quantize it."
        )
    rest = {
        k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        for k, v in state.items()
        if k in model.state_dict()
    }
    model.load_state_dict(rest, strict=False, assign=True)
    if tied:
        model.tie_weights()
    model.to(device)
    return model


def _quant_linear(
    name: str,
    module: nn.Linear,
    layer: LayerQuant,
    state: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> QuantLinear:
    n, k = module.out_features, module.in_features
    stored_shape = [int(v) for v in state.pop(f"{name}.weight_shape").tolist()]
    if stored_shape != [n, k]:
        raise InvalidModelError(f"'{name}' is stored as {stored_shape} but the model expects {[n, k]}.")
    q = unpack_int32(state.pop(f"{name}.weight_packed"), layer.bits, k)
    scale = state.pop(f"{name}.weight_scale")
    zp_packed = state.pop(f"{name}.weight_zero_point", None)
    zero_point = (
        unpack_int32(zp_packed.T.contiguous(), 4, n).T.contiguous() if zp_packed is not None else None
    )
    shape = LayerShape(layer.scheme, k, n, layer.group_size)
    bias = state.pop(f"{name}.bias", None)
    return QuantLinear.from_quantized(shape, q, scale, zero_point, bias, device, dtype)
