import pytest
import torch

from llmopt.errors import UnsupportedError
from llmopt.quant.packing import pack_int32, unpack_int32
from llmopt.quant.schemes import (
    QuantSpec,
    choose_group_size,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.square().sum() / (ref - approx).square().sum()))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("shape", [(7, 576), (5, 33), (3, 1), (64, 64)])
def test_packing_matches_compressed_tensors_bytes(bits, shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    lo = -(1 << (bits - 1))
    q = torch.randint(lo, -lo, shape, dtype=torch.int8)
    ours = pack_int32(q, bits)
    assert torch.equal(ours, helpers.pack_to_int32(q, bits))
    assert torch.equal(unpack_int32(ours, bits, shape[1]), q)


def test_zero_point_packing_along_rows_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    zp = torch.randint(-8, 8, (37, 9), dtype=torch.int8)
    ours = pack_int32(zp.T.contiguous(), 4).T.contiguous()
    assert torch.equal(ours, helpers.pack_to_int32(zp, 4, packed_dim=0))


def test_int8_per_channel_is_accurate_and_symmetric():
    torch.manual_seed(0)
    w = torch.randn(96, 200) * torch.linspace(0.01, 1.0, 96)[:, None]  # rows of very different scale
    q, scale = quantize_int8(w, torch.float32)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (96, 1)
    assert sqnr_db(w, dequantize_int8(q, scale)) > 38  # per-channel: every row keeps ~7 bits


def test_int4_groupwise_is_accurate_and_in_range():
    torch.manual_seed(0)
    w = torch.randn(64, 256) + 0.3  # an offset the zero points must absorb
    q, scale, zp = quantize_int4(w, 64, torch.bfloat16)
    assert q.min() >= -8 and q.max() <= 7 and zp.min() >= -8 and zp.max() <= 7
    assert scale.shape == zp.shape == (64, 4) and scale.dtype == torch.bfloat16
    assert sqnr_db(w, dequantize_int4(q, scale, zp, 64)) > 18


def test_int4_search_is_never_worse_than_full_range():
    torch.manual_seed(1)
    w = torch.randn(32, 128) ** 3  # heavy tails: clipping pays
    import llmopt.quant.schemes as schemes

    searched = dequantize_int4(*quantize_int4(w, 32, torch.float32), 32)
    steps = schemes.INT4_SEARCH_STEPS
    try:
        schemes.INT4_SEARCH_STEPS = 1
        plain = dequantize_int4(*quantize_int4(w, 32, torch.float32), 32)
    finally:
        schemes.INT4_SEARCH_STEPS = steps
    assert (searched - w).square().sum() < (plain - w).square().sum()


def test_default_group_size_is_largest_that_divides_every_layer():
    assert choose_group_size([576, 1536], None) == 64  # smollm2
    assert choose_group_size([4096, 14336], None) == 128  # llama-3-8b
    assert choose_group_size([96, 160], None) == 32
    with pytest.raises(UnsupportedError, match="Use --scheme int8"):
        choose_group_size([100], None)
    with pytest.raises(UnsupportedError, match="does not divide"):
        choose_group_size([576, 1536], 128)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "int3"}, "Unknown scheme"),
        ({"scheme": "int4", "group_size": 48}, "not supported"),
        ({"scheme": "int8", "group_size": 64}, "int4 only"),
    ],
)
def test_quant_spec_validates_itself(kwargs, message):
    with pytest.raises(UnsupportedError, match=message):
        QuantSpec(**kwargs)
