"""Benchmark one candidate, or compare two (before/after) in the same process on the same inputs."""

from __future__ import annotations

import multiprocessing
import queue
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from llmopt import errors as llmopt_errors
from llmopt.bench.hardware import environment, measure_copy_bandwidth_gb_s
from llmopt.bench.memory import memory_label
from llmopt.bench.offline import BenchSpec, Candidate, CandidateResult, bench_candidate
from llmopt.device import resolve_device
from llmopt.errors import LLMOptError
from llmopt.models import BUILTIN_MODELS, LoadSpec, cache_dir, load_model, resolve_model
from llmopt.models.builtin import RANDOM_SHAPES
from llmopt.models.files import hash_model
from llmopt.models.loading import has_tokenizer

Progress = Callable[[str, int, int], None]
DEFAULT_BEFORE = "smollm2-135m"


@dataclass
class BenchResult:
    environment: dict[str, Any]
    spec: dict[str, Any]
    memory_metric: str
    copy_bandwidth_gb_s: float
    candidates: list[CandidateResult]
    quality: dict[str, Any] | None = None  # before/after perplexity and top-1 agreement (compare only)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["kind"] = "llmopt-bench"
        if len(self.candidates) == 2:
            doc["compare"] = compare_summaries(self.candidates[0], self.candidates[1])
        return doc


def compare_summaries(
    before: CandidateResult, after: CandidateResult
) -> dict[str, dict[str, dict[str, float]]]:
    """Per batch size and metric: before, after and after/before."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for b, a in zip(before.batches, after.batches, strict=True):
        out[str(b.batch_size)] = {
            key: {
                "before": b.summary[key],
                "after": a.summary[key],
                "ratio": a.summary[key] / b.summary[key] if b.summary[key] else float("nan"),
            }
            for key in b.summary
            if not key.endswith(("_min", "_max"))
        }
    return out


def cached_quantized(model: str, scheme: str = "int8", progress: Progress | None = None) -> str:
    """The path of ``model`` quantized with ``scheme``, made once into the cache (keyed by source hash
    and by the default recipe's version, so a changed recipe makes a new checkpoint).

    When something has to be made (a built-in model converted, the checkpoint quantized and
    evaluated), that runs in a fresh child process: a gigabyte of freed calibration and GPTQ memory
    left in this process's heap would distort the peak-RSS figures measured here afterwards."""
    from llmopt.models.builtin import builtin_ready

    if model in BUILTIN_MODELS and not builtin_ready(model):
        _make_in_child(model, scheme)  # converts the model, then makes the checkpoint
    files = resolve_model(model, progress=(lambda m: progress(m, 0, 0)) if progress else None)
    out = _quantized_path(model, scheme, files)
    if not (out / "config.json").is_file():
        _make_in_child(model, scheme)
    return str(out)


def _quantized_path(model: str, scheme: str, files: Any) -> Path:
    from llmopt.quant.api import RECIPE_VERSION

    label = model if model in BUILTIN_MODELS else files.root.name
    return cache_dir() / "quantized" / f"{label}-{scheme}-r{RECIPE_VERSION}-{hash_model(files)[:12]}"


def _cached_quantized(model: str, scheme: str, progress: Progress | None = None) -> str:
    from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
    from llmopt.quant.schemes import QuantSpec

    files = resolve_model(model, progress=(lambda m: progress(m, 0, 0)) if progress else None)
    out = _quantized_path(model, scheme, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f"{out.name}.lock")):
        if not (out / "config.json").is_file():
            spec = QuantizeSpec(QuantSpec(scheme), out=out, force=True, evaluate=has_tokenizer(files.root))
            quantize_checkpoint(model, spec, progress)
    return str(out)


def _child_progress(stage: str, done: int, total: int) -> None:
    if total == 0 or done in (1, total):
        print(f"  {stage}" + (f" {done}/{total}" if total else ""), file=sys.stderr, flush=True)


def _make_child(model: str, scheme: str, errors: Any) -> None:
    try:
        print(f"preparing {model} ({scheme}) in a child process", file=sys.stderr, flush=True)
        _cached_quantized(model, scheme, _child_progress)
    except LLMOptError as exc:
        errors.put((type(exc).__name__, str(exc)))
        raise SystemExit(1) from None


def _make_in_child(model: str, scheme: str) -> None:
    """Run ``_cached_quantized`` in a spawned process; its llmopt errors are raised here as the same
    class (so the CLI's exit codes hold), anything else as a RuntimeError."""
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    child = context.Process(target=_make_child, args=(model, scheme, errors))
    child.start()
    try:
        child.join()
    except BaseException:  # Ctrl-C here: stop the child too (its output is written atomically)
        child.terminate()
        child.join()
        raise
    if child.exitcode == 0:
        return
    try:
        name, message = errors.get(timeout=5)
    except queue.Empty:
        pass
    else:
        cls = getattr(llmopt_errors, name, LLMOptError)
        raise cls(message)
    raise RuntimeError(
        f"Preparing {model} ({scheme}) failed in its child process (exit {child.exitcode}); see above."
    )


def measure_quality(before: Candidate, after: Candidate, progress: Progress | None = None) -> dict[str, Any]:
    """Perplexity of both and top-1 agreement of after against before, by the foundation's protocol.

    Reuses the numbers an llmopt checkpoint recorded when it was made from this same source."""
    from llmopt.quant.checkpoint import read_provenance
    from llmopt.quant.quality import evaluate_quality

    provenance = read_provenance(Path(after.model))
    recorded = provenance.get("quality")
    if recorded and provenance.get("source") in (before.model, str(Path(before.model).resolve())):
        return {**recorded, "source": "recorded by llmopt quantize in llmopt.json"}
    load = LoadSpec(dtype="float32", device="cpu")
    candidate = load_model(after.model, load)
    reference = load_model(before.model, load)
    result = evaluate_quality(candidate.model, candidate.tokenizer, reference.model, progress=progress)
    return {**result.to_dict(), "source": "measured now"}


def _has_text(candidate: Candidate) -> bool:
    return candidate.model not in RANDOM_SHAPES and has_tokenizer(resolve_model(candidate.model).root)


def run_bench(
    candidates: list[Candidate], spec: BenchSpec, with_quality: bool = True, progress: Progress | None = None
) -> BenchResult:
    """Measure each candidate in turn, in this process, with the same seeded inputs and threads."""
    device = resolve_device(spec.device)
    copy_gb_s = measure_copy_bandwidth_gb_s(device)
    results = [bench_candidate(c, spec, copy_gb_s, progress) for c in candidates]
    quality = None
    if with_quality and len(candidates) == 2 and all(_has_text(c) for c in candidates):
        quality = measure_quality(candidates[0], candidates[1], progress)
    return BenchResult(environment(device), asdict(spec), memory_label(device), copy_gb_s, results, quality)
