"""GPTQ: same formats as round-to-nearest, smaller output error on correlated inputs."""

import json
from pathlib import Path

import pytest
import torch

from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
from llmopt.quant.gptq import collect_hessians, gptq_quantize_int4, gptq_quantize_int8
from llmopt.quant.schemes import QuantSpec, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8


def correlated_problem(n: int = 48, k: int = 128, rows: int = 2048):
    torch.manual_seed(0)
    mixing = torch.randn(k, k) / k**0.5 + torch.eye(k)
    x = torch.randn(rows, k) @ mixing * torch.linspace(0.2, 3.0, k)  # correlated, uneven channels
    w = torch.randn(n, k) * 0.05
    return x, w, 2.0 / rows * x.T @ x


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return float((x @ (w - w_hat).T).square().sum())


def test_gptq_int8_beats_round_to_nearest_in_the_same_format():
    x, w, h = correlated_problem()
    q, scale = gptq_quantize_int8(w, h, torch.bfloat16)
    q_rtn, scale_rtn = quantize_int8(w, torch.bfloat16)
    assert q.dtype == torch.int8 and q.shape == w.shape and q.abs().max() <= 127
    assert torch.equal(scale, scale_rtn)  # same scales: GPTQ only chooses the integers
    gptq = output_error(x, w, dequantize_int8(q, scale))
    rtn = output_error(x, w, dequantize_int8(q_rtn, scale_rtn))
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_gptq_int4_beats_round_to_nearest_in_the_same_format():
    x, w, h = correlated_problem()
    q, scale, zp = gptq_quantize_int4(w, h, 32, torch.bfloat16)
    assert q.dtype == zp.dtype == torch.int8 and scale.shape == zp.shape == (48, 4)
    assert q.min() >= -8 and q.max() <= 7 and zp.min() >= -8 and zp.max() <= 7
    gptq = output_error(x, w, dequantize_int4(q, scale, zp, 32))
    rtn = output_error(x, w, dequantize_int4(*quantize_int4(w, 32, torch.bfloat16), 32))
    assert gptq < 0.7 * rtn, (gptq, rtn)


def test_hessians_cover_every_linear(tiny_dir: Path):
    from llmopt.models import LoadSpec, load_model

    lm = load_model("tiny-random", LoadSpec(dtype="float32", device="cpu"))
    text = "Anne Elliot walked to Uppercross with her sister and the Musgroves. " * 40
    hessians = collect_hessians(lm.model, lm.tokenizer, text, n_tokens=256, seq_len=64)
    linears = {n for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(hessians) == linears and "lm_head" in hessians
    h = hessians["model.layers.0.mlp.down_proj"]
    assert h.shape == (128, 128)
    torch.testing.assert_close(h, h.T)
    assert torch.linalg.eigvalsh(h.double()).min() > -1e-6  # positive semi-definite


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_method_is_recorded(tmp_path: Path, method: str):
    result = quantize_checkpoint(
        "tiny-random", QuantizeSpec(QuantSpec(method=method), out=tmp_path / "q", evaluate=False)
    )
    assert result.method == method
    provenance = json.loads((tmp_path / "q" / "llmopt.json").read_text())
    assert provenance["method"] == method and provenance["method_detail"]


def test_auto_falls_back_to_rtn_without_a_tokenizer(tiny_copy: Path, tmp_path: Path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_copy / name).unlink()
    spec = QuantizeSpec(QuantSpec(method="auto"), out=tmp_path / "q", evaluate=False)
    assert quantize_checkpoint(str(tiny_copy), spec).method == "rtn"
    from llmopt.errors import InputError

    with pytest.raises(InputError, match="--method rtn"):
        quantize_checkpoint(
            str(tiny_copy), QuantizeSpec(QuantSpec(method="gptq"), out=tmp_path / "q2", evaluate=False)
        )
    assert not (tmp_path / "q2").exists()
