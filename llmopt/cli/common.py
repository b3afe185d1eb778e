"""What every command shares: consoles, error handling at the edge, progress, shared options."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from llmopt.errors import LLMOptError

out = Console()  # results: tables (or JSON) on stdout
err = Console(stderr=True)  # chatter, progress and errors on stderr

F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[str, typer.Argument(help="A local Hugging Face model directory or a built-in name.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option("--trust-remote-code", help="Allow the model's own Python code to run (off by default)."),
]
AllowPickle = Annotated[
    bool, typer.Option("--allow-pickle", help="Read pickle .bin checkpoints (with weights_only=True).")
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
TextFile = Annotated[
    Path | None, typer.Option("--text", help="Evaluate on this UTF-8 text instead of the shipped slice.")
]


def handle_errors(command: F) -> F:
    """Turn llmopt's errors into one clear line on stderr and a non-zero exit (LLMOPT_DEBUG=1: traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LLMOptError as exc:
            if os.environ.get("LLMOPT_DEBUG") == "1":
                raise
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]: nothing was left half-written.")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@contextmanager
def progress_reporter(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A ``progress(stage, done, total)`` callback drawing rich bars on stderr, one per stage."""
    if not enabled or not sys.stderr.isatty():
        last: dict[str, int] = {}

        def plain(stage: str, done: int, total: int) -> None:
            # Non-interactive stderr: one line per stage start and end, not a redrawn bar.
            if total == 0 or (done in (1, total) and last.get(stage) != done):
                err.print(f"[dim]{stage}[/]" + (f" {done}/{total}" if total else ""), highlight=False)
                last[stage] = done

        yield plain
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    ) as bars:
        tasks: dict[str, TaskID] = {}

        def draw(stage: str, done: int, total: int) -> None:
            if total == 0:
                err.print(f"[dim]{stage}[/]", highlight=False)
                return
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done)

        yield draw


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"
