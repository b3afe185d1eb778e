"""Check llmopt's quantized-matmul kernels on a GPU: correctness, CUDA-graph capture, speed.

Run from the repo root:  PYTHONPATH=. python examples/gpu_kernel_check.py
(``--device cpu --small`` runs the same harness on CPU, for a dry run without a GPU.)

Imports only the torch-only parts of llmopt (quant.schemes, quant.kernels, quant.linear, errors).

1. Correctness: for several (N, K) and batch sizes M, random weights (randn * 0.02) are quantized
   with ``quantize_int8`` / ``quantize_int4`` (bf16 scales), a ``QuantLinear`` is built on the
   device in bf16, and its output is compared with ``x.double() @ dequant(W).double().T`` by
   relative Frobenius error. PASS means no NaN/Inf and rel_err < 1e-2.
2. Diagnosis: on one small shape the effective weight each kernel uses is read back (matmul with
   the identity) and compared element-wise with the dequantized weight, for the packing llmopt uses
   and for the alternative nibble order, so a packing bug is pinned down exactly.
3. CUDA graphs: one QuantLinear forward is captured (after warm-up on a side stream), replayed on a
   new input written into the static input, and compared with the eager output.
4. Timing (informational): M=1, int8 / int4 QuantLinear vs bf16 nn.Linear, median of 50 CUDA-event
   timings; several copies of each layer are cycled so the weights do not sit in L2.

Results go to $OUT/kernel_check.json (or ./kernel_check.json); the table is printed last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import traceback

import torch
from gpu_lowbit_kernels import capture  # examples/ is on sys.path when this script runs
from torch import nn

from llmopt.errors import UnsupportedError
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

SHAPES = [(576, 576), (1536, 576), (576, 1536), (4096, 4096), (14336, 4096), (4096, 14336), (49152, 576)]
SMALL_SHAPES = [(576, 576), (1536, 576), (256, 1024)]
BATCHES = [1, 7, 32, 300]
GROUPS = [64, 128]
TOL = 1e-2
DTYPE = torch.bfloat16


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return (out.double() - ref).norm().item() / ref.norm().item()


def build(scheme: str, w: torch.Tensor, group: int | None, device: torch.device):
    """Quantize w (on its own device), build the QuantLinear, return (layer, dequantized weight)."""
    n, k = w.shape
    with torch.device(w.device):  # quantize_int4 allocates its search buffers on the default device
        if scheme == "int8":
            q, scale = quantize_int8(w, DTYPE)
            zp = None
            wd = dequantize_int8(q, scale)
        else:
            q, scale, zp = quantize_int4(w, group, DTYPE)
            wd = dequantize_int4(q, scale, zp, group)
    shape = LayerShape(scheme=scheme, in_features=k, out_features=n, group_size=group)
    layer = QuantLinear.from_quantized(shape, q, scale, zp, None, device, DTYPE)
    return layer, wd, (q, scale, zp)


def check_correctness(shapes, device, results):
    rows = []
    for si, (n, k) in enumerate(shapes):
        cases = [("int8", None)] + [("int4", g) for g in GROUPS if k % g == 0]
        for ci, (scheme, group) in enumerate(cases):
            torch.manual_seed(1000 * si + ci)
            w = torch.randn(n, k, device=device) * 0.02
            try:
                layer, wd, (q, scale, zp) = build(scheme, w, group, device)
                kname = layer.kernel.name
            except Exception as e:
                status = "UNSUPPORTED" if isinstance(e, UnsupportedError) else "ERROR"
                rows.append(
                    dict(
                        scheme=scheme,
                        N=n,
                        K=k,
                        M=None,
                        group=group,
                        rel_err=None,
                        status=status,
                        kernel=None,
                        error=f"build: {type(e).__name__}: {e}",
                    )
                )
                print(f"[build error] {scheme} {n}x{k} g={group}: {e}", flush=True)
                continue
            wd64 = wd.to(device).double()
            # tinygemm stores zero = -zp*scale in bf16; this reference uses exactly what the kernel holds.
            wd_bf16zero = None
            if scheme == "int4":
                g = group
                s = scale.float().to(device)
                zero = (-zp.float().to(device) * s).to(DTYPE).float()
                wd_bf16zero = (
                    ((q.float().to(device).reshape(n, k // g, g) * s.unsqueeze(-1)) + zero.unsqueeze(-1))
                    .reshape(n, k)
                    .double()
                )
            for m in BATCHES:
                x = torch.randn(m, k, device=device).to(DTYPE)
                row = dict(scheme=scheme, N=n, K=k, M=m, group=group, kernel=kname)
                try:
                    out = layer(x)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    ref = x.double() @ wd64.T
                    finite = bool(torch.isfinite(out).all().item())
                    err = rel_err(out, ref)
                    row["rel_err"] = err
                    row["out_dtype"] = str(out.dtype)
                    row["out_shape"] = list(out.shape)
                    if wd_bf16zero is not None:
                        row["rel_err_vs_bf16_zero_ref"] = rel_err(out, x.double() @ wd_bf16zero.T)
                    ok = (
                        finite
                        and math.isfinite(err)
                        and err < TOL
                        and out.dtype == DTYPE
                        and tuple(out.shape) == (m, n)
                    )
                    row["finite"] = finite
                    row["status"] = "PASS" if ok else "FAIL"
                except Exception as e:
                    row.update(rel_err=None, status="ERROR", error=f"{type(e).__name__}: {e}")
                rows.append(row)
                print(
                    f"{scheme:5s} N={n:6d} K={k:6d} M={m:4d} g={group!s:4s} "
                    f"err={row.get('rel_err')!s:24s} {row['status']} {kname}",
                    flush=True,
                )
            del layer, wd, wd64, wd_bf16zero, q, scale, zp, w
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results["correctness"] = rows
    return rows


def diagnose_packing(device, results):
    """Read back the effective weight of each kernel (y = I @ W_eff^T) and compare element-wise."""
    diag = {}
    n, k, g = 256, 1024, 128
    torch.manual_seed(7)
    w = torch.randn(n, k, device=device) * 0.02
    eye = torch.eye(k, device=device, dtype=DTYPE)
    # int8
    try:
        layer, wd, _ = build("int8", w, None, device)
        w_eff = layer(eye).float().T  # (N, K)
        diag["int8"] = dict(
            max_abs_diff=(w_eff - wd.to(device)).abs().max().item(), max_abs_w=wd.abs().max().item()
        )
    except Exception as e:
        diag["int8"] = dict(error=f"{type(e).__name__}: {e}")
    # int4: llmopt's layout, then alternatives packed by hand
    try:
        with torch.device(device):
            q, scale, zp = quantize_int4(w, g, DTYPE)
        wd = dequantize_int4(q, scale, zp, g).to(device)
        s = scale.float().to(device)
        zero = -zp.float().to(device) * s
        sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(DTYPE)
        zero_bf = zero.to(DTYPE).float()
        wd_kernel = (
            q.float().to(device).reshape(n, k // g, g) * s.unsqueeze(-1) + zero_bf.unsqueeze(-1)
        ).reshape(n, k)
        shape = LayerShape(scheme="int4", in_features=k, out_features=n, group_size=g)
        layer = QuantLinear.from_quantized(shape, q, scale, zp, None, device, DTYPE)
        w_eff = layer(eye).float().T
        diag["int4_llmopt"] = dict(
            kernel=layer.kernel.name,
            max_abs_diff_vs_dequant=(w_eff - wd).abs().max().item(),
            max_abs_diff_vs_bf16zero=(w_eff - wd_kernel).abs().max().item(),
            max_abs_w=wd.abs().max().item(),
        )
        if device.type == "cuda":
            u = (q.to(torch.int32) + 8).to(device).to(torch.uint8)
            alts = {
                "even_hi  (u[:, ::2] << 4 | u[:, 1::2])  [llmopt]": (u[:, ::2] << 4 | u[:, 1::2]),
                "odd_hi   (u[:, 1::2] << 4 | u[:, ::2])": (u[:, 1::2] << 4 | u[:, ::2]),
            }
            for name, packed_in in alts.items():
                try:
                    packed = torch.ops.aten._convert_weight_to_int4pack(packed_in.contiguous(), 8)
                    y = torch.ops.aten._weight_int4pack_mm(eye, packed, g, sz).float().T
                    diag[f"int4_alt {name}"] = dict(
                        max_abs_diff_vs_bf16zero=(y - wd_kernel).abs().max().item()
                    )
                except Exception as e:
                    diag[f"int4_alt {name}"] = dict(error=f"{type(e).__name__}: {e}")
    except Exception as e:
        diag["int4"] = dict(error=f"{type(e).__name__}: {e}", tb=traceback.format_exc())
    if device.type == "cuda":
        # K=576 is not a multiple of 8*16: does a smaller inner_k_tiles handle it correctly?
        n2, k2, g2 = 576, 576, 64
        torch.manual_seed(8)
        w2 = torch.randn(n2, k2, device=device) * 0.02
        with torch.device(device):
            q, scale, zp = quantize_int4(w2, g2, DTYPE)
        s = scale.float()
        zero = -zp.float() * s
        sz = torch.stack([s, zero], dim=-1).transpose(0, 1).contiguous().to(DTYPE)
        wk = (
            q.float().reshape(n2, k2 // g2, g2) * s.unsqueeze(-1) + zero.to(DTYPE).float().unsqueeze(-1)
        ).reshape(n2, k2)
        u = (q.to(torch.int32) + 8).to(torch.uint8)
        eye2 = torch.eye(k2, device=device, dtype=DTYPE)
        for ikt in (2, 4, 8):
            key = f"int4_K576_g64_inner_k_tiles={ikt}"
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack(
                    (u[:, ::2] << 4 | u[:, 1::2]).contiguous(), ikt
                )
                y = torch.ops.aten._weight_int4pack_mm(eye2, packed, g2, sz).float().T
                xr = torch.randn(7, k2, device=device).to(DTYPE)
                yr = torch.ops.aten._weight_int4pack_mm(xr, packed, g2, sz)
                diag[key] = dict(
                    max_abs_diff_vs_bf16zero=(y - wk).abs().max().item(),
                    rel_err_M7=rel_err(yr, xr.double() @ wk.double().T),
                )
            except Exception as e:
                diag[key] = dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    results["packing_diagnosis"] = diag
    for key, val in diag.items():
        print(f"[diag] {key}: {val}", flush=True)


def check_cuda_graph(device, results):
    out = {}
    n, k, m = 4096, 4096, 7
    for scheme, group in [("int8", None), ("int4", 128)]:
        try:
            torch.manual_seed(11)
            w = torch.randn(n, k, device=device) * 0.02
            layer, _, _ = build(scheme, w, group, device)
            static_x = torch.randn(m, k, device=device).to(DTYPE)
            captured: list[torch.Tensor] = []
            graph = capture(
                lambda f=layer, x=static_x, c=captured: c.append(f(x)),
                warmup=lambda f=layer, x=static_x: [f(x) for _ in range(3)],
            )
            static_y = captured[0]
            new_x = torch.randn(m, k, device=device).to(DTYPE)
            static_x.copy_(new_x)
            graph.replay()
            torch.cuda.synchronize()
            eager = layer(new_x)
            torch.cuda.synchronize()
            diff = (static_y.float() - eager.float()).abs().max().item()
            out[scheme] = dict(
                kernel=layer.kernel.name,
                captured=True,
                max_abs_diff_vs_eager=diff,
                bitwise_equal=bool(torch.equal(static_y, eager)),
                status="PASS" if diff == 0.0 or diff < 1e-6 else "FAIL",
            )
        except Exception as e:
            out[scheme] = dict(captured=False, status="ERROR", error=f"{type(e).__name__}: {e}")
        print(f"[cuda graph] {scheme}: {out[scheme]}", flush=True)
    results["cuda_graph"] = out


def _time(fn, reps=50, warm=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def timing(device, results):
    out = []
    copies = 4  # cycle distinct copies so one layer's weights are not still in L2
    for n, k in [(14336, 4096), (4096, 14336)]:
        torch.manual_seed(21)
        w = torch.randn(n, k, device=device) * 0.02
        x = torch.randn(1, k, device=device).to(DTYPE)
        variants = {}
        lin = [nn.Linear(k, n, bias=False, device=device, dtype=DTYPE) for _ in range(copies)]
        for L in lin:
            L.weight.data.copy_(w)
        variants["bf16 nn.Linear"] = (lin, n * k * 2)
        for scheme, group in [("int8", None), ("int4", 128)]:
            layers = [build(scheme, w, group, device)[0] for _ in range(copies)]
            nbytes = sum(b.numel() * b.element_size() for b in layers[0].buffers())
            variants[f"{scheme}" + (f" g{group}" if group else "") + f" ({layers[0].kernel.name})"] = (
                layers,
                nbytes,
            )
        for name, (layers, nbytes) in variants.items():

            def run(layers=layers, x=x):
                for L in layers:
                    L(x)

            ms = _time(run) / copies
            # the same, replayed from a CUDA graph (no Python/launch overhead)
            graph_ms = None
            try:
                g = capture(lambda run=run: [run() for _ in range(5)], warmup=run)
                graph_ms = _time(g.replay) / (5 * copies)
            except Exception as e:
                print(f"[timing] graph failed for {name}: {e}", flush=True)
            row = dict(
                N=n,
                K=k,
                M=1,
                variant=name,
                weight_bytes=nbytes,
                eager_us=ms * 1e3,
                eager_GBps=nbytes / (ms * 1e-3) / 1e9,
                graph_us=None if graph_ms is None else graph_ms * 1e3,
                graph_GBps=None if graph_ms is None else nbytes / (graph_ms * 1e-3) / 1e9,
            )
            out.append(row)
            print(
                f"[timing] {n}x{k} {name:45s} bytes={nbytes / 1e6:7.1f}MB eager {row['eager_us']:7.1f}us "
                f"{row['eager_GBps']:7.0f}GB/s | graph "
                f"{row['graph_us'] if graph_ms is None else round(row['graph_us'], 1)}us "
                f"{'-' if graph_ms is None else round(row['graph_GBps'])}GB/s",
                flush=True,
            )
        del variants, lin
        torch.cuda.empty_cache()
    results["timing"] = out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes only (CPU dry run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    results: dict = dict(torch=torch.__version__, device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        results.update(
            gpu=props.name, capability=list(torch.cuda.get_device_capability(0)), cuda=torch.version.cuda
        )
    print(
        f"torch {torch.__version__} device {results.get('gpu', device)} cuda {torch.version.cuda}", flush=True
    )

    shapes = SMALL_SHAPES if args.small else SHAPES
    diagnose_packing(device, results)
    rows = check_correctness(shapes, device, results)
    if device.type == "cuda":
        check_cuda_graph(device, results)
        try:
            timing(device, results)
        except Exception as e:
            results["timing_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()

    n_pass = sum(r["status"] == "PASS" for r in rows)
    n_uns = sum(r["status"] == "UNSUPPORTED" for r in rows)
    n_bad = len(rows) - n_pass - n_uns
    results["summary"] = dict(passed=n_pass, unsupported=n_uns, failed_or_error=n_bad, total=len(rows))
    out_dir = os.environ.get("OUT", ".")
    with open(os.path.join(out_dir, "kernel_check.json"), "w") as f:
        json.dump(results, f, indent=1)

    print("\n=== correctness table ===")
    hdr = f"{'scheme':6s} {'N':>6s} {'K':>6s} {'M':>4s} {'group':>5s} {'rel_err':>10s} {'err_bf16z':>10s}"
    print(hdr + " status kernel")
    for r in rows:
        e = "-" if r.get("rel_err") is None else f"{r['rel_err']:.3e}"
        e2 = "-" if r.get("rel_err_vs_bf16_zero_ref") is None else f"{r['rel_err_vs_bf16_zero_ref']:.3e}"
        print(
            f"{r['scheme']:6s} {r['N']:6d} {r['K']:6d} {r['M']!s:>4s} {r['group'] or '-'!s:>5s} "
            f"{e:>10s} {e2:>10s} {r['status']:6s} {r['kernel'] or '-'}"
            + (f"  {r['error']}" if r.get("error") else "")
        )
    print(f"summary: {n_pass} PASS, {n_bad} FAIL/ERROR, {n_uns} UNSUPPORTED (no kernel), of {len(rows)}")
    if "cuda_graph" in results:
        for s, v in results["cuda_graph"].items():
            print(f"cuda graph {s}: {v}")
    return 0 if n_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
