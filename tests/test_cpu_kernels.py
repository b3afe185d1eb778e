"""llmopt's C++ int8 kernel for the CPU (llmopt/quant/cpu_kernels.py, csrc/int8_linear_cpu.cpp).

Against a float64 reference ``x.double() @ (q.double() * scale[:, None]).T`` on many shapes, odd
ones included (N, K not multiples of 16 or 64), decode and prefill row counts, fp32 and bf16
activations, both vector ISA paths where the CPU has them. Outputs
are poisoned with NaN first, so an element the kernel fails to write cannot pass.

Error bounds, per element, with ``mag = |x| @ |w|.T`` (what the products' rounding scales with):
- fp32 activations: fp32 accumulation, |err| <= 1e-5 * mag (K <= 1,536 here; observed ~1e-7).
- bf16 activations: the bf16 values are exact in fp32 and accumulate the same way; the result is
  rounded to bf16 once: |err| <= 2^-8 * |ref| + 1e-5 * mag.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmopt.quant import cpu_kernels
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import dequantize_int8, quantize_int8

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    cpu_kernels.cpu_isa() == "none", reason="llmopt's CPU kernel needs an x86-64 CPU with AVX2 or AVX-512"
)
ROWS = [1, 2, 3, 7, 16, 33, 64, 130]  # the kernel serves every row count (prefill too)
SHAPES = [(1, 1), (15, 3), (16, 16), (17, 63), (33, 577), (64, 64), (100, 200), (192, 576), (49, 1536)]
ISAS = ["avx2", "avx512"]
FP32_TOL, BF16_TOL = 1e-5, 2.0**-8


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """On a CPU the kernel supports, it must build and load: a failure here is a real failure."""
    assert cpu_kernels.ready(), "the CPU kernel did not build; see the warning"


def make_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02 + 0.001
    return q, scale


def check(out: torch.Tensor, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    w = q.double() * scale.double()[:, None]
    ref = x.double() @ w.T
    mag = x.double().abs() @ w.abs().T
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert not torch.isnan(out).any(), "an output element was never written"
    bound = FP32_TOL * mag + (BF16_TOL * ref.abs() if x.dtype == torch.bfloat16 else 0)
    err = (out.double() - ref).abs()
    worst = float((err / bound.clamp_min(1e-30)).max())
    assert bool((err <= bound).all()), f"error {worst:.2f}x the bound"


def isa_available(isa: str) -> bool:
    return isa == "avx2" or cpu_kernels.kernel_isa() == "avx512"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS)
def test_kernel_matches_float64_reference(m: int, dtype: torch.dtype, isa: str):
    if not isa_available(isa):
        pytest.skip(f"this CPU has no {isa}")
    for n, k in SHAPES:
        q, scale = make_layer(n, k, seed=n * 7919 + k * 31 + m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
        packed = cpu_kernels.pack_int8(q)
        out = torch.full((m, n), float("nan"), dtype=dtype)
        cpu_kernels.int8_linear(x, packed, scale, out=out, isa=isa)
        check(out, x, q, scale)


def test_public_op_and_strided_inputs():
    q, scale = make_layer(33, 577, seed=1)
    packed = cpu_kernels.pack_int8(q)
    wide = torch.randn(5, 2 * 577)
    x = wide[:, ::2]  # not contiguous
    check(torch.ops.llmopt.int8_linear_cpu(x, packed, scale), x, q, scale)
    empty = torch.ops.llmopt.int8_linear_cpu(torch.randn(0, 577), packed, scale)
    assert empty.shape == (0, 33)


def test_pack_round_trips_and_pads_with_zeros():
    q, _ = make_layer(37, 11, seed=2)
    packed = cpu_kernels.pack_int8(q)
    assert packed.shape == (3, 11, 16) and packed.dtype == torch.int8
    assert torch.equal(cpu_kernels.unpack_int8(packed, 37), q)
    assert not packed[2, :, 5:].any()  # rows 37..47 do not exist


def test_bad_inputs_are_refused():
    q, scale = make_layer(32, 64, seed=3)
    packed = cpu_kernels.pack_int8(q)
    with pytest.raises(RuntimeError, match="K="):
        torch.ops.llmopt.int8_linear_cpu(torch.randn(2, 65), packed, scale)
    with pytest.raises(RuntimeError, match="does not match"):
        torch.ops.llmopt.int8_linear_cpu(torch.randn(2, 64), packed, scale[:8])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.llmopt.int8_linear_cpu(torch.randn(2, 64, dtype=torch.float64), packed, scale)


def test_fake_implementation_is_consistent():
    q, scale = make_layer(40, 64, seed=4)
    args = (torch.randn(3, 64), cpu_kernels.pack_int8(q), scale)
    torch.library.opcheck(torch.ops.llmopt.int8_linear_cpu.default, args)


def test_compiles_as_one_opaque_call():
    q, scale = make_layer(48, 64, seed=5)
    packed = cpu_kernels.pack_int8(q)
    bias = torch.randn(48)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(torch.ops.llmopt.int8_linear_cpu(x * 2.0, packed, scale) + bias)

    x = torch.randn(2, 64)
    compiled = torch.compile(f, fullgraph=True, dynamic=False)  # fullgraph: a graph break would raise
    torch.testing.assert_close(compiled(x), f(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_on_cpu_selects_it(dtype: torch.dtype):
    torch.manual_seed(6)
    n, k = 72, 96
    w, bias = torch.randn(n, k) * 0.05, torch.randn(n)
    q, scale = quantize_int8(w, torch.bfloat16)
    layer = QuantLinear.from_quantized(LayerShape("int8", k, n, None), q, scale, None, bias, CPU, dtype)
    assert layer.kernel.name == "llmopt.int8_linear_cpu"
    assert "kernel=llmopt.int8_linear_cpu" in layer.extra_repr()
    assert {name for name, _ in layer.named_buffers()} == {"weight_packed", "scales"}
    ref_w = dequantize_int8(q, scale).double()
    for m in (1, 5, 200):  # decode and prefill rows: all through the kernel
        x = torch.randn(2, m, k).to(dtype)  # leading dims are kept
        out = layer(x)
        ref = x.double() @ ref_w.T + bias.double().to(dtype).double()
        assert out.shape == (2, m, n) and out.dtype == dtype
        rel = float((out.double() - ref).norm() / ref.norm())
        assert rel < (1e-6 if dtype == torch.float32 else 1e-2), (m, rel)


def test_concat_fuses_layers_over_the_same_input():
    kernel = cpu_kernels.CpuInt8Kernel()
    parts, qs, scales = [], [], []
    for i, n in enumerate((24, 8, 40)):  # not multiples of 16: the blocks are repacked
        q, scale = make_layer(n, 50, seed=10 + i)
        qs.append(q)
        scales.append(scale)
        parts.append(kernel.prepare(q, scale, None, LayerShape("int8", 50, n, None), CPU, torch.float32))
    fused = kernel.concat(parts)
    x = torch.randn(3, 50)
    out = kernel.matmul(x, fused, LayerShape("int8", 50, 72, None))
    check(out, x, torch.cat(qs), torch.cat(scales))


def test_without_a_compiler_int8_layers_fall_back_with_one_warning(tmp_path):
    """No usable compiler (CXX points at one that fails): one warning naming the fix, and int8
    layers take torch's op. In a subprocess: this process has already loaded the library."""
    code = """
import warnings, torch
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    layers = [
        QuantLinear.from_quantized(LayerShape("int8", 32, 16, None), torch.ones(16, 32, dtype=torch.int8),
                                   torch.ones(16), None, None, torch.device("cpu"), torch.float32)
        for _ in range(3)
    ]
mine = [str(w.message) for w in caught if "CPU kernels are unavailable" in str(w.message)]
assert len(mine) == 1, mine
assert "aten._weight_int8pack_mm" in mine[0] and "g++" in mine[0], mine[0]
assert {layer.kernel.name for layer in layers} == {"aten._weight_int8pack_mm"}
print("ok")
"""
    env = {**os.environ, "CXX": "false", "LLMOPT_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_concurrent_builds_compile_once(tmp_path, monkeypatch):
    """Two builders of one key (threads here; processes behave the same, the lock is a file lock):
    the compiler runs once, the second waits and loads the first one's library. A stand-in
    command replaces the real compiler, so this takes a second, not a build."""
    import threading

    runs: list[int] = []

    def fake_command(cxx, source, target):
        runs.append(1)
        return ["sh", "-c", f"sleep 0.5; printf lib > '{target}'"]

    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_build_command", fake_command)
    results: list[tuple] = []
    threads = [threading.Thread(target=lambda: results.append(cpu_kernels.build_library())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1
    (path_a, secs_a), (path_b, secs_b) = results
    assert path_a == path_b and path_a.read_text() == "lib" and sorted([secs_a, secs_b])[0] == 0.0
    assert not list(path_a.parent.glob("*.tmp.so"))
