"""Inspect and stream the files of a model directory in Hugging Face layout, without loading the model.

Everything here reads headers and streams tensors one at a time, so a model larger than memory
can be validated, hashed and quantized.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from llmopt.errors import InvalidModelError, ModelNotFoundError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class ModelFiles:
    """What a model directory holds: its config and weight files, in load order."""

    root: Path
    config: dict[str, Any]
    weight_files: tuple[Path, ...]
    pickle: bool  # True when the weights are torch pickle .bin files

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def is_llmopt_quantized(self) -> bool:
        qc = self.config.get("quantization_config") or {}
        return qc.get("quant_method") == "compressed-tensors" and (self.root / "llmopt.json").exists()


def inspect_model_dir(path: Path, *, allow_pickle: bool = False) -> ModelFiles:
    """Validate that ``path`` is a loadable HF model directory and list its weight files.

    Raises a clear ``InputError`` for a missing path, a non-model directory, missing or corrupt
    weights, and pickle checkpoints unless ``allow_pickle`` is set.
    """
    if not path.exists():
        raise ModelNotFoundError(
            f"Model path '{path}' does not exist. Pass a local Hugging Face model directory "
            "or a built-in model name (run `llmopt models` to list them)."
        )
    if not path.is_dir():
        raise InvalidModelError(
            f"'{path}' is a file. Pass the directory that holds config.json and the weights."
        )
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidModelError(
            f"'{path}' is not a model directory: it has no config.json. "
            "Pass a directory saved with save_pretrained() (config.json + *.safetensors)."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(
            f"'{config_path}' is not valid JSON ({exc}). Restore or re-save the model."
        ) from exc
    if not isinstance(config, dict):
        raise InvalidModelError(f"'{config_path}' does not hold a JSON object. Restore or re-save the model.")

    files = _indexed_files(path, SAFETENSORS_INDEX) or sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            check_safetensors_file(f)
        return ModelFiles(path, config, tuple(files), pickle=False)

    pickles = _indexed_files(path, PICKLE_INDEX) or sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise InvalidModelError(
                f"'{path}' holds only pickle weights ({pickles[0].name}), which can run code when read. "
                "Convert it to safetensors, or pass --allow-pickle to read it with weights_only=True."
            )
        return ModelFiles(path, config, tuple(pickles), pickle=True)
    raise InvalidModelError(
        f"'{path}' has a config.json but no weights (*.safetensors). Copy the weight files in."
    )


def _indexed_files(path: Path, index_name: str) -> list[Path]:
    index_path = path / index_name
    if not index_path.is_file():
        return []
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InvalidModelError(
            f"'{index_path}' is not a valid weight index ({exc}). Re-save the model."
        ) from exc
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (path / n).is_file()]
    if missing:
        raise InvalidModelError(
            f"'{index_path}' lists shard(s) that are missing: {', '.join(missing)}. "
            "Copy the missing files in."
        )
    return [path / n for n in names]


def check_safetensors_file(path: Path) -> None:
    """Check a safetensors file's header and that its size matches: catches truncation and corruption."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(fh.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(
            f"'{path}' is not a valid safetensors file ({exc}). It is corrupt; re-download or re-save it."
        ) from exc
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        raise InvalidModelError(
            f"'{path}' is truncated or corrupt: {size} bytes on disk, its header describes {expected}. "
            "Re-download or re-save it."
        )


def iter_tensors(files: ModelFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every stored tensor, one at a time (memory-mapped where possible)."""
    for path in files.weight_files:
        if files.pickle:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from state.items()
            del state
            continue
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, fh.get_tensor(name)


def tensor_names(files: ModelFiles) -> list[str]:
    """The stored tensor names, read from headers only (safetensors) or the pickle index."""
    names: list[str] = []
    for path in files.weight_files:
        if files.pickle:
            names.extend(torch.load(path, map_location="meta", weights_only=True, mmap=True).keys())
        else:
            with safe_open(str(path), framework="pt") as fh:
                names.extend(fh.keys())
    return names


def hash_model(files: ModelFiles, chunk: int = 1 << 24) -> str:
    """sha256 over config.json and the weight files, in order: the source's identity in provenance."""
    digest = hashlib.sha256()
    for path in (files.root / "config.json", *files.weight_files):
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
    return digest.hexdigest()
