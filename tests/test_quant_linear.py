import pytest
import torch

from llmopt.quant.kernels import LayerShape
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8

CPU = torch.device("cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize(("n", "k", "m"), [(96, 64, 1), (33, 128, 5), (200, 576, 17), (7, 32, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_dequantized_reference(n, k, m, dtype):
    torch.manual_seed(n * k + m)
    w, bias, x = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(m, k)
    q, scale = quantize_int8(w, torch.bfloat16)
    layer = QuantLinear.from_quantized(LayerShape("int8", k, n, None), q, scale, None, bias, CPU, dtype)
    out = layer(x.to(dtype))
    ref = x.double() @ dequantize_int8(q, scale).double().T + bias.double()
    assert out.dtype == dtype and out.shape == (m, n)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-2  # bf16 activations inside the CPU op


@pytest.mark.parametrize(("n", "k", "m", "group"), [(96, 64, 1, 32), (48, 256, 9, 64), (80, 512, 4, 128)])
def test_int4_linear_matches_dequantized_reference(n, k, m, group):
    torch.manual_seed(n + k + m)
    w, x = torch.randn(n, k) * 0.05, torch.randn(2, m, k)  # 3-D input: leading dims are kept
    q, scale, zp = quantize_int4(w, group, torch.bfloat16)
    layer = QuantLinear.from_quantized(
        LayerShape("int4", k, n, group), q, scale, zp, None, CPU, torch.float32
    )
    out = layer(x)
    ref = x.double() @ dequantize_int4(q, scale, zp, group).double().T
    assert out.shape == (2, m, n)
    assert rel_err(out, ref) < 1e-2


def cpu_int8_kernel() -> tuple[str, str]:
    """(kernel name, integer buffer name) that int8 layers get on this CPU: llmopt's C++ kernel
    where it builds (x86-64 with AVX2 or AVX-512), else torch's op."""
    from llmopt.quant import cpu_kernels

    if cpu_kernels.available() and cpu_kernels.ready():
        return "llmopt.int8_linear_cpu", "weight_packed"
    return "aten._weight_int8pack_mm", "weight_int8"


def test_quant_linear_holds_no_float_weight():
    q, scale = quantize_int8(torch.randn(64, 64), torch.bfloat16)
    layer = QuantLinear.from_quantized(
        LayerShape("int8", 64, 64, None), q, scale, None, None, CPU, torch.float32
    )
    kernel, weight = cpu_int8_kernel()
    tensors = dict(layer.named_buffers()) | dict(layer.named_parameters())
    assert set(tensors) == {weight, "scales"}
    assert tensors[weight].dtype == torch.int8 and tensors[weight].numel() == 64 * 64
    assert tensors["scales"].numel() == 64
    assert layer.kernel.name == kernel


def test_shapes_no_kernel_fits_use_the_fallback_with_a_warning():
    torch.manual_seed(3)
    w, x = torch.randn(40, 64) * 0.05, torch.randn(3, 64)  # 40 rows: the CPU int4 op needs multiples of 16
    q, scale, zp = quantize_int4(w, 32, torch.bfloat16)
    with pytest.warns(UserWarning, match="slow"):
        layer = QuantLinear.from_quantized(
            LayerShape("int4", 64, 40, 32), q, scale, zp, None, CPU, torch.float32
        )
    assert layer.kernel.name == "llmopt.dequantize_then_matmul"
    assert rel_err(layer(x), x.double() @ dequantize_int4(q, scale, zp, 32).double().T) < 1e-5


def test_int8_cpu_many_rows_keep_fp32_activations():
    # Prefill-sized inputs in fp32 are computed in fp32 (rounding-level error). Decode-sized ones
    # too with llmopt's C++ kernel; through torch's int8 op (no compiler) they take bf16
    # activations (~1e-3 error).
    torch.manual_seed(5)
    w = torch.randn(96, 128) * 0.05
    q, scale = quantize_int8(w, torch.bfloat16)
    layer = QuantLinear.from_quantized(
        LayerShape("int8", 128, 96, None), q, scale, None, None, CPU, torch.float32
    )
    ref_w = dequantize_int8(q, scale).double()
    big, small = torch.randn(200, 128), torch.randn(3, 128)
    assert rel_err(layer(big), big.double() @ ref_w.T) < 1e-6
    if cpu_int8_kernel()[0] == "llmopt.int8_linear_cpu":
        assert rel_err(layer(small), small.double() @ ref_w.T) < 1e-6
    else:
        assert 1e-5 < rel_err(layer(small), small.double() @ ref_w.T) < 1e-2
