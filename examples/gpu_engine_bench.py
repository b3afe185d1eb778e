"""Benchmark of record for llmopt's engine (../shared/GPU.md protocol): Llama-3-8B shape, seeded
random bf16 weights, one GPU. Every result is appended to $OUT/engine-<part>.json as soon as it exists.

    python examples/gpu_engine_bench.py engine     # correctness on the card, engine decode, breakdown, TTFT
    python examples/gpu_engine_bench.py baselines  # transformers eager and static cache + torch.compile
    python examples/gpu_engine_bench.py lowbit     # bf16, int8, int4 on the engine (SCHEMES=...)
    python examples/gpu_engine_bench.py prefill    # prefill: wall time vs GPU busy time, per scheme

Part `engine`:
1. Correctness first: the engine's logits against transformers' (bf16) on the same weights, and
   greedy tokens of both for a prompt.
2. `bench_candidate` (the code behind `llmopt bench`) for the engine at batch 1, 8, 32, 128, prompt
   128, gen 128: CUDA graphs; then the same with the decode step also torch.compile'd.
3. Step time split at batch 1, 32, 128: kernel time by class (weight matmuls, attention, other
   kernels) from a profiled step, against the replayed graph's wall time (the rest is overhead).
4. Time to first token for a 1,024-token prompt, and its FLOP rate against a large bf16 matmul's.

Part `lowbit` (issue 5): the model quantized in memory (round-to-nearest; int4 group 128; head int8)
(SCHEMES=bf16,int8,int4; suffixes turn parts off for A/B runs: "-triton" the CUDA decode kernels, "-sdpa"
the fused decode attention, "-nocutlass" the Hopper int8/int4 GEMM, "-nofusednorm" the norms and residual
adds folded into the decode matmuls, "-nopdl" the decode kernels' programmatic launch; "-fuseone"
turns the folded-in norms on at one row for int4 too; e.g. SCHEMES=bf16,int4-nocutlass,int4) on the
engine with llmopt's
kernels. First the quantized model's own transformers forward (the same QuantLinear kernels, unfused)
against the engine (q/k/v and gate/up stacked, CUDA graphs, compiled), then `bench_candidate` at every
batch size (BENCH=0 skips it), bf16 first as the same-run baseline; with BREAKDOWN=1 also each
configuration's step split at BREAKDOWN_BATCHES (default 1), as part `engine` does for bf16 (SUSTAINED=n
adds n more blocks of 50 replays of the step, back to back).

Part `prefill`: the engine's correctness (as part `engine`; CORRECTNESS=0 skips it), the host time
to issue one quantized matmul against F.linear, then per scheme one prompt of each of
PREFILL_LENGTHS (128,1024) through the runner's prefill: wall time, GPU busy time and kernel count
(wall well above busy: launch-bound); PROFILE_HOST=1 adds a cProfile of the host side.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from llmopt.bench.compare import measure_copy_bandwidth_gb_s
from llmopt.bench.offline import BenchSpec, Candidate, bench_candidate
from llmopt.engine import Engine, EngineConfig, SamplingParams
from llmopt.engine.runner import DecoderRunner, PrefillChunk
from llmopt.models import LoadSpec, load_model
from llmopt.quant import cuda_gemv

POLICY_FUSED_NORM_ROWS = dict(cuda_gemv.FUSED_NORM_ROWS)

OUT = Path(os.environ.get("OUT", "bench-out"))
MODEL = os.environ.get("MODEL", "llama-3-8b")
BATCHES = tuple(int(b) for b in os.environ.get("BATCHES", "1,8,32,128").split(","))
BREAKDOWN_BATCHES = tuple(int(b) for b in os.environ.get("BREAKDOWN_BATCHES", "1").split(","))
RESULTS: dict = {}


def save(part: str, key: str, value) -> None:
    RESULTS[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"engine-{part}.json").write_text(json.dumps(RESULTS, indent=2, default=str))
    print(f"== {key}: {json.dumps(value, default=str)[:1500]}", flush=True)


def summaries(result) -> list[dict]:
    return [
        {"batch": b.batch_size, "warmup_s": b.warmup_s}
        | {k: v for k, v in b.summary.items() if not k.endswith(("_min", "_max"))}
        for b in result.batches
    ]


def timed(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def teacher_forced_errors(hf, seq: torch.Tensor, digest: list | None = None) -> tuple[float, float]:
    """(max |Δlogit| over 81 positions of each of seq's R rows, the reference logits' std) for the
    engine against transformers' forward: the R rows' prefill of 120 tokens as one batch (R <= 4: one
    graph of 4 x 128 padded tokens), then 80 decode steps of all R rows (CUDA graphs, compiled).
    ``digest``: the engine's logits are hashed into it (sha256 of their bytes), so that two runs of the
    same weights can be compared bit for bit (the kernels are deterministic)."""
    import hashlib

    hasher = hashlib.sha256()
    rows = seq.shape[0]
    with torch.no_grad():
        ref = hf(seq).logits.float()
    engine = Engine(hf, None, EngineConfig(max_batch=4, max_seq=256))
    runner = engine.runner
    slots = [3, 0, 2][:rows]  # any slots, in any order
    prefill = runner.prefill(
        [PrefillChunk(slot, seq[r, :120].tolist(), 0, True) for r, slot in enumerate(slots)]
    )
    errs = [(logits - ref[r, 119]).abs().max().item() for r, logits in enumerate(prefill)]
    for p in range(120, 200):
        logits = runner.decode(slots, seq[:, p], [p] * rows)
        errs += [(logits[r] - ref[r, p]).abs().max().item() for r in range(rows)]
        if digest is not None:
            hasher.update(logits.float().cpu().numpy().tobytes())
    if digest is not None:  # and one row alone (the one-row kernels, the norms folded in)
        digest.append(hasher.hexdigest()[:16])
        runner.prefill([PrefillChunk(0, seq[0, :120].tolist(), 0, True)])  # slot 0: a one-row step
        for p in range(120, 200):
            hasher.update(runner.decode([0], seq[:1, p], [p]).float().cpu().numpy().tobytes())
        digest.append(hasher.hexdigest()[:16])
    return max(errs), ref.std().item()


def correctness() -> dict:
    """fp32 on the real layer shapes (4 layers): tight agreement; bf16 full model: agreement relative
    to the logits' spread (random weights give flat logits, so greedy paths are not compared)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmopt.models.builtin import RANDOM_SHAPES

    gen = torch.Generator().manual_seed(0)
    shape = json.loads(RANDOM_SHAPES[MODEL].read_text())
    seq = torch.randint(10, shape["vocab_size"], (3, 200), generator=gen).cuda()
    torch.manual_seed(0)
    with torch.device("cuda"):
        small = AutoModelForCausalLM.from_config(
            AutoConfig.for_model(**{**shape, "num_hidden_layers": 4}), dtype=torch.float32
        ).eval()
    err32, std32 = teacher_forced_errors(small, seq)
    del small
    loaded = load_model(MODEL, LoadSpec(device="cuda"))
    err16, std16 = teacher_forced_errors(loaded.model, seq)
    del loaded
    torch.cuda.empty_cache()
    return {
        "fp32_4_layers_max_abs_err": err32,
        "fp32_logit_std": std32,
        "bf16_full_max_abs_err": err16,
        "bf16_logit_std": std16,
    }


def kernel_class(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # inductor's kernels, named after the ops they fuse ("..._gemv_...")
        return "other"
    if any(k in low for k in ("fmha", "attention", "flash", "sdpa", "efficient")):
        return "attention"
    if any(k in low for k in ("gemm", "gemv", "cutlass", "xmma", "nvjet", "sm90", "splitk", "matmul", "mma")):
        return "weights"
    return "other"


def breakdown(engine: Engine, batch: int, attn_len: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    assert isinstance(runner, DecoderRunner)
    runner.positions[:batch].fill_(attn_len - 2)
    tokens, positions = runner.tokens[:batch], runner.positions[:batch]
    eager = lambda: runner.step_model(tokens, positions, runner.cache, 0, attn_len)  # noqa: E731
    with torch.inference_mode():
        eager()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager()
            torch.cuda.synchronize()
        graph = runner.graphs.get((batch, attn_len)) or runner._capture(batch, attn_len)
        replay_ms = timed(graph.graph.replay, 50)
        eager_ms = timed(eager, 5)
        # SUSTAINED=n: n more blocks of 50 replays back to back (does the step slow under sustained load?)
        sustained = [timed(graph.graph.replay, 50) for _ in range(int(os.environ.get("SUSTAINED", "0")))]
    classes = {"weights": 0.0, "attention": 0.0, "other": 0.0}
    counts = {"weights": 0, "attention": 0, "other": 0}
    by_name: dict[str, float] = {}
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            cls = kernel_class(evt.name)
            classes[cls] += evt.device_time / 1000.0
            counts[cls] += 1
            by_name[evt.name[:90]] = by_name.get(evt.name[:90], 0.0) + evt.device_time / 1000.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    busy = sum(classes.values())
    return {
        "batch": batch,
        "attn_len": attn_len,
        "graph_step_ms": replay_ms,
        "eager_step_ms": eager_ms,
        "weights_ms": classes["weights"],
        "attention_ms": classes["attention"],
        "other_kernels_ms": classes["other"],
        "gaps_ms": replay_ms - busy,
        "sustained_replay_ms": sustained,
        "kernels": counts,
        "top_kernels_ms": {name: round(ms, 3) for name, ms in top},
    }


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, 20)
    return 2 * 8192**3 / (ms / 1000) / 1e12


def ttft_1024(engine: Engine, n_params: int, config) -> dict:
    prompt = torch.randint(
        10, config.vocab_size, (1024,), generator=torch.Generator().manual_seed(3)
    ).tolist()
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)
    engine.generate([prompt], params)  # warm-up
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        out = engine.generate([prompt], params)[0]
        times.append(out.ttft_s)
    ttft = sorted(times)[len(times) // 2]
    d = config.hidden_size
    flops = 2 * n_params * 1024 + 2 * config.num_hidden_layers * 1024 * 1024 * d  # matmuls + causal attention
    rate = matmul_tflops()
    achieved = flops / ttft / 1e12
    return {
        "ttft_ms": ttft * 1000,
        "prefill_tflops": achieved,
        "matmul_tflops": rate,
        "share_pct": 100 * achieved / rate,
    }


def part_engine() -> None:
    save("engine", "device", torch.cuda.get_device_name())
    save("engine", "correctness", correctness())
    copy = measure_copy_bandwidth_gb_s(torch.device("cuda"))
    save("engine", "copy_gb_s", copy)
    spec = BenchSpec(batch_sizes=BATCHES, prompt_len=128, gen_len=128, runs=3, device="cuda")
    result = bench_candidate(Candidate(MODEL, "llmopt", "llmopt-graphs"), spec, copy)
    save("engine", "llmopt_graphs", summaries(result))
    save("engine", "llmopt_graphs_capture_s", result.capture_s)
    # Breakdown and TTFT on a fresh engine (graphs only).
    loaded = load_model(MODEL, LoadSpec(device="cuda"))
    n_params = sum(p.numel() for n, p in loaded.model.named_parameters() if "embed_tokens" not in n)
    config = loaded.model.config
    engine = Engine(
        loaded.model, None, EngineConfig(max_batch=max(BATCHES), max_seq=1100, prefill_chunk=1024)
    )
    for batch in (1, 32, 128):
        if batch <= max(BATCHES):
            save("engine", f"breakdown_b{batch}", breakdown(engine, batch, 256))
    save("engine", "ttft_1024", ttft_1024(engine, n_params, config))
    del engine, loaded
    torch.cuda.empty_cache()
    if os.environ.get("COMPILE", "1") == "1":
        t = time.time()
        spec = BenchSpec(
            batch_sizes=BATCHES, prompt_len=128, gen_len=128, runs=3, device="cuda", compile=True
        )
        result = bench_candidate(Candidate(MODEL, "llmopt", "llmopt-compiled"), spec, copy)
        save("engine", "llmopt_compiled", summaries(result))
        save("engine", "llmopt_compiled_wall_s", time.time() - t)


def part_baselines() -> None:
    save("baselines", "device", torch.cuda.get_device_name())
    copy = measure_copy_bandwidth_gb_s(torch.device("cuda"))
    save("baselines", "copy_gb_s", copy)
    for engine, batches in (("transformers", BATCHES), ("transformers-compile", (1,))):
        spec = BenchSpec(batch_sizes=batches, prompt_len=128, gen_len=128, runs=3, device="cuda")
        t = time.time()
        result = bench_candidate(Candidate(MODEL, engine, engine), spec, copy)
        save("baselines", engine, summaries(result))
        save("baselines", f"{engine}_wall_s", time.time() - t)


def apply_switches(scheme: str) -> str:
    """The scheme without its suffixes, which turn parts off for A/B runs: "-triton" the CUDA decode
    kernels (Triton at every row count), "-sdpa" the fused decode attention (index_put + SDPA),
    "-nocutlass" the Hopper int8/int4 GEMM (Triton / dequantize + cuBLAS past decode's rows),
    "-nofusednorm" the norms and residual adds folded into the decode matmuls (norm_fusion), "-nosilu" the
    SiLU product folded into gate/up's, "-nopdl" the decode kernels' programmatic launch (cuda_gemv);
    "-fuseone" turns the folded-in norms on at one row where cuda_gemv.FUSED_NORM_ROWS leaves them off
    (int4); e.g. int8-triton, bf16-sdpa, int8-nocutlass, int4-nofusednorm, int4-nosilu, int8-nopdl,
    int4-fuseone."""
    base, *off = scheme.split("-")
    os.environ["LLMOPT_CUDA_GEMV"] = "0" if "triton" in off else "1"
    os.environ["LLMOPT_TRITON_ATTENTION"] = "0" if "sdpa" in off else "1"
    os.environ["LLMOPT_CUTLASS"] = "0" if "nocutlass" in off else "1"
    os.environ["LLMOPT_FUSED_NORM"] = "0" if "nofusednorm" in off else "1"
    os.environ["LLMOPT_FUSED_SILU"] = "0" if "nosilu" in off else "1"
    os.environ["LLMOPT_PDL"] = "0" if "nopdl" in off else "1"
    cuda_gemv.FUSED_NORM_ROWS.update(POLICY_FUSED_NORM_ROWS)
    if "fuseone" in off:  # the norms folded in at one row whatever the policy says (int4)
        cuda_gemv.FUSED_NORM_ROWS.update({key: max(1, rows) for key, rows in POLICY_FUSED_NORM_ROWS.items()})
    return base


def part_lowbit() -> None:
    from llmopt.quant.inplace import quantize_model_
    from llmopt.quant.schemes import QuantSpec

    save("lowbit", "device", torch.cuda.get_device_name())
    copy = measure_copy_bandwidth_gb_s(torch.device("cuda"))
    save("lowbit", "copy_gb_s", copy)
    for scheme in os.environ.get("SCHEMES", "bf16,int8,int4").split(","):
        base = apply_switches(scheme)
        quantize = None if base == "bf16" else base
        if quantize:
            gen = torch.Generator().manual_seed(0)
            loaded = load_model(MODEL, LoadSpec(device="cuda"))
            seq = torch.randint(10, loaded.model.config.vocab_size, (3, 200), generator=gen).cuda()
            quantize_model_(loaded.model, QuantSpec(quantize))
            kernels = sorted({m.kernel.name for m in loaded.model.modules() if hasattr(m, "kernel")})
            digests: list[str] = []
            err, std = teacher_forced_errors(loaded.model, seq, digests)
            checked = {"max_abs_err": err, "logit_std": std, "kernels": kernels, "logit_digests": digests}
            save("lowbit", f"{scheme}_engine_vs_own_forward", checked)
            del loaded
            torch.cuda.empty_cache()
        if os.environ.get("BENCH", "1") == "1":
            t = time.time()
            spec = BenchSpec(batch_sizes=BATCHES, prompt_len=128, gen_len=128, runs=3, device="cuda")
            result = bench_candidate(Candidate(MODEL, "llmopt", f"llmopt-{scheme}", quantize), spec, copy)
            save("lowbit", scheme, summaries(result))
            save("lowbit", f"{scheme}_weight_bytes", result.weight_bytes)
            save("lowbit", f"{scheme}_wall_s", time.time() - t)
            del result
            torch.cuda.empty_cache()
        if os.environ.get("BREAKDOWN") == "1":  # where a step's time goes, this configuration
            loaded = load_model(MODEL, LoadSpec(device="cuda"))
            if quantize:
                quantize_model_(loaded.model, QuantSpec(quantize))
            for batch in BREAKDOWN_BATCHES:
                engine = Engine(loaded.model, None, EngineConfig(max_batch=batch, max_seq=300))
                save("lowbit", f"{scheme}_breakdown_b{batch}", breakdown(engine, batch, 256))
                del engine
            del loaded
            torch.cuda.empty_cache()


def prefill_profile(runner: DecoderRunner, length: int) -> dict:
    """One prompt of ``length`` tokens through ``runner.prefill`` (slot 0, logits wanted): wall time
    (median of 5, synchronised), and from a profiled run the GPU's busy time, the kernel count and
    the host time spent issuing them; wall well above busy means the prefill is launch-bound."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(10, runner.vocab_size, (length,), generator=gen).tolist()
    chunk = [PrefillChunk(0, tokens, 0, True)]
    runner.prefill(chunk)
    torch.cuda.synchronize()
    walls = []
    for _ in range(5):
        start = time.perf_counter()
        runner.prefill(chunk)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.prefill(chunk)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    host = None
    if os.environ.get("PROFILE_HOST") == "1":  # where the host's time goes, by Python function
        import cProfile
        import io
        import pstats

        with cProfile.Profile() as cprof:
            runner.prefill(chunk)
            torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(cprof, stream=text).sort_stats("tottime").print_stats(30)
        host = text.getvalue()
        print(host, flush=True)
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name[:80]] = by_name.get(e.name[:80], 0.0) + e.device_time / 1000.0
    wall = sorted(walls)[2] * 1000
    return {
        "tokens": length,
        "wall_ms": wall,
        "gpu_busy_ms": sum(e.device_time for e in kernels) / 1000.0,
        "kernels": len(kernels),
        "host_us_per_kernel": wall * 1000 / max(1, len(kernels)),
        "top_kernels_ms": dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:10]),
        "host_profile": host,
    }


def host_costs() -> dict:
    """Host time to issue one matmul (µs; 200 calls enqueued back to back, no synchronisation in
    between; kernels short enough that the GPU keeps up): the custom op, the function it wraps, and
    F.linear, at prefill and decode row counts."""
    import torch.nn.functional as F

    from llmopt.quant import triton_kernels as tk

    n = k = 4096
    q = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    s = torch.rand(n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    result = {}
    for m in (1, 128, 1024):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        calls = {
            "custom_op": lambda x=x: torch.ops.llmopt.int8_mm(x, q, s),
            "direct": lambda x=x: tk.int8_matmul(x, q, s),
            "F.linear": lambda x=x: F.linear(x, w),
        }
        for label, fn in calls.items():
            with torch.inference_mode():
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(200):
                    fn()
                host = (time.perf_counter() - start) / 200 * 1e6
                torch.cuda.synchronize()
                total = (time.perf_counter() - start) / 200 * 1e6
            result[f"m{m}_{label}"] = {"host_us": round(host, 1), "with_gpu_us": round(total, 1)}
    return result


def part_prefill() -> None:
    """Time to first token's prefill, per scheme: launch-bound or GPU-bound (PREFILL_LENGTHS)."""
    from llmopt.quant.inplace import quantize_model_
    from llmopt.quant.schemes import QuantSpec

    save("prefill", "device", torch.cuda.get_device_name())
    if os.environ.get("CORRECTNESS", "1") == "1":  # the engine (graphed prefill included) vs transformers
        save("prefill", "correctness", correctness())
    save("prefill", "host_costs", host_costs())
    lengths = [int(v) for v in os.environ.get("PREFILL_LENGTHS", "128,1024").split(",")]
    for scheme in os.environ.get("SCHEMES", "bf16,int8,int4").split(","):
        base = apply_switches(scheme)
        loaded = load_model(MODEL, LoadSpec(device="cuda"))
        if base != "bf16":
            quantize_model_(loaded.model, QuantSpec(base))
        engine = Engine(loaded.model, None, EngineConfig(max_batch=1, max_seq=1100, prefill_chunk=1024))
        assert isinstance(engine.runner, DecoderRunner)
        for length in lengths:
            save("prefill", f"{scheme}_{length}", prefill_profile(engine.runner, length))
        del engine, loaded
        torch.cuda.empty_cache()


if __name__ == "__main__":
    parts = {"engine": part_engine, "baselines": part_baselines, "lowbit": part_lowbit}
    (parts | {"prefill": part_prefill})[sys.argv[1]]()
