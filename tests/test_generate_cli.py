"""`llmopt generate` end to end on the real built-in model: exact greedy text, streaming, JSON, errors."""

import json

from typer.testing import CliRunner

from llmopt.cli.app import app

runner = CliRunner()
PROMPT = "Elizabeth Bennet walked into the room and"
# transformers' greedy continuation (the engine tests assert the token ids)
GREEDY = " said, \"I'm sorry, I'm not sure I'm ready to talk about it.\""


def test_streams_the_greedy_text(smollm2_dir):
    result = runner.invoke(app, ["generate", "smollm2-135m", PROMPT, "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(GREEDY)
    assert "[length, 20 tokens]" in result.stderr


def test_batch_json_with_stop_string(smollm2_dir):
    args = ["generate", "smollm2-135m", PROMPT, "The capital of France is", "--max-new-tokens", "20"]
    result = runner.invoke(app, [*args, "--stop", "sorry", "--json"])
    assert result.exit_code == 0, result.output
    first, second = json.loads(result.stdout)
    assert first["text"] == GREEDY[: GREEDY.index("sorry")] and first["finish_reason"] == "stop"
    assert second["text"].startswith(" Paris.") and second["finish_reason"] == "length"


def test_refuses_what_does_not_fit(smollm2_dir):
    result = runner.invoke(
        app, ["generate", "smollm2-135m", "Hi", "--max-new-tokens", "500", "--max-seq", "64"]
    )
    assert result.exit_code == 2
    assert "max_seq" in result.stderr
    bad = runner.invoke(app, ["generate", "smollm2-135m", "Hi", "--top-p", "0"])
    assert bad.exit_code == 2 and "top_p" in bad.stderr
