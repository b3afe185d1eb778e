"""Shared fixtures. Tests run offline on the CPU; built-in models convert once per session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, llmopt's Triton kernels run under Triton's interpreter (on CPU tensors); the flag is
# read when the kernels are defined, so it is set before anything imports them. The engine and
# QuantLinear never pick Triton kernels for CPU layers, so nothing else changes.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def llmopt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache per test session (or LLMOPT_TEST_CACHE_DIR, to keep conversions between local runs)."""
    path = Path(os.environ.get("LLMOPT_TEST_CACHE_DIR") or tmp_path_factory.mktemp("llmopt-cache"))
    os.environ["LLMOPT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own empty directory, so default outputs (./MODEL-SCHEME) never collide."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_dir(llmopt_cache: Path) -> Path:
    from llmopt.models import materialize_builtin

    return materialize_builtin("tiny-random")


@pytest.fixture(scope="session")
def smollm2_dir(llmopt_cache: Path) -> Path:
    from llmopt.models import materialize_builtin

    return materialize_builtin("smollm2-135m")


@pytest.fixture
def tiny_copy(tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of tiny-random that a test may damage."""
    dst = tmp_path / "tiny-copy"
    shutil.copytree(tiny_dir, dst)
    return dst


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    """Run the real `llmopt` entry point (python -m llmopt) in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "llmopt", *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount small tmpfs folders (read-only or tiny) to test output failures; skips without mount rights."""
    mounted: list[Path] = []

    def mount(name: str, options: str) -> Path:
        target = tmp_path / name
        target.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True
        )
        if proc.returncode != 0:
            pytest.skip("cannot mount tmpfs here (needs root); output-failure test skipped")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], check=False)
