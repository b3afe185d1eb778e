"""``llmopt models``: list the built-in model names."""

from __future__ import annotations

from rich.table import Table

from llmopt.cli.common import handle_errors, out


@handle_errors
def models() -> None:
    """List the built-in models any MODEL argument accepts."""
    from llmopt.models.builtin import BUILTIN_MODELS, RANDOM_SHAPES, cache_dir

    table = Table(title=f"Built-in models (cache: {cache_dir() / 'models'})", title_justify="left")
    table.add_column("Name")
    table.add_column("What")
    for spec in BUILTIN_MODELS.values():
        table.add_row(spec.name, spec.description)
    for name in RANDOM_SHAPES:
        table.add_row(name, f"{name} shape, seeded random bf16 weights, in memory only (llmopt bench)")
    out.print(table)
