"""`llmopt bench` and `bench --compare` end to end on tiny-random, with tiny lengths."""

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmopt.cli.app import app

runner = CliRunner()
TINY = ["--batch-sizes", "1,2", "--prompt-len", "8", "--gen-len", "4", "--runs", "2"]


DERIVED = ("achieved_gb_s", "floor_ms", "bytes_per_step", "floor_pct")  # computed from medians: no spread


def check_consistent(summary: dict, gen_len: int, batch: int) -> None:
    for key in (
        "ttft_ms_p50",
        "tpot_ms_p50",
        "e2e_ms_p50",
        "output_tok_s",
        "requests_per_s",
        "peak_mem_gib",
        *DERIVED,
    ):
        assert summary[key] > 0, key
        if key not in DERIVED:
            assert summary[f"{key}_min"] <= summary[key] <= summary[f"{key}_max"], key
    assert summary["output_tokens"] == gen_len * batch
    assert summary["ttft_ms_p50"] <= summary["e2e_ms_p50"]
    assert summary["floor_pct"] == pytest.approx(100 * summary["floor_ms"] / summary["tpot_ms_p50"])


def test_compare_end_to_end(tmp_path: Path):
    save, plot = tmp_path / "result.json", tmp_path / "chart.png"
    result = runner.invoke(
        app,
        [
            "bench",
            "--compare",
            "--before",
            "tiny-random",
            *TINY,
            "--json",
            "--save",
            str(save),
            "--plot",
            str(plot),
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert json.loads(save.read_text()) == doc
    env = doc["environment"]
    for key in ("device", "device_name", "torch", "transformers", "llmopt", "git_sha"):
        assert key in env
    assert doc["spec"]["gen_len"] == 4 and doc["copy_bandwidth_gb_s"] > 0
    before, after = doc["candidates"]
    assert before["model"] == "tiny-random" and "tiny-random-int8" in after["model"]
    assert before["engine"] == "transformers" and after["engine"] == "llmopt"
    assert after["weight_bytes"] != before["weight_bytes"]
    for cand in (before, after):
        assert [b["batch_size"] for b in cand["batches"]] == [1, 2]
        for batch in cand["batches"]:
            assert len(batch["runs"]) == 2 and batch["warmup_s"] > 0
            for run in batch["runs"]:
                s = run["summary"]
                # tokens/s × time = tokens, per run
                assert s["output_tok_s"] * s["wall_s"] == pytest.approx(s["output_tokens"])
                assert len(run["records"]) == batch["batch_size"]
                assert all(len(r["itl_s"]) == 3 for r in run["records"])
            check_consistent(batch["summary"], 4, batch["batch_size"])
    assert set(doc["compare"]) == {"1", "2"}
    ratio = doc["compare"]["1"]["output_tok_s"]
    assert ratio["ratio"] == pytest.approx(ratio["after"] / ratio["before"])
    assert 0.95 <= doc["quality"]["top1_agreement"] <= 1.0
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_table_and_markdown():
    result = runner.invoke(app, ["bench", "--compare", "--before", "tiny-random", *TINY, "--no-quality"])
    assert result.exit_code == 0, result.output
    for phrase in ("Metric", "Before", "After", "Change", "Output tokens/s", "Peak memory", "prefill"):
        assert phrase in result.stdout
    md = runner.invoke(
        app, ["bench", "--compare", "--before", "tiny-random", *TINY, "--no-quality", "--markdown"]
    )
    assert md.exit_code == 0
    lines = md.stdout.strip().splitlines()
    assert lines[0] == "| Metric | Before | After | Change |" and lines[1] == "|---|---|---|---|"
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines[2:])


@pytest.mark.parametrize("engine", ["llmopt", "transformers", "transformers-compile"])
def test_single_model_bench(engine: str):
    args = [] if engine == "llmopt" else ["--engine", engine]  # llmopt's engine is the default
    result = runner.invoke(app, ["bench", "tiny-random", *TINY, *args, "--json"])
    assert result.exit_code == 0, result.output
    (cand,) = json.loads(result.stdout)["candidates"]
    assert cand["engine"] == engine and len(cand["batches"]) == 2
    for batch in cand["batches"]:
        check_consistent(batch["summary"], 4, batch["batch_size"])
        for run in batch["runs"]:
            assert all(r["output_tokens"] == 4 and len(r["itl_s"]) == 3 for r in run["records"])


@pytest.mark.parametrize(
    ("args", "code", "phrase"),
    [
        (["--batch-sizes", "1,x"], 2, "comma-separated"),
        (["--batch-sizes", "0"], 2, "positive"),
        (["--gen-len", "1"], 2, "TPOT"),
        (["--engine", "vllm"], 2, "Unknown engine"),
        (["--plot", "chart.jpg"], 2, ".png"),
        (["--save", "/nonexistent/dir/x.json"], 3, "does not exist"),
    ],
)
def test_bad_bench_input(args, code, phrase):
    result = runner.invoke(app, ["bench", "tiny-random", *TINY, *args])
    assert result.exit_code == code, result.output
    assert phrase in result.stderr


def test_random_shape_compare_quantizes_in_memory(tmp_path: Path, monkeypatch):
    # A benchmark shape (like llama-3-8b, but tiny) is built in memory; the "after" is the same
    # seeded model quantized in place, with no checkpoint on disk and no quality section.
    from llmopt.models import builtin

    shape = json.loads((builtin.SHAPES_DIR / "llama-3-8b.json").read_text())
    shape |= {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "vocab_size": 1024,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    path = tmp_path / "tiny-shape.json"
    path.write_text(json.dumps(shape))
    monkeypatch.setitem(builtin.RANDOM_SHAPES, "tiny-shape", path)
    result = runner.invoke(
        app, ["bench", "--compare", "--before", "tiny-shape", "--scheme", "int4", *TINY, "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    before, after = doc["candidates"]
    assert after["label"] == "tiny-shape int4 (llmopt)" and after["model"] == "tiny-shape"
    assert after["weight_bytes"] < 0.6 * before["weight_bytes"]
    assert doc["quality"] is None
    assert not list(Path(os.environ["LLMOPT_CACHE_DIR"]).glob("**/tiny-shape*"))  # nothing written
    quantize = runner.invoke(app, ["quantize", "tiny-shape", "--no-eval"])
    assert quantize.exit_code == 2 and "only in memory" in quantize.stderr


def test_checkpoint_preparation_runs_in_a_child_and_keeps_error_classes(tmp_path: Path):
    """What bench --compare has to make (a quantized checkpoint) is made in a spawned process, so its
    freed memory never counts in the peak RSS measured afterwards; a child's llmopt error comes back
    as the same class, so the CLI's exit codes hold."""
    from llmopt.bench import compare
    from llmopt.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        compare._make_in_child("no-such-model", "int8")
    import shutil

    from llmopt.models import resolve_model

    made = compare._quantized_path("tiny-random", "int4", resolve_model("tiny-random"))
    shutil.rmtree(made, ignore_errors=True)  # the session's cache may hold it from an earlier test
    assert not (made / "config.json").is_file()
    path = compare.cached_quantized("tiny-random", "int4")
    assert path == str(made)
    assert (made / "config.json").is_file()
    assert compare.cached_quantized("tiny-random", "int4") == path
