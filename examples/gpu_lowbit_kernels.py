"""llmopt's Triton int8/int4 kernels on a GPU: correctness first, then per-kernel timing (and a tile sweep).

Run from the repo root on the GPU machine:
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py check      # correctness + CUDA graph capture
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py table      # per-kernel table, chosen tiles
                                                                  # (W8A8_SWEEP=1: also sweep W8A8 tiles)
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py sweep      # search tile configs per shape
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py orient     # weight as left vs right mma operand
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py split      # int8 decode: split-K set explicitly
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py gemv       # CUDA decode kernels: work-shape sweep
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py gemv-mma   # the tensor-core decode kernel's
                                  # (both: BASELINE_SOURCE=old/gemv_cuda.cu: that version's dispatch, same
                                  # call; MMA_VARIANTS="-D.. -D..;-D..": build and time these -D sets instead)
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py fused      # decode kernels with the norm / residual
                                  # folded in against without, per layer (FUSED_ROWS=1,8)
    PYTHONPATH=. python examples/gpu_lowbit_kernels.py cutlass    # the Hopper int8/int4 GEMM: configurations,
                                  # the chosen one, int8_matmul / int4_matmul with and without it, bf16
                                  # cuBLAS (SCHEMES=int8,int4, ROWS=64,128,...)

Correctness: random weights quantized with llmopt's own schemes, many shapes (odd sizes, not
multiples of any block), bf16 and fp16 activations; outputs poisoned with NaN before each run;
relative Frobenius error against ``x.double() @ dequant(W).double().T`` must stay below 1e-2
(the bf16 rounding of inputs and outputs, ~4e-3, dominates).

Timing: Llama-3-8B layer shapes (q/k/v and gate/up fused, as the engine runs them), each kernel
captured in a CUDA graph that cycles through enough copies of the weights to miss L2, median of 7
replays; GB/s counts the weight, scale and activation bytes read and the output written, and is
set against the measured device-to-device copy bandwidth. bf16 cuBLAS (``F.linear``) and torch's
``_weight_int8pack_mm`` / ``_weight_int4pack_mm`` run on the same shapes as baselines.
Results: $OUT/lowbit_<part>.json.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from llmopt.quant import cuda_gemv, cutlass_gemm
from llmopt.quant import triton_kernels as tk
from llmopt.quant.kernels import AtenInt4Kernel, AtenInt8Kernel, LayerShape
from llmopt.quant.schemes import quantize_int4, quantize_int8

OUT = Path(os.environ.get("OUT", "bench-out"))
DEV = torch.device("cuda")
LLAMA_SHAPES = {  # name: (N, K)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "head": (128256, 4096),
}
GROUP = 128


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (start.elapsed_time(end) / 1e3)


def default_group(k: int) -> int:
    return GROUP if k % GROUP == 0 else 32


def make_layer(scheme: str, n: int, k: int, dtype: torch.dtype, seed: int = 0, group: int | None = None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(DEV)
    if scheme == "int8":
        q, s = quantize_int8(w, dtype)
        return q, s, None, (q.double() * s.double()).float()
    group = group or default_group(k)
    q, s, zp = quantize_int4(w, group, dtype)
    deq = (q.double().view(n, -1, group) - zp.double().view(n, -1, 1)) * s.double().view(n, -1, 1)
    return q, s, zp, deq.view(n, k).float()


def rows_reference(x: torch.Tensor) -> torch.Tensor:
    """x with each row rounded to int8 as the W8A8 path does (absmax / 127, half away from 0), float64."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / 127.0).clamp(min=1e-30)
    v = xf / scale[:, None]
    return (torch.sign(v) * torch.floor(v.abs() + 0.5)).double() * scale.double()[:, None]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(y).all():
        return float("inf")
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def capture(body, warmup) -> torch.cuda.CUDAGraph:
    """``warmup()`` on a side stream (compilation, allocations), then ``body()`` captured in a graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warmup()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph


def part_check() -> dict:
    rows = []
    shapes = [(1, 33, 577), (1, 4096, 4096), (3, 100, 1000), (7, 6144, 4096), (16, 1000, 4096),
              (2, 333, 1024), (3, 50, 96), (4, 6144, 4096), (1, 4096, 14336), (4, 101, 14336),
              (8, 1000, 4096), (2, 40, 96), (12, 333, 4096), (9, 37, 1408), (13, 4096, 14336),
              (17, 333, 768),
              (33, 4096, 1408), (128, 4096, 4096), (1000, 1536, 576),
              # the Hopper int8 / int4 GEMM (cutlass_gemm) from 64 / 33 rows: odd row counts, N not a multiple
              # of its tiles, K split by stream-K; N not a multiple of 8 stays on Triton
              (64, 4104, 1040), (77, 5000, 2000), (200, 6144, 4096), (257, 1000, 4096),
              (96, 28672, 4096), (513, 4096, 14336), (100, 333, 4096)]  # fmt: skip
    int8_cases = [(m, n, k, None) for m, n, k in shapes]
    int4_cases = [(m, n, k, default_group(k)) for m, n, k in shapes if k % 32 == 0]
    int4_cases += [(1, 37, 4096, GROUP), (5, 4096, 14336, GROUP), (4, 100, 4096, 32), (11, 64, 1024, 64),
                   (16, 48, 256, 64)]  # groups below 128 on the tensor cores  # fmt: skip
    for scheme, cases in (("int8", int8_cases), ("int4", int4_cases)):
        for (m, n, k, group), dtype in itertools.product(cases, (torch.bfloat16, torch.float16)):
            q, s, zp, deq = make_layer(scheme, n, k, dtype, group=group)
            shape = LayerShape(scheme, k, n, group)
            kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
            buffers = kernel.prepare(q, s, zp, shape, DEV, dtype)
            x = torch.randn(m, k, device=DEV, dtype=dtype)
            w8a8 = scheme == "int8" and m >= tk.W8A8_MIN_ROWS and tk.int8_activations_enabled()
            ref = (rows_reference(x) if w8a8 else x.double()) @ deq.double().T

            def run(x=x, b=buffers, scheme=scheme, group=group, n=n) -> torch.Tensor:
                out = torch.full((x.shape[0], n), float("nan"), device=DEV, dtype=x.dtype)
                if scheme == "int8":
                    return tk.int8_matmul(x, b["weight_int8"], b["scales"], out=out)
                return tk.int4_matmul(x, b["weight_int4"], b["scales"], b["zeros"], group, out=out,
                                      group_major=by_group(b))  # fmt: skip

            out = run()
            weight = buffers["weight_int8" if scheme == "int8" else "weight_int4"]
            path = "cuda" if cuda_gemv.usable(x, weight, k, group) else "triton"
            if scheme == "int8" and not w8a8 and cutlass_gemm.usable(x, weight, buffers["scales"], out):
                path = "cutlass"
            gm = by_group(buffers)
            if scheme == "int4" and gm is not None and cutlass_gemm.usable_int4(x, weight, *gm, group, out):
                path = "cutlass"
            err = rel_err(out, ref)
            row = {"scheme": scheme, "m": m, "n": n, "k": k, "group": group, "dtype": str(dtype),
                   "path": path, "rel_err": err, "ok": err < 1e-2}  # fmt: skip
            if path in ("cuda", "cutlass"):  # fixed-order reductions: bit-identical on a second run
                row["deterministic"] = bool(torch.equal(out, run()))
                row["ok"] = row["ok"] and row["deterministic"]
            if w8a8:  # what the activations' int8 rounding adds, against weight-only
                row["w8a8"] = True
                row["rel_err_vs_weight_only"] = rel_err(out, x.double() @ deq.double().T)
                # The card's fp32 division may round a code at a .5 boundary the other way than
                # torch's: allow that, at most one step, on a tiny share of the elements.
                xq, xs = tk.quantize_rows(x)
                xs_col = xs.double()[:, None]
                steps = ((xq.double() * xs_col - rows_reference(x)) / xs_col).abs()
                row["rows_max_step"] = steps.max().item()
                row["rows_mismatch_share"] = (steps > 0.5).double().mean().item()
                rows_ok = row["rows_max_step"] <= 1.0 + 1e-6 and row["rows_mismatch_share"] < 1e-3
                row["ok"] = row["ok"] and rows_ok
            rows.append(row)
    # CUDA graph capture of the custom ops, as the engine does it (compiled): decode rows (the CUDA
    # kernels) and 128 rows (the Hopper int8 / int4 GEMM, stream-K workspace and all).
    graph_err = max(graph_check(m, scheme) for m in (2, 128) for scheme in ("int8", "int4"))
    rows += fused_check()
    rows += gated_check()
    result = {"cases": rows, "all_ok": all(r["ok"] for r in rows), "graph_rel_err": graph_err}
    worst = max(r["rel_err"] for r in rows)
    n_cuda = sum(r["path"] == "cuda" for r in rows)
    n_cutlass = sum(r["path"] == "cutlass" for r in rows)
    n_fused = sum(r["path"] == "cuda-fused" for r in rows)
    n_gated = sum(r["path"] == "cuda-gated" for r in rows)
    print(
        f"check: {len(rows)} cases ({n_cuda} on the CUDA decode kernels, {n_fused} with the norm / residual "
        f"folded in, {n_gated} with the SiLU product, {n_cutlass} on the Hopper int8/int4 GEMM), "
        f"all_ok={result['all_ok']}, worst rel_err {worst:.2e}, graph {graph_err:.2e}"
    )
    for r in rows:
        if not r["ok"]:
            print("FAIL", r)
    return result


def fused_check() -> list[dict]:
    """The norm and residual folded into the CUDA decode kernels (``cuda_gemv.fused_gemv``) against
    ``norm_fusion``'s arithmetic in float64: a matmul after a norm (x = h * w, its sums times rstd from h's
    sum of squares) and one ending a residual branch (h = residual + y, then h * w, equal to torch's on the
    kernel's own h bit for bit, and h's row sums of squares, to fp32 rounding; the ticket counter back at
    zero). Outputs NaN-poisoned, a second run bit-identical (a different block finishes last)."""
    from llmopt.quant import norm_fusion

    rows = []
    eps = 1e-5
    cases = [("int8", 1, 4096, 4096), ("int8", 1, 1000, 1040), ("int8", 1, 6144, 4096),
             ("int8", 3, 333, 4096), ("int8", 16, 4096, 4096), ("int4", 1, 4096, 4096),
             ("int4", 1, 28672, 4096), ("int4", 5, 1000, 1024), ("int4", 16, 4104, 4096),
             ("int4", 9, 37, 1408)]  # fmt: skip
    counter = norm_fusion.new_counter(DEV)
    for (scheme, m, n, k), dtype in itertools.product(cases, (torch.bfloat16, torch.float16)):
        group = None if scheme == "int8" else GROUP if k % GROUP == 0 else 32
        q, s, zp, deq = make_layer(scheme, n, k, dtype, group=group)
        shape = LayerShape(scheme, k, n, group)
        kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
        b = kernel.prepare(q, s, zp, shape, DEV, dtype)
        weight = b["weight_int8" if scheme == "int8" else "weight_int4"]
        zero = None if scheme == "int8" else b["zeros"]
        if not cuda_gemv.fused_kernel_takes(m, n, k, group):
            rows.append({"scheme": scheme, "m": m, "n": n, "k": k, "fused": False, "ok": False,
                         "path": "none", "rel_err": float("inf")})  # fmt: skip
            continue
        h = torch.randn(m, k, device=DEV, dtype=dtype)
        w_in = (1 + 0.3 * torch.randn(k, device=DEV)).to(dtype)
        x_w, sumsq = norm_fusion.norm_inputs(h, w_in)
        residual = torch.randn(m, n, device=DEV, dtype=dtype)
        w_out = (1 + 0.3 * torch.randn(n, device=DEV)).to(dtype)

        def both(x_w=x_w, sumsq=sumsq, weight=weight, zero=zero, b=b, group=group, residual=residual,
                 w_out=w_out, m=m, n=n):  # fmt: skip
            normed = torch.full((m, n), float("nan"), device=DEV, dtype=x_w.dtype)
            cuda_gemv.fused_gemv(x_w, weight, b["scales"], zero, group or 0, normed, sumsq_in=sumsq,
                                 eps=eps)  # fmt: skip
            h_out, weighted = torch.full_like(normed, float("nan")), torch.full_like(normed, float("nan"))
            sumsq_out = torch.full((m,), float("nan"), device=DEV)
            cuda_gemv.fused_gemv(x_w, weight, b["scales"], zero, group or 0, h_out, residual=residual,
                                 norm_weight=w_out, weighted=weighted, sumsq_out=sumsq_out,
                                 counter=counter)  # fmt: skip
            return normed, h_out, weighted, sumsq_out

        normed, h_out, weighted, sumsq_out = both()
        y = x_w.double() @ deq.double().T
        rstd = torch.rsqrt(sumsq.double()[:, None] / k + eps)
        err_normed = rel_err(normed, y * rstd)
        err_h = rel_err(h_out, residual.double() + y)
        weighted_exact = bool(torch.equal(weighted, (h_out.float() * w_out.float()).to(dtype)))
        sumsq_err = rel_err(sumsq_out, h_out.double().square().sum(-1))
        again = both()
        runs = (normed, h_out, weighted, sumsq_out)
        deterministic = all(torch.equal(a, c) for a, c in zip(runs, again, strict=True))
        counter_zero = counter.item() == 0
        ok = (err_normed < 1e-2 and err_h < 1e-2 and weighted_exact and sumsq_err < 1e-5 and deterministic
              and counter_zero)  # fmt: skip
        rows.append({"scheme": scheme, "m": m, "n": n, "k": k, "group": group, "dtype": str(dtype),
                     "fused": True, "path": "cuda-fused", "rel_err": max(err_normed, err_h),
                     "rel_err_normed": err_normed, "rel_err_residual": err_h,
                     "weighted_exact": weighted_exact, "sumsq_rel_err": sumsq_err,
                     "deterministic": deterministic, "counter_zero": counter_zero, "ok": ok})  # fmt: skip
    return rows


def gated_check() -> list[dict]:
    """The SiLU product folded into the CUDA decode kernels (``cuda_gemv.fused_gemv(gated=True)``, the
    weight's channels interleaved gate/up pairs) against float64: each output rounded to the activation
    type, then silu(gate) * up; plain and after a norm (x = h * w, sums times rstd). Outputs NaN-poisoned
    (half as wide), a second run bit-identical; int8 at one row runs the CUDA-core kernel, the rest the
    tensor-core one."""
    from llmopt.quant import norm_fusion

    rows = []
    eps = 1e-5
    cases = [("int8", 1, 28672, 4096), ("int8", 1, 1000, 1040), ("int8", 3, 334, 4096),
             ("int8", 16, 4096, 4096), ("int4", 1, 28672, 4096), ("int4", 5, 1000, 1024),
             ("int4", 16, 4104, 4096), ("int4", 9, 38, 1408)]  # fmt: skip
    for (scheme, m, n, k), dtype, after_norm in itertools.product(cases, (torch.bfloat16, torch.float16),
                                                                  (False, True)):  # fmt: skip
        group = None if scheme == "int8" else GROUP if k % GROUP == 0 else 32
        q, s, zp, deq = make_layer(scheme, n, k, dtype, group=group)
        kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
        b = kernel.prepare(q, s, zp, LayerShape(scheme, k, n, group), DEV, dtype)
        weight = b["weight_int8" if scheme == "int8" else "weight_int4"]
        zero = None if scheme == "int8" else b["zeros"]
        h = torch.randn(m, k, device=DEV, dtype=dtype)
        x, sumsq = norm_fusion.norm_inputs(h, (1 + 0.3 * torch.randn(k, device=DEV)).to(dtype))
        if not after_norm:
            x, sumsq = h, None

        def run(x=x, sumsq=sumsq, weight=weight, zero=zero, b=b, group=group, m=m, n=n):
            out = torch.full((m, n // 2), float("nan"), device=DEV, dtype=x.dtype)
            return cuda_gemv.fused_gemv(x, weight, b["scales"], zero, group or 0, out, sumsq_in=sumsq,
                                        eps=eps, gated=True)  # fmt: skip

        got = run()
        y = x.double() @ deq.double().T
        if sumsq is not None:
            y = y * torch.rsqrt(sumsq.double()[:, None] / k + eps)
        y = y.to(dtype).double()  # (each output rounded, as a matmul's)
        err = rel_err(got, torch.nn.functional.silu(y[:, 0::2]) * y[:, 1::2])
        deterministic = bool(torch.equal(got, run()))
        rows.append({"scheme": scheme, "m": m, "n": n, "k": k, "group": group, "dtype": str(dtype),
                     "after_norm": after_norm, "path": "cuda-gated", "rel_err": err,
                     "deterministic": deterministic, "ok": err < 1e-2 and deterministic})  # fmt: skip
    return rows


def part_fused() -> dict:
    """Per layer, the CUDA decode kernels with the norm / residual folded in against without (``FUSED_ROWS``,
    default 1,8): plain; as the matmul after a norm (sum of squares in, rstd out); with a residual only;
    and as the matmul ending a residual branch (residual, h * w, the last block's sums). µs, CUDA graph over
    weight copies > 256 MB, as ``table``."""
    from llmopt.quant import norm_fusion

    rows = []
    counter = norm_fusion.new_counter(DEV)
    for m in (int(v) for v in os.environ.get("FUSED_ROWS", "1,8").split(",")):
        for scheme, (name, (n, k)) in itertools.product(("int8", "int4"), LLAMA_SHAPES.items()):
            if name == "head":
                continue
            group = None if scheme == "int8" else GROUP
            q, s, zp, _ = make_layer(scheme, n, k, torch.bfloat16, group=group)
            shape = LayerShape(scheme, k, n, group)
            kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
            first = kernel.prepare(q, s, zp, shape, DEV, torch.bfloat16)
            weight_key = "weight_int8" if scheme == "int8" else "weight_int4"
            if not cuda_gemv.fused_kernel_takes(m, n, k, group):
                continue
            nbytes = sum(t.numel() * t.element_size() for t in first.values())
            copies = max(2, math.ceil((256 << 20) / nbytes))
            bufs = [first] + [{key: t.clone() for key, t in first.items()} for _ in range(copies - 1)]
            x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
            sumsq = norm_fusion.row_sumsq(torch.randn(m, k, device=DEV))
            out, weighted = (
                torch.empty(m, n, device=DEV, dtype=x.dtype),
                torch.empty(m, n, device=DEV, dtype=x.dtype),
            )
            residual = torch.randn(m, n, device=DEV, dtype=x.dtype)
            w_norm = torch.ones(n, device=DEV, dtype=x.dtype)
            sumsq_out = torch.empty(m, device=DEV)

            state = {
                "bufs": bufs, "x": x, "out": out, "scheme": scheme, "group": group, "key": weight_key,
                "sumsq": sumsq, "residual": residual, "w_norm": w_norm, "weighted": weighted,
                "sumsq_out": sumsq_out,
            }  # fmt: skip

            def call(i, mode, st=state):
                b, x, out = st["bufs"][i], st["x"], st["out"]
                zero = b.get("zeros")
                if mode == "plain" and st["scheme"] == "int8":
                    cuda_gemv.int8_gemv(x, b[st["key"]], b["scales"], out)
                elif mode == "plain":
                    cuda_gemv.int4_gemv(x, b[st["key"]], b["scales"], zero, st["group"], out)
                else:
                    extra = {
                        "normed": {"sumsq_in": st["sumsq"], "eps": 1e-5},
                        "residual": {"residual": st["residual"]},
                        "producer": {
                            "residual": st["residual"],
                            "norm_weight": st["w_norm"],
                            "weighted": st["weighted"],
                            "sumsq_out": st["sumsq_out"],
                            "counter": counter,
                        },
                    }[mode]
                    cuda_gemv.fused_gemv(x, b[st["key"]], b["scales"], zero, st["group"] or 0, out, **extra)

            row = {"scheme": scheme, "layer": name, "m": m, "n": n, "k": k}
            for mode in ("plain", "normed", "residual", "producer"):
                row[f"{mode}_us"] = 1e6 * time_graph(functools.partial(call, mode=mode), copies)
            rows.append(row)
            print(row, flush=True)
            del bufs
            torch.cuda.empty_cache()
    return {"rows": rows}


def by_group(buffers: dict) -> tuple | None:
    """An int4 layer's group-major scales for the Hopper GEMM, where prepare made them."""
    return tuple(buffers[n] for n in tk.GROUP_MAJOR) if tk.GROUP_MAJOR[0] in buffers else None


def graph_check(m: int, scheme: str) -> float:
    """Relative error of the compiled op captured in a CUDA graph and replayed on new inputs."""
    q, s, zp, deq = make_layer(scheme, 4096, 4096, torch.bfloat16)
    shape = LayerShape(scheme, 4096, 4096, None if scheme == "int8" else GROUP)
    kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
    b = kernel.prepare(q, s, zp, shape, DEV, torch.bfloat16)
    x = torch.randn(m, 4096, device=DEV, dtype=torch.bfloat16)
    gm = by_group(b) or (None, None)

    def op(t: torch.Tensor) -> torch.Tensor:
        if scheme == "int8":
            return torch.ops.llmopt.int8_mm(t, b["weight_int8"], b["scales"]) * 2
        return torch.ops.llmopt.int4_mm(t, b["weight_int4"], b["scales"], b["zeros"], GROUP, *gm) * 2

    fn = torch.compile(op, fullgraph=True)
    captured: list[torch.Tensor] = []
    graph = capture(lambda: captured.append(fn(x)), warmup=lambda: [fn(x) for _ in range(3)])
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    return rel_err(captured[-1], 2 * (x.double() @ deq.double().T))


def time_graph(fn, copies: int, reps: int = 7) -> float:
    """Seconds per call: one CUDA graph runs ``fn(i)`` for every copy i, 4 rounds."""

    def one_round() -> None:
        for i in range(copies):
            fn(i)

    def four_rounds() -> None:
        for _ in range(4):
            one_round()

    graph = capture(four_rounds, warmup=one_round)
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (4 * copies))
    return statistics.median(times)


def bench_shape(name: str, n: int, k: int, m: int, copy_bw: float, configs=None) -> list[dict]:
    rows = []
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
    io = 2 * m * k + 2 * m * n

    def record(label, sec, nbytes, cfg=None):
        row = {"shape": name, "n": n, "k": k, "m": m, "kernel": label, "us": sec * 1e6, "bytes": nbytes,
               "gbps": nbytes / sec / 1e9, "pct_copy_bw": 100 * nbytes / sec / copy_bw}  # fmt: skip
        if cfg is not None:
            row["config"] = cfg.__dict__
        rows.append(row)

    # bf16 cuBLAS
    wb = 2 * n * k
    copies = max(2, math.ceil(256e6 / wb))
    ws = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    record("bf16 cublas", time_graph(lambda i, ws=ws: torch.mm(x, ws[i].T, out=out), copies), wb + io)
    del ws
    for scheme in ("int8", "int4"):
        q, s, zp, _ = make_layer(scheme, n, k, torch.bfloat16)
        shape = LayerShape(scheme, k, n, None if scheme == "int8" else GROUP)
        kern = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
        b = kern.prepare(q, s, zp, shape, DEV, torch.bfloat16)
        nbytes = sum(t.numel() * t.element_size() for t in b.values()) + io
        copies = max(2, math.ceil(256e6 / nbytes))
        bufs = [{key: t.clone() for key, t in b.items()} for _ in range(copies)]

        def run(i, cfg=None, scheme=scheme, bufs=bufs):
            bb = bufs[i]
            if scheme == "int8":
                tk.int8_matmul(x, bb["weight_int8"], bb["scales"], out=out, config=cfg)
            else:
                tk.int4_matmul(x, bb["weight_int4"], bb["scales"], bb["zeros"], GROUP, out=out, config=cfg)

        chosen = tk.choose_config(scheme, m, n, k, shape.group_size, tk.sm_count(0))
        record(f"llmopt {scheme}", time_graph(lambda i, c=chosen: run(i, c), copies), nbytes, chosen)
        weight = b["weight_int8" if scheme == "int8" else "weight_int4"]
        if cuda_gemv.usable(x, weight, k, shape.group_size):  # what int8/int4_matmul run at decode rows
            record(f"cuda {scheme}", time_graph(lambda i: run(i, None), copies), nbytes)
        for cfg in (configs or {}).get(scheme, []):
            try:
                sec = time_graph(lambda i, cfg=cfg: run(i, cfg), copies, reps=3)
            except Exception as exc:
                print(f"skip {cfg}: {type(exc).__name__}")
                continue
            record(f"sweep {scheme}", sec, nbytes, cfg)
        del bufs
        # torch's own op, batch 1 only (its int8 path collapses at larger batches; GPU.md)
        if m <= 16 or scheme == "int4":  # torch's int8 op collapses at larger batches
            aten = AtenInt8Kernel() if scheme == "int8" else AtenInt4Kernel()
            if aten.supports(shape, DEV, torch.bfloat16):
                ab = aten.prepare(q, s, zp, shape, DEV, torch.bfloat16)
                abytes = sum(t.numel() * t.element_size() for t in ab.values()) + io
                acopies = max(2, math.ceil(256e6 / abytes))
                abufs = [{key: t.clone() for key, t in ab.items()} for _ in range(acopies)]
                sec = time_graph(lambda i, a=aten, b=abufs, sh=shape: a.matmul(x, b[i], sh), acopies)
                record(f"aten {scheme}", sec, abytes)
                del abufs
    if m > 16:  # llmopt's W8A8 kernel (activations quantized per row, int8 tensor cores), fused
        q, s, zp, _ = make_layer("int8", n, k, torch.bfloat16)
        scales = s.reshape(-1).contiguous()
        qs = [q.clone() for _ in range(max(2, math.ceil(256e6 / (n * k))))]
        nbytes = n * k + 2 * n + io
        chosen = tk.choose_w8a8_config(m, n, k, tk.sm_count(0))
        sec = time_graph(lambda i: tk.w8a8_matmul(x, qs[i], scales, out=out), len(qs))
        record("llmopt w8a8", sec, nbytes, chosen)
        for cfg in (configs or {}).get("w8a8", []):
            try:
                sec = time_graph(lambda i, c=cfg: tk.w8a8_matmul(x, qs[i], scales, out=out, config=c),
                                 len(qs), reps=3)  # fmt: skip
            except Exception as exc:
                print(f"skip {cfg}: {type(exc).__name__}")
                continue
            record("sweep w8a8", sec, nbytes, cfg)
        del qs
    if m > 16:  # int8 tensor cores through torch: activations quantized by torch ops, cuBLAS int8
        q, s, zp, _ = make_layer("int8", n, k, torch.bfloat16)
        qs = [q.clone() for _ in range(max(2, math.ceil(256e6 / (n * k))))]
        sw = s.reshape(1, -1).float()

        def w8a8(i):
            sx = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-8) / 127
            xq = torch.round(x.float() / sx).to(torch.int8)
            acc = torch._int_mm(xq, qs[i].T)
            out.copy_(acc.float() * sx * sw)

        record("w8a8 torch-int-mm", time_graph(w8a8, len(qs)), n * k + 2 * n + io)
    return rows


def sweep_configs(m: int) -> dict:
    out: dict[str, list] = {"int8": [], "int4": []}
    if m <= 16:
        space = list(itertools.product((64, 128, 256), (128, 256, 512), (1, 2), (4, 8), (3, 4)))
        bms = [16]
    else:
        space = list(itertools.product((64, 128, 256), (64, 128), (1,), (4, 8), (3, 4)))
        bms = sorted({min(max(16, 1 << (m - 1).bit_length()), 128), 64})
    for bn, bk, split, warps, stages in space:
        for scheme in ("int8", "int4"):
            if scheme == "int4" and bk < GROUP:
                continue
            for block_m in bms:
                out[scheme].append(tk.TileConfig(block_m, bn, bk, split, warps, stages))
    return out


def w8a8_configs(m: int, n: int, k: int) -> list[tk.TileConfig]:
    """The W8A8 kernel's tile space (split-K by choose_config's rule)."""
    configs = []
    for block_m, block_n, block_k, warps, stages in itertools.product(
        sorted({64, min(128, max(64, 1 << (m - 1).bit_length()))}), (128, 256), (128, 256), (4, 8), (3, 4)
    ):
        split = tk._split_to_fill(-(-n // block_n) * -(-m // block_m), -(-k // block_k), tk.sm_count(0))
        configs.append(tk.TileConfig(block_m, block_n, block_k, split, warps, stages))
    return configs


def with_split(scheme: str, m: int, n: int, k: int, block_m: int, block_n: int, block_k: int,
               warps: int, stages: int, weight_left: bool) -> tk.TileConfig:  # fmt: skip
    """A tile config whose split-K follows choose_config's rule for these tiles."""
    split = tk._split_to_fill(-(-n // block_n) * -(-m // block_m), -(-k // block_k), tk.sm_count(0))
    return tk.TileConfig(block_m, block_n, block_k, split, warps, stages, weight_left)


def uses_wgmma(scheme: str, cfg: tk.TileConfig) -> bool:
    """Whether Triton compiled this tile config to Hopper's wgmma (else mma.sync)."""
    n, k, m = 4096, 4096, cfg.block_m
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
    q, s, zp, _ = make_layer(scheme, n, k, torch.bfloat16)
    shape = LayerShape(scheme, k, n, None if scheme == "int8" else GROUP)
    kern = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
    b = kern.prepare(q, s, zp, shape, DEV, torch.bfloat16)
    grid = (n // cfg.block_n, 1, 1)
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT=False,
                  DOT_DTYPE=tk.tl.bfloat16, WEIGHT_LEFT=cfg.weight_left, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)  # fmt: skip
    if scheme == "int8":
        handle = tk._int8_mm_kernel[grid](x, b["weight_int8"], b["scales"], out, m, n, k, k, k, k, n, 0,
                                          **common)  # fmt: skip
    else:
        handle = tk._int4_mm_kernel[grid](x, b["weight_int4"], b["scales"], b["zeros"], out, m, n, k, k,
                                          k, k // 2, k // GROUP, n, 0, GROUP=GROUP, **common)  # fmt: skip
    return "wgmma" in handle.asm["ptx"]


def part_orient() -> dict:
    """Weight tile as the right mma operand (x @ Wᵀ) against the left one ((W @ xᵀ)ᵀ), per shape."""
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    probes = {}
    for scheme in ("int8", "int4"):
        for left in (False, True):
            for bm, bn, warps in ((16, 64, 4), (16, 128, 8), (64, 128, 4), (128, 128, 8)):
                cfg = tk.TileConfig(bm, bn, 256 if bm == 16 else 128, 1, warps, 3, left)
                try:
                    probes[f"{scheme} left={left} {bm}x{bn} w{warps}"] = uses_wgmma(scheme, cfg)
                except Exception as exc:  # a config Triton cannot compile
                    probes[f"{scheme} left={left} {bm}x{bn} w{warps}"] = f"{type(exc).__name__}: {exc}"[:200]
    for key, val in probes.items():
        print(f"wgmma {key}: {val}", flush=True)
    return sweep_by("weight_left", orient_space, copy_bw) | {"probes": probes}


def orient_space(scheme: str, m: int, n: int, k: int) -> list:
    configs = []
    if m <= 16:
        space = itertools.product((16,), (64, 128), (256, 512), (4, 8), (3,), (False, True))
    else:
        bms = (min(128, max(16, 1 << (m - 1).bit_length())),)
        space = itertools.product(bms, (64, 128, 256), (64, 128), (4, 8), (3,), (False, True))
    for bm, bn, bk, warps, stages, left in space:
        if scheme == "int4" and bk < GROUP:
            continue
        configs.append(with_split(scheme, m, n, k, bm, bn, bk, warps, stages, left))
    return configs


def split_space(scheme: str, m: int, n: int, k: int) -> list:
    """int8 at decode sizes: split-K set explicitly rather than by the SM rule (narrow layers)."""
    if scheme != "int8":
        return []
    return [tk.TileConfig(16, bn, bk, split, warps, 3)
            for bn, bk, split, warps in itertools.product((64, 128), (256, 512), (1, 2, 4, 8, 16), (4, 8))
            if k // bk >= split]  # fmt: skip


def part_split() -> dict:
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    return sweep_by("split_k", split_space, copy_bw)


def sweep_by(key: str, space, copy_bw: float) -> dict:
    """Time every config of ``space(scheme, m, n, k)`` per row count and shape; print the best per
    value of the config field ``key``."""
    ms = [int(v) for v in os.environ.get("MS", "1,16,32,128").split(",")]
    shapes = os.environ.get("SHAPES", "qkv,o,gate_up,down").split(",")
    rows = []
    for m in ms:
        for name in shapes:
            n, k = LLAMA_SHAPES[name]
            configs = {scheme: space(scheme, m, n, k) for scheme in ("int8", "int4")}
            rows += bench_shape(name, n, k, m, copy_bw, configs)
            for scheme in ("int8", "int4"):
                for value in sorted({c.__dict__[key] for c in configs[scheme]}):
                    cands = [r for r in rows if r["m"] == m and r["shape"] == name
                             and r["kernel"] == f"sweep {scheme}"
                             and r["config"][key] == value]  # fmt: skip
                    if cands:
                        r = min(cands, key=lambda r: r["us"])
                        print(f"m={m:4d} {name:8s} {scheme} {key}={value!s:5s} best {r['us']:8.1f} us "
                              f"{r['pct_copy_bw']:5.1f}% {r['config']}", flush=True)  # fmt: skip
            bf = [r for r in rows if r["m"] == m and r["shape"] == name and r["kernel"] == "bf16 cublas"]
            print(f"m={m:4d} {name:8s} bf16 cublas {bf[0]['us']:8.1f} us", flush=True)
            (OUT / f"lowbit_{key}_partial.json").write_text(json.dumps({"copy_bw": copy_bw, "rows": rows}))
    return {"copy_bw": copy_bw, "rows": rows}


def part_table(sweep: bool) -> dict:
    copy_bw = copy_bandwidth()
    print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    ms = [int(v) for v in os.environ.get("MS", "1,16,32,128,1024").split(",")]
    shapes = os.environ.get("SHAPES", ",".join(LLAMA_SHAPES)).split(",")
    rows = []
    for m in ms:
        for name in shapes:
            n, k = LLAMA_SHAPES[name]
            configs = sweep_configs(m) if sweep else None
            if os.environ.get("W8A8_SWEEP") == "1" and m > 16:
                configs = {"w8a8": w8a8_configs(m, n, k)}
            rows += bench_shape(name, n, k, m, copy_bw, configs)
            best = {}
            for r in rows:
                if r["m"] == m and r["shape"] == name:
                    key = r["kernel"].replace("sweep ", "llmopt ")  # a sweep competes with the rule
                    if key not in best or r["us"] < best[key]["us"]:
                        best[key] = r
            for key, r in best.items():
                print(f"m={m:5d} {name:8s} {key:12s} best {r['kernel']:12s} {r['us']:9.1f} us "
                      f"{r['gbps']:7.0f} GB/s "
                      f"{r['pct_copy_bw']:5.1f}% {r.get('config', '')}", flush=True)  # fmt: skip
            partial = {"copy_bw": copy_bw, "rows": rows}
            (OUT / f"lowbit_{'sweep' if sweep else 'table'}_partial.json").write_text(json.dumps(partial))
    return {"copy_bw": copy_bw, "rows": rows}


def gemv_variants() -> list[tuple[str, ...]]:
    """Work shapes of the CUDA decode kernels (csrc/gemv_cuda.cu): rows per team x chunks in flight x
    warps per team, the same for int8 and int4 in one build."""
    variants = []
    for rows, unroll, ksplit in itertools.product((1, 2, 4, 8), (1, 2, 4), (1, 2, 4)):
        shape = (("ROWS", rows), ("UNROLL", unroll), ("KSPLIT", ksplit))
        variants.append(tuple(f"-D{s}_{name}={v}" for s in ("INT8", "INT4") for name, v in shape))
    return variants


def env_variants() -> list[tuple[str, ...]] | None:
    """The -D sets in MMA_VARIANTS, e.g. "-DMMA_WARPS=8 -DMMA_UNROLL=2;-DINT8_MMA_FROM=1", to build and time
    instead of a sweep's own list (None: not set)."""
    if not os.environ.get("MMA_VARIANTS"):
        return None
    return [tuple(v.split()) for v in os.environ["MMA_VARIANTS"].split(";")]


def mma_variants() -> list[tuple[str, ...]]:
    """Work shapes of the tensor-core decode kernel: warps per block x chunks in flight. (A version that
    staged the weights through shared memory was slower at every shape: BENCHMARKS.md §5.)"""
    if (variants := env_variants()) is not None:
        return variants
    shapes = itertools.product((4, 8, 16), (1, 2, 4))
    return [(f"-DMMA_WARPS={w}", f"-DMMA_UNROLL={u}") for w, u in shapes]


def load_baseline(source: str, arch: str) -> ctypes.CDLL:
    """Another version of csrc/gemv_cuda.cu (``BASELINE_SOURCE``, e.g. the last commit's), built here,
    so that its default kernels run in the same call as this one's. Only its two row-dispatching entry
    points are used; their signatures have not changed."""
    target = OUT / "baseline_gemv.so"
    nvcc = cuda_gemv.nvcc_path()
    assert nvcc is not None
    subprocess.run([nvcc, *cuda_gemv.NVCC_FLAGS, f"-arch={arch}", source, "-o", str(target)], check=True)
    lib = ctypes.CDLL(str(target))
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.llmopt_int8_gemv.argtypes = [ptr, i32, ptr, ptr, i32, ptr, i32, i32, i32, i64, i64, ptr]
    lib.llmopt_int4_gemv.argtypes = [ptr, i32, ptr, ptr, i32, ptr, ptr, i32, i32, i32, i32, i64, i64, ptr]
    lib.llmopt_gemv_max_rows.argtypes = [i32]
    return lib


def part_gemv(mma: bool) -> dict:
    """Build every variant (in parallel); per layer shape and row count, check and time each. ``mma``:
    the tensor-core kernel's variants (forced at every row count), else the CUDA-core kernels' (1-2
    rows). Same call, same buffers: the library's default dispatch ("default"), the Triton tiles the
    dispatch would otherwise fall back to ("triton"), bf16 cuBLAS, and with ``BASELINE_SOURCE`` another
    version of the library's default dispatch ("baseline")."""
    from concurrent.futures import ThreadPoolExecutor

    copy_bw = copy_bandwidth()
    arch = cuda_gemv._arch(0)
    variants = mma_variants() if mma else (env_variants() or gemv_variants())
    with ThreadPoolExecutor(16) as pool:
        paths = list(pool.map(lambda d: cuda_gemv.build_library(arch, defines=d)[0], variants))
    libs = [cuda_gemv.load(p) for p in paths]
    baseline_source = os.environ.get("BASELINE_SOURCE")
    baseline = load_baseline(baseline_source, arch) if baseline_source else None
    ms = [int(v) for v in os.environ.get("MS", "1,2,3,4,8,12,16" if mma else "1,2").split(",")]
    rows = []
    for scheme in os.environ.get("SCHEMES", "int8,int4").split(","):
        for name in os.environ.get("SHAPES", ",".join(LLAMA_SHAPES)).split(","):
            n, k = LLAMA_SHAPES[name]
            q, s, zp, deq = make_layer(scheme, n, k, torch.bfloat16)
            shape = LayerShape(scheme, k, n, None if scheme == "int8" else GROUP)
            kern = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
            b = kern.prepare(q, s, zp, shape, DEV, torch.bfloat16)
            nbytes_w = sum(t.numel() * t.element_size() for t in b.values())
            copies = max(2, math.ceil(256e6 / nbytes_w))
            bufs = [{key: t.clone() for key, t in b.items()} for _ in range(copies)]
            for m in ms:
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
                ref = x.double() @ deq.double().T
                nbytes = nbytes_w + 2 * m * k + 2 * m * n
                here = []

                def measure(label, run, copies=copies, nbytes=nbytes, x=x, out=out, ref=ref, m=m, name=name,
                            scheme=scheme, here=here):  # fmt: skip
                    out.fill_(float("nan"))
                    run(0)
                    err = rel_err(out, ref)
                    sec = time_graph(run, copies, reps=5)
                    row = {"scheme": scheme, "shape": name, "m": m, "variant": label, "us": sec * 1e6,
                           "pct_copy_bw": 100 * nbytes / sec / copy_bw, "rel_err": err}  # fmt: skip
                    rows.append(row)
                    here.append(row)

                def run_lib(i, lib=None, forced=False, x=x, out=out, bufs=bufs, scheme=scheme):
                    bb = bufs[i]
                    if scheme == "int8":
                        cuda_gemv.int8_gemv(x, bb["weight_int8"], bb["scales"], out, lib=lib,
                                            tensor_cores=forced)  # fmt: skip
                    else:
                        cuda_gemv.int4_gemv(x, bb["weight_int4"], bb["scales"], bb["zeros"], GROUP, out,
                                            lib=lib, tensor_cores=forced)  # fmt: skip

                for variant, lib in zip(variants, libs, strict=True):
                    mine = [d for d in variant if mma or d.startswith(f"-D{scheme.upper()}")]
                    label = " ".join(d.split("_", 1)[1] for d in mine) if mine else " ".join(variant)
                    measure(label, functools.partial(run_lib, lib=lib, forced=mma))
                weight = b["weight_int8" if scheme == "int8" else "weight_int4"]
                if cuda_gemv.usable(x, weight, k, shape.group_size):
                    measure("default", run_lib)
                if baseline is not None and m <= baseline.llmopt_gemv_max_rows(0 if scheme == "int8" else 1):
                    measure("baseline", functools.partial(run_lib, lib=baseline))
                cfg = tk.choose_config(scheme, m, n, k, shape.group_size, tk.sm_count(0))

                def run_triton(i, cfg=cfg, x=x, out=out, bufs=bufs, scheme=scheme):
                    bb = bufs[i]
                    if scheme == "int8":
                        tk.int8_matmul(x, bb["weight_int8"], bb["scales"], out=out, config=cfg)
                    else:
                        tk.int4_matmul(x, bb["weight_int4"], bb["scales"], bb["zeros"], GROUP, out=out,
                                       config=cfg)  # fmt: skip

                measure("triton", run_triton)
                best = min((r for r in here if r["variant"] not in ("default", "baseline", "triton")),
                           key=lambda r: r["us"])  # fmt: skip
                named = {r["variant"]: r["us"] for r in here}
                print(f"{scheme} m={m:2d} {name:8s} best {best['variant']:24s} {best['us']:7.1f} us "
                      f"{best['pct_copy_bw']:5.1f}% | default {named.get('default', float('nan')):7.1f} "
                      f"baseline {named.get('baseline', float('nan')):7.1f} triton {named['triton']:7.1f} "
                      f"(worst err {max(r['rel_err'] for r in here):.1e})", flush=True)  # fmt: skip
                (OUT / "lowbit_gemv_partial.json").write_text(json.dumps({"copy_bw": copy_bw, "rows": rows}))
            del bufs
    return {"copy_bw": copy_bw, "rows": rows}


CUTLASS_ROWS = (32, 48, 64, 96, 128, 192, 256, 512, 1024, 2048)


def part_cutlass() -> dict:
    """The Hopper int8 and int4 GEMMs on Llama-3-8B's layers (SCHEMES, default both): every
    configuration, the one ``choose_config`` picks, what int8_matmul / int4_matmul run without it
    (LLMOPT_CUTLASS=0: Triton tiles below 256 rows, dequantize + cuBLAS from 256) and bf16 cuBLAS, all
    in one call; plus each configuration's error against float64 and a second run's bit-identity.
    ROWS overrides the row counts."""
    copy_bw = copy_bandwidth()
    rows = []
    row_counts = [int(v) for v in os.environ.get("ROWS", ",".join(map(str, CUTLASS_ROWS))).split(",")]
    for scheme in os.environ.get("SCHEMES", "int8,int4").split(","):
        for name, (n, k) in LLAMA_SHAPES.items():
            q, s, zp, deq = make_layer(scheme, n, k, torch.bfloat16)
            shape = LayerShape(scheme, k, n, None if scheme == "int8" else GROUP)
            kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
            b = kernel.prepare(q, s, zp, shape, DEV, torch.bfloat16)
            nbytes = sum(t.numel() * t.element_size() for t in b.values())
            extra = math.ceil(256e6 / nbytes)
            copies = [b] + [{key: t.clone() for key, t in b.items()} for _ in range(extra)]
            ws = [deq.to(torch.bfloat16) for _ in range(max(2, math.ceil(256e6 / (2 * n * k))))]
            for m in row_counts:
                row = cutlass_shape(scheme, name, m, copies, ws, deq, copy_bw)
                best_us = row["configs"][row["best"]]["us"]
                worst_err = max(c["rel_err"] for c in row["configs"].values())
                print(f"{scheme} {name:8} m={m:5} bf16 {row['bf16_us']:8.1f} "
                      f"without {row['without_us']:8.1f} default {row['default_us']:8.1f} "
                      f"pick {row['pick']:9} (x{row['pick_over_best']:.2f} "
                      f"of {row['best']} {best_us:.1f}) err {worst_err:.1e}", flush=True)  # fmt: skip
                rows.append(row)
            del copies, ws
    ok = all(c["rel_err"] < 1e-2 and c["repeatable"] for r in rows for c in r["configs"].values())
    print(f"cutlass: {len(rows)} shapes x {len(cutlass_gemm.CONFIGS)} configurations, all_ok={ok}, worst "
          f"pick/best {max(r['pick_over_best'] for r in rows):.2f}")  # fmt: skip
    return {"copy_bw": copy_bw, "rows": rows, "all_ok": ok}


def cutlass_shape(scheme: str, name: str, m: int, copies: list, ws: list, deq: torch.Tensor,
                  copy_bw: float) -> dict:  # fmt: skip
    """One (scheme, layer, rows) row of part_cutlass; ``copies``: the layer's prepared buffers, enough
    copies to miss L2; ``ws``: bf16 weight copies."""
    (n, k), b0 = deq.shape, copies[0]
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(m, n, device=DEV, dtype=torch.bfloat16)
    ref = x.double() @ deq.double().T
    row = {"scheme": scheme, "shape": name, "n": n, "k": k, "m": m,
           "pick": cutlass_gemm.choose_config(m, n, k, tk.sm_count(0)),
           "takes_rows": cutlass_gemm.takes_rows(m, n, k, scheme), "configs": {}}  # fmt: skip

    def library(i: int, y: torch.Tensor) -> None:
        b = copies[i]
        if scheme == "int8":
            tk.int8_matmul(x, b["weight_int8"], b["scales"], out=y)
        else:
            gm = by_group(b)
            tk.int4_matmul(x, b["weight_int4"], b["scales"], b["zeros"], GROUP, out=y, group_major=gm)

    def config_run(i: int, y: torch.Tensor, config: str) -> None:
        b = copies[i]
        if scheme == "int8":
            cutlass_gemm.int8_gemm(x, b["weight_int8"], b["scales"], y, config=config)
        else:
            gm = by_group(b)
            assert gm is not None, "int4_wanted() said no on this GPU"
            cutlass_gemm.int4_gemm(x, b["weight_int4"], *gm, GROUP, y, config=config)

    row["bf16_us"] = time_graph(lambda i: torch.mm(x, ws[i].T, out=out), len(ws)) * 1e6
    for label, env in (("without_us", "0"), ("default_us", "1")):
        os.environ[cutlass_gemm.DISABLE_ENV] = env
        row[label] = time_graph(lambda i: library(i, out), len(copies)) * 1e6
    for config in cutlass_gemm.CONFIGS:
        y, again = (torch.full((m, n), float("nan"), device=DEV, dtype=torch.bfloat16) for _ in range(2))
        config_run(0, y, config)
        config_run(0, again, config)
        sec = time_graph(lambda i, c=config: config_run(i, out, c), len(copies))
        row["configs"][config] = {"us": sec * 1e6, "rel_err": rel_err(y, ref),
                                  "repeatable": bool(torch.equal(y, again))}  # fmt: skip
    best = min(row["configs"], key=lambda c: row["configs"][c]["us"])
    row["best"] = best
    row["pick_over_best"] = row["configs"][row["pick"]]["us"] / row["configs"][best]["us"]
    moved = sum(t.numel() * t.element_size() for t in b0.values()) + 2 * m * (k + n)
    row["pct_copy_bw_default"] = 100 * moved / (row["default_us"] / 1e6) / copy_bw
    return row


def main() -> None:
    part = sys.argv[1]
    OUT.mkdir(parents=True, exist_ok=True)
    if part == "check":
        result = part_check()
    elif part == "orient":
        result = part_orient()
    elif part == "split":
        result = part_split()
    elif part == "cutlass":
        result = part_cutlass()
    elif part == "fused":
        result = part_fused()
    elif part in ("gemv", "gemv-mma"):
        result = part_gemv(mma=part == "gemv-mma")
    else:
        result = part_table(sweep=part == "sweep")
    result["device"] = torch.cuda.get_device_name()
    result["triton"] = tk.triton.__version__
    (OUT / f"lowbit_{part}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
