"""The compressed-tensors ``quantization_config`` that llmopt writes and reads.

Weight-only groups in ``pack-quantized`` format: transformers (with the compressed-tensors package)
and vLLM load the same directory. Per quantized linear ``X``: ``X.weight_packed`` (int32),
``X.weight_scale``, ``X.weight_shape`` and, for asymmetric int4, ``X.weight_zero_point``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmopt.errors import InvalidModelError

FORMAT = "pack-quantized"


@dataclass(frozen=True)
class LayerQuant:
    """How one linear layer is quantized."""

    bits: int  # 8 or 4
    group_size: int | None  # None: per output channel

    @property
    def scheme(self) -> str:
        return f"int{self.bits}"

    @property
    def symmetric(self) -> bool:
        return self.bits == 8  # int4 groups carry zero points


def _weights_args(layer: LayerQuant) -> dict[str, Any]:
    return {
        "num_bits": layer.bits,
        "type": "int",
        "symmetric": layer.symmetric,
        "strategy": "group" if layer.group_size else "channel",
        "group_size": layer.group_size,
        "dynamic": False,
        "observer": "minmax",
    }


def build_quantization_config(
    body: LayerQuant, head: LayerQuant | None, head_name: str, ignore: list[str]
) -> dict[str, Any]:
    """One group for the body's linears; a second, by exact name, for the head when it differs."""
    groups: dict[str, Any] = {}
    if head is not None and head != body:
        groups["group_0"] = {
            "targets": [head_name],
            "weights": _weights_args(head),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    groups[f"group_{len(groups)}"] = {
        "targets": ["Linear"],
        "weights": _weights_args(body),
        "input_activations": None,
        "output_activations": None,
        "format": FORMAT,
    }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


def layer_quant_for(config: dict[str, Any], module_name: str) -> LayerQuant | None:
    """The quantization of a linear module under a compressed-tensors config (None: not quantized).

    Exact-name and ``re:`` targets take precedence over the class target ``Linear``.
    """
    if any(_matches(t, module_name) for t in config.get("ignore") or []):
        return None
    by_class: LayerQuant | None = None
    for group in (config.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        try:
            layer = LayerQuant(bits=int(weights["num_bits"]), group_size=weights.get("group_size"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidModelError(
                f"quantization_config has a group without valid weights args ({exc})."
            ) from exc
        if weights.get("type", "int") != "int" or layer.bits not in (4, 8):
            raise InvalidModelError(
                f"quantization_config asks for {weights.get('type')} {layer.bits}-bit weights; "
                "llmopt loads int8 and int4 only."
            )
        targets = group.get("targets") or []
        if any(t != "Linear" and _matches(t, module_name) for t in targets):
            return layer
        if "Linear" in targets:
            by_class = layer
    return by_class


def _matches(target: str, name: str) -> bool:
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return target == name
