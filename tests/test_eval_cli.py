"""`llmopt eval`: the protocol on a small budget, with and without a reference."""

import json
from pathlib import Path

from typer.testing import CliRunner

from llmopt.cli.app import app

runner = CliRunner()
SMALL = ["--max-tokens", "512", "--window", "128"]


def test_eval_against_a_reference_reports_all_metrics():
    result = runner.invoke(app, ["eval", "tiny-random", "--reference", "tiny-random", *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["windows"] == 4 and doc["tokens_scored"] == 4 * 127
    assert doc["perplexity"] == doc["reference_perplexity"]  # the same model against itself
    assert abs(doc["kl_mean_nats"]) < 1e-6 and doc["top1_agreement"] == 1.0


def test_quantized_model_defaults_to_its_source_as_reference(tmp_path: Path):
    assert (
        runner.invoke(app, ["quantize", "tiny-random", "--out", str(tmp_path / "q"), "--no-eval"]).exit_code
        == 0
    )
    result = runner.invoke(app, ["eval", str(tmp_path / "q"), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["reference"] == "tiny-random"
    assert 0 < doc["kl_mean_nats"] < 0.05 and doc["top1_agreement"] > 0.9
    assert "reference: tiny-random" in result.stderr


def test_eval_table_without_reference(tmp_path: Path):
    text = tmp_path / "t.txt"
    text.write_text("It was a truth universally acknowledged. " * 100)
    result = runner.invoke(app, ["eval", "tiny-random", "--text", str(text), *SMALL])
    assert result.exit_code == 0, result.output
    assert "Perplexity" in result.stdout and "Top-1" not in result.stdout
    doc = json.loads(
        runner.invoke(app, ["eval", "tiny-random", "--text", str(text), *SMALL, "--json"]).stdout
    )
    assert doc["text"] == str(text) and doc["reference_perplexity"] is None


def test_window_larger_than_the_text_is_a_clear_error(tmp_path: Path):
    text = tmp_path / "short.txt"
    text.write_text("Too short.")
    result = runner.invoke(app, ["eval", "tiny-random", "--text", str(text), *SMALL])
    assert result.exit_code == 2
    assert "needs at least one window" in result.stderr
