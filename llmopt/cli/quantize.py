"""``llmopt quantize``: write an int8/int4 checkpoint and show its size and quality."""

from __future__ import annotations

import json
from pathlib import Path
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
    human_bytes,
    out,
    progress_reporter,
)

METHOD_LABELS = {
    "gptq": "GPTQ (calibrated)",
    "learned": "learned rounding (calibrated)",
    "rtn": "round-to-nearest",
}


@handle_errors
def quantize(
    model: ModelArg = "smollm2-135m",
    scheme: Annotated[str, typer.Option(help="int8 (per-channel) or int4 (group-wise).")] = "int8",
    group_size: Annotated[
        int | None,
        typer.Option(help="int4 group size (32/64/128/256); default: largest of 128/64/32 that fits."),
    ] = None,
    method: Annotated[
        str,
        typer.Option(
            help="gptq (calibrated), learned (rounding learned per block: best int4, minutes on a GPU, "
            "hours on a small CPU), rtn (round-to-nearest, bounded memory); auto: learned for int4 "
            "on a GPU, else gptq, if it fits."
        ),
    ] = "auto",
    keep_head: Annotated[bool, typer.Option("--keep-head", help="Leave lm_head in 16-bit.")] = False,
    rotate: Annotated[
        bool | None,
        typer.Option(
            "--rotate/--no-rotate",
            help="Rotate the residual stream before quantizing (exact; the checkpoint stays a plain "
            "one of the same architecture). Default: on for int8 with GPTQ where the architecture "
            "allows, off otherwise.",
        ),
    ] = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output directory (default ./MODEL-SCHEME).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the quality evaluation.")] = False,
    text: TextFile = None,
    allow_pickle: AllowPickle = False,
    trust_remote_code: TrustRemoteCode = False,
    as_json: JsonFlag = False,
) -> None:
    """Quantize MODEL's linear layers to int8 or int4 and write a checkpoint in HF layout.

    Example: llmopt quantize smollm2-135m --scheme int4 --out ./smol-int4
    """
    from llmopt.quant.api import QuantizeSpec, quantize_checkpoint
    from llmopt.quant.quality import EvalSpec
    from llmopt.quant.schemes import QuantSpec

    spec = QuantizeSpec(
        quant=QuantSpec(
            scheme=scheme, group_size=group_size, keep_head=keep_head, method=method, rotate=rotate
        ),
        out=out_dir,
        force=force,
        evaluate=not no_eval,
        eval=EvalSpec(text_path=text),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    with progress_reporter() as progress:
        result = quantize_checkpoint(model, spec, progress)
    err.print(f"wrote [bold]{result.out}[/]", highlight=False)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    table = Table(title=f"llmopt quantize {result.source} → {result.scheme}", title_justify="left")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    group = f", group {result.group_size}" if result.group_size else ", per channel"
    table.add_row("Scheme", f"{result.scheme}{group}, head {result.head}")
    table.add_row("Method", METHOD_LABELS[result.method])
    table.add_row("Residual-stream rotation", "yes" if result.rotated else "no")
    table.add_row("Size before", human_bytes(result.bytes_before))
    table.add_row("Size after", human_bytes(result.bytes_after))
    table.add_row("Ratio", f"{result.ratio:.2f}x")
    table.add_row("Quantize time", f"{result.seconds_quantize:.1f} s")
    q = result.quality
    if q is not None:
        table.add_row(
            "Perplexity (reference → quantized)", f"{q.reference_perplexity:.3f} → {q.perplexity:.3f}"
        )
        table.add_row("Perplexity increase", f"{q.perplexity_increase_pct:+.2f}%")
        table.add_row("KL(reference ‖ quantized), mean", f"{q.kl_mean_nats:.5f} nats")
        table.add_row("Top-1 agreement", f"{100 * (q.top1_agreement or 0):.2f}%")
        table.add_row("Evaluated on", f"{q.tokens_scored} tokens, {q.windows} windows ({q.seconds:.0f} s)")
    out.print(table)
