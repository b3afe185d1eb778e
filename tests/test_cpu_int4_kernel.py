"""llmopt's C++ int4 kernel for the CPU (llmopt/quant/cpu_kernels.py, csrc/int4_linear_cpu.cpp).

Against a float64 reference ``x.double() @ W.T`` with ``W = (q - zp) * scale`` per group, on odd
shapes (N not a multiple of 16, groups from 2 to 128, K from 2 to 1,536), decode and prefill row
counts, fp32 and bf16 activations, both vector ISA paths where the CPU has them; outputs poisoned
with NaN first. Error bounds per element, with ``mag = |x| @ |W|.T``: fp32 activations
|err| <= 1e-5 * mag (the per-group zero point is subtracted from fp32 sums, as the kernel does);
bf16 activations add the result's rounding to bf16, 2^-8 * |ref|.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.quant import cpu_kernels
from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import quantize_int4

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    cpu_kernels.cpu_isa() == "none", reason="llmopt's CPU kernels need an x86-64 CPU with AVX2 or AVX-512"
)
SHAPES = [(1, 2, 2), (17, 64, 32), (100, 192, 64), (33, 128, 128), (49, 1536, 64), (16, 96, 16)]  # (N, K, G)
ROWS = [1, 3, 4, 7, 130]
FP32_TOL, BF16_TOL = 1e-5, 2.0**-8


def make_layer(n: int, k: int, group: int, seed: int):
    """(q, scale, zp), the kernel's buffers, and the float64 weight they stand for."""
    g = torch.Generator().manual_seed(seed)
    q, scale, zp = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group, torch.float32)
    w = (q.double().view(n, -1, group) - zp.double().view(n, -1, 1)) * scale.double().view(n, -1, 1)
    shape = LayerShape("int4", k, n, group)
    buffers = cpu_kernels.CpuInt4Kernel().prepare(q, scale, zp, shape, CPU, torch.float32)
    return (q, scale, zp), buffers, w.view(n, k)


def check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = x.double() @ w.T
    mag = x.double().abs() @ w.abs().T
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert not torch.isnan(out).any(), "an output element was never written"
    bound = FP32_TOL * mag + (BF16_TOL * ref.abs() if x.dtype == torch.bfloat16 else 0)
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"error {float((err / bound.clamp_min(1e-30)).max()):.2f}x the bound"


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", ROWS)
def test_kernel_matches_float64_reference(m: int, dtype: torch.dtype, isa: str):
    if isa == "avx512" and cpu_kernels.kernel_isa() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    for n, k, group in SHAPES:
        _, b, w = make_layer(n, k, group, seed=n * 31 + k + m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(dtype)
        out = torch.full((m, n), float("nan"), dtype=dtype)
        cpu_kernels.int4_linear(x, b["weight_packed"], b["scales"], b["zeros"], group, out=out, isa=isa)
        check(out, x, w)


def test_pack_round_trips_and_pads_with_zeros():
    (q, _, _), b, _ = make_layer(37, 12, 4, seed=1)
    packed = b["weight_packed"]
    assert packed.shape == (3, 6, 16) and packed.dtype == torch.uint8
    assert torch.equal(cpu_kernels.unpack_int4(packed, 37), q.to(torch.int8))
    assert not packed[2, :, 5:].any()  # channels 37..47 do not exist


def test_bad_inputs_are_refused():
    _, b, _ = make_layer(32, 64, 32, seed=2)
    args = (b["weight_packed"], b["scales"], b["zeros"])
    with pytest.raises(RuntimeError, match="K="):
        torch.ops.llmopt.int4_linear_cpu(torch.randn(2, 66), *args, 32)
    with pytest.raises(RuntimeError, match="group"):
        torch.ops.llmopt.int4_linear_cpu(torch.randn(2, 64), *args, 24)
    with pytest.raises(RuntimeError, match="does not match"):
        short = (b["weight_packed"], b["scales"][:8], b["zeros"][:8])
        torch.ops.llmopt.int4_linear_cpu(torch.randn(2, 64), *short, 32)


def test_fake_implementation_and_compile():
    _, b, w = make_layer(40, 64, 32, seed=3)
    args = (torch.randn(3, 64), b["weight_packed"], b["scales"], b["zeros"], 32)
    torch.library.opcheck(torch.ops.llmopt.int4_linear_cpu.default, args)
    compiled = torch.compile(lambda x: torch.ops.llmopt.int4_linear_cpu(x * 2.0, *args[1:]), fullgraph=True)
    x = torch.randn(2, 64)
    check(compiled(x) / 2.0, x, w)


def test_quant_linear_on_cpu_selects_it_and_fuses():
    """A QuantLinear picks the kernel; stacking layers (what the engine does for q/k/v) repacks the
    blocks and gives the layers' outputs side by side."""
    layers, ws = [], []
    for i, n in enumerate((24, 8, 40)):  # not multiples of 16
        (q, scale, zp), _, w = make_layer(n, 128, 64, seed=10 + i)
        shape = LayerShape("int4", 128, n, 64)
        layer = QuantLinear.from_quantized(shape, q, scale, zp, None, CPU, torch.float32)
        assert layer.kernel.name == "llmopt.int4_linear_cpu"
        layers.append(layer)
        ws.append(w)
    fused = QuantLinear.fuse(layers)
    assert fused is not None and fused.out_features == 72
    x = torch.randn(5, 128)
    check(fused(x), x, torch.cat(ws))
