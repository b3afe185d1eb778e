"""CPU int8 decode of smollm2-135m: llmopt's C++ kernel and engine against the usual recipes.

    python examples/cpu_int8_bench.py kernels  # per-shape µs and GB/s: llmopt's kernel vs torch's int8 op
    python examples/cpu_int8_bench.py e2e      # tok/s and perplexity of (a)-(d) below, plus a profiled step
    python examples/cpu_int8_bench.py all      # both (default); --out FILE.json (default cpu-int8-bench.json)

End to end, all in this one process, batch 1, a seeded 128-token prompt (``llmopt bench``'s prompts)
→ 128 new tokens, greedy, EOS ignored, median of 3 runs after one warm-up run:
(a) transformers fp32, eager ``generate()``;
(b) ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`` of the same
    fp32 model under ``generate()`` (int8 weights, activations quantized per call);
(c) llmopt's int8 checkpoint (``llmopt quantize smollm2-135m``, GPTQ, made once into the cache) on
    llmopt's engine, eager;
(d) the same with the engine's decode step under ``torch.compile`` (warm-up = compilation, in a
    fresh inductor cache unless ``--warm-inductor-cache``).
Decode tok/s = 1 / median inter-token time of a run (time to first token excluded).
Perplexity: llmopt's protocol (llmopt/quant/quality.py; fp32 reference = (a)'s model); its
1,024-row windows run through the same C++ kernel as decode.
Kernel shapes: weights are cycled through enough copies (≥ 160 MB) that they stream from memory,
as in decode, rather than from the cache.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

MODEL = "smollm2-135m"
PROMPT_LEN, GEN_LEN, RUNS = 128, 128, 3
SHAPES = [  # (label, N, K) of smollm2-135m's linears
    ("q / o", 576, 576),
    ("k / v", 192, 576),
    ("qkv fused", 960, 576),
    ("gate / up", 1536, 576),
    ("gate_up fused", 3072, 576),
    ("down", 576, 1536),
    ("head", 49152, 576),
]
STREAM_BYTES = 160 * 2**20


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- kernels ----------------------------------------------------------------------------------


def _time_cycled(fn: Callable[[Any], Any], items: list[Any], repeats: int = 7) -> float:
    """Median seconds per call, cycling through ``items`` (weights that do not fit the caches)."""
    for item in items[:3]:
        fn(item)
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        per_call.append((time.perf_counter() - start) / len(items))
    return statistics.median(per_call)


def bench_kernels(rows: tuple[int, ...]) -> list[dict[str, Any]]:
    from llmopt.quant import cpu_kernels

    if not cpu_kernels.ready():
        raise SystemExit("llmopt's CPU kernel is not available here (see the warning above).")
    aten = torch.ops.aten._weight_int8pack_mm
    results = []
    for m in rows:
        for label, n, k in SHAPES:
            torch.manual_seed(n + k + m)
            copies = max(4, min(400, STREAM_BYTES // (n * k)))
            qs = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(copies)]
            scale = torch.rand(n) + 0.5
            x = torch.randn(m, k)
            xb, sb = x.bfloat16(), scale.bfloat16()
            packed = [cpu_kernels.pack_int8(q) for q in qs]
            row: dict[str, Any] = {"shape": label, "N": n, "K": k, "M": m, "weight_bytes": n * k}
            mine = functools.partial(cpu_kernels.int8_linear, scale=scale)
            row["llmopt_fp32_us"] = 1e6 * _time_cycled(lambda w, x=x, f=mine: f(x, w), packed)
            row["llmopt_bf16_us"] = 1e6 * _time_cycled(lambda w, x=xb, f=mine: f(x, w), packed)
            if cpu_kernels.kernel_isa() == "avx512":
                avx2 = functools.partial(mine, isa="avx2")
                row["llmopt_fp32_avx2_us"] = 1e6 * _time_cycled(lambda w, x=x, f=avx2: f(x, w), packed)
            row["aten_bf16_us"] = 1e6 * _time_cycled(lambda q, x=xb, s=sb: aten(x, q, s), qs)
            if m == 1 and n * k <= 4 * 2**20:  # ~10x slower: a few copies are enough
                slow = functools.partial(aten, x, scales=scale)
                row["aten_fp32_us"] = 1e6 * _time_cycled(lambda q, f=slow: f(q), qs[:4], repeats=3)
            for key in [k for k in row if k.endswith("_us")]:
                row[key.replace("_us", "_gb_s")] = n * k / (row[key] * 1e-6) / 1e9
            results.append(row)
            log(
                f"M={m:2d} {label:14s} {n:6d}x{k:<5d} llmopt fp32 {row['llmopt_fp32_us']:8.1f} us "
                f"({row['llmopt_fp32_gb_s']:5.1f} GB/s)  aten bf16 {row['aten_bf16_us']:8.1f} us "
                f"({row['aten_bf16_gb_s']:5.1f} GB/s)"
            )
    return results


def kernel_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| M | layer | N x K | llmopt fp32 act µs (GB/s) | llmopt bf16 act µs | llmopt AVX2 path µs "
        "| aten bf16 act µs (GB/s) | aten fp32 act µs | speed-up vs aten bf16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        avx2 = f"{r['llmopt_fp32_avx2_us']:.1f}" if "llmopt_fp32_avx2_us" in r else "-"
        aten32 = f"{r['aten_fp32_us']:.1f}" if "aten_fp32_us" in r else "-"
        lines.append(
            f"| {r['M']} | {r['shape']} | {r['N']}x{r['K']} | {r['llmopt_fp32_us']:.1f} "
            f"({r['llmopt_fp32_gb_s']:.1f}) | {r['llmopt_bf16_us']:.1f} | {avx2} | {r['aten_bf16_us']:.1f} "
            f"({r['aten_bf16_gb_s']:.1f}) | {aten32} | {r['aten_bf16_us'] / r['llmopt_fp32_us']:.2f}x |"
        )
    return "\n".join(lines)


# ---- end to end -------------------------------------------------------------------------------


class _Clock:
    """A logits processor that stamps the time of every generated token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def _hf_run(model: Any, prompt: torch.Tensor) -> tuple[float, float, list[int]]:
    """(ttft s, decode s/token, tokens) of one generate() call."""
    from transformers import LogitsProcessorList

    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=GEN_LEN,
            min_new_tokens=GEN_LEN,
            do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=model.generation_config.pad_token_id or 0,
        )
    s = clock.stamps
    return s[0] - start, (s[-1] - s[0]) / (len(s) - 1), out[0, prompt.shape[1] :].tolist()


def _engine_run(engine: Any, prompt: torch.Tensor) -> tuple[float, float, list[int]]:
    from llmopt.engine import SamplingParams

    start = time.perf_counter()
    [out] = engine.generate([prompt[0].tolist()], SamplingParams(max_new_tokens=GEN_LEN, ignore_eos=True))
    t = out.token_times
    return t[0] - start, (t[-1] - t[0]) / (len(t) - 1), list(out.token_ids)


def _measure(label: str, run: Callable[[], tuple[float, float, list[int]]]) -> dict[str, Any]:
    start = time.perf_counter()
    run()
    warmup = time.perf_counter() - start
    runs = []
    for i in range(RUNS):
        ttft, tpot, tokens = run()
        runs.append({"ttft_s": ttft, "tpot_ms": 1e3 * tpot, "decode_tok_s": 1.0 / tpot})
        log(f"{label}: run {i + 1}: {1.0 / tpot:.1f} tok/s (TTFT {ttft * 1e3:.0f} ms)")
    tpot_ms = statistics.median(r["tpot_ms"] for r in runs)
    return {
        "label": label,
        "warmup_s": warmup,
        "runs": runs,
        "tpot_ms": tpot_ms,
        "decode_tok_s": 1e3 / tpot_ms,
        "ttft_ms": 1e3 * statistics.median(r["ttft_s"] for r in runs),
        "tokens": tokens,
    }


def profile_step(engine: Any, position: int = 200) -> dict[str, Any]:
    """One eager decode step of the engine at attention length 256: wall time unprofiled (median
    of 50 steps), then one profiled step split into llmopt's int8 matmuls, attention and the rest."""
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    token = torch.tensor([17])

    def step() -> None:
        runner.decode([0], token, [position])

    for _ in range(5):
        step()
    walls = []
    for _ in range(50):
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        profiled_wall = time.perf_counter() - start
    events = prof.key_averages()
    by_op = {e.key: (e.self_cpu_time_total, e.count) for e in events}
    total_ops = sum(t for t, _ in by_op.values())
    matmul = sum(t for k, (t, _) in by_op.items() if "int8_linear_cpu" in k or "int8pack" in k)
    attention = sum(t for k, (t, _) in by_op.items() if "scaled_dot_product" in k or "decode_attention" in k)
    top = sorted(by_op.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "step_ms_unprofiled_median": 1e3 * statistics.median(walls),
        "profiled_step_ms": 1e3 * profiled_wall,
        "ops_self_ms": total_ops / 1e3,
        "int8_matmul_ms": matmul / 1e3,
        "int8_matmul_calls": sum(c for k, (_, c) in by_op.items() if "int8_linear_cpu" in k),
        "attention_ms": attention / 1e3,
        "other_ops_ms": (total_ops - matmul - attention) / 1e3,
        "outside_ops_ms": 1e3 * profiled_wall - total_ops / 1e3,
        "top_ops": [{"op": k, "self_ms": t / 1e3, "calls": c} for k, (t, c) in top],
    }


def bench_e2e(quality: bool, warm_inductor_cache: bool) -> dict[str, Any]:
    from torch import nn

    from llmopt.bench.compare import cached_quantized
    from llmopt.bench.offline import BenchSpec, seeded_prompts
    from llmopt.engine import Engine, EngineConfig
    from llmopt.models import LoadSpec, load_model
    from llmopt.quant import cpu_kernels
    from llmopt.quant.linear import QuantLinear

    load = LoadSpec(dtype="float32", device="cpu")
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    fp32 = load_model(MODEL, load)
    tokenizer = fp32.tokenizer
    spec = BenchSpec(prompt_len=PROMPT_LEN, gen_len=GEN_LEN, batch_sizes=(1,))
    prompt = seeded_prompts(spec, 1, fp32.model.config.vocab_size, torch.device("cpu"))

    log("(a) transformers fp32 eager generate()")
    rows = {"a": _measure("(a) transformers fp32 eager", lambda: _hf_run(fp32.model, prompt))}

    log("(b) quantize_dynamic int8 of the same model, generate()")
    dynamic = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(fp32.model), {nn.Linear}, dtype=torch.qint8
    )
    rows["b"] = _measure("(b) quantize_dynamic qint8", lambda: _hf_run(dynamic, prompt))

    int8_dir = cached_quantized(MODEL, "int8")
    out["int8_checkpoint"] = int8_dir
    log(f"(c) llmopt int8 checkpoint {int8_dir} on llmopt's engine, eager")
    int8 = load_model(int8_dir, load)
    kernels = sorted({m.kernel.name for m in int8.model.modules() if isinstance(m, QuantLinear)})
    out["int8_kernels"] = kernels
    out["kernel_isa"] = cpu_kernels.kernel_isa()
    config = EngineConfig(max_batch=1, max_seq=PROMPT_LEN + GEN_LEN, prefill_chunk=PROMPT_LEN)
    engine = Engine(int8.model, tokenizer, config)
    rows["c"] = _measure("(c) llmopt int8 engine, eager", functools.partial(_engine_run, engine, prompt))
    log("profiling one eager decode step")
    out["profile"] = profile_step(engine)

    log("(d) the same, decode step under torch.compile")
    if not warm_inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmopt-inductor-")
    int8_c = load_model(int8_dir, load)
    engine_c = Engine(int8_c.model, tokenizer, replace(config, compile=True))
    rows["d"] = _measure("(d) llmopt int8 engine, compiled", functools.partial(_engine_run, engine_c, prompt))
    rows["d"]["inductor_cache"] = "warm (default dir)" if warm_inductor_cache else "fresh"

    reference_tokens = rows["a"]["tokens"]
    for row in rows.values():
        tokens = row["tokens"]
        row["same_tokens_as_a"] = sum(1 for x, y in zip(tokens, reference_tokens, strict=True) if x == y)
        row["first_divergence"] = next(
            (i for i, (x, y) in enumerate(zip(tokens, reference_tokens, strict=True)) if x != y), None
        )
        row["speedup_vs_a"] = row["decode_tok_s"] / rows["a"]["decode_tok_s"]
        row["speedup_vs_b"] = row["decode_tok_s"] / rows["b"]["decode_tok_s"]

    if quality:
        from llmopt.quant.quality import evaluate_quality

        def say(stage: str, done: int, total: int) -> None:
            log(f"   {stage} {done}/{total}")

        log("perplexity (a): fp32")
        base = evaluate_quality(fp32.model, tokenizer, progress=say)
        rows["a"]["quality"] = base.to_dict()
        log("perplexity (b) against (a)")
        rows["b"]["quality"] = evaluate_quality(dynamic, tokenizer, fp32.model, progress=say).to_dict()
        log("perplexity (c) against (a)")
        int8_q = load_model(int8_dir, load)
        rows["c"]["quality"] = evaluate_quality(int8_q.model, tokenizer, fp32.model, progress=say).to_dict()
        rows["d"]["quality"] = rows["c"]["quality"]  # the same checkpoint and kernels
    out["rows"] = rows
    return out


def e2e_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "| candidate | decode tok/s | TPOT ms | vs (a) | vs (b) | TTFT ms | warm-up s | ppl | ppl vs (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows.values():
        q = row.get("quality") or {}
        ppl = f"{q['perplexity']:.3f}" if q else "-"
        inc = q.get("perplexity_increase_pct")
        inc_s = f"{inc:+.2f}%" if inc is not None else "(reference)" if q else "-"
        lines.append(
            f"| {row['label']} | {row['decode_tok_s']:.1f} | {row['tpot_ms']:.2f} "
            f"| {row['speedup_vs_a']:.2f}x | {row['speedup_vs_b']:.2f}x | {row['ttft_ms']:.0f} "
            f"| {row['warmup_s']:.1f} | {ppl} | {inc_s} |"
        )
    return "\n".join(lines)


def profile_table(p: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"decode step (eager, batch 1, attention length 256): {p['step_ms_unprofiled_median']:.2f} ms "
            f"unprofiled (median of 50); profiled step {p['profiled_step_ms']:.2f} ms =",
            f"  int8 matmuls ({p['int8_matmul_calls']} calls) {p['int8_matmul_ms']:.2f} ms"
            f" + attention {p['attention_ms']:.2f} ms + other ops {p['other_ops_ms']:.2f} ms"
            f" + outside ops (Python, dispatch, profiler) {p['outside_ops_ms']:.2f} ms",
            "  top ops: "
            + ", ".join(f"{o['op']} {o['self_ms']:.2f} ms/{o['calls']}" for o in p["top_ops"][:8]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", nargs="?", default="all", choices=["kernels", "e2e", "all"])
    parser.add_argument("--out", default="cpu-int8-bench.json")
    parser.add_argument("--rows", default="1,4,16", help="M values for the kernel table")
    parser.add_argument("--no-quality", action="store_true", help="skip the perplexity evaluations (~5 min)")
    parser.add_argument(
        "--warm-inductor-cache", action="store_true", help="reuse inductor's default cache for (d)"
    )
    args = parser.parse_args()
    result: dict[str, Any] = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.part in ("kernels", "all"):
        result["kernels"] = bench_kernels(tuple(int(m) for m in args.rows.split(",")))
        print(kernel_table(result["kernels"]), flush=True)
    if args.part in ("e2e", "all"):
        result["e2e"] = bench_e2e(not args.no_quality, args.warm_inductor_cache)
        print(e2e_table(result["e2e"]), flush=True)
        print(profile_table(result["e2e"]["profile"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
