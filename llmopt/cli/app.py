"""The Typer application. Importing this module must not import torch (``llmopt --help`` stays fast)."""

from __future__ import annotations

import typer

from llmopt import __version__
from llmopt.cli import bench, evaluate, generate, models, pending, quantize

app = typer.Typer(
    name="llmopt",
    help="Quantize, shard, serve and benchmark Hugging Face causal LMs near the hardware's limit.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("quantize")(quantize.quantize)
app.command("eval")(evaluate.evaluate)
app.command("models")(models.models)
app.command("bench")(bench.bench)
app.command("generate")(generate.generate)
app.command("shard")(pending.shard)
app.command("serve")(pending.serve)
app.command("nginx-config")(pending.nginx_config)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version."
    ),
) -> None:
    """Quantize, shard, serve and benchmark Hugging Face causal LMs near the hardware's limit."""


def main() -> None:
    app()
