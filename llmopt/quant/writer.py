"""Write a model directory atomically, with safetensors shards streamed to disk as they fill."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from llmopt.errors import OutputError

DEFAULT_MAX_SHARD_BYTES = 2 << 30


class ShardWriter:
    """Collects tensors and writes a shard whenever ``max_shard_bytes`` would be exceeded."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f"shard-{len(self._shards):05d}.safetensors"
        try:
            save_file(self._pending, str(path), metadata={"format": "pt"})
        except SafetensorError as exc:  # its I/O failures are not OSError; recover the errno for the message
            found = re.search(r"os error (\d+)", str(exc))
            raise OSError(int(found.group(1)) if found else errno.EIO, str(exc)) from exc
        self._shards.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> list[Path]:
        """Write the last shard, give the shards their final names, and the index if there are several."""
        if self._pending or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            final = self.folder / "model.safetensors"
            self._shards[0][0].rename(final)
            return [final]
        weight_map: dict[str, str] = {}
        finals = []
        for i, (path, names) in enumerate(self._shards):
            final = self.folder / f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update(dict.fromkeys(names, final.name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return finals


def check_output_dir(out: Path, force: bool) -> None:
    """Refuse early, before any work, an output that exists without --force or cannot be written."""
    if out.exists() and not force:
        raise OutputError(
            f"Output '{out}' already exists. Pass --force to replace it, or choose another --out."
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"Output '{out}' exists and is not a directory. Choose another --out.")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(
            f"The folder '{parent}' for the output does not exist. Create it or choose another --out."
        )


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` in one rename.

    On any failure, Ctrl-C included, the temporary directory is removed and ``out`` is untouched.
    """
    check_output_dir(out, force)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise _output_error(out, exc) from exc
    try:
        try:
            yield tmp
        except OSError as exc:
            raise _output_error(out, exc) from exc
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _output_error(out: Path, exc: OSError) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return OutputError(
            f"No space left on the device holding '{out.parent}'. Free space or choose another --out."
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"Cannot write to '{out.parent}' ({exc.strerror}). Choose a writable --out.")
    return OutputError(
        f"Writing '{out}' failed: {exc}. Nothing was left behind; check the location and retry."
    )
