"""Residual-stream rotation (llmopt/quant/rotation.py): exact in float, and what quantize writes with it."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llmopt.errors import InputError
from llmopt.models import LoadSpec, load_model
from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
from llmopt.quant.rotation import random_orthogonal, rotate_residual_, unsupported_reason
from llmopt.quant.schemes import QuantSpec

FP32 = LoadSpec(dtype="float32", device="cpu")
IDS = torch.tensor([[1, 17, 301, 4000, 9, 88, 2048, 5, 77, 1000, 12, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.double()


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(96, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, random_orthogonal(96, seed=3)) and not torch.equal(q, random_orthogonal(96, seed=4))


def test_rotation_leaves_the_model_function_unchanged(tiny_dir: Path):
    model = load_model("tiny-random", FP32).model
    # Non-trivial norm scales, so folding them is tested too.
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data = 0.5 + torch.rand(p.shape, generator=gen)
    before = logits(model)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rotate_residual_(model, seed=1)
    after = logits(model)
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert norms and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    if tied:  # the final norm's scale went into the head: no longer the embeddings
        assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
        assert model.config.tie_word_embeddings is False


def test_rotation_refuses_other_architectures():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    assert "not 'gpt2'" in (unsupported_reason(gpt2) or "")
    with pytest.raises(InputError, match="without --rotate"):
        rotate_residual_(gpt2)


def test_int8_default_rotates_and_writes_a_plain_checkpoint(tmp_path: Path):
    out = tmp_path / "q"
    result = quantize_checkpoint(
        "tiny-random", QuantizeSpec(QuantSpec(method="gptq"), out=out, evaluate=False)
    )
    assert result.rotated
    provenance = json.loads((out / "llmopt.json").read_text())
    assert "rotated" in provenance["rotation"]
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        norm = fh.get_tensor("model.layers.0.input_layernorm.weight")
        embed = fh.get_tensor("model.embed_tokens.weight")
        assert "lm_head.weight_packed" in fh.keys()  # noqa: SIM118 - safe_open is not a mapping
    assert torch.equal(norm, torch.ones_like(norm)) and embed.dtype == torch.bfloat16
    # The rotated, quantized checkpoint computes what the source does, up to int8 rounding.
    source = logits(load_model("tiny-random", FP32).model)
    quantized = logits(load_model(str(out), FP32).model)
    assert (quantized - source).abs().max() < 0.05 * source.abs().max()


def test_rotation_is_off_for_int4_and_on_request(tmp_path: Path):
    int4 = QuantizeSpec(QuantSpec(scheme="int4", method="gptq"), out=tmp_path / "a", evaluate=False)
    assert not quantize_checkpoint("tiny-random", int4).rotated
    no = QuantizeSpec(QuantSpec(method="gptq", rotate=False), out=tmp_path / "b", evaluate=False)
    assert not quantize_checkpoint("tiny-random", no).rotated
    assert json.loads((tmp_path / "b" / "llmopt.json").read_text())["rotation"] is None


def test_rotated_16bit_head_is_written_when_it_was_tied(tmp_path: Path):
    """--keep-head --rotate on a tied model: the rotated head (final norm folded in) is its own tensor."""
    out = tmp_path / "q"
    spec = QuantizeSpec(QuantSpec(method="rtn", keep_head=True, rotate=True), out=out, evaluate=False)
    assert quantize_checkpoint("tiny-random", spec).rotated
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
        head = fh.get_tensor("lm_head.weight")
    assert "lm_head.weight_packed" not in names and head.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    source = logits(load_model("tiny-random", FP32).model)
    quantized = logits(load_model(str(out), FP32).model)
    assert (quantized - source).abs().max() < 0.05 * source.abs().max()


def test_rotation_with_rtn_is_refused_when_the_model_would_not_fit(tmp_path: Path, monkeypatch):
    from llmopt.quant import api

    monkeypatch.setattr(api, "free_memory_bytes", lambda device: 1024)
    spec = QuantizeSpec(QuantSpec(method="rtn", rotate=True), out=tmp_path / "q", evaluate=False)
    with pytest.raises(InputError, match="--no-rotate"):
        quantize_checkpoint("tiny-random", spec)
    assert not (tmp_path / "q").exists()


def test_cli_flags_and_report(tmp_path: Path):
    from tests.conftest import run_cli

    proc = run_cli(
        "quantize", "tiny-random", "--no-rotate", "--no-eval", "--json", "--out", str(tmp_path / "a")
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rotated"] is False
    proc = run_cli("quantize", "tiny-random", "--no-eval", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr
    assert "Residual-stream rotation" in proc.stdout and "yes" in proc.stdout


def test_writer_refuses_replacements_that_match_no_stored_tensor(tmp_path: Path):
    from llmopt.errors import InvalidModelError
    from llmopt.models import resolve_model
    from llmopt.quant.checkpoint import plan_quantization, write_quantized_checkpoint

    files = resolve_model("tiny-random")
    plan = plan_quantization(files, QuantSpec())
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidModelError, match="--no-rotate"):
        write_quantized_checkpoint(
            files, plan, tmp_path / "out", {}, replace={"model.renamed.weight": torch.ones(3)}
        )
