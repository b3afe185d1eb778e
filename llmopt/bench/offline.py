"""The offline (in-process) benchmark: generate() over seeded random prompts at several batch sizes.

Each candidate is loaded, warmed up once per batch size (reported apart), then timed ``runs`` times.
A logits processor stamps the time of every decode step (after a device sync), which gives TTFT,
inter-token gaps and end-to-end latency for every sequence of the batch.
"""

from __future__ import annotations

import functools
import gc
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from llmopt.bench.memory import baseline_bytes, peak_bytes, reset_peak
from llmopt.bench.metrics import (
    RequestRecord,
    achieved_bandwidth_gb_s,
    decode_bytes_per_step,
    floor_ms,
    median,
    summarize_requests,
)
from llmopt.device import resolve_device, synchronize
from llmopt.errors import InputError
from llmopt.models import LoadSpec, load_model

ENGINES = ("transformers", "transformers-compile", "llmopt")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Candidate:
    """One thing to measure: a model argument and the engine that runs it."""

    model: str
    engine: str = "transformers"
    label: str = ""
    quantize: str | None = None  # quantize in memory after loading (random-weight shapes have no files)

    @classmethod
    def parse(cls, text: str, label: str = "") -> Candidate:
        """``MODEL[:ENGINE]`` (engine default: transformers, the "before" of a comparison); a path
        with ':' in it is left to the model part."""
        model, sep, engine = text.rpartition(":")
        if not sep or engine not in ENGINES:
            return cls(text, "transformers", label or text)
        return cls(model, engine, label or text)


@dataclass(frozen=True)
class BenchSpec:
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 128
    gen_len: int = 64
    runs: int = 3
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # the candidates' activation dtype: auto = checkpoint dtype on GPU, fp32 on CPU
    compile: bool | None = None  # llmopt engine: torch.compile its decode step (None: on CUDA)

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InputError("--batch-sizes must be positive integers, e.g. 1,8.")
        if self.prompt_len < 1 or self.gen_len < 2:
            raise InputError("--prompt-len must be ≥ 1 and --gen-len ≥ 2 (TPOT needs two tokens).")
        if self.runs < 1:
            raise InputError("--runs must be at least 1.")


@dataclass
class BatchResult:
    batch_size: int
    warmup_s: float
    runs: list[dict[str, Any]]  # per run: summary and per-request records
    summary: dict[str, float]  # medians over runs, with _min/_max, plus memory and bandwidth


@dataclass
class CandidateResult:
    label: str
    model: str
    engine: str
    dtype: str
    load_s: float
    weight_bytes: int
    embedding_bytes: int
    kv_bytes_per_token: int
    batches: list[BatchResult] = field(default_factory=list)
    capture_s: float = 0.0  # llmopt engine: CUDA-graph capture time, included in the warm-ups

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StepClock:
    """A logits processor that records when each new token's logits are ready (one call per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def model_bytes(model: Any) -> tuple[int, int]:
    """(bytes of every parameter and buffer at its stored width, bytes of those a decode step does not
    read: the input embedding table (0 when the head is tied to it, since the head reads it whole), and
    the copies a quantized layer's kernel keeps for other row counts, ``QuantKernel.decode_unread``)."""
    from llmopt.quant.linear import QuantLinear

    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() in seen:
            continue  # tied weights count once
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    unread = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            copies = (getattr(module, name, None) for name in module.kernel.decode_unread)
            unread += sum(t.numel() * t.element_size() for t in copies if t is not None)
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is embedding:
        return total, unread
    return total, unread + embedding.numel() * embedding.element_size()


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    from llmopt.engine.kv_cache import kv_bytes_per_token as per_token

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return per_token(config.num_hidden_layers, kv_heads, head_dim, dtype)


def seeded_prompts(spec: BenchSpec, batch: int, vocab_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + batch)
    low = min(10, vocab_size - 1)  # skip the first ids, where special tokens usually live
    return torch.randint(low, vocab_size, (batch, spec.prompt_len), generator=generator).to(device)


def _generate_once(
    model: Any, prompts: torch.Tensor, spec: BenchSpec, device: torch.device, static_cache: bool = False
) -> list[RequestRecord]:
    """transformers' generate(); with ``static_cache`` its static cache, which on a GPU makes
    transformers compile the decode step (torch.compile, mode reduce-overhead)."""
    from transformers import LogitsProcessorList

    clock = _StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=spec.gen_len,
            min_new_tokens=spec.gen_len,  # EOS is ignored: every run does the same work
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=model.generation_config.pad_token_id or 0,
            **({"cache_implementation": "static"} if static_cache else {}),
        )
    synchronize(device)
    end = time.perf_counter()
    new_tokens = out.shape[1] - prompts.shape[1]
    stamps = [s - start for s in clock.stamps]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return [
        RequestRecord(
            prompt_tokens=prompts.shape[1],
            output_tokens=new_tokens,
            ttft_s=stamps[0],
            itl_s=list(gaps),
            latency_s=end - start,
        )
        for _ in range(prompts.shape[0])
    ]


def _engine_generate_once(engine: Any, prompts: torch.Tensor, spec: BenchSpec) -> list[RequestRecord]:
    """llmopt's engine on the same prompts: all submitted at once, timed from the submission."""
    from llmopt.engine import SamplingParams

    params = SamplingParams(max_new_tokens=spec.gen_len, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts.tolist(), params)
    records = []
    for out in outputs:
        times = [t - start for t in out.token_times]
        records.append(
            RequestRecord(
                prompt_tokens=len(out.prompt_token_ids),
                output_tokens=len(out.token_ids),
                ttft_s=times[0],
                itl_s=[b - a for a, b in itertools.pairwise(times)],
                latency_s=times[-1],
            )
        )
    return records


def _summarize_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = runs[0].keys()
    summary: dict[str, float] = {}
    for key in keys:
        values = [r[key] for r in runs]
        summary[key] = median(values)
        summary[f"{key}_min"] = min(values)
        summary[f"{key}_max"] = max(values)
    return summary


def bench_candidate(
    candidate: Candidate, spec: BenchSpec, copy_gb_s: float, progress: Progress | None = None
) -> CandidateResult:
    """Load one candidate and measure it at every batch size; frees it before returning."""
    say = progress or (lambda *_: None)
    if candidate.engine not in ENGINES:
        raise InputError(f"Unknown engine '{candidate.engine}'. Use one of: {', '.join(ENGINES)}.")
    gc.collect()
    baseline = baseline_bytes(resolve_device(spec.device))
    load_start = time.perf_counter()
    loaded = load_model(candidate.model, LoadSpec(dtype=spec.dtype, device=spec.device))
    model, device = loaded.model, loaded.device
    if candidate.quantize:
        from llmopt.quant.inplace import quantize_model_
        from llmopt.quant.schemes import QuantSpec

        quantize_model_(model, QuantSpec(candidate.quantize))
    weights, embedding = model_bytes(model)  # before the engine fuses projections (same bytes)
    kv_per_token = kv_bytes_per_token(model.config, loaded.dtype)
    run_once: Callable[[torch.Tensor], list[RequestRecord]]
    engine: Any = None
    if candidate.engine == "llmopt":
        from llmopt.engine import Engine, EngineConfig

        longest = max(spec.batch_sizes)
        config = EngineConfig(
            max_batch=longest,
            max_seq=spec.prompt_len + spec.gen_len,
            prefill_chunk=longest * spec.prompt_len,  # prefill the whole batch first, as generate() does
            compile=spec.compile,
        )
        engine = Engine(model, loaded.tokenizer, config)
        run_once = functools.partial(_engine_generate_once, engine, spec=spec)
    else:
        static = candidate.engine == "transformers-compile"
        run_once = functools.partial(_generate_once, model, spec=spec, device=device, static_cache=static)
    load_s = time.perf_counter() - load_start
    result = CandidateResult(
        candidate.label or candidate.model,
        candidate.model,
        candidate.engine,
        str(loaded.dtype).removeprefix("torch."),
        load_s,
        weights,
        embedding,
        kv_per_token,
    )
    for batch in spec.batch_sizes:
        prompts = seeded_prompts(spec, batch, model.config.vocab_size, device)
        warm_start = time.perf_counter()
        run_once(prompts)  # warm-up: allocations, kernels, graph capture, compilation
        warmup_s = time.perf_counter() - warm_start
        runs: list[dict[str, Any]] = []
        summaries: list[dict[str, float]] = []
        for i in range(spec.runs):
            say(f"{result.label}: batch {batch}", i + 1, spec.runs)
            reset_peak(device)
            records = run_once(prompts)
            wall = max(r.latency_s or 0.0 for r in records)
            summary = summarize_requests(records, wall)
            summary["peak_mem_gib"] = (peak_bytes(device) - baseline) / 2**30
            summaries.append(summary)
            runs.append({"summary": summary, "records": [asdict(r) for r in records]})
        combined = _summarize_runs(summaries)
        # The floor at the mean context of the decode steps (prompt plus half the generated tokens).
        context = spec.prompt_len + spec.gen_len // 2
        step_bytes = decode_bytes_per_step(weights, embedding, kv_per_token, context, batch)
        combined["bytes_per_step"] = float(step_bytes)
        combined["copy_bandwidth_gb_s"] = copy_gb_s
        combined["floor_ms"] = floor_ms(step_bytes, copy_gb_s)
        combined["achieved_gb_s"] = achieved_bandwidth_gb_s(step_bytes, combined["tpot_ms_p50"])
        combined["floor_pct"] = 100.0 * combined["floor_ms"] / combined["tpot_ms_p50"]
        result.batches.append(BatchResult(batch, warmup_s, runs, combined))
    if engine is not None:
        result.capture_s = engine.runner.capture_s
    del model, loaded, engine, run_once
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result
