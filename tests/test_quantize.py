"""`llmopt quantize` end to end on tiny-random: the checkpoint, loading it back, atomicity."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from llmopt.cli.app import app
from llmopt.models import LoadSpec, load_model
from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
from llmopt.quant.linear import QuantLinear
from llmopt.quant.schemes import QuantSpec

runner = CliRunner()
PROMPT = "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who"


def stored(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            tensors.update({k: fh.get_tensor(k) for k in fh.keys()})  # noqa: SIM118
    return tensors


def test_int8_checkpoint_layout_and_provenance(tiny_dir: Path, tmp_path: Path):
    out = tmp_path / "q8"
    result = runner.invoke(app, ["quantize", "tiny-random", "--out", str(out), "--no-eval", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["scheme"] == "int8" and report["head"] == "int8" and report["bytes_after"] > 0

    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    assert group["weights"].items() >= {"num_bits": 8, "symmetric": True, "strategy": "channel"}.items()
    assert config["tie_word_embeddings"] is False  # the head became its own int8 tensor

    tensors = stored(out)
    assert tensors["lm_head.weight_packed"].dtype == torch.int32
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # input embeddings stay 16-bit
    assert tensors["model.layers.0.mlp.down_proj.weight_shape"].tolist() == [64, 128]
    assert not any(k.endswith("proj.weight") for k in tensors)

    provenance = json.loads((out / "llmopt.json").read_text())
    assert provenance["source"] == "tiny-random" and len(provenance["source_sha256"]) == 64
    assert provenance["scheme"] == "int8" and provenance["llmopt_version"]
    for name in ("tokenizer.json", "generation_config.json"):
        assert (out / name).is_file()
    assert not list(tmp_path.glob(".q8*"))  # no temporary folders left beside it


def test_int4_checkpoint_has_int8_head_and_zero_points(tmp_path: Path):
    out = tmp_path / "q4"
    spec = QuantizeSpec(quant=QuantSpec("int4"), out=out, evaluate=False)
    result = quantize_checkpoint("tiny-random", spec)
    assert result.group_size == 64  # widths 64 and 128: the largest of 128/64/32 dividing both
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    head_group, body_group = qc["config_groups"].values()
    assert head_group["targets"] == ["lm_head"] and head_group["weights"]["num_bits"] == 8
    assert (
        body_group["weights"].items()
        >= {"num_bits": 4, "strategy": "group", "group_size": 64, "symmetric": False}.items()
    )
    tensors = stored(out)
    assert tensors["model.layers.1.self_attn.q_proj.weight_zero_point"].dtype == torch.int32
    assert tensors["model.layers.1.self_attn.q_proj.weight_scale"].shape == (64, 1)


@pytest.mark.parametrize(("scheme", "keep_head"), [("int8", False), ("int4", False), ("int8", True)])
def test_quantized_model_loads_into_quant_linears_and_tracks_the_original(tmp_path, scheme, keep_head):
    out = tmp_path / "q"
    quantize_checkpoint(
        "tiny-random", QuantizeSpec(QuantSpec(scheme, keep_head=keep_head), out=out, evaluate=False)
    )
    quantized = load_model(str(out), LoadSpec(dtype="float32", device="cpu"))
    original = load_model("tiny-random", LoadSpec(dtype="float32", device="cpu"))
    linears = {n: m for n, m in quantized.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(linears) == 2 * 7 + (0 if keep_head else 1)
    assert isinstance(quantized.model.lm_head, torch.nn.Linear) == keep_head
    ids = torch.tensor([original.tokenizer(PROMPT)["input_ids"]])
    a, b = quantized.model(ids).logits, original.model(ids).logits
    rel = float((a - b).norm() / b.norm())
    assert rel < (0.05 if scheme == "int8" else 0.25), rel
    assert rel > 0  # it really is the quantized model


def test_sharded_output_round_trips(tmp_path: Path, tiny_dir: Path):
    from llmopt.models import resolve_model
    from llmopt.quant.checkpoint import plan_quantization, write_quantized_checkpoint

    files = resolve_model("tiny-random")
    out = tmp_path / "sharded"
    out.mkdir()
    write_quantized_checkpoint(
        files, plan_quantization(files, QuantSpec("int8")), out, {}, max_shard_bytes=1 << 20
    )
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    int8_kernels = ("llmopt.int8_linear_cpu", "aten._weight_int8pack_mm")  # C++ kernel, or torch's op
    assert load_model(str(out)).model.lm_head.kernel.name in int8_kernels


def test_existing_output_needs_force(tmp_path: Path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["quantize", "tiny-random", "--out", str(out), "--no-eval"])
    assert result.exit_code == 3
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "precious"
    result = runner.invoke(app, ["quantize", "tiny-random", "--out", str(out), "--no-eval", "--force"])
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch, exc):
    import llmopt.quant.checkpoint as checkpoint

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(checkpoint, "pack_int32", fail)  # mid-way through writing, whatever the method
    with pytest.raises(type(exc)):
        quantize_checkpoint("tiny-random", QuantizeSpec(out=tmp_path / "q", evaluate=False))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmpfs):
    target = tmpfs("full", "size=2m")
    result = runner.invoke(app, ["quantize", "tiny-random", "--out", str(target / "q"), "--no-eval"])
    assert result.exit_code == 3
    assert "No space left" in result.stderr
    assert list(target.iterdir()) == []


def test_read_only_location_is_a_clear_error(tmpfs):
    target = tmpfs("ro", "ro,size=1m")
    result = runner.invoke(app, ["quantize", "tiny-random", "--out", str(target / "q"), "--no-eval"])
    assert result.exit_code == 3
    assert "Cannot write" in result.stderr


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_in_place_quantization_equals_the_round_trip_through_a_checkpoint(tmp_path: Path, scheme: str):
    from llmopt.quant.inplace import quantize_model_

    spec = QuantSpec(scheme, method="rtn")
    quantize_checkpoint("tiny-random", QuantizeSpec(spec, out=tmp_path / "q", evaluate=False))
    from_disk = load_model(str(tmp_path / "q"), LoadSpec(dtype="float32", device="cpu"))
    in_memory = load_model("tiny-random", LoadSpec(dtype="float32", device="cpu"))
    quantize_model_(in_memory.model, spec, scale_dtype=torch.bfloat16)  # tiny-random is stored in bf16
    ids = torch.tensor([from_disk.tokenizer(PROMPT)["input_ids"]])
    torch.testing.assert_close(in_memory.model(ids).logits, from_disk.model(ids).logits, rtol=0, atol=0)
