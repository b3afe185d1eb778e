"""Learned rounding (llmopt/quant/learned.py): codes in the schemes' format, block losses that only
go down, the round-to-nearest guard, and what ``llmopt quantize --method learned`` writes."""

import json
from pathlib import Path

import pytest
import torch

from llmopt.errors import InputError, UnsupportedError
from llmopt.models import LoadSpec, load_model, resolve_model
from llmopt.quant import learned
from llmopt.quant.api import QuantizeSpec, choose_method, quantize_checkpoint
from llmopt.quant.checkpoint import plan_layers, plan_quantization
from llmopt.quant.gptq import calibration_windows
from llmopt.quant.schemes import QuantSpec, dequantize_int4, dequantize_int8

FP32 = LoadSpec(dtype="float32", device="cpu")
TEXT = "It was a truth universally acknowledged that the quiet of the morning would not last. " * 60
FEW = learned.LearnSpec(steps=20, batch=2)


def setup(scheme: str):
    loaded = load_model("tiny-random", FP32)
    plan = plan_layers(loaded.model, QuantSpec(scheme=scheme))
    windows = calibration_windows(loaded.tokenizer, TEXT, 1024, 128)
    return loaded.model, plan, windows


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_codes_have_the_schemes_format_and_every_block_loss_goes_down(scheme: str):
    model, plan, windows = setup(scheme)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    codes, losses = learned.learn_codes(model, plan.layers, windows, torch.bfloat16, FEW)
    assert set(codes) == set(plan.layers)
    for name, (q, scale, zero) in codes.items():
        weight = model.get_submodule(name).weight
        layer = plan.layers[name]
        assert q.shape == weight.shape and q.dtype == torch.int8 and scale.dtype == torch.bfloat16
        if layer.bits == 8:
            assert zero is None and scale.shape == (weight.shape[0], 1)
            assert q.abs().max() <= 127
            deq = dequantize_int8(q, scale)
        else:
            assert layer.group_size is not None and zero is not None
            groups = weight.shape[1] // layer.group_size
            assert scale.shape == zero.shape == (weight.shape[0], groups)
            assert q.min() >= -8 and q.max() <= 7 and zero.min() >= -8 and zero.max() <= 7
            deq = dequantize_int4(q, scale, zero, layer.group_size)
        # Close to the float weight: at most a grid step or so off, except where a range clips.
        assert ((deq - weight).norm() / weight.norm()).item() < (0.2 if layer.bits == 4 else 0.05)
    assert len(losses) == model.config.num_hidden_layers
    assert all(after <= before_ for before_, after in losses)
    assert all(after < before_ for before_, after in losses), losses  # learning helped in every block
    # The model itself is left as it was.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_block_that_learning_makes_worse_keeps_round_to_nearest(monkeypatch: pytest.MonkeyPatch):
    model, plan, windows = setup("int4")

    def wrong_way(self, lr):  # round every weight the wrong way
        with torch.no_grad():
            self.v.copy_(-0.5 * torch.sign(self.w / self.w.abs().amax() + 1e-9))

    monkeypatch.setattr(learned.LearnedQuantizer, "step", wrong_way)
    codes, losses = learned.learn_codes(model, plan.layers, windows, torch.bfloat16, FEW)
    assert all(after == before for before, after in losses)
    name = "model.layers.0.mlp.down_proj"
    rtn = learned.LearnedQuantizer(model.get_submodule(name).weight, plan.layers[name], torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(codes[name], rtn.codes(), strict=True))


def test_models_without_decoder_layers_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "GPT2LMHeadModel lacks" in (learned.unsupported_reason(gpt2) or "")
    with pytest.raises(UnsupportedError, match="--method gptq"):
        learned.decoder_blocks(gpt2)
    assert learned.unsupported_reason(load_model("tiny-random", FP32).model) is None


def test_auto_learns_int4_rounding_on_a_gpu_only(monkeypatch: pytest.MonkeyPatch):
    files = resolve_model("tiny-random")
    int4 = plan_quantization(files, QuantSpec(scheme="int4"))
    int8 = plan_quantization(files, QuantSpec(scheme="int8"))
    assert choose_method("auto", files, int4) == "gptq"  # the CPU: learning would take hours
    from llmopt.quant import api

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(api, "free_memory_bytes", lambda device: 1 << 40)
    assert choose_method("auto", files, int4) == "learned"
    assert choose_method("auto", files, int8) == "gptq"
    assert choose_method("learned", files, int8) == "learned"


def test_learned_checkpoint_loads_and_is_closer_to_the_source_than_round_to_nearest(tmp_path: Path):
    ids = torch.tensor([[1, 17, 301, 4000, 9, 88, 2048, 5, 77, 1000, 12, 3]])
    with torch.no_grad():
        source = load_model("tiny-random", FP32).model(ids).logits
    errors = {}
    for method in ("learned", "rtn"):
        spec = QuantizeSpec(QuantSpec(scheme="int4", method=method), out=tmp_path / method, evaluate=False)
        result = quantize_checkpoint("tiny-random", spec)
        assert result.method == method and not result.rotated
        with torch.no_grad():
            logits = load_model(str(tmp_path / method), FP32).model(ids).logits
        errors[method] = (logits - source).norm().item()
    provenance = json.loads((tmp_path / "learned" / "llmopt.json").read_text())
    assert provenance["method"] == "learned" and "learned rounding" in provenance["method_detail"]
    # Measured: relative logit error 0.097 learned, 0.104 round-to-nearest (GPTQ 0.0996).
    assert errors["learned"] < errors["rtn"] < 0.15 * source.norm().item()


def test_methods_that_load_the_model_check_the_memory_of_the_device_it_loads_to(
    monkeypatch: pytest.MonkeyPatch,
):
    """With a GPU the model is calibrated there: a full GPU and a roomy host means round-to-nearest."""
    from llmopt.quant import api

    files = resolve_model("tiny-random")
    plan = plan_quantization(files, QuantSpec(scheme="int4"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(api, "free_memory_bytes", lambda device: 1024 if device.type == "cuda" else 1 << 40)
    assert choose_method("auto", files, plan) == "rtn"
    with pytest.raises(InputError, match="--method rtn"):
        choose_method("learned", files, plan)
