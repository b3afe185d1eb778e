"""llmopt's CUDA decode kernels (llmopt/quant/cuda_gemv.py, csrc/gemv_cuda.cu) on a machine without a GPU.

The kernels themselves run only on a GPU: examples/gpu_lowbit_kernels.py ``check`` compares them with
a float64 reference there (odd shapes, NaN-poisoned outputs, a second run bit-identical) before any
timing. Here: the source compiles with nvcc where nvcc is installed (this machine type has it), the
library loads and agrees with the Python side on its row limits, CPU tensors never reach it, and a
missing compiler gives one warning and the Triton path instead of an error.
"""

from __future__ import annotations

import pytest
import torch

from llmopt.quant import cuda_gemv


@pytest.mark.skipif(cuda_gemv._nvcc() is None, reason="nvcc is not installed here")
def test_library_builds_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    path, seconds = cuda_gemv.build_library("sm_80")
    assert path.is_file() and seconds > 0
    lib = cuda_gemv.load(path)
    assert (lib.llmopt_gemv_max_rows(0), lib.llmopt_gemv_max_rows(1)) == (
        cuda_gemv.INT8_MAX_ROWS,
        cuda_gemv.INT4_MAX_ROWS,
    )
    assert cuda_gemv.build_library("sm_80") == (path, 0.0)  # built once per key


def test_cpu_tensors_never_reach_the_library(monkeypatch):
    def no_build(device_index: int) -> None:
        raise AssertionError("the CUDA library was asked for on a CPU call")

    monkeypatch.setattr(cuda_gemv, "_library", no_build)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert not cuda_gemv.usable(x, torch.zeros(8, 64, dtype=torch.int8), 64)


def test_missing_compiler_warns_and_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_gemv, "_nvcc", lambda: None)
    monkeypatch.setattr(cuda_gemv, "_arch", lambda device_index: "sm_90")
    cuda_gemv._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="nvcc"):
            assert cuda_gemv._library(0) is None
    finally:
        cuda_gemv._library.cache_clear()


@pytest.mark.parametrize(
    ("m", "k", "group", "expected"),
    [
        (1, 4096, None, True),  # int8: 1-2 rows, K a multiple of 16
        (2, 4096, None, True),
        (3, 4096, None, False),  # the Triton tiles are faster from 3 rows
        (1, 4104, None, False),
        (1, 4096, 128, True),  # int4 one row: the CUDA-core kernel
        (2, 96, 32, True),  # two rows, K not a multiple of 128: still the CUDA-core kernel
        (3, 96, 32, False),  # the tensor-core kernel needs K a multiple of 128
        (8, 4096, 128, True),
        (9, 4096, 128, False),  # one n8 tile
        (1, 4096, 48, False),  # group not a power of two
        (1, 4096, 16, False),  # group below 32
    ],
)
def test_row_and_shape_limits(m, k, group, expected):
    assert cuda_gemv._rows_ok(m, k, group) is expected
