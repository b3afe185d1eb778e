"""``quantize_checkpoint``: the whole ``llmopt quantize`` job as a library call."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from llmopt import __version__
from llmopt.device import free_memory_bytes, resolve_device
from llmopt.errors import InputError
from llmopt.models import BUILTIN_MODELS, LoadSpec, load_model, resolve_model
from llmopt.models.files import ModelFiles, hash_model
from llmopt.models.loading import DTYPES, has_tokenizer
from llmopt.quant.checkpoint import (
    PROVENANCE_FILE,
    Codes,
    QuantPlan,
    plan_quantization,
    write_quantized_checkpoint,
)
from llmopt.quant.learned import LearnSpec
from llmopt.quant.quality import EvalSpec, QualityResult, evaluate_quality
from llmopt.quant.rotation import DEFAULT_SEED, rotate_residual_, unsupported_reason
from llmopt.quant.schemes import QuantSpec
from llmopt.quant.writer import atomic_output_dir, check_output_dir

Progress = Callable[[str, int, int], None]  # (stage, done, total); total 0 means unknown


@dataclass(frozen=True)
class QuantizeSpec:
    quant: QuantSpec = field(default_factory=QuantSpec)
    out: Path | None = None  # default: ./<model>-<scheme>
    force: bool = False  # replace an existing output
    evaluate: bool = True  # measure quality against the source after writing
    eval: EvalSpec = field(default_factory=EvalSpec)
    allow_pickle: bool = False
    trust_remote_code: bool = False


@dataclass
class QuantizeResult:
    source: str
    out: Path
    scheme: str
    group_size: int | None
    head: str  # "int8" or "16-bit"
    method: str  # "gptq", "learned" or "rtn"
    rotated: bool  # residual stream rotated before quantizing (quant/rotation.py)
    bytes_before: int
    bytes_after: int
    seconds_quantize: float
    quality: QualityResult | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "out": str(self.out),
            "scheme": self.scheme,
            "group_size": self.group_size,
            "head": self.head,
            "method": self.method,
            "rotated": self.rotated,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "ratio": self.ratio,
            "seconds_quantize": self.seconds_quantize,
            "quality": self.quality.to_dict() if self.quality else None,
        }


def default_output(model_arg: str, scheme: str) -> Path:
    label = model_arg if model_arg in BUILTIN_MODELS else Path(model_arg).resolve().name
    return Path.cwd() / f"{label}-{scheme}"


def quantize_checkpoint(
    model_arg: str, spec: QuantizeSpec, progress: Progress | None = None
) -> QuantizeResult:
    """Quantize a model directory (or built-in) into a new checkpoint directory, atomically.

    Validates everything it can before writing; on any failure nothing is left at the output path.
    """
    say = progress or (lambda *_: None)
    out = (spec.out or default_output(model_arg, spec.quant.scheme)).expanduser().absolute()
    check_output_dir(out, spec.force)
    files = resolve_model(model_arg, allow_pickle=spec.allow_pickle, progress=lambda m: say(m, 0, 0))
    if spec.evaluate and not has_tokenizer(files.root):
        raise InputError(
            f"'{files.root}' has no tokenizer, so its quality cannot be measured; pass --no-eval."
        )
    plan = plan_quantization(files, spec.quant, spec.trust_remote_code)
    method = choose_method(spec.quant.method, files, plan)
    rotate: bool | None = choose_rotation(spec.quant, method, files)
    start = time.perf_counter()
    codes: dict[str, Codes] = {}
    replace: dict[str, torch.Tensor] = {}
    if method != "rtn" or rotate:  # else round-to-nearest as the tensors stream past
        codes, replace, rotate, method = in_memory_codes(files, plan, spec, method, rotate, say)
    say("hashing source", 0, 0)
    provenance: dict[str, Any] = {
        "llmopt_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": model_arg if model_arg in BUILTIN_MODELS else str(files.root.resolve()),
        "source_path": str(files.root.resolve()),
        "source_sha256": hash_model(files),
        "scheme": spec.quant.scheme,
        "group_size": plan.body.group_size,
        "head": "16-bit" if plan.head is None else "int8",
        "method": method,
        "method_detail": _method_detail(method, spec.quant.scheme),
        "rotation": ROTATION_DETAIL if rotate else None,
    }
    with atomic_output_dir(out, spec.force) as tmp:
        write_quantized_checkpoint(files, plan, tmp, provenance, progress=say, codes=codes, replace=replace)
    seconds = time.perf_counter() - start
    result = QuantizeResult(
        source=provenance["source"],
        out=out,
        scheme=spec.quant.scheme,
        group_size=plan.body.group_size,
        head=provenance["head"],
        method=method,
        rotated=bool(rotate),
        bytes_before=files.weight_bytes,
        bytes_after=resolve_model(str(out)).weight_bytes,
        seconds_quantize=seconds,
    )
    if spec.evaluate:
        result.quality = evaluate_against_source(out, files, spec, say)
        _record_quality(out, result.quality)
    return result


# The default recipe's version: bump it when defaults change what ``llmopt quantize`` writes (cached
# checkpoints, e.g. ``llmopt bench``'s, are keyed by it). 2: int8 rotates the residual stream.
# 3: int4 on a GPU learns its rounding.
RECIPE_VERSION = 3

# Calibration texts (llmopt/data/README.md), neither overlapping the evaluation slice: GPTQ's
# Hessians come from persuasion_calib.txt, learned rounding trains on persuasion_calib_long.txt.
CALIBRATION_TOKENS = 8192
CALIBRATION_WINDOW = 512
LEARN_CALIBRATION_TOKENS = 32768


def _fits_in_memory(needed: int) -> bool:
    """The in-memory paths (GPTQ, learned rounding, rotation) run where the model loads, the GPU when
    there is one, and only where they take under half of that device's free memory."""
    return needed < 0.5 * free_memory_bytes(resolve_device("auto"))


def choose_method(requested: str, files: ModelFiles, plan: QuantPlan) -> str:
    """GPTQ and learned rounding need the model in memory (fp32) and a tokenizer for their
    calibration text (GPTQ also one (K, K) Hessian per linear, learned rounding three copies of
    the calibration activations); round-to-nearest streams one tensor at a time. ``auto`` takes
    learned rounding for int4 on a GPU (smollm2 int4 g64: +3.5% perplexity against GPTQ's +5.8%,
    87 s on an H200, but an estimated 1.5 hours on a 2-core CPU), else GPTQ, else round-to-nearest."""
    if requested == "rtn":
        return "rtn"
    hidden = int(files.config.get("hidden_size") or 0)
    needed = {
        "gptq": 2 * files.weight_bytes + sum(4 * k * k for k in plan.in_features.values()),
        "learned": 2 * files.weight_bytes + 3 * 4 * LEARN_CALIBRATION_TOKENS * hidden,
    }
    if requested in needed:
        label = "GPTQ" if requested == "gptq" else "Learned rounding"
        if not has_tokenizer(files.root):
            raise InputError(f"{label} calibrates on text; this model has no tokenizer. Use --method rtn.")
        if not _fits_in_memory(needed[requested]):
            raise InputError(
                f"{label} needs about {needed[requested] / 1e9:.1f} GB of memory here, more than half of "
                "what is free. Use --method rtn, which streams the model in bounded memory."
            )
        return requested
    if not has_tokenizer(files.root):
        return "rtn"
    if plan.body.bits == 4 and torch.cuda.is_available() and _fits_in_memory(needed["learned"]):
        return "learned"
    return "gptq" if _fits_in_memory(needed["gptq"]) else "rtn"


def choose_rotation(quant: QuantSpec, method: str, files: ModelFiles) -> bool | None:
    """True: rotate (``--rotate``; with round-to-nearest the model is then loaded into memory for
    it). False: don't. None: rotate if the architecture allows — the default for int8 with GPTQ,
    where the model is in memory anyway (smollm2 top-1 agreement 97.8% → 98.6%). Not for int4 by
    default, where it measured no better with GPTQ (BENCHMARKS.md §1)."""
    if quant.rotate and method == "rtn":
        needed = 2 * files.weight_bytes
        if not _fits_in_memory(needed):
            raise InputError(
                f"--rotate loads the model in fp32, about {needed / 1e9:.1f} GB, more than half of the "
                "free memory here. Use --no-rotate with --method rtn, which streams in bounded memory."
            )
    if quant.rotate is not None:
        return quant.rotate
    return None if quant.scheme == "int8" and method in ("gptq", "learned") else False


ROTATION_DETAIL = f"residual stream rotated by a random orthogonal matrix (seed {DEFAULT_SEED}), norms folded"


def in_memory_codes(
    files: ModelFiles,
    plan: QuantPlan,
    spec: QuantizeSpec,
    method: str,
    rotate: bool | None,
    progress: Progress | None = None,
) -> tuple[dict[str, Codes], dict[str, torch.Tensor], bool, str]:
    """Integers and scales of every planned layer from the model loaded in fp32 — GPTQ from Hessians
    on the shipped calibration text, learned rounding, or round-to-nearest — after rotating its
    residual stream (``rotate``: True must, None if the architecture allows; see
    ``choose_rotation``); plus the other tensors the rotation changed (embeddings, norms, a 16-bit
    head), whether it rotated, and the method used (``auto``'s learned rounding becomes GPTQ on an
    architecture it does not cover).

    Scales are in the checkpoint's own dtype, as round-to-nearest would store them. (Sequential
    GPTQ, with Hessians from the partly quantized model, was measured too: int4 +5.38% against
    +5.80% here, for about six times the time; see BENCHMARKS.md.)"""
    from importlib import resources

    from llmopt.quant.checkpoint import quantize_weight
    from llmopt.quant.gptq import calibration_windows, collect_hessians
    from llmopt.quant.learned import learn_codes
    from llmopt.quant.learned import unsupported_reason as learned_unsupported

    stored = str(files.config.get("dtype") or files.config.get("torch_dtype") or "float32")
    scale_dtype = DTYPES.get(stored, torch.float32)
    load = LoadSpec(dtype="float32", trust_remote_code=spec.trust_remote_code, allow_pickle=spec.allow_pickle)
    loaded = load_model(files, load)
    model = loaded.model
    replace: dict[str, torch.Tensor] = {}
    if rotate is None:
        rotate = unsupported_reason(model) is None
    if rotate:
        if progress:
            progress("rotating", 0, 0)
        rotate_residual_(model)
        quantized = {f"{name}.weight" for name in plan.layers}
        replace = {name: p.detach() for name, p in model.named_parameters() if name not in quantized}
    if method == "learned" and spec.quant.method == "auto" and learned_unsupported(model):
        method = "gptq"
    if method == "learned":
        text = (resources.files("llmopt") / "data" / "persuasion_calib_long.txt").read_text(encoding="utf-8")
        windows = calibration_windows(loaded.tokenizer, text, LEARN_CALIBRATION_TOKENS, CALIBRATION_WINDOW)
        if progress and loaded.device.type == "cpu":
            progress("learning rounding on the CPU: slow (~1.5 h for 135M on 2 cores)", 0, 0)
        learned, _losses = learn_codes(model, plan.layers, windows, scale_dtype, progress=progress)
        return learned, replace, rotate, method
    hessians: dict[str, torch.Tensor] = {}
    if method == "gptq":
        text = (resources.files("llmopt") / "data" / "persuasion_calib.txt").read_text(encoding="utf-8")
        hessians = collect_hessians(
            model, loaded.tokenizer, text, CALIBRATION_TOKENS, CALIBRATION_WINDOW, progress
        )
    codes: dict[str, Codes] = {}
    for i, (name, layer) in enumerate(plan.layers.items(), start=1):
        weight = model.get_submodule(name).weight
        q, scale, zero = quantize_weight(weight, layer, hessians.pop(name, None), scale_dtype)
        # Codes leave the GPU as they are made: only one layer's work is there at a time.
        codes[name] = (q.cpu(), scale.cpu(), zero.cpu() if zero is not None else None)
        if progress:
            progress("GPTQ" if method == "gptq" else "quantizing", i, len(plan.layers))
    return codes, replace, rotate, method


def _method_detail(method: str, scheme: str) -> str:
    if method == "learned":
        return (
            f"learned rounding (signed gradient descent, {LearnSpec().steps} steps per decoder block against "
            f"its float output), trained on {LEARN_CALIBRATION_TOKENS} tokens of persuasion_calib_long.txt; "
            "output head by GPTQ"
        )
    if method == "gptq":
        detail = "GPTQ (act-order, error feedback through the inverse-Hessian Cholesky factor), "
        detail += f"calibrated on {CALIBRATION_TOKENS} tokens of persuasion_calib.txt"
        if scheme == "int4":
            detail += "; per-group range search weighted by the group's Hessian block"
        return detail
    if scheme == "int8":
        return "round-to-nearest, per-output-channel absmax scale, symmetric"
    return "round-to-nearest, group-wise asymmetric, per-group range search (least squared error)"


def evaluate_against_source(
    out: Path, source: ModelFiles, spec: QuantizeSpec, progress: Progress | None = None
) -> QualityResult:
    """Load the written checkpoint through llmopt's own loader and score it against the fp32 source."""
    load = LoadSpec(
        dtype="float32",
        device="cpu",
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
    )
    quantized = load_model(str(out), load)
    reference = load_model(source, load)
    return evaluate_quality(quantized.model, quantized.tokenizer, reference.model, spec.eval, progress)


def _record_quality(out: Path, quality: QualityResult) -> None:
    path = out / PROVENANCE_FILE
    data = json.loads(path.read_text())
    data["quality"] = quality.to_dict()
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
