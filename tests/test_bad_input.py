"""Bad input: one clear line on stderr, a non-zero exit code, nothing left behind."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmopt.cli.app import app

runner = CliRunner()


def quantize(*args: str):
    return runner.invoke(app, ["quantize", *args, "--no-eval"])


def assert_clean_failure(result, code: int, *phrases: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_missing_path(tmp_path: Path):
    assert_clean_failure(quantize(str(tmp_path / "nope")), 2, "does not exist", "built-in")


def test_directory_that_is_not_a_model(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    assert_clean_failure(quantize(str(tmp_path / "empty"), "--out", str(tmp_path / "o")), 2, "no config.json")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(tiny_copy: Path, tmp_path: Path):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert_clean_failure(
        quantize(str(tiny_copy), "--out", str(tmp_path / "o")), 2, "truncated", "Re-download"
    )
    assert not (tmp_path / "o").exists()


def test_corrupt_safetensors_header(tiny_copy: Path, tmp_path: Path):
    weights = tiny_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\xff" * 8
    weights.write_bytes(bytes(data))
    assert_clean_failure(quantize(str(tiny_copy), "--out", str(tmp_path / "o")), 2, "corrupt")


def test_sharded_index_with_missing_shard(tiny_copy: Path, tmp_path: Path):
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (tiny_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(quantize(str(tiny_copy)), 2, "missing", "model-00001-of-00002.safetensors")


def pickle_model(tiny_copy: Path) -> Path:
    from safetensors.torch import load_file

    state = load_file(str(tiny_copy / "model.safetensors"))
    torch.save(state, tiny_copy / "pytorch_model.bin")
    (tiny_copy / "model.safetensors").unlink()
    return tiny_copy


def test_pickle_is_refused_without_flag(tiny_copy: Path):
    assert_clean_failure(quantize(str(pickle_model(tiny_copy))), 2, "--allow-pickle", "weights_only")


def test_pickle_is_read_with_flag(tiny_copy: Path, tmp_path: Path):
    result = quantize(str(pickle_model(tiny_copy)), "--allow-pickle", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["--scheme", "fp8"], "Unknown scheme"),
        (["--scheme", "int4", "--group-size", "48"], "not supported"),
        (["--scheme", "int4", "--group-size", "256"], "does not divide"),
        (["--group-size", "64"], "int4 only"),
    ],
)
def test_unsupported_scheme_or_group_size(args, phrase, tmp_path: Path):
    assert_clean_failure(quantize("tiny-random", *args, "--out", str(tmp_path / "o")), 2, phrase)
    assert not (tmp_path / "o").exists()


def test_quantizing_a_quantized_model_is_refused(tmp_path: Path):
    assert quantize("tiny-random", "--out", str(tmp_path / "q")).exit_code == 0
    assert_clean_failure(quantize(str(tmp_path / "q"), "--out", str(tmp_path / "qq")), 2, "already quantized")


def test_debug_env_shows_traceback(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LLMOPT_DEBUG", "1")
    result = quantize(str(tmp_path / "nope"))
    assert result.exit_code != 0
    assert result.exception is not None and "does not exist" in str(result.exception)


def test_eval_of_missing_text_file(tmp_path: Path):
    result = runner.invoke(app, ["eval", "tiny-random", "--text", str(tmp_path / "none.txt")])
    assert_clean_failure(result, 2, "does not exist")


def test_cache_survives_a_removed_marker(tiny_dir: Path):
    # A half-built cache entry (no marker) is rebuilt, never trusted.
    from llmopt.models import materialize_builtin

    backup = tiny_dir.parent / "tiny-backup"
    shutil.copytree(tiny_dir, backup)
    try:
        (tiny_dir / "llmopt-builtin.json").unlink()
        assert (materialize_builtin("tiny-random") / "llmopt-builtin.json").is_file()
    finally:
        shutil.rmtree(backup)
