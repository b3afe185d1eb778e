"""Commands that later issues build. Each says so plainly and exits non-zero; none fakes a result."""

from __future__ import annotations

from typing import Annotated

import typer

from llmopt.cli.common import handle_errors
from llmopt.errors import NotYetAvailableError


def _not_yet(command: str, what: str) -> None:
    raise NotYetAvailableError(f"`llmopt {command}` is not yet available: {what} has not been built yet.")


@handle_errors
def shard(model: Annotated[str, typer.Argument()] = "smollm2-135m") -> None:
    """Plan a device map across GPUs and run tensor-parallel (not yet available)."""
    _not_yet("shard", "device-map planning and tensor parallelism")


@handle_errors
def serve(model: Annotated[str, typer.Argument()] = "smollm2-135m") -> None:
    """Serve replicas behind NGINX with an OpenAI-compatible API (not yet available)."""
    _not_yet("serve", "the replica server")


@handle_errors
def nginx_config() -> None:
    """Print the NGINX load-balancer config for `llmopt serve` (not yet available)."""
    _not_yet("nginx-config", "the NGINX config renderer")
