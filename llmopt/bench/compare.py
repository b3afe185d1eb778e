"""Benchmark one candidate, or compare two (before/after) in the same process on the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from llmopt.bench.hardware import environment, measure_copy_bandwidth_gb_s
from llmopt.bench.memory import memory_label
from llmopt.bench.offline import BenchSpec, Candidate, CandidateResult, bench_candidate
from llmopt.device import resolve_device
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
    and by the default recipe's version, so a changed recipe makes a new checkpoint)."""
    from llmopt.quant.api import RECIPE_VERSION, QuantizeSpec, quantize_checkpoint
    from llmopt.quant.schemes import QuantSpec

    files = resolve_model(model, progress=(lambda m: progress(m, 0, 0)) if progress else None)
    label = model if model in BUILTIN_MODELS else files.root.name
    root = cache_dir() / "quantized"
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{label}-{scheme}-r{RECIPE_VERSION}-{hash_model(files)[:12]}"
    with FileLock(str(root / f"{out.name}.lock")):
        if not (out / "config.json").is_file():
            spec = QuantizeSpec(QuantSpec(scheme), out=out, force=True, evaluate=has_tokenizer(files.root))
            quantize_checkpoint(model, spec, progress)
    return str(out)


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
