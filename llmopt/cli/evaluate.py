"""``llmopt eval``: perplexity of a model, and KL / top-1 agreement against a reference."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli.common import (
    AllowPickle,
    JsonFlag,
    ModelArg,
    TextFile,
    TrustRemoteCode,
    err,
    handle_errors,
    out,
    progress_reporter,
)


@handle_errors
def evaluate(
    model: ModelArg = "smollm2-135m",
    reference: Annotated[
        str | None,
        typer.Option(
            help="Reference model for KL and top-1 agreement (default: a quantized model's source)."
        ),
    ] = None,
    text: TextFile = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text to score.")] = 16_384,
    window: Annotated[int, typer.Option(help="Tokens per independent window.")] = 1_024,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: JsonFlag = False,
) -> None:
    """Score MODEL by llmopt's quality protocol (fp32, non-overlapping windows of shipped public-domain text).

    Example: llmopt eval ./smollm2-135m-int8 --reference smollm2-135m
    """
    from llmopt.models import LoadSpec, load_model
    from llmopt.quant.checkpoint import read_provenance
    from llmopt.quant.quality import EvalSpec, evaluate_quality

    spec = EvalSpec(text_path=text, max_tokens=max_tokens, window=window)
    load = LoadSpec(
        dtype="float32", device="cpu", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    with progress_reporter() as progress:
        candidate = load_model(model, load, progress=lambda m: progress(m, 0, 0))
        if reference is None and (source := read_provenance(candidate.path).get("source")):
            reference = source
            err.print(f"reference: {source} (the quantized model's source)", highlight=False)
        ref = load_model(reference, load) if reference else None
        result = evaluate_quality(
            candidate.model, candidate.tokenizer, ref.model if ref else None, spec, progress
        )
    if as_json:
        typer.echo(json.dumps({"model": model, "reference": reference, **result.to_dict()}, indent=2))
        return
    table = Table(title=f"llmopt eval {model}", title_justify="left")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    table.add_row("Text", result.text)
    table.add_row("Tokens scored", f"{result.tokens_scored} ({result.windows} windows of {window})")
    table.add_row("Perplexity", f"{result.perplexity:.3f}")
    if result.reference_perplexity is not None:
        table.add_row(f"Reference perplexity ({reference})", f"{result.reference_perplexity:.3f}")
        table.add_row("Perplexity increase", f"{result.perplexity_increase_pct:+.2f}%")
        table.add_row("KL(reference ‖ model), mean", f"{result.kl_mean_nats:.5f} nats")
        table.add_row("Top-1 agreement", f"{100 * (result.top1_agreement or 0):.2f}%")
    table.add_row("Time", f"{result.seconds:.0f} s")
    out.print(table)
