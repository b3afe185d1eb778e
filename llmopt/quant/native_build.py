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

import ctypes
import hashlib
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import cast


class BuildError(RuntimeError):
    pass


class Unusable(Exception):
    """A library that builds cannot serve this device (a GPU too old for it, or a failed self-test)."""


def load_or_warn(
    what: str,
    build: Callable[[], tuple[Path, float]],
    open_checked: Callable[[Path], ctypes.CDLL],
    consequence: str,
    unusable_fix: str,
    build_fix: str,
) -> ctypes.CDLL | None:
    """``open_checked(path)`` of the library ``build()`` makes (saying so when it had to compile), or
    None with one warning: llmopt's ``what`` is unavailable (why), ``consequence``, and how to fix it
    (``unusable_fix`` when it built but cannot serve this device, else ``build_fix``)."""
    try:
        path, seconds = build()
        if seconds:
            print(f"llmopt: built the {what} in {seconds:.1f} s ({path})", file=sys.stderr)
        return open_checked(path)
    except (BuildError, OSError, Unusable) as exc:
        fix = unusable_fix if isinstance(exc, Unusable) else build_fix
        warnings.warn(f"llmopt's {what}: unavailable ({exc}); {consequence}. To fix: {fix}.", stacklevel=4)
        return None


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


Command = list[str]


def build_library(
    folder: Path,
    name: str,
    command: Callable[[Path], Command | list[list[Command]]],
    force: bool = False,
) -> tuple[Path, float]:
    """Run ``command(target)`` to build ``folder/<name>.so`` unless it is there (``force`` rebuilds).
    ``command`` returns one argv, or stages of argvs: the stages run in order, each stage's commands at
    once (separate translation units compiled in parallel, then one link); files a stage writes
    next to the target as ``<target>.*.o`` are deleted afterwards. Returns the library's path and the
    build time in seconds (0 when it was already built). Raises BuildError with the compiler's last
    lines when the build fails now or failed before."""
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
        planned = command(partial)
        staged = bool(planned) and isinstance(planned[0], list)
        stages = cast(list[list[Command]], planned if staged else [[planned]])
        start = time.perf_counter()
        try:
            _run_stages(stages, log, failed)
        except BuildError:
            partial.unlink(missing_ok=True)
            raise
        finally:
            for leftover in folder.glob(f"{partial.name}.*.o"):
                leftover.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        if not partial.is_file():
            failed.write_text("no library written")
            raise BuildError(f"the build wrote no library (log: {log})")
        os.replace(partial, target)  # atomic: a reader never sees a half-written library
        failed.unlink(missing_ok=True)
        return target, seconds


def _run_stages(stages: list[list[Command]], log: Path, failed: Path) -> None:
    """Run each stage's commands concurrently, stage after stage, into one log; the first failure
    marks the folder failed and raises BuildError with that command's last lines."""
    from concurrent.futures import ThreadPoolExecutor

    def run(argv: Command) -> tuple[Command, subprocess.CompletedProcess[str] | Exception]:
        try:
            return argv, subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            return argv, exc

    entries: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for stage in stages:
            for argv, result in pool.map(run, stage):
                if isinstance(result, Exception):
                    log.write_text("\n".join([*entries, " ".join(argv), str(result)]))
                    failed.write_text(str(result))
                    raise BuildError(f"{argv[0]} could not run ({result})") from result
                entries.append(" ".join(argv) + "\n\n" + result.stdout + result.stderr)
                if result.returncode != 0:
                    log.write_text("\n".join(entries))
                    failed.write_text(f"exit {result.returncode}")
                    tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
                    what = f"{argv[0]} failed (exit {result.returncode})"
                    raise BuildError(f"{what}; full log in {log}:\n{tail}")
    log.write_text("\n".join(entries))
