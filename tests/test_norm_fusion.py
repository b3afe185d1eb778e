"""The norms and residual adds folded into the low-bit decode matmuls (llmopt/quant/norm_fusion.py).

The CUDA kernels that do it run only on a GPU (examples/gpu_lowbit_kernels.py ``check`` compares them with
float64 there). Here: the arithmetic they implement reproduces RMSNorm + matmul and the residual add;
the model takes the fused path wherever its projections report they fold the norm in (forced on the
CPU kernels, which then do the same arithmetic around their plain matmul), chains a down_proj's output
into the next layer's q/k/v, falls back per projection (a bias after a residual matmul, rows past the
limit), and gives the unfused model's logits; and the CUDA kernels' row rules.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.engine.model import DecoderModel, FusedRows, rms_norm
from llmopt.engine.runner import DecoderRunner, PrefillChunk
from llmopt.quant import cuda_gemv, norm_fusion
from llmopt.quant.inplace import quantize_model_
from llmopt.quant.kernels import QuantKernel
from llmopt.quant.schemes import QuantSpec
from tests.test_engine_logits import CONFIGS, random_model


def test_sums_of_squares_and_rstd_reproduce_rms_norm_through_a_matmul():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    w = 1 + 0.3 * torch.randn(20, generator=gen, dtype=torch.float64)
    weight = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    weighted, sumsq = norm_fusion.norm_inputs(h, w)
    assert sumsq.shape == (3,) and sumsq.dtype == torch.float32
    assert torch.allclose(sumsq.double(), h.square().sum(-1), rtol=1e-6)
    got = norm_fusion.scale_rows(weighted @ weight.T, sumsq, 20, 1e-5)
    want = rms_norm(h, w, 1e-5) @ weight.T
    assert (got - want).abs().max().item() < 1e-6


def test_add_residual_returns_the_next_norms_inputs():
    gen = torch.Generator().manual_seed(1)
    y, residual = torch.randn(2, 16, generator=gen), torch.randn(2, 16, generator=gen)
    w = torch.rand(16, generator=gen)
    h, weighted, sumsq = norm_fusion.add_residual(y, residual, w)
    assert torch.equal(h, residual + y)
    assert weighted is not None and sumsq is not None
    assert torch.equal(weighted, h * w) and torch.allclose(sumsq, h.square().sum(-1))
    assert norm_fusion.add_residual(y, residual, None)[1:] == (None, None)


def test_a_biased_layer_adds_its_bias_before_the_residual(monkeypatch):
    """forward_residual on a layer with a bias: h = residual + (x W + b), whatever rows the kernel reports."""
    model = quantized("llama3-rope-scaling-biases", "int8")
    o_proj = model.model.layers[0].self_attn.o_proj
    assert o_proj.bias is not None
    monkeypatch.setattr(QuantKernel, "fused_norm_rows", lambda self, buffers, shape, dtype: 4)
    assert o_proj.fused_norm_rows(torch.float32, residual=True) == 0
    assert o_proj.fused_norm_rows(torch.float32) == 4  # as a matmul after a norm it would fuse
    gen = torch.Generator().manual_seed(4)
    x, residual = torch.randn(1, 2, 64, generator=gen), torch.randn(1, 2, 64, generator=gen)
    w = torch.rand(64, generator=gen)
    h, weighted, sumsq = o_proj.forward_residual(x, residual, w)
    want = residual + o_proj(x)
    assert torch.allclose(h, want, atol=1e-6) and h.shape == residual.shape
    assert weighted is not None and sumsq is not None
    assert torch.allclose(weighted, h * w) and torch.allclose(sumsq, h.square().sum(-1).view(-1))


def quantized(name: str, scheme: str) -> torch.nn.Module:
    model_type, overrides = CONFIGS[name]
    return quantize_model_(random_model(model_type, overrides), QuantSpec(scheme))


def decode_logits(model: DecoderModel, seq: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """Prefill 12 tokens into each of ``batch`` slots (one chunk of 12 rows: past the fused rows), then
    decode 6 steps of all slots together (``batch`` rows each)."""
    runner = DecoderRunner(model, max_batch=batch, max_seq=32, use_graphs=False)
    runner.prefill([PrefillChunk(slot, seq[slot, :12].tolist(), 0, True) for slot in range(batch)])
    slots = list(range(batch))
    return [runner.decode(slots, seq[:batch, p], [p] * batch) for p in range(12, 18)]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", ["llama-tied-mha", "llama3-rope-scaling-biases"])
def test_fused_norms_give_the_unfused_models_logits(monkeypatch, name: str, scheme: str):
    """llama-tied-mha has no biases: every layer fuses both norms and each down_proj makes the next
    layer's q/k/v input. The biased config has biases after o_proj and down_proj: those stay unfused
    (the bias comes after the residual add) while q/k/v and gate/up still fold their norm in."""
    seq = torch.randint(10, 300, (3, 18), generator=torch.Generator().manual_seed(2))
    plain = DecoderModel(quantized(name, scheme))
    assert all(layer.fused_rows == FusedRows() for layer in plain.layers)  # the CPU kernels fold nothing in
    want = decode_logits(plain, seq, batch=3)

    monkeypatch.setattr(QuantKernel, "fused_norm_rows", lambda self, buffers, shape, dtype: 4)
    fused = DecoderModel(quantized(name, scheme))
    biased = name != "llama-tied-mha"
    expected = FusedRows(qkv=4, o_proj=0 if biased else 4, gate_up=4, down_proj=0 if biased else 4)
    assert all(layer.fused_rows == expected for layer in fused.layers)
    counters = [name for name, _ in fused.named_buffers() if name.endswith("fusion_counter")]
    assert len(counters) == (0 if biased else 2 * len(fused.layers))  # one per residual matmul that fuses
    assert "fusion_counter" not in str(list(fused.state_dict()))  # a workspace, not the model's state
    calls = {"starts": 0, "residual": 0}  # norms started from h by the model; residual matmuls
    real_inputs, real_residual = norm_fusion.norm_inputs, norm_fusion.add_residual
    inside_residual = False

    def counted_inputs(*args):
        calls["starts"] += not inside_residual
        return real_inputs(*args)

    def counted_residual(*args):
        nonlocal inside_residual
        calls["residual"] += 1
        inside_residual = True
        try:
            return real_residual(*args)
        finally:
            inside_residual = False

    monkeypatch.setattr(norm_fusion, "norm_inputs", counted_inputs)
    monkeypatch.setattr(norm_fusion, "add_residual", counted_residual)
    got = decode_logits(fused, seq, batch=3)
    n_layers, steps = len(fused.layers), 6
    if biased:  # each layer starts both of its norms from h
        assert calls == {"starts": 2 * n_layers * steps, "residual": 0}
    else:  # only the first layer's first norm starts from h; residual matmuls make the rest
        assert calls == {"starts": steps, "residual": 2 * n_layers * steps}
    # int8 runs llmopt's fp32 CPU kernel; torch's CPU int4 op takes bf16 activations, so there h * w and
    # norm(h) are rounded to bf16 at different points (a few 1e-3 relative per layer).
    tolerance = 1e-4 if scheme == "int8" else 2e-2
    for a, b in zip(want, got, strict=True):
        assert (a - b).abs().max().item() < tolerance * a.abs().max().item() + 1e-5


def test_rows_past_the_limit_and_the_switch_keep_the_plain_path(monkeypatch):
    seq = torch.randint(10, 300, (3, 18), generator=torch.Generator().manual_seed(3))
    want = decode_logits(DecoderModel(quantized("llama-tied-mha", "int8")), seq, batch=3)
    monkeypatch.setattr(QuantKernel, "fused_norm_rows", lambda self, buffers, shape, dtype: 2)
    monkeypatch.setattr(norm_fusion, "norm_inputs", lambda *args: pytest.fail("3 rows are past the limit"))
    got = decode_logits(DecoderModel(quantized("llama-tied-mha", "int8")), seq, batch=3)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    monkeypatch.setenv(norm_fusion.DISABLE_ENV, "0")
    model = DecoderModel(quantized("llama-tied-mha", "int8"))
    assert all(layer.fused_rows == FusedRows() for layer in model.layers)


@pytest.mark.parametrize(
    ("m", "n", "k", "group", "fuses"),
    [
        (1, 4096, 4096, None, True),  # int8, one row: the CUDA-core kernel
        (1, 4096, 1040, None, True),  # ... any K a multiple of 16
        (2, 4096, 1040, None, False),  # two rows need the tensor-core kernel: K a multiple of 64
        (16, 4096, 4096, None, True),
        (2, 28672, 4096, None, False),  # a weight the Triton tiles take past one row
        (16, 4096, 4096, 128, True),  # int4: the tensor-core kernel, K a multiple of 128
        (1, 4096, 4064, 32, False),  # ... else the CUDA-core int4 kernel, which does not fuse
        (17, 4096, 4096, 128, False),
    ],
)
def test_cuda_fusion_row_rules(m: int, n: int, k: int, group: int | None, fuses: bool):
    assert cuda_gemv.fused_kernel_takes(m, n, k, group) is fuses


def test_cpu_weights_never_fuse_on_the_cuda_kernels():
    assert cuda_gemv.fused_max_rows(torch.bfloat16, torch.zeros(16, 64, dtype=torch.int8), 64) == 0
