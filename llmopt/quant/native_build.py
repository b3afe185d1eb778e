"""Building llmopt's native kernel libraries on first use, once per key, safely across processes.

The CPU kernels (g++, csrc/*.cpp) and the GPU decode kernels (nvcc, csrc/*.cu) are compiled on the
machine that runs them, into llmopt's cache: ``<cache>/<kind>/<name>-<key>/<name>.so``, where the key
hashes everything the binary depends on (sources, compiler version, flags, target). A file lock makes
sure two processes never build the same key at once (the later one loads the finished library); the
library is written under a temporary name and renamed, so no reader sees half a file; a failed build
leaves ``build.failed`` and ``build.log`` behind, so later processes report it instead of retrying
until the inputs change or the folder is deleted.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path


class BuildError(RuntimeError):
    pass


def tool_version(executable: str) -> str:
    """What ``executable --version`` prints ('?' when it does not run): part of a build's key."""
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip() or "?"


def build_folder(kind: str, name: str, key_parts: Iterable[bytes | str]) -> Path:
    """``<cache>/<kind>/<name>-<hash of key_parts>``."""
    from llmopt.models.builtin import cache_dir

    key = hashlib.sha256()
    for part in key_parts:
        key.update(part.encode() if isinstance(part, str) else part)
        key.update(b"\0")
    return cache_dir() / kind / f"{name}-{key.hexdigest()[:16]}"


def build_library(
    folder: Path, name: str, command: Callable[[Path], list[str]], force: bool = False
) -> tuple[Path, float]:
    """Run ``command(target)`` to build ``folder/<name>.so`` unless it is there (``force`` rebuilds).
    Returns its path and the build time in seconds (0 when it was already built). Raises BuildError
    with the compiler's last lines when the build fails now or failed before."""
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.so"
    failed = folder / "build.failed"
    log = folder / "build.log"
    with FileLock(str(folder / "build.lock")):
        if target.is_file() and not force:
            return target, 0.0
        if failed.is_file() and not force:
            raise BuildError(f"an earlier build failed (log: {log}; delete {folder} to retry)")
        partial = folder / f"{name}.{os.getpid()}.tmp.so"
        argv = command(partial)
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            failed.write_text(str(exc))
            raise BuildError(f"{argv[0]} could not run ({exc})") from exc
        seconds = time.perf_counter() - start
        log.write_text(" ".join(argv) + "\n\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            failed.write_text(f"exit {proc.returncode}")
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise BuildError(f"{argv[0]} failed (exit {proc.returncode}); full log in {log}:\n{tail}")
        os.replace(partial, target)  # atomic: a reader never sees a half-written library
        failed.unlink(missing_ok=True)
        return target, seconds
