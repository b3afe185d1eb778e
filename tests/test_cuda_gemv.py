"""llmopt's CUDA decode kernels (llmopt/quant/cuda_gemv.py, csrc/gemv_cuda.cu) on a machine without a GPU.

The kernels themselves run only on a GPU: examples/gpu_lowbit_kernels.py ``check`` compares them with
a float64 reference there (odd shapes, NaN-poisoned outputs, a second run bit-identical) before any
timing. Here: the source compiles with nvcc where nvcc is installed (this machine type has it), for
Ampere and Hopper, the library loads and agrees with the Python side on its row limits, its launch mode
follows LLMOPT_PDL and the GPU's generation, CPU tensors never reach it, the
row/shape limits, the load-time self-test's cases and tolerance (against stand-in kernels), and that
a missing compiler or a pre-Ampere GPU gives one warning and the Triton path instead of an error.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from llmopt.quant import cuda_gemv


@pytest.mark.skipif(cuda_gemv.nvcc_path() is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])  # sm_90: the programmatic-launch instructions too
def test_library_builds_and_loads(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    path, seconds = cuda_gemv.build_library(arch)
    assert path.is_file() and seconds > 0
    lib = cuda_gemv.load(path)
    assert (lib.llmopt_gemv_max_rows(0), lib.llmopt_gemv_max_rows(1)) == (cuda_gemv.MAX_ROWS,) * 2
    assert lib.llmopt_set_programmatic_launch(1) == 0  # off until switched on
    assert lib.llmopt_set_programmatic_launch(0) == 1
    assert cuda_gemv.build_library(arch) == (path, 0.0)  # built once per key


class FakeLibrary:
    """Stands in for the loaded library: records how it was told to launch."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def llmopt_set_programmatic_launch(self, on: int) -> int:
        self.calls.append(on)
        return 0


def test_programmatic_launch_follows_the_switch_and_the_gpu(monkeypatch):
    lib = FakeLibrary()
    monkeypatch.setattr(cuda_gemv, "_programmatic_capable", lambda device_index: True)
    monkeypatch.delenv(cuda_gemv.PDL_ENV, raising=False)
    cuda_gemv._set_launch_mode(lib, 0)
    cuda_gemv._set_launch_mode(lib, 0)  # unchanged: the library is not called again
    assert lib.calls == [1]
    monkeypatch.setenv(cuda_gemv.PDL_ENV, "0")  # read at every call: an A/B run flips it in one process
    cuda_gemv._set_launch_mode(lib, 0)
    assert lib.calls == [1, 0]
    monkeypatch.delenv(cuda_gemv.PDL_ENV)
    monkeypatch.setattr(cuda_gemv, "_programmatic_capable", lambda device_index: False)  # before Hopper
    cuda_gemv._set_launch_mode(lib, 0)
    assert lib.calls == [1, 0] and not cuda_gemv.programmatic_launch(0)
    cuda_gemv._set_launch_mode(object(), 0)  # an older build without the switch (sweeps): left alone


def test_cpu_tensors_never_reach_the_library(monkeypatch):
    def no_build(device_index: int) -> None:
        raise AssertionError("the CUDA library was asked for on a CPU call")

    monkeypatch.setattr(cuda_gemv, "_library", no_build)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    assert not cuda_gemv.usable(x, torch.zeros(8, 64, dtype=torch.int8), 64)


@pytest.fixture
def uncached_library() -> Iterator[None]:
    """``_library``'s per-process answer forgotten before and after the test (which monkeypatches
    what it depends on)."""
    cuda_gemv._library.cache_clear()
    yield
    cuda_gemv._library.cache_clear()


def test_missing_compiler_warns_and_falls_back(tmp_path, monkeypatch, uncached_library):
    monkeypatch.setenv("LLMOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda_gemv, "nvcc_path", lambda: None)
    monkeypatch.setattr(cuda_gemv, "_arch", lambda device_index: "sm_90")
    with pytest.warns(UserWarning, match="nvcc"):
        assert cuda_gemv._library(0) is None


@pytest.mark.parametrize(
    ("m", "n", "k", "group", "expected"),
    [
        (1, 4096, 4096, None, True),  # int8: 1-2 rows on the CUDA cores, K a multiple of 16
        (2, 4096, 4112, None, True),
        (3, 4096, 4112, None, False),  # the tensor-core kernel needs K a multiple of 64
        (3, 4096, 4096, None, True),
        (16, 6144, 4096, None, True),
        (17, 4096, 4096, None, False),  # two n8 tiles: the Triton tiles from 17 rows
        (1, 4096, 4104, None, False),
        (1, 28672, 4096, None, True),  # a large int8 weight: the CUDA-core kernel at one row,
        (2, 28672, 4096, None, False),  # the Triton tiles past it
        (8, 4096, 14336, None, True),  # a mid-size one (down_proj): the tensor-core kernel up to 8 rows,
        (9, 4096, 14336, None, False),  # the Triton tiles past them
        (16, 4096, 4096, None, True),
        (1, 4096, 4096, 128, True),  # int4 one row
        (2, 4096, 96, 32, True),  # two rows, K not a multiple of 128: the CUDA-core kernel
        (3, 4096, 96, 32, False),  # the tensor-core kernel needs K a multiple of 128
        (16, 28672, 4096, 128, True),  # int4 takes every size
        (17, 4096, 4096, 128, False),
        (1, 4096, 4096, 48, False),  # group not a power of two
        (1, 4096, 4096, 16, False),  # group below 32
    ],
)
def test_row_and_shape_limits(m, n, k, group, expected):
    assert cuda_gemv._rows_ok(m, n, k, group) is expected


def _unpack_int4_halves(packed: torch.Tensor, group: int) -> torch.Tensor:
    """The (N, K) nibbles (q + 8) of triton_kernels.pack_int4_halves' layout."""
    n, half_k = packed.shape
    g = packed.view(n, -1, group // 2).to(torch.int16)
    return torch.cat([g & 0xF, g >> 4], dim=2).reshape(n, 2 * half_k)


def _reference_kernels(monkeypatch, error: float = 0.0) -> None:
    """Stand-ins for the library's two entry points that compute what the kernels must (times 1 +
    error), so the self-test's cases and tolerance can be checked without a GPU."""

    def int8(x, q, scale, out, lib=None):
        out.copy_((x.double() @ (q.double() * scale.double()[:, None]).T) * (1 + error))

    def int4(x, packed, scale, zero, group, out, lib=None, tensor_cores=False):
        nib = _unpack_int4_halves(packed, group).double()
        n, k = nib.shape
        w = (nib.view(n, -1, group) - zero.double().view(n, -1, 1)) * scale.double().view(n, -1, 1)
        out.copy_((x.double() @ w.view(n, k).T) * (1 + error))

    monkeypatch.setattr(cuda_gemv, "int8_gemv", int8)
    monkeypatch.setattr(cuda_gemv, "int4_gemv", int4)


def test_self_test_passes_correct_kernels(monkeypatch):
    _reference_kernels(monkeypatch)
    cuda_gemv._self_test(None, torch.device("cpu"))  # type: ignore[arg-type]


def test_self_test_rejects_wrong_kernels(monkeypatch):
    _reference_kernels(monkeypatch, error=0.05)
    with pytest.raises(cuda_gemv.Unusable, match="self-test"):
        cuda_gemv._self_test(None, torch.device("cpu"))  # type: ignore[arg-type]


def test_gpus_before_ampere_are_declined_with_a_warning(monkeypatch, uncached_library):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (7, 5))
    with pytest.warns(UserWarning, match="compute capability 7.5"):
        assert cuda_gemv._library(0) is None
