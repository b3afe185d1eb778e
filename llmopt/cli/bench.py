"""``llmopt bench``: offline latency, throughput, memory and bandwidth; ``--compare`` before and after."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmopt.cli.common import JsonFlag, err, handle_errors, out, progress_reporter
from llmopt.errors import InputError, OutputError


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(
            f"--batch-sizes must be comma-separated integers such as 1,8 (got '{text}')."
        ) from None
    return sizes


def _check_writable(path: Path | None, option: str) -> None:
    if path is not None and not path.expanduser().absolute().parent.is_dir():
        raise OutputError(f"The folder for {option} '{path}' does not exist. Create it or pass another path.")


@handle_errors
def bench(
    model: Annotated[str, typer.Argument(help="Model to measure (ignored with --compare).")] = "smollm2-135m",
    engine: Annotated[
        str,
        typer.Option(
            help="llmopt (its own engine), transformers (generate()) or transformers-compile "
            "(static cache; compiled on GPU)."
        ),
    ] = "llmopt",
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (seeded random ids).")] = 128,
    gen_len: Annotated[int, typer.Option(help="New tokens per sequence (EOS ignored).")] = 64,
    runs: Annotated[int, typer.Option(help="Timed runs per batch size, after one warm-up.")] = 3,
    seed: Annotated[int, typer.Option(help="Seed of the random prompts.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (checkpoint dtype on GPU, fp32 on CPU), bf16, fp16, fp32.")
    ] = "auto",
    compile_step: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="llmopt engine: torch.compile the decode step (default: on CUDA, off on CPU).",
        ),
    ] = None,
    compare: Annotated[bool, typer.Option("--compare", help="Measure --before against --after.")] = False,
    before: Annotated[str | None, typer.Option(help="MODEL[:ENGINE] before (default smollm2-135m).")] = None,
    after: Annotated[str | None, typer.Option(help="MODEL[:ENGINE] after (default: before's int8).")] = None,
    scheme: Annotated[str, typer.Option(help="Scheme of the default --after: int8 or int4.")] = "int8",
    no_quality: Annotated[
        bool, typer.Option("--no-quality", help="Skip perplexity / top-1 in --compare.")
    ] = False,
    save: Annotated[Path | None, typer.Option(help="Write the full JSON result to this file.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Draw before/after charts into this PNG.")] = None,
    markdown: Annotated[
        bool, typer.Option("--markdown", help="Print a Markdown table for BENCHMARKS.md.")
    ] = False,
    as_json: JsonFlag = False,
) -> None:
    """Measure TTFT, TPOT, latency, tokens/s, memory and bandwidth against the floor.

    Example: llmopt bench --compare   (smollm2-135m under transformers' generate(), against llmopt's
    int8 checkpoint on llmopt's engine)
    """
    from llmopt.bench.compare import DEFAULT_BEFORE, cached_quantized, run_bench
    from llmopt.bench.offline import BenchSpec, Candidate
    from llmopt.bench.report import comparison_rows, save_plot, single_header, single_rows, to_markdown
    from llmopt.models.builtin import RANDOM_SHAPES

    spec = BenchSpec(
        batch_sizes=_batch_sizes(batch_sizes),
        prompt_len=prompt_len,
        gen_len=gen_len,
        runs=runs,
        seed=seed,
        device=device,
        dtype=dtype,
        compile=compile_step,
    )
    _check_writable(save, "--save")
    _check_writable(plot, "--plot")
    if plot is not None and plot.suffix.lower() != ".png":
        raise InputError(f"--plot writes a PNG; give a file name ending in .png (got '{plot}').")
    with progress_reporter() as progress:
        if compare:
            first = Candidate.parse(before or DEFAULT_BEFORE)
            label = f"{first.label} {scheme} (llmopt)"
            if after:
                second = Candidate.parse(after)
            elif first.model in RANDOM_SHAPES:  # in memory only: quantized in place after loading
                second = Candidate(first.model, "llmopt", label, quantize=scheme)
            else:
                second = Candidate(cached_quantized(first.model, scheme, progress), "llmopt", label)
            candidates = [first, second]
        else:
            candidates = [Candidate(model, engine, model)]
        result = run_bench(candidates, spec, with_quality=not no_quality, progress=progress)
    doc = result.to_dict()
    if save is not None:
        save.write_text(json.dumps(doc, indent=2) + "\n")
        err.print(f"saved {save}", highlight=False)
    if plot is not None:
        save_plot(doc, plot)
        err.print(f"plotted {plot}", highlight=False)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    header: tuple[str, ...]
    rows: list[tuple[str, ...]]
    if compare:
        header, rows = ("Metric", "Before", "After", "Change"), list(comparison_rows(doc))
    else:
        header, rows = single_header(doc), single_rows(doc)
    if markdown:
        typer.echo(to_markdown(header, rows))
        return
    env = doc["environment"]
    title = (
        f"llmopt bench on {env['device_name']} ({env['device']}, {env['threads']} threads) — "
        f"prompt {prompt_len}, gen {gen_len}, median of {runs} runs"
    )
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    out.print(table)
    out.print(
        f"Memory: {doc['memory_metric']}. Floor: bytes read per decode step / measured copy bandwidth "
        f"({doc['copy_bandwidth_gb_s']:.1f} GB/s).",
        highlight=False,
    )
