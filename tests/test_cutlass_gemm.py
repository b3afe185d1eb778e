"""llmopt's Hopper int8/int4 GEMM (llmopt/quant/cutlass_gemm.py, csrc/mixed_gemm_sm90.cu) without a GPU.

The GEMM runs only on a Hopper GPU: examples/gpu_lowbit_kernels.py ``check`` compares it there with a
float64 reference (odd shapes, NaN-poisoned outputs, a second run bit-identical, a CUDA-graph replay)
and ``cutlass`` times every configuration against bf16 cuBLAS (BENCHMARKS.md §5). Here: its int8 and
int4 translation units compile with nvcc against CUTLASS's headers where both are installed, llmopt's
int4 layout and zero points map exactly onto what CUTLASS computes, the tile choice and row rule on
Llama-3-8B's shapes, where the headers are looked for, CPU tensors never reach it, and a missing
dependency gives one warning naming the fix and the Triton path instead of an error.
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
@pytest.mark.parametrize("scheme", cutlass_gemm.SCHEMES)
def test_one_translation_unit_compiles(tmp_path, scheme):
    import subprocess

    nvcc, dirs = nvcc_path(), cutlass_gemm.header_dirs()
    assert nvcc is not None and dirs is not None
    obj = tmp_path / "unit.o"
    argv = cutlass_gemm.compile_command(nvcc, dirs, "pp64x64", torch.bfloat16, obj, scheme)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    symbols = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    entry = cutlass_gemm.entry_name("pp64x64", torch.bfloat16, scheme)
    assert f" T {entry}\n" in symbols and f" T {entry}_workspace\n" in symbols


def test_int4_layout_and_zero_points_map_onto_cutlass():
    """What the int4 GEMM computes, written out: CUTLASS reads byte j's low nibble as input 2j and its
    high one as 2j + 1 and makes each weight u * s + z; with ``group_major``'s s and z and x's columns
    permuted by ``interleave_halves`` that is exactly x @ dequant(W).T for llmopt's half-split bytes."""
    from llmopt.quant.triton_kernels import pack_int4_halves

    gen = torch.Generator().manual_seed(0)
    n, k, group = 24, 512, 128
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    zero_point = torch.randint(-8, 8, (n, k // group), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, k // group, generator=gen) / 8).to(torch.bfloat16).double()  # as models store it
    packed = pack_int4_halves(q, group)
    u = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(n, k).double()  # CUTLASS's reading
    zeros = (zero_point.to(torch.int16) + 8).to(torch.uint8)
    s, z = cutlass_gemm.group_major(scale, zeros, torch.float64)
    assert s.shape == z.shape == (k // group, n) and s.is_contiguous() and z.is_contiguous()
    weight_cutlass = u * s.T.repeat_interleave(group, dim=1) + z.T.repeat_interleave(group, dim=1)
    x = torch.randn(5, k, generator=gen, dtype=torch.float64)
    dequant = (q.double() - zero_point.double().repeat_interleave(group, dim=1)) * scale.repeat_interleave(
        group, dim=1
    )
    got = cutlass_gemm.interleave_halves(x, group) @ weight_cutlass.T
    torch.testing.assert_close(got, x @ dequant.T, rtol=1e-12, atol=1e-12)


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
    ("m", "n", "k", "scheme", "expected"),
    [
        (48, 28672, 4096, "int8", False),  # Triton's tiles are faster below MIN_ROWS
        (64, 28672, 4096, "int8", True),
        (96, 4096, 4096, "int8", False),  # o_proj-sized weights from SMALL_WEIGHT_MIN_ROWS
        (128, 4096, 4096, "int8", True),
        (64, 6144, 4096, "int8", True),
        (4096, 28672, 4096, "int8", True),
        (4097, 28672, 4096, "int8", False),  # compute-bound: dequantize + cuBLAS bf16
        (32, 28672, 4096, "int4", False),  # int4's Triton tiles win up to 32 rows, lose from 33
        (33, 28672, 4096, "int4", True),
        (128, 4096, 4096, "int4", False),  # int4's small weights stay on Triton longer
        (256, 4096, 4096, "int4", True),
        (512, 4096, 14336, "int4", True),
        (513, 4096, 14336, "int4", False),  # int4 crosses over to dequantize + cuBLAS sooner
    ],
)
def test_row_rule(m, n, k, scheme, expected):
    assert cutlass_gemm.takes_rows(m, n, k, scheme) is expected


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
    out = torch.empty(128, 64, dtype=torch.bfloat16)
    assert not cutlass_gemm.usable(x, q, scale, out)
    packed, by_group = torch.zeros(64, 32, dtype=torch.uint8), torch.ones(1, 64, dtype=torch.bfloat16)
    assert not cutlass_gemm.usable_int4(x, packed, by_group, by_group, 64, out)
    assert not cutlass_gemm.int4_wanted(torch.device("cpu"), torch.bfloat16, 128)


def test_every_operand_must_be_contiguous_and_aligned_for_tma(monkeypatch):
    """TMA reads 16-byte aligned rows: a strided view of a group-major copy (or of int8's scale) sends
    the call to the other path instead of reaching the GEMM."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cutlass_gemm.CAPABILITY)
    monkeypatch.setattr(cutlass_gemm, "_library", lambda device_index: object())
    x, out = torch.randn(256, 256, dtype=torch.bfloat16), torch.empty(256, 64, dtype=torch.bfloat16)
    packed, group = torch.zeros(64, 128, dtype=torch.uint8), 128
    scale_g = torch.ones(2, 64, dtype=torch.bfloat16)
    wide = torch.ones(2, 128, dtype=torch.bfloat16)
    assert cutlass_gemm.usable_int4(x, packed, scale_g, scale_g.clone(), group, out)
    assert not cutlass_gemm.usable_int4(x, packed, scale_g, wide[:, ::2], group, out)
    q, scale = torch.zeros(64, 256, dtype=torch.int8), torch.ones(128, dtype=torch.bfloat16)
    assert cutlass_gemm.usable(x, q, scale[:64], out)
    assert not cutlass_gemm.usable(x, q, scale[::2], out)


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


def test_stacked_int4_layers_keep_their_group_major_copies_aligned():
    """The engine stacks q/k/v and gate/up (``QuantKernel.concat``): the (N, ...) buffers along rows, the
    (K/G, N) group-major copies along columns, so channel c of the stack has its own scales in both."""
    from llmopt.quant.triton_kernels import GROUP_MAJOR, TritonInt4Kernel

    def layer(n: int, first: int) -> dict[str, torch.Tensor]:
        scales = torch.arange(first, first + n * 4, dtype=torch.float32).view(n, 4)  # (N, K/G), K/G = 4
        return {"weight_int4": torch.zeros(n, 256, dtype=torch.uint8), "scales": scales,
                "zeros": torch.zeros(n, 4, dtype=torch.uint8), GROUP_MAJOR[0]: scales.T.contiguous(),
                GROUP_MAJOR[1]: -scales.T.contiguous()}  # fmt: skip

    stacked = TritonInt4Kernel().concat([layer(8, 0), layer(16, 1000)])
    assert stacked is not None
    assert stacked["weight_int4"].shape == (24, 256) and stacked["scales"].shape == (24, 4)
    torch.testing.assert_close(stacked[GROUP_MAJOR[0]], stacked["scales"].T)
    torch.testing.assert_close(stacked[GROUP_MAJOR[1]], -stacked["scales"].T)
