"""Load a model directory (plain or llmopt-quantized) into a torch module and its tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmopt.device import resolve_device
from llmopt.errors import InputError, InvalidModelError
from llmopt.models.builtin import BUILTIN_MODELS, RANDOM_SEED, RANDOM_SHAPES, Progress, materialize_builtin
from llmopt.models.files import ModelFiles, inspect_model_dir

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class LoadSpec:
    dtype: str = "auto"  # "auto": the checkpoint's dtype on GPU, float32 on CPU
    device: str = "auto"
    trust_remote_code: bool = False  # passed explicitly to transformers, never implied
    allow_pickle: bool = False  # read pytorch_model.bin (with weights_only=True)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (with QuantLinear modules when quantized)
    tokenizer: Any  # None for random-weight benchmark models, which have no tokenizer
    files: ModelFiles | None  # None for random-weight benchmark models, which live in memory only
    device: torch.device
    dtype: torch.dtype

    @property
    def path(self) -> Path:
        if self.files is None:
            raise InputError("A random-weight benchmark model has no directory.")
        return self.files.root


def resolve_model(arg: str, *, allow_pickle: bool = False, progress: Progress | None = None) -> ModelFiles:
    """A model argument is a built-in name or a directory; return its validated files."""
    if arg in RANDOM_SHAPES and not Path(arg).exists():
        raise InputError(
            f"'{arg}' is a random-weight benchmark shape that exists only in memory; "
            "use it with `llmopt bench`."
        )
    if arg in BUILTIN_MODELS and not Path(arg).exists():
        return inspect_model_dir(materialize_builtin(arg, progress))
    return inspect_model_dir(Path(arg).expanduser(), allow_pickle=allow_pickle)


def has_tokenizer(root: Path) -> bool:
    return any(
        (root / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


def resolve_dtype(name: str, config: dict[str, Any], device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, the checkpoint's own dtype (default bf16) on GPU."""
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        stored = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
        return DTYPES.get(stored, torch.bfloat16)
    if name not in DTYPES:
        raise InputError(f"Unknown dtype '{name}'. Use one of: auto, {', '.join(sorted(DTYPES))}.")
    return DTYPES[name]


def load_model(
    arg: str | ModelFiles, spec: LoadSpec | None = None, progress: Progress | None = None
) -> LoadedModel:
    """Load a model for inference (eval mode, no grad). Quantized llmopt checkpoints load into
    QuantLinear modules that hold only the packed weights and scales."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # llmopt reports progress itself; stderr stays readable
    spec = spec or LoadSpec()
    if isinstance(arg, str) and arg in RANDOM_SHAPES and not Path(arg).exists():
        return load_random_model(arg, spec)
    files = (
        arg
        if isinstance(arg, ModelFiles)
        else resolve_model(arg, allow_pickle=spec.allow_pickle, progress=progress)
    )
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, files.config, device)
    tokenizer = None  # random-weight benchmark models ship none; they are fed token ids
    try:
        if has_tokenizer(files.root):
            tokenizer = AutoTokenizer.from_pretrained(files.root, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidModelError(
            f"Cannot load the tokenizer of '{files.root}' ({exc}). Copy its tokenizer files in."
        ) from exc
    if files.is_llmopt_quantized:
        from llmopt.quant.checkpoint import load_quantized_model

        model: Any = load_quantized_model(
            files, device=device, dtype=dtype, trust_remote_code=spec.trust_remote_code
        )
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                files.root,
                dtype=dtype,
                trust_remote_code=spec.trust_remote_code,
                use_safetensors=not files.pickle,
            )
        except (OSError, ValueError, KeyError) as exc:
            raise InvalidModelError(f"transformers cannot load '{files.root}': {exc}") from exc
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, files=files, device=device, dtype=dtype)


def load_random_model(name: str, spec: LoadSpec) -> LoadedModel:
    """Build a benchmark shape directly on the device with seeded random weights (transformers' own init)."""
    import json

    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(spec.device)
    config_dict = json.loads(RANDOM_SHAPES[name].read_text())
    dtype = resolve_dtype(spec.dtype, config_dict, device)
    config = AutoConfig.for_model(**config_dict)
    torch.manual_seed(RANDOM_SEED)
    with torch.device(device):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=None, files=None, device=device, dtype=dtype)
