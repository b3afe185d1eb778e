"""llmopt/quant/native_build.py: staged builds (translation units compiled in parallel, then a link),
with g++ and two tiny C sources; failures leave build.failed and no stray files."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import pytest

from llmopt.quant import native_build
from llmopt.quant.native_build import BuildError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _sources(tmp_path: Path, second_body: str = "return 2 * x;") -> list[Path]:
    first, second = tmp_path / "first.cpp", tmp_path / "second.cpp"
    first.write_text('extern "C" int first(int x) { return x + 1; }\n')
    second.write_text(f'extern "C" int second(int x) {{ {second_body} }}\n')
    return [first, second]


def _stages(sources: list[Path]):
    def stages(target: Path) -> list[list[list[str]]]:
        objects = [f"{target}.{i}.o" for i in range(len(sources))]
        compiles = [
            ["g++", "-O1", "-fPIC", "-c", str(s), "-o", o] for s, o in zip(sources, objects, strict=True)
        ]
        return [compiles, [["g++", "-shared", *objects, "-o", str(target)]]]

    return stages


def test_staged_build_links_parallel_units_once(tmp_path):
    folder = tmp_path / "lib"
    path, seconds = native_build.build_library(folder, "two", _stages(_sources(tmp_path)))
    lib = ctypes.CDLL(str(path))
    assert (lib.first(41), lib.second(21)) == (42, 42) and seconds > 0
    assert native_build.build_library(folder, "two", _stages(_sources(tmp_path))) == (path, 0.0)
    assert sorted(p.name for p in folder.iterdir()) == ["build.lock", "build.log", "two.so"]


def test_a_failing_unit_fails_the_build_and_is_remembered(tmp_path):
    folder = tmp_path / "lib"
    stages = _stages(_sources(tmp_path, second_body="return undeclared;"))
    with pytest.raises(BuildError, match="g\\+\\+ failed"):
        native_build.build_library(folder, "two", stages)
    assert (folder / "build.failed").is_file() and "undeclared" in (folder / "build.log").read_text()
    assert not list(folder.glob("*.o")) and not list(folder.glob("*.so"))  # nothing half-built is left
    with pytest.raises(BuildError, match="earlier build failed"):
        native_build.build_library(folder, "two", _stages(_sources(tmp_path)))
    path, _ = native_build.build_library(folder, "two", _stages(_sources(tmp_path)), force=True)
    assert ctypes.CDLL(str(path)).second(4) == 8 and not (folder / "build.failed").exists()


def test_load_or_warn_opens_or_warns_once_with_the_fix(tmp_path, capsys):
    build = lambda: native_build.build_library(tmp_path / "lib", "two", _stages(_sources(tmp_path)))  # noqa: E731
    opened = native_build.load_or_warn(
        "test library", build, lambda p: ctypes.CDLL(str(p)), "x", "fix A", "fix B"
    )
    assert opened is not None and opened.first(1) == 2
    assert "built the test library" in capsys.readouterr().err

    def refuse(path: Path) -> ctypes.CDLL:
        raise native_build.Unusable("self-test: off by 1e0")

    with pytest.warns(
        UserWarning, match=r"test library: unavailable \(self-test.*\); slow path\. To fix: fix A\."
    ):
        assert native_build.load_or_warn("test library", build, refuse, "slow path", "fix A", "fix B") is None

    def fail() -> tuple[Path, float]:
        raise BuildError("no compiler")

    with pytest.warns(UserWarning, match="To fix: fix B"):
        assert native_build.load_or_warn("test library", fail, refuse, "slow path", "fix A", "fix B") is None
