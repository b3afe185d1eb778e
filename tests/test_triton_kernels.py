"""llmopt's Triton int8/int4 kernels (llmopt/quant/triton_kernels.py), under Triton's interpreter.

Without a GPU, conftest sets TRITON_INTERPRET=1 and the kernels run on CPU tensors: the same
index arithmetic, masks, split-K partial sums and layouts as on the GPU. One difference: the
interpreter's bf16 ``tl.dot`` is wrong, so there the dot takes fp32 operands (the GPU feeds bf16 or
fp16 to the tensor cores; examples/gpu_lowbit_kernels.py runs these same checks on the card).

Reference: ``x.double() @ dequant(W).double().T``. Outputs are poisoned with NaN first, so an
element the kernel never writes fails. With fp32 inputs the only error is fp32 accumulation:
relative Frobenius error <= 1e-5 (observed ~2e-7).
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("these run under Triton's interpreter (a GPU machine checks the compiled kernels)",
                allow_module_level=True)  # fmt: skip

import triton.language as tl  # noqa: E402

from llmopt.quant import triton_kernels as tk  # noqa: E402
from llmopt.quant.kernels import LayerShape  # noqa: E402
from llmopt.quant.linear import QuantLinear  # noqa: E402
from llmopt.quant.schemes import quantize_int4, quantize_int8  # noqa: E402

CPU = torch.device("cpu")
REL_TOL = 1e-5


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    return ((y.double() - ref).norm() / ref.norm()).item()


def poisoned(m: int, n: int) -> torch.Tensor:
    return torch.full((m, n), float("nan"))


def int8_layer(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, scale = quantize_int8(torch.randn(n, k, generator=g) * 0.05, torch.float32)
    return q, scale.reshape(-1), q.double() * scale.double()


def int4_layer(n: int, k: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, scale, zp = quantize_int4(torch.randn(n, k, generator=g) * 0.05, group, torch.float32)
    deq = (q.double().view(n, -1, group) - zp.double().view(n, -1, 1)) * scale.double().view(n, -1, 1)
    buffers = tk.TritonInt4Kernel().prepare(q, scale, zp, LayerShape("int4", k, n, group), CPU, torch.float32)
    return buffers, deq.view(n, k)


# (M, N, K): one row and several, N and K off every block size, K not a multiple of 16.
INT8_SHAPES = [(1, 33, 577), (2, 64, 256), (3, 100, 1000), (16, 17, 129), (17, 70, 300), (32, 37, 515)]


@pytest.mark.parametrize(("m", "n", "k"), INT8_SHAPES)
def test_int8_matches_dequantized_reference(m: int, n: int, k: int) -> None:
    q, scale, w = int8_layer(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    out = tk.int8_matmul(x, q, scale, out=poisoned(m, n))
    assert rel_err(out, x.double() @ w.T) < REL_TOL


@pytest.mark.parametrize(("split_k", "weight_left"), [(1, False), (2, False), (3, False), (8, False),
                                                      (1, True), (3, True)])  # fmt: skip
def test_int8_split_k_sums_every_slice_once(split_k: int, weight_left: bool) -> None:
    """Split K (fp32 partials summed in a fixed order, scale applied after the sum) equals no split;
    so does the transposed product (weight tile as the left operand), written back transposed."""
    m, n, k = 3, 45, 700
    q, scale, w = int8_layer(n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    cfg = tk.TileConfig(block_m=16, block_n=32, block_k=64, split_k=split_k, num_warps=4, num_stages=2,
                        weight_left=weight_left)  # fmt: skip
    out = tk.int8_matmul(x, q, scale, out=poisoned(m, n), config=cfg)
    assert rel_err(out, x.double() @ w.T) < REL_TOL


def rows_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 as the kernel defines it: scale = absmax / 127 (fp32), round half away from 0."""
    scale = (x.abs().amax(dim=1) / 127.0).clamp(min=1e-30)
    v = x / scale[:, None]
    return (torch.sign(v) * torch.floor(v.abs() + 0.5)).to(torch.int8), scale


def test_row_quantizer_is_exact() -> None:
    """Odd K, K over one step (1,024 inputs), a row of zeros, a row with one large outlier."""
    x = torch.randn(5, 2500, generator=torch.Generator().manual_seed(7))
    x[2] = 0.0
    x[3, 17] = 300.0
    q, scale = tk.quantize_rows(x)
    ref_q, ref_scale = rows_reference(x)
    assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale)
    assert q.abs().max() == 127 and not q[2].any()


# With LLMOPT_INT8_ACTIVATIONS=1, from W8A8_MIN_ROWS rows on, int8 layers quantize their
# activations per row and run int8 x int8.
@pytest.mark.parametrize(("m", "n", "k"), [(33, 33, 577), (70, 100, 300), (130, 64, 1000)])
def test_w8a8_from_many_rows_matches_its_reference(
    m: int, n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOPT_INT8_ACTIVATIONS", "1")
    assert m >= tk.W8A8_MIN_ROWS
    q, scale, w = int8_layer(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    out = tk.int8_matmul(x, q, scale, out=poisoned(m, n))
    xq, xs = rows_reference(x)
    assert rel_err(out, (xq.double() * xs.double()[:, None]) @ w.T) < REL_TOL
    # Against weight-only: the activations' rounding alone, ~0.7% on Gaussian rows.
    assert rel_err(out, x.double() @ w.T) < 2e-2


@pytest.mark.parametrize("split_k", [1, 2, 3])
def test_w8a8_split_k_sums_every_slice_once(split_k: int) -> None:
    m, n, k = 70, 45, 700
    q, scale, w = int8_layer(n, k, seed=1)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    cfg = tk.TileConfig(block_m=64, block_n=32, block_k=64, split_k=split_k, num_warps=4, num_stages=2)
    out = tk.w8a8_matmul(x, q, scale, out=poisoned(m, n), config=cfg)
    xq, xs = rows_reference(x)
    assert rel_err(out, (xq.double() * xs.double()[:, None]) @ w.T) < REL_TOL


def test_int8_stays_weight_only_at_many_rows_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOPT_INT8_ACTIVATIONS", raising=False)
    q, scale, w = int8_layer(33, 300, seed=5)
    x = torch.randn(80, 300, generator=torch.Generator().manual_seed(5))
    assert rel_err(tk.int8_matmul(x, q, scale, out=poisoned(80, 33)), x.double() @ w.T) < REL_TOL


@pytest.mark.parametrize(("m", "n", "k", "group"), [
    (1, 33, 576, 64), (2, 64, 256, 32), (5, 100, 384, 128), (17, 48, 512, 256), (33, 20, 1024, 128),
])  # fmt: skip
def test_int4_matches_dequantized_reference(m: int, n: int, k: int, group: int) -> None:
    buffers, w = int4_layer(n, k, group, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    out = tk.int4_matmul(
        x, buffers["weight_int4"], buffers["scales"], buffers["zeros"], group, out=poisoned(m, n)
    )
    assert rel_err(out, x.double() @ w.T) < REL_TOL


@pytest.mark.parametrize(("split_k", "weight_left"),
                         [(1, False), (2, False), (5, False), (1, True), (2, True)])  # fmt: skip
def test_int4_split_k_and_several_groups_per_step(split_k: int, weight_left: bool) -> None:
    m, n, k, group = 4, 70, 1024, 64
    buffers, w = int4_layer(n, k, group, seed=3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    cfg = tk.TileConfig(block_m=16, block_n=32, block_k=256, split_k=split_k, num_warps=4, num_stages=2,
                        weight_left=weight_left)  # fmt: skip
    out = tk.int4_matmul(x, buffers["weight_int4"], buffers["scales"], buffers["zeros"], group,
                         out=poisoned(m, n), config=cfg)  # fmt: skip
    assert rel_err(out, x.double() @ w.T) < REL_TOL


def test_int4_layout_and_dequantize_are_exact() -> None:
    """Byte j of a group: input j in the low nibble, input j + G/2 in the high one, each as q + 8."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(2, 4)  # (2, 64)
    packed = tk.pack_int4_halves(q, group=32)
    assert packed.shape == (2, 32)
    assert packed[0, 0].item() == (q[0, 0] + 8) | ((q[0, 16] + 8) << 4)
    assert packed[1, 17].item() == (q[1, 33] + 8) | ((q[1, 49] + 8) << 4)
    buffers, w = int4_layer(37, 512, 128, seed=5)
    dense = tk.int4_dequantize(
        buffers["weight_int4"], buffers["scales"], buffers["zeros"], 128, torch.float32
    )
    assert torch.equal(dense, w.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_dequantize_is_exact(dtype: torch.dtype) -> None:
    """The prefill path's dense copy: q * scale rounded once to the activation dtype, every element
    of an odd shape written."""
    q, scale, _ = int8_layer(37, 1100, seed=6)
    scale = scale.to(dtype)
    dense = tk.int8_dequantize(q, scale, dtype)
    assert torch.equal(dense, (q.float() * scale.float()[:, None]).to(dtype))


@pytest.mark.parametrize("dtype", [tl.float16, tl.float32])
def test_nibble_conversion_is_exact(dtype) -> None:
    """The GPU's 16-bit path ORs nibbles into a float's mantissa instead of converting integers."""

    @triton.jit
    def convert(nib_ptr, zero_ptr, out_ptr, DTYPE: tl.constexpr):
        r = tl.arange(0, 16)
        nib = tl.load(nib_ptr + r[:, None] * 16 + r[None, :])
        out = tk._nibbles_to_float(nib, tl.load(zero_ptr + r)[None, :], DTYPE)
        tl.store(out_ptr + r[:, None] * 16 + r[None, :], out.to(tl.float32))

    nib = torch.arange(256, dtype=torch.int32).remainder(16).to(torch.uint8).view(16, 16)
    zero = torch.arange(15, -1, -1, dtype=torch.uint8)
    out = poisoned(16, 16)
    convert[(1,)](nib, zero, out, DTYPE=dtype)
    assert torch.equal(out, nib.float() - zero.float()[None, :])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_layers_equal_separate_ones(scheme: str) -> None:
    """QuantLinear.fuse stacks q/k/v-like layers (with and without bias) into one matmul."""
    k, group = 256, 64
    kernel = tk.TritonInt8Kernel() if scheme == "int8" else tk.TritonInt4Kernel()
    layers = []
    for i, n in enumerate((48, 16, 16)):
        g = torch.Generator().manual_seed(i)
        w = torch.randn(n, k, generator=g) * 0.05
        if scheme == "int8":
            q, scale = quantize_int8(w, torch.float32)
            zp = None
        else:
            q, scale, zp = quantize_int4(w, group, torch.float32)
        shape = LayerShape(scheme, k, n, group if scheme == "int4" else None)
        bias = torch.randn(n, generator=g) if i != 1 else None
        layers.append(
            QuantLinear(shape, kernel, kernel.prepare(q, scale, zp, shape, CPU, torch.float32), bias)
        )
    x = torch.randn(3, k)
    separate = torch.cat([layer(x) for layer in layers], dim=-1)
    fused = QuantLinear.fuse(layers)
    assert fused is not None and fused.out_features == 80
    assert torch.allclose(fused(x), separate, rtol=1e-5, atol=1e-6)


def test_custom_op_traces_under_torch_compile() -> None:
    """The op's fake implementation lets torch.compile trace through it as one opaque call."""
    q, scale, w = int8_layer(40, 96, seed=6)
    fn = torch.compile(
        lambda t: torch.ops.llmopt.int8_mm(t, q, scale) * 2, backend="aot_eager", fullgraph=True
    )
    x = torch.randn(2, 96)
    assert rel_err(fn(x), 2 * (x.double() @ w.T)) < REL_TOL


def test_tile_choice_keeps_every_sm_busy() -> None:
    """Decode shapes: 16-row tiles; K is split when a narrow output leaves SMs idle; never when wide."""
    narrow = tk.choose_config("int8", 1, 4096, 4096, None, sms=132)
    wide = tk.choose_config("int8", 1, 28672, 4096, None, sms=132)
    assert narrow.block_m == wide.block_m == 16
    assert narrow.split_k > 1 and (4096 // narrow.block_n) * narrow.split_k >= 0.9 * 132
    assert wide.split_k == 1
    assert tk.choose_config("int4", 1, 4096, 4096, 128, sms=132).block_k % 128 == 0
    assert tk.choose_config("int8", 128, 4096, 4096, None, sms=132).block_m == 128
    # int4 puts the dequantized weight on the left of the mma from 17 rows on; int8 never does.
    assert not tk.choose_config("int4", 16, 4096, 4096, 128, sms=132).weight_left
    assert tk.choose_config("int4", 17, 4096, 4096, 128, sms=132).weight_left
    assert not any(tk.choose_config("int8", m, 4096, 4096, None, sms=132).weight_left for m in (1, 32, 128))
    # W8A8 (33 rows on): 64-row tiles up to 64 rows, 256-deep steps for wide K, K split to fill SMs.
    assert tk.choose_w8a8_config(64, 4096, 4096, sms=132).block_m == 64
    wide_k = tk.choose_w8a8_config(128, 4096, 14336, sms=132)
    assert wide_k.block_m == 128 and wide_k.block_k == 256
    assert (4096 // wide_k.block_n) * wide_k.split_k >= 0.9 * 132
    assert tk.choose_w8a8_config(128, 28672, 4096, sms=132).split_k == 1


def test_cuda_layers_pick_triton_and_warn_when_only_torch_ops_remain(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmopt.quant import kernels

    cuda = torch.device("cuda")
    int8, int4 = LayerShape("int8", 4096, 4096, None), LayerShape("int4", 4096, 4096, 128)
    assert isinstance(kernels.select_kernel(int8, cuda, torch.bfloat16), tk.TritonInt8Kernel)
    assert isinstance(kernels.select_kernel(int4, cuda, torch.bfloat16), tk.TritonInt4Kernel)
    monkeypatch.setattr(kernels, "_KERNELS", [kernels.AtenInt8Kernel()])
    monkeypatch.setattr(kernels, "_WARNED", set())
    with pytest.warns(UserWarning, match="install triton"):
        assert kernels.select_kernel(int8, cuda, torch.bfloat16).name == "aten._weight_int8pack_mm"
