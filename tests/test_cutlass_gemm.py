"""llmopt's Hopper int8 GEMM (llmopt/quant/cutlass_gemm.py, csrc/int8_gemm_sm90.cu) without a GPU.

The GEMM runs only on a Hopper GPU: examples/gpu_lowbit_kernels.py ``check`` compares it there with a
float64 reference (odd shapes, NaN-poisoned outputs, a second run bit-identical, a CUDA-graph replay)
and ``cutlass`` times every configuration against bf16 cuBLAS (BENCHMARKS.md §5). Here: one of its
translation units compiles with nvcc against CUTLASS's headers where both are installed, the tile
choice and row rule on Llama-3-8B's shapes, where the headers are looked for, CPU tensors never reach
it, and a missing dependency gives one warning naming the fix and the Triton path instead of an error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llmopt.quant import cutlass_gemm
from llmopt.quant.cuda_gemv import nvcc_path

H200_SMS = 132


@pytest.mark.skipif(
    nvcc_path() is None or cutlass_gemm.header_dirs() is None, reason="needs nvcc and CUTLASS's headers"
)
def test_one_translation_unit_compiles(tmp_path):
    import subprocess

    nvcc, dirs = nvcc_path(), cutlass_gemm.header_dirs()
    assert nvcc is not None and dirs is not None
    obj = tmp_path / "unit.o"
    argv = cutlass_gemm.compile_command(nvcc, dirs, "pp64x64", torch.bfloat16, obj)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    entry = cutlass_gemm.entry_name("pp64x64", torch.bfloat16)
    assert f" T {entry}\n" in symbols and f" T {entry}_workspace\n" in symbols


# The fastest configuration measured on an H200 (the sweep in BENCHMARKS.md §5) where the cost model's
# pick is that one: (rows, N, K) -> configuration.
@pytest.mark.parametrize(
    ("m", "n", "k", "expected"),
    [
        (128, 6144, 4096, "pp64x128"),  # q/k/v at batch 128
        (128, 4096, 4096, "pp64x64"),  # o
        (128, 28672, 4096, "sk128x128"),  # gate/up
        (128, 4096, 14336, "sk128x128"),  # down: K split by stream-K
        (128, 128256, 4096, "sk128x128"),  # the head
        (64, 28672, 4096, "sk128x64"),
        (64, 4096, 14336, "sk128x64"),
        (256, 6144, 4096, "pp64x256"),
        (1024, 28672, 4096, "sk128x256"),  # prefill
        (2048, 4096, 14336, "sk128x256"),
    ],
)
def test_choose_config_on_llama_shapes(m, n, k, expected):
    assert cutlass_gemm.choose_config(m, n, k, H200_SMS) == expected


def test_cost_model_counts_waves_and_splits():
    pingpong, stream_k = cutlass_gemm.CONFIGS["pp64x64"], cutlass_gemm.CONFIGS["sk128x64"]
    one_wave = cutlass_gemm.estimated_cost(pingpong, 64, 64 * H200_SMS, 4096, H200_SMS)
    assert cutlass_gemm.estimated_cost(pingpong, 64, 64 * H200_SMS + 1, 4096, H200_SMS) == 2 * one_wave
    few_tiles = cutlass_gemm.estimated_cost(stream_k, 64, 128 * 10, 4096, H200_SMS)
    assert few_tiles == pytest.approx(
        10 / H200_SMS * 64 * stream_k.step_cost + cutlass_gemm.STREAM_K_SPLIT_COST
    )


@pytest.mark.parametrize(
    ("m", "n", "k", "expected"),
    [
        (48, 28672, 4096, False),  # Triton's tiles are faster below MIN_ROWS
        (64, 28672, 4096, True),
        (96, 4096, 4096, False),  # o_proj-sized weights from SMALL_WEIGHT_MIN_ROWS
        (128, 4096, 4096, True),
        (64, 6144, 4096, True),
        (4096, 28672, 4096, True),
        (4097, 28672, 4096, False),  # compute-bound: dequantize + cuBLAS bf16
    ],
)
def test_row_rule(m, n, k, expected):
    assert cutlass_gemm.takes_rows(m, n, k) is expected


def test_headers_from_a_cutlass_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(cutlass_gemm.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))
    assert cutlass_gemm.header_dirs() is None  # an empty folder is not a checkout
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").write_text("")
    (tmp_path / "tools" / "util" / "include" / "cutlass" / "util").mkdir(parents=True)
    assert cutlass_gemm.header_dirs() == [tmp_path / "include", tmp_path / "tools" / "util" / "include"]


def test_cpu_tensors_never_reach_the_library(monkeypatch):
    def no_build(device_index: int) -> None:
        raise AssertionError("the CUTLASS library was asked for on a CPU call")

    monkeypatch.setattr(cutlass_gemm, "_library", no_build)
    x = torch.randn(128, 64, dtype=torch.bfloat16)
    q, scale = torch.zeros(64, 64, dtype=torch.int8), torch.ones(64, dtype=torch.bfloat16)
    assert not cutlass_gemm.usable(x, q, scale, torch.empty(128, 64, dtype=torch.bfloat16))


@pytest.fixture
def uncached_library() -> Iterator[None]:
    cutlass_gemm._library.cache_clear()
    yield
    cutlass_gemm._library.cache_clear()


def test_missing_headers_warn_with_the_fix(tmp_path, monkeypatch, uncached_library):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cutlass_gemm, "nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    monkeypatch.setattr(cutlass_gemm, "header_dirs", lambda: None)
    with pytest.warns(UserWarning, match=r"llmopt\[gpu\].*slower Triton"):
        assert cutlass_gemm._library(0) is None


def test_missing_compiler_warns(tmp_path, monkeypatch, uncached_library):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cutlass_gemm, "nvcc_path", lambda: None)
    with pytest.warns(UserWarning, match="nvcc"):
        assert cutlass_gemm._library(0) is None
