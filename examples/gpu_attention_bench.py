"""llmopt's fused decode attention (llmopt/engine/triton_attention.py) on a GPU: correctness first,
then time per layer against the engine's other path (two index_put cache writes + SDPA).

Run from the repo root on the GPU machine:
    PYTHONPATH=. python examples/gpu_attention_bench.py

Shapes: Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, bf16), batch 1, 32, 128 x
attention length 256, 1,024, 4,096; the cache holds attn_len + 1 positions (the last one the
scratch position, as in the engine's last bucket, where idle rows still attend).

1. Correctness: rows at random positions (one at 0; with batch > 1 one idle row at the scratch
   position), outputs against a float64 masked-softmax reference (relative Frobenius error; SDPA's
   own error on the same inputs is printed as a yardstick), PASS below 1e-2 (bf16 rounding of the
   output and of the probabilities). The cache must hold exactly the new k/v at the rows'
   positions and be unchanged elsewhere. A few extra cases: sliding window, fp16, fp32 (1e-5),
   Qwen2.5-0.5B's heads (14 / 2, head_dim 64). Then determinism: a second run, and a CUDA-graph
   replay, equal the first output bit for bit.
2. Timing (every row at attn_len - 1: the whole length is read): each path runs over the caches of
   L layers inside one CUDA graph (L so that they far exceed L2, as the engine's weights flush it
   between layers), median of 20 replays / L = µs per layer. Fused: the automatic chunking, then a
   sweep of chunk and tile sizes. Baseline: the engine's code (index_put x2 + F.scaled_dot_product_attention
   with the additive mask, built once per step outside, as the engine shares it across layers).
   GB/s: KV bytes read per layer / time.

Results: $OUT/attention.json; the table is printed last.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmopt.engine import triton_attention as ta

OUT = Path(os.environ.get("OUT", "bench-out"))
DEV = torch.device("cuda")
N_HEADS, N_KV, HEAD_DIM = 32, 8, 128
BATCHES, ATTN_LENS = (1, 32, 128), (256, 1024, 4096)
L2_FLUSH_BYTES = 1 << 30  # the layers' caches together, at least
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


@dataclass
class Step:
    """One layer's decode-step inputs; q_sdpa is q as the SDPA path lays it out ([B, KV, G, D])."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    q_sdpa: torch.Tensor


def make_step(
    batch: int, attn_len: int, n_heads: int, n_kv: int, d: int, dtype, positions, window=None
) -> Step:
    g = torch.Generator(device=DEV).manual_seed(batch * 7 + attn_len)
    q = torch.randn(batch, 1, n_heads, d, generator=g, device=DEV, dtype=dtype)
    k = torch.randn(batch, 1, n_kv, d, generator=g, device=DEV, dtype=dtype)
    v = torch.randn(batch, 1, n_kv, d, generator=g, device=DEV, dtype=dtype)
    pos = torch.tensor(positions, device=DEV).unsqueeze(1)
    keys = torch.arange(attn_len, device=DEV)
    visible = keys <= pos
    if window is not None:
        visible &= keys > pos - window
    group = n_heads // n_kv
    mask = torch.zeros(batch, 1, group, attn_len, device=DEV, dtype=dtype)
    mask.masked_fill_(~visible[:, None, None, :], float("-inf"))
    q_sdpa = q.view(batch, n_kv, group, d)
    slots = torch.arange(batch, device=DEV).unsqueeze(1)
    return Step(q, k, v, slots, pos, mask, q_sdpa)


def make_cache(batch: int, n_kv: int, seq: int, d: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.randn(batch, n_kv, seq, d, device=DEV, dtype=dtype),
            torch.randn(batch, n_kv, seq, d, device=DEV, dtype=dtype))  # fmt: skip


def written(step: Step, caches) -> list[torch.Tensor]:
    """Copies of the caches with the step's k/v written, as the kernel must leave them."""
    out = [c.clone() for c in caches]
    for cache, new in zip(out, (step.k, step.v), strict=True):
        cache[step.slots, :, step.positions] = new
    return out


def run_kernel(step: Step, caches, attn_len: int, window, scale: float, config=None) -> torch.Tensor:
    return ta.decode_attention(step.q, step.k, step.v, *caches, step.slots, step.positions, attn_len,
                               window, scale, config)  # fmt: skip


def sdpa(step: Step, caches, attn_len: int, scale: float) -> torch.Tensor:
    """The engine's path for the same step: index_put into the cache, SDPA over the bucket's slots."""
    k_all, v_all = caches
    k_all[step.slots, :, step.positions] = step.k
    v_all[step.slots, :, step.positions] = step.v
    b = step.q.shape[0]
    out = F.scaled_dot_product_attention(step.q_sdpa, k_all[:b, :, :attn_len], v_all[:b, :, :attn_len],
                                         attn_mask=step.mask, scale=scale)  # fmt: skip
    return out.reshape(b, 1, -1)


def reference(step: Step, caches, attn_len: int, window, scale: float) -> torch.Tensor:
    """float64 attention over the cache after the write (zeros for an idle row)."""
    b = step.q.shape[0]
    k, v = (c[:b, :, :attn_len].double() for c in written(step, caches))  # [B, KV, L, D]
    scores = torch.einsum("bkgd,bkld->bkgl", step.q_sdpa.double(), k) * scale
    keys = torch.arange(attn_len, device=DEV)
    visible = (keys <= step.positions) & (step.positions < attn_len)
    if window is not None:
        visible &= keys > step.positions - window
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num()
    return torch.einsum("bkgl,bkld->bkgd", weights, v).reshape(b, 1, -1)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref).norm() / ref.norm()).item()


def capture(body) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and allocate outside the graph
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def check_positions(batch: int, attn_len: int) -> list[int]:
    """Random positions in the bucket's upper half; with several rows one at 0 and one idle row."""
    gen = torch.Generator().manual_seed(attn_len + batch)
    positions = torch.randint(attn_len // 2, attn_len, (batch,), generator=gen).tolist()
    if batch > 1:
        positions[0] = 0
    if batch > 2:
        positions[1] = attn_len  # the scratch position (the cache holds attn_len + 1)
    return positions


def check_case(batch, attn_len, n_heads=N_HEADS, n_kv=N_KV, d=HEAD_DIM, dtype=torch.bfloat16,
               window=None) -> dict:  # fmt: skip
    positions = check_positions(batch, attn_len)
    step = make_step(batch, attn_len, n_heads, n_kv, d, dtype, positions, window)
    scale = d**-0.5
    caches = make_cache(batch, n_kv, attn_len + 1, d, dtype)
    ref = reference(step, caches, attn_len, window, scale)
    first = [c.clone() for c in caches]
    out = run_kernel(step, first, attn_len, window, scale)
    again = run_kernel(step, [c.clone() for c in caches], attn_len, window, scale)
    in_graph, graph_out = [c.clone() for c in caches], []
    capture(lambda: graph_out.append(run_kernel(step, in_graph, attn_len, window, scale))).replay()
    baseline = sdpa(step, [c.clone() for c in caches], attn_len, scale)
    torch.cuda.synchronize()
    live = [i for i, p in enumerate(positions) if p < attn_len]  # the idle row's output is ignored
    result = {
        "batch": batch, "attn_len": attn_len, "heads": f"{n_heads}/{n_kv}x{d}", "dtype": str(dtype),
        "window": window, "rel_err": rel_err(out[live], ref[live]),
        "sdpa_rel_err": rel_err(baseline[live], ref[live]),
        "cache_exact": all(torch.equal(a, b) for a, b in zip(first, written(step, caches), strict=True)),
        "deterministic": torch.equal(out, again), "graph_equal": torch.equal(out, graph_out[-1]),
    }  # fmt: skip
    result["pass"] = result["rel_err"] < TOL[dtype] and all(
        result[k] for k in ("cache_exact", "deterministic", "graph_equal")
    )
    return result


def time_per_layer(body_for_layer, n_layers: int) -> float:
    """µs per layer: one graph runs every layer's call, median of 20 replays."""
    graph = capture(lambda: [body_for_layer(i) for i in range(n_layers)])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / n_layers)
    return statistics.median(times)


def sweep_configs(attn_len: int) -> list[ta.DecodeConfig]:
    chunks = [c for c in (64, 128, 256, 512, 1024) if c <= attn_len]
    return [ta.DecodeConfig(chunk, block_n) for chunk in chunks for block_n in (32, 64)]


def time_case(batch: int, attn_len: int) -> dict:
    dtype, scale = torch.bfloat16, HEAD_DIM**-0.5
    step = make_step(batch, attn_len, N_HEADS, N_KV, HEAD_DIM, dtype, [attn_len - 1] * batch)
    layer_bytes = 2 * batch * N_KV * (attn_len + 1) * HEAD_DIM * 2
    n_layers = max(2, min(512, math.ceil(L2_FLUSH_BYTES / layer_bytes)))
    layers = [make_cache(batch, N_KV, attn_len + 1, HEAD_DIM, dtype) for _ in range(n_layers)]
    read_bytes = 2 * batch * N_KV * attn_len * HEAD_DIM * 2

    def fused_at(config: ta.DecodeConfig | None):
        return lambda i: run_kernel(step, layers[i], attn_len, None, scale, config)

    auto = ta.choose_config(
        batch * N_KV, attn_len, HEAD_DIM, torch.cuda.get_device_properties(DEV).multi_processor_count
    )
    baseline_us = time_per_layer(lambda i: sdpa(step, layers[i], attn_len, scale), n_layers)
    fused_us = time_per_layer(fused_at(None), n_layers)
    sweep = {
        f"chunk{c.chunk}_n{c.block_n}": time_per_layer(fused_at(c), n_layers) for c in sweep_configs(attn_len)
    }
    best = min(sweep, key=sweep.__getitem__)
    return {
        "batch": batch, "attn_len": attn_len, "layers_in_graph": n_layers,
        "sdpa_us": baseline_us, "fused_us": fused_us, "speedup": baseline_us / fused_us,
        "auto": f"chunk{auto.chunk}_n{auto.block_n}",
        "sdpa_gb_s": read_bytes / baseline_us / 1e3, "fused_gb_s": read_bytes / fused_us / 1e3,
        "best": best, "best_us": sweep[best], "sweep_us": sweep,
    }  # fmt: skip


def main() -> None:
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    OUT.mkdir(parents=True, exist_ok=True)

    def save(key: str, value) -> None:
        results[key] = value
        (OUT / "attention.json").write_text(json.dumps(results, indent=2))
        print(f"== {key}: {json.dumps(value)[:400]}", flush=True)

    checks = [check_case(b, n) for b in BATCHES for n in ATTN_LENS]
    checks += [
        check_case(32, 1024, window=200),
        check_case(32, 1024, dtype=torch.float16),
        check_case(8, 1024, dtype=torch.float32),
        check_case(5, 300, n_heads=14, n_kv=2, d=64),
    ]
    save("checks", checks)
    save("all_pass", all(c["pass"] for c in checks))
    timings = []
    for b in BATCHES:
        for n in ATTN_LENS:
            timings.append(time_case(b, n))
            torch.cuda.empty_cache()
            save("timings", timings)
    print(f"\n{results['device']}: checks {'PASS' if results['all_pass'] else 'FAIL'}")
    print(f"{'batch':>5} {'attn':>5} {'sdpa µs':>8} {'fused µs':>8} {'x':>5} {'fused GB/s':>10} "
          f"{'auto':>14} {'best':>14} {'best µs':>8}")  # fmt: skip
    for t in timings:
        print(f"{t['batch']:>5} {t['attn_len']:>5} {t['sdpa_us']:>8.1f} {t['fused_us']:>8.1f} "
              f"{t['speedup']:>5.2f} {t['fused_gb_s']:>10.0f} {t['auto']:>14} {t['best']:>14} "
              f"{t['best_us']:>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
