"""The MLP's SiLU product folded into its gate/up matmul (QuantLinear.forward_gated, norm_fusion).

The CUDA kernels that do it run only on a GPU (examples/gpu_lowbit_kernels.py ``check`` compares them with
float64 there). Here: gate's and up's channels stack interleaved in every kernel's layout and give each
layer's outputs back; the model takes the gated path wherever the stacked layer reports it (forced on the CPU
kernel, which then computes the same product around its plain matmul), also after a folded-in norm, with
the plain model's logits; rows past the limit, a bias and the switch keep the plain path; and the CUDA
kernels' row rules.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmopt.engine.model import DecoderModel
from llmopt.quant import cuda_gemv, norm_fusion
from llmopt.quant import triton_kernels as tk
from llmopt.quant.kernels import LayerShape, QuantKernel, stack_channels
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import quantize_int4
from tests.test_engine_logits import CONFIGS, random_model
from tests.test_norm_fusion import decode_logits, quantized


def test_stack_channels_interleaves_layers_channel_by_channel():
    a = torch.arange(6).view(3, 2)
    b = 10 + a
    assert stack_channels([a, b]).tolist() == [[0, 1], [2, 3], [4, 5], [10, 11], [12, 13], [14, 15]]
    interleaved = stack_channels([a, b], 0, interleave=True)
    assert interleaved.tolist() == [[0, 1], [10, 11], [2, 3], [12, 13], [4, 5], [14, 15]]
    assert torch.equal(stack_channels([a.T, b.T], 1, interleave=True), interleaved.T)  # channels as columns
    assert interleaved.is_contiguous()
    with pytest.raises(AssertionError, match="same shape"):
        stack_channels([a, b[:2]], 0, interleave=True)


def test_silu_product_pairs_even_and_odd_channels():
    y = torch.randn(2, 3, 8)
    assert torch.equal(norm_fusion.silu_product(y), F.silu(y[..., 0::2]) * y[..., 1::2])
    assert norm_fusion.silu_product(y).shape == (2, 3, 4)


def test_interleaved_cpu_int8_layers_give_each_layers_outputs():
    """llmopt's CPU int8 kernel packs 16 channels per block: interleaving unpacks and repacks them."""
    mlp = quantized("llama-tied-mha", "int8").model.layers[0].mlp
    x = torch.randn(3, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    fused = QuantLinear.fuse([mlp.gate_proj, mlp.up_proj], interleave=True)
    assert fused is not None and fused.out_features == 2 * gate.shape[-1]
    y = fused(x)
    assert torch.allclose(y[:, 0::2], gate, rtol=1e-6, atol=1e-6)
    assert torch.allclose(y[:, 1::2], up, rtol=1e-6, atol=1e-6)
    assert torch.allclose(fused.forward_gated(x), F.silu(gate) * up, rtol=1e-5, atol=1e-6)
    assert QuantLinear.fuse([mlp.gate_proj, mlp.down_proj], interleave=True) is None  # other sizes, K


def test_triton_int4_buffers_interleave_by_rows_and_by_group_major_columns():
    """The Triton int4 kernel's row-major buffers interleave by rows; its group-major copies (K/G, N), which
    the Hopper GEMM reads, by columns."""
    kernel, k, n, group = tk.TritonInt4Kernel(), 64, 6, 32
    shape = LayerShape("int4", k, n, group)
    parts = []
    for seed in (1, 2):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
        q, scale, zero_point = quantize_int4(w, group, torch.float32)
        buffers = kernel.prepare(q, scale, zero_point, shape, torch.device("cpu"), torch.float32)
        columns = zip(tk.GROUP_MAJOR, ("scales", "zeros"), strict=True)
        buffers |= {name: buffers[col].T.contiguous() for name, col in columns}
        parts.append(buffers)
    stacked = kernel.concat(parts, interleave=True)
    assert stacked is not None
    for name, tensor in stacked.items():
        by_columns = name in tk.GROUP_MAJOR
        for i, part in enumerate(parts):
            got = tensor[:, i::2] if by_columns else tensor[i::2]
            assert torch.equal(got, part[name]), name


def count_gated_calls(monkeypatch) -> dict[str, int]:
    calls = {"gated": 0, "after_norm": 0}
    real = QuantKernel.matmul_gated

    def counted(self, x, buffers, shape, sumsq=None, eps=0.0):
        calls["gated"] += 1
        calls["after_norm"] += sumsq is not None
        return real(self, x, buffers, shape, sumsq, eps)

    monkeypatch.setattr(QuantKernel, "matmul_gated", counted)
    return calls


@pytest.mark.parametrize("fold_norm", [False, True])
def test_gated_mlp_gives_the_plain_models_logits(monkeypatch, fold_norm: bool):
    """Forced on the CPU int8 kernel, every layer's gate/up returns the SiLU product itself (after its
    folded-in norm with ``fold_norm``); the logits match the model without it."""
    seq = torch.randint(10, 300, (3, 18), generator=torch.Generator().manual_seed(5))
    plain = DecoderModel(quantized("llama-tied-mha", "int8"))
    assert all(layer.gate_up.interleaved for layer in plain.layers)
    assert all(layer.gate_up.parts[0]._gated_rows == 0 for layer in plain.layers)  # (the CPU kernel)
    want = decode_logits(plain, seq, batch=3)

    monkeypatch.setattr(QuantKernel, "gated_rows", lambda self, buffers, shape, dtype: 4)
    if fold_norm:
        monkeypatch.setattr(QuantKernel, "fused_norm_rows", lambda self, buffers, shape, dtype: 4)
    gated = DecoderModel(quantized("llama-tied-mha", "int8"))
    calls = count_gated_calls(monkeypatch)
    got = decode_logits(gated, seq, batch=3)
    decode_calls = len(gated.layers) * 6  # (the 12-row prefill is past the limit)
    assert calls == {"gated": decode_calls, "after_norm": decode_calls if fold_norm else 0}
    for a, b in zip(want, got, strict=True):
        assert (a - b).abs().max().item() < 1e-4 * a.abs().max().item() + 1e-5


def test_rows_past_the_limit_a_bias_and_the_switch_keep_the_plain_product(monkeypatch):
    seq = torch.randint(10, 300, (3, 18), generator=torch.Generator().manual_seed(6))
    monkeypatch.setattr(QuantKernel, "gated_rows", lambda self, buffers, shape, dtype: 2)
    model = DecoderModel(quantized("llama-tied-mha", "int8"))
    calls = count_gated_calls(monkeypatch)
    decode_logits(model, seq, batch=3)  # 3 rows per step
    assert calls["gated"] == 0
    biased = DecoderModel(quantized("llama3-rope-scaling-biases", "int8"))
    gate_up = biased.layers[0].gate_up.parts[0]
    assert gate_up.bias is not None and gate_up._gated_rows == 0  # the bias comes before the product
    monkeypatch.setenv(norm_fusion.DISABLE_SILU_ENV, "0")
    switched_off = DecoderModel(quantized("llama-tied-mha", "int8"))
    assert all(layer.gate_up.parts[0]._gated_rows == 0 for layer in switched_off.layers)


def test_float_models_interleave_too():
    """A float model's gate/up also stacks interleaved: one matmul, and the product reads its pairs."""
    float_model = DecoderModel(random_model(*CONFIGS["llama-tied-mha"]))
    layer = float_model.layers[0]
    assert layer.gate_up.interleaved and len(layer.gate_up.parts) == 1
    x = torch.randn(2, layer.gate_up.parts[0].in_features)
    gate, up = layer.gate_up(x)
    fused = layer.gate_up.parts[0](x)
    assert torch.equal(gate, fused[:, 0::2]) and torch.equal(up, fused[:, 1::2])
    assert torch.equal(layer.gate_up.gated(x), F.silu(gate) * up)
    assert layer.gate_up.gated_rows(torch.float32) == 0  # float layers: no kernel of llmopt's


@pytest.mark.parametrize(
    ("n", "k", "group", "rows"),
    [
        (28672, 4096, None, 1),  # int8: a weight the Triton tiles take past one row
        (4096, 4096, None, 16),
        (4096, 1040, None, 1),  # ... K not a multiple of 64: the CUDA-core kernel, one row
        (28672, 4096, 128, 16),  # int4: the tensor-core kernel up to 16 rows
        (4096, 4064, 32, 0),  # ... not for K off a multiple of 128 (the CUDA-core int4 kernel)
        (4095, 4096, 128, 0),  # pairs need an even N
    ],
)
def test_cuda_gated_row_rules(monkeypatch, n: int, k: int, group: int | None, rows: int):
    monkeypatch.setattr(cuda_gemv, "_layer_runs_here", lambda x_dtype, weight: True)
    assert cuda_gemv.gated_max_rows(torch.bfloat16, torch.empty(n, 1), k, group) == rows


def test_cpu_weights_never_gate_on_the_cuda_kernels():
    assert cuda_gemv.gated_max_rows(torch.bfloat16, torch.empty(64, 64, dtype=torch.int8), 64) == 0
