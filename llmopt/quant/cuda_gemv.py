"""llmopt's CUDA C++ decode kernels: int8 and int4 weight-only matmuls for decode's few rows.

At decode's row counts a low-bit matmul is a stream of weight bytes, and Triton's tensor-core tiles
spend more instructions per byte than the copy rate allows (int4: 19-35% of copy bandwidth on an
H200, BENCHMARKS.md §5). ``csrc/gemv_cuda.cu`` has two kinds of kernel (its header explains them):
- CUDA-core matrix-vector kernels (1-2 rows): 16-byte chunks of the weight, integers turned into
  floats with byte permutes instead of conversion instructions, fp32 sums;
- a tensor-core kernel for either scheme at up to 16 rows: mma tiles of 16 channels x 8 rows, the
  integers made exact 16-bit floats with logic ops, the scales applied to the fp32 sums.
The library picks between them by row count; both sum in a fixed order (deterministic) and read the
Triton kernels' layouts, so ``triton_kernels.int8_matmul`` / ``int4_matmul`` call them up to
``MAX_ROWS`` rows and keep the Triton tiles for more; nothing is repacked.

Build (``native_build``): the first call compiles the source with nvcc for the GPU's architecture
(a few seconds; no torch headers, so no ninja or Python headers either) into llmopt's cache,
``<cache>/cuda/gemv_cuda-<key>/``, and loads it with ctypes. Launches go to torch's current stream,
so CUDA graphs capture them. A self-test against float64 runs when the library loads. Where nvcc is
missing, the build or the self-test fails, or the GPU predates Ampere, one warning says so and the
Triton kernels do the work. ``LLMOPT_CUDA_GEMV=0`` turns the library off (for A/B measurements).

On Hopper and later, the matmul after a folded-in norm (``fused_gemv`` with ``sumsq_in``, whose predecessor
in the stream is the residual matmul that summed the norm's squares) is launched programmatically (the
source's header explains it): it launches and starts its blocks during that matmul's tail, and waits for it
before reading anything. ``LLMOPT_PDL=0`` launches it the ordinary way (A/B runs). ``LLMOPT_GEMV_DEFINES``
(e.g. ``-DINT8_MMA_FROM=1``) adds -D flags to the build the library loads, to time a compile-time variant in
the engine. ``fused_gemv(..., gated=True)`` also takes the MLP's SiLU product into the gate/up matmul
(``norm_fusion`` explains the interleaved layout it needs).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
from pathlib import Path

import torch

from llmopt.quant import native_build
from llmopt.quant.native_build import BuildError, Unusable

SOURCE = Path(__file__).parent / "csrc" / "gemv_cuda.cu"
LIBRARY_NAME = "gemv_cuda"
DISABLE_ENV = "LLMOPT_CUDA_GEMV"
PDL_ENV = "LLMOPT_PDL"
DEFINES_ENV = "LLMOPT_GEMV_DEFINES"  # extra -D flags for the build the library loads (A/B runs of a variant)
PDL_MIN_CAPABILITY = (9, 0)  # griddepcontrol and the programmatic-serialization launch attribute
NVCC_FLAGS = ("-O3", "-std=c++20", "-shared", "-Xcompiler", "-fPIC", "-DNDEBUG")
# Row limits (csrc/gemv_cuda.cu): the CUDA-core kernels take 1-2 rows (kMaxRows; K a multiple of 16 for
# int8, of the group for int4), the tensor-core kernel up to 16 (kMaxMmaRows: two n8 tiles; K a multiple
# of 64 for int8, 128 for int4).
CORE_MAX_ROWS = 2
MAX_ROWS = 16
# int8 past one row: the Triton tiles stream the largest weights faster than the tensor-core kernel (an H200,
# Llama-3-8B: gate/up 33.2-33.8 against 34.2-37.2 us at 2-8 rows; the head), the others slower (q/k/v 13.4
# against 10.3-10.9, o 10.1 against 6.9-7.1, down 21.6 against 18.0-18.2 up to 8 rows, but 21.7 against 23.0+
# from 12). Weights of more than INT8_MAX_MULTIROW_WEIGHT elements go to Triton past one row, those of more
# than INT8_ANY_ROWS_WEIGHT past INT8_MID_MAX_ROWS rows.
INT8_ANY_ROWS_WEIGHT = 32 << 20
INT8_MAX_MULTIROW_WEIGHT = 64 << 20
INT8_MID_MAX_ROWS = 8

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


def nvcc_path() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home) / "bin" / "nvcc" if home else None
    if candidate is not None and candidate.is_file():
        return str(candidate)
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )


MIN_CAPABILITY = (8, 0)  # bf16 arithmetic and the int4 kernel's mma.sync shape


def _arch(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    if (major, minor) < MIN_CAPABILITY:
        raise Unusable(f"the GPU's compute capability {major}.{minor} is below 8.0")
    return f"sm_{major}{minor}"


def build_library(arch: str, force: bool = False, defines: tuple[str, ...] = ()) -> tuple[Path, float]:
    """Compile the library for ``arch`` (e.g. 'sm_90'), once per key: native_build.build_library.
    ``defines`` (e.g. '-DINT8_ROWS=4') override the kernels' work shape, for sweeps."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError("nvcc (CUDA's compiler) was not found on PATH, in $CUDA_HOME or /usr/local/cuda")
    flags = (*NVCC_FLAGS, *defines, f"-arch={arch}")
    key = (SOURCE.read_bytes(), native_build.tool_version(nvcc), " ".join(flags))
    folder = native_build.build_folder("cuda", LIBRARY_NAME, key)

    def command(target: Path) -> list[str]:
        return [nvcc, *flags, str(SOURCE), "-o", str(target)]

    return native_build.build_library(folder, LIBRARY_NAME, command, force=force)


def load(path: Path) -> ctypes.CDLL:
    """The built library at ``path``, with its entry points declared."""
    return _declare(ctypes.CDLL(str(path)))


class Fusion(ctypes.Structure):
    """csrc/gemv_cuda.cu's ``Fusion``: the RMSNorm and residual add folded into a decode matmul
    (``norm_fusion`` explains the scheme); null pointers leave a part out."""

    _fields_ = [
        ("sumsq_in", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("residual", ctypes.c_void_p),
        ("norm_weight", ctypes.c_void_p),
        ("weighted", ctypes.c_void_p),
        ("partials", ctypes.c_void_p),
        ("sumsq_out", ctypes.c_void_p),
        ("counter", ctypes.c_void_p),
        ("gated", ctypes.c_int),
    ]


PARTIAL_CHANNELS = 8  # csrc/gemv_cuda.cu's kPartialChannels: a residual matmul's workspace, per row


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
    lib.llmopt_int8_gemv.argtypes = [ptr, i32, ptr, ptr, i32, ptr, i32, i32, i32, i64, i64, ptr]
    lib.llmopt_int4_gemv.argtypes = [ptr, i32, ptr, ptr, i32, ptr, ptr, i32, i32, i32, i32, i64, i64, ptr]
    lib.llmopt_mma_gemv.argtypes = [i32, *lib.llmopt_int4_gemv.argtypes]
    lib.llmopt_fused_gemv.argtypes = [*lib.llmopt_mma_gemv.argtypes[:-1], ctypes.POINTER(Fusion), ptr]
    lib.llmopt_int8_gemv.restype = lib.llmopt_int4_gemv.restype = lib.llmopt_mma_gemv.restype = i32
    lib.llmopt_fused_gemv.restype = i32
    lib.llmopt_gemv_max_rows.argtypes = [i32]
    lib.llmopt_gemv_max_rows.restype = i32
    if hasattr(lib, "llmopt_set_programmatic_launch"):  # (sweeps load older builds without it)
        lib.llmopt_set_programmatic_launch.argtypes = [i32]
        lib.llmopt_set_programmatic_launch.restype = i32
    return lib


@functools.cache
def _programmatic_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= PDL_MIN_CAPABILITY


def programmatic_launch(device_index: int) -> bool:
    """Whether the matmuls after a folded-in norm launch programmatically on this device: Hopper or later,
    unless LLMOPT_PDL=0."""
    return os.environ.get(PDL_ENV, "1") != "0" and _programmatic_capable(device_index)


def _set_launch_mode(lib: ctypes.CDLL, device_index: int) -> None:
    """Tell ``lib`` how to launch (``programmatic_launch``), when that changed since the last call: the
    switch is read at every call, so an A/B run can flip it between models in one process."""
    if not hasattr(lib, "llmopt_set_programmatic_launch"):  # an older build (sweeps)
        return
    want = programmatic_launch(device_index)
    if getattr(lib, "launch_mode_programmatic", None) != want:  # (kept on the library object)
        lib.llmopt_set_programmatic_launch(int(want))
        setattr(lib, "launch_mode_programmatic", want)  # noqa: B010


@functools.cache
def _library(device_index: int) -> ctypes.CDLL | None:
    """The loaded library for this device's architecture, or None (warned once) when it cannot be
    built, loaded, or fails its self-test here."""

    def open_checked(path: Path) -> ctypes.CDLL:
        lib = load(path)
        limits = lib.llmopt_gemv_max_rows(0), lib.llmopt_gemv_max_rows(1)
        if limits != (MAX_ROWS, MAX_ROWS):
            raise Unusable(f"{path} takes {limits} rows; this module expects {MAX_ROWS}")
        if not torch.cuda.is_current_stream_capturing():  # a test launch must not land in a graph
            _self_test(lib, torch.device("cuda", device_index))
        return lib

    return native_build.load_or_warn(
        "CUDA decode kernels",
        lambda: build_library(_arch(device_index), defines=tuple(os.environ.get(DEFINES_ENV, "").split())),
        open_checked,
        consequence="int8/int4 decode uses the slower Triton kernels",
        unusable_fix="nothing on a GPU older than Ampere; a failed self-test is a bug to report. "
        f"{DISABLE_ENV}=0 goes straight to Triton without this warning",
        build_fix="install CUDA's compiler (nvcc, matching the driver) or set CUDA_HOME",
    )


def _self_test(lib: ctypes.CDLL, device: torch.device) -> None:
    """One small product per kernel the dispatch runs, against float64: int8 at one row (the CUDA-core
    kernel), 2 and 11 rows (the tensor-core kernel with one and two n8 tiles); int4 at 1 and 11 rows with
    groups of 64 (dequantized per weight) and 128 (scaled after the mma), and at one row with K not a
    multiple of 128 (the CUDA-core kernel). So that a build this GPU or driver cannot run is caught at
    load time, with a warning, rather than in the middle of a decode."""
    from llmopt.quant.triton_kernels import pack_int4_halves  # (imports this module)

    gen = torch.Generator().manual_seed(0)
    n, k = 48, 256
    x = torch.randn(11, k, generator=gen).to(torch.bfloat16)
    q8, q4 = torch.randint(-127, 128, (n, k), generator=gen), torch.randint(-8, 8, (n, k), generator=gen)
    s8 = torch.rand(n, generator=gen) / 64

    def int4_case(rows: int, group: int, width: int = k) -> tuple:
        s4 = torch.rand(n, width // group, generator=gen) / 8
        z4 = torch.randint(-8, 8, (n, width // group), generator=gen)
        q = q4[:, :width]
        w4 = (q.double().view(n, -1, group) - z4.double().view(n, -1, 1)) * s4.double().view(n, -1, 1)
        return (rows, width, w4.view(n, width), lambda xs, out: int4_gemv(
            xs, pack_int4_halves(q.to(device), group), s4.to(device, torch.bfloat16),
            (z4 + 8).to(device, torch.uint8), group, out, lib=lib))  # fmt: skip

    cases = [
        (rows, k, q8.double() * s8.double()[:, None], lambda xs, out: int8_gemv(
            xs, q8.to(device, torch.int8), s8.to(device, torch.bfloat16), out, lib=lib))
        for rows in (1, 2, 11)
    ] + [int4_case(rows, group) for rows, group in ((1, 64), (1, 128), (11, 64), (11, 128))] + [
        int4_case(1, 32, width=224)
    ]  # fmt: skip
    try:
        for rows, width, weight, run in cases:
            out = torch.full((rows, n), float("nan"), device=device, dtype=torch.bfloat16)
            xs = x[:rows, :width].contiguous()
            run(xs.to(device), out)
            ref = xs.double() @ weight.T
            err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:  # bf16 rounding is ~4e-3; NaN (an unwritten output) fails too
                raise Unusable(f"self-test: {rows}-row product off by {err:.1e} relative")
    except RuntimeError as exc:  # a launch the driver refused
        raise Unusable(f"self-test: {exc}") from exc


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def _rows_ok(m: int, n: int, k: int, group: int | None) -> bool:
    if group is None:  # int8
        if m > 1 and n * k > (INT8_ANY_ROWS_WEIGHT if m > INT8_MID_MAX_ROWS else INT8_MAX_MULTIROW_WEIGHT):
            return False
        return (1 <= m <= CORE_MAX_ROWS and k % 16 == 0) or (1 <= m <= MAX_ROWS and k % 64 == 0)
    group_ok = group >= 32 and group & (group - 1) == 0 and k % group == 0
    return group_ok and (1 <= m <= CORE_MAX_ROWS or (1 <= m <= MAX_ROWS and k % 128 == 0))


def usable(x: torch.Tensor, weight: torch.Tensor, k: int, group: int | None = None) -> bool:
    """Whether the CUDA kernels take this call: a bf16/fp16 CUDA x of 1-2 rows, or up to 16 rows with K
    a multiple of 64 (int8) or 128 (int4); int8 K a multiple of 16 and, past one row, a weight of at
    most INT8_MAX_MULTIROW_WEIGHT elements (INT8_ANY_ROWS_WEIGHT past INT8_MID_MAX_ROWS rows); int4
    groups a power of two >= 32 dividing K; a 16-byte aligned contiguous weight; and the library
    builds here."""
    return x.is_cuda and _rows_ok(x.shape[0], weight.shape[0], k, group) and _layer_runs_here(x.dtype, weight)


def _layer_runs_here(x_dtype: torch.dtype, weight: torch.Tensor) -> bool:
    """What the kernels need of a layer beyond its shape: bf16/fp16 activations, a 16-byte aligned
    contiguous CUDA weight, the library switched on and built for this GPU."""
    return (
        weight.is_cuda
        and x_dtype in _ACTIVATION_DTYPES
        and weight.is_contiguous()
        and weight.data_ptr() % 16 == 0
        and enabled()
        and _library(weight.device.index or 0) is not None
    )


def fused_kernel_takes(m: int, n: int, k: int, group: int | None) -> bool:
    """Whether ``fused_gemv`` can run this call: the rows ``_rows_ok`` gives the CUDA kernels, on the kernels
    that fold a norm in (int8: one row on the CUDA cores, or K a multiple of 64 for the tensor-core kernel;
    int4: K a multiple of 128)."""
    if not _rows_ok(m, n, k, group):
        return False
    return ((m == 1 and k % 16 == 0) or k % 64 == 0) if group is None else k % 128 == 0


# Up to how many rows the engine folds the norms in, per scheme: where it measured faster (an H200,
# Llama-3-8B, BENCHMARKS.md §5). The matmul ending a residual branch pays a ticket and its last block's
# sum (+1.5 us int8, +2.5-2.8 us int4 on o/down at one row), the fused tensor-core kernels run 0.5-1 us
# slower than their plain twins, and a standalone add + norm costs ~2.8 us: int8's one-row CUDA-core
# kernel gains, int4 and 8 rows lose. (With the matmul after the norm launched programmatically, int4 at one
# row came out even: -0.3%, within noise.)
FUSED_NORM_ROWS = {"int8": 1, "int4": 0}


def fused_max_rows(x_dtype: torch.dtype, weight: torch.Tensor, k: int, group: int | None = None) -> int:
    """Up to how many rows the engine runs this layer through ``fused_gemv`` (from one; ``FUSED_NORM_ROWS``),
    0 where it does not: a bf16/fp16 model on CUDA, a 16-byte aligned contiguous weight, the library built
    here. Called when a model is built (it reads the weight's address), not under torch.compile."""
    if not _layer_runs_here(x_dtype, weight):
        return 0
    return _fused_rows_up_to(FUSED_NORM_ROWS["int8" if group is None else "int4"], weight.shape[0], k, group)


def gated_max_rows(x_dtype: torch.dtype, weight: torch.Tensor, k: int, group: int | None = None) -> int:
    """Up to how many rows the engine runs this layer (interleaved gate/up channels) through ``fused_gemv``
    with ``gated``: wherever the CUDA kernels take it (from one row) and N is even, 0 elsewhere. Called when a
    model is built (it reads the weight's address), not under torch.compile."""
    if weight.shape[0] % 2 != 0 or not _layer_runs_here(x_dtype, weight):
        return 0
    return _fused_rows_up_to(MAX_ROWS, weight.shape[0], k, group)


def _fused_rows_up_to(limit: int, n: int, k: int, group: int | None) -> int:
    """The most rows, at most ``limit``, for which ``fused_kernel_takes`` holds from one row up."""
    rows = 0
    while rows < limit and fused_kernel_takes(rows + 1, n, k, group):
        rows += 1
    return rows


def fused_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group: int,
    out: torch.Tensor,
    *,
    sumsq_in: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    weighted: torch.Tensor | None = None,
    sumsq_out: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """``int8_gemv`` (``zero`` None) or ``int4_gemv`` with a norm and residual folded in (``norm_fusion``):
    the sums times each row's ``rsqrt(sumsq_in / K + eps)`` (sumsq_in (M,) fp32); plus ``residual``; and
    with ``norm_weight``, ``weighted = out * norm_weight`` and each row's sum of out² into ``sumsq_out``
    (M,) fp32, which takes ``counter``: one int32, zero before the call and zero again after it (a
    workspace of the layer's; one call at a time). ``gated``: the weight's channels are interleaved gate/up
    pairs and out (M, N/2) gets ``norm_fusion.silu_product`` of the outputs (no residual or norm_weight then).
    All tensors contiguous on x's device."""
    x = _aligned(x)
    (m, k), n = x.shape, weight.shape[0]
    assert x.is_cuda and fused_kernel_takes(m, n, k, None if zero is None else group)
    assert not gated or (n % 2 == 0 and residual is None and norm_weight is None)
    assert out.shape == (m, n // 2 if gated else n)
    lib = _library(x.device.index or 0)
    assert lib is not None
    partials = None
    if norm_weight is not None:
        assert weighted is not None and sumsq_out is not None and counter is not None
        partials = torch.empty((m, -(-n // PARTIAL_CHANNELS)), device=x.device, dtype=torch.float32)
    tensors = (sumsq_in, residual, norm_weight, weighted, sumsq_out, counter)
    assert all(t is None or (t.is_contiguous() and t.device == x.device) for t in tensors)

    def pointer(t: torch.Tensor | None) -> int | None:
        return None if t is None else t.data_ptr()

    fusion = Fusion(
        pointer(sumsq_in), eps, pointer(residual), pointer(norm_weight), pointer(weighted),
        pointer(partials), pointer(sumsq_out), pointer(counter), int(gated),
    )  # fmt: skip
    _set_launch_mode(lib, x.device.index or 0)
    with torch.cuda.device(x.device):
        code = lib.llmopt_fused_gemv(
            int(zero is not None), x.data_ptr(), _DTYPE_CODES[x.dtype], weight.data_ptr(), scale.data_ptr(),
            _DTYPE_CODES[scale.dtype], pointer(zero), out.data_ptr(), m, n, k, group, x.stride(0),
            out.stride(0), ctypes.byref(fusion), _stream(x),
        )  # fmt: skip
    _check(code, ("gated " if gated else "fused ") + ("int4" if zero is not None else "int8"))
    return out


def _check(code: int, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"llmopt's CUDA {what} kernel failed to launch (cudaError {code})")


def _stream(x: torch.Tensor) -> int:
    return torch.cuda.current_stream(x.device).cuda_stream


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """x with 16-byte aligned rows (the kernels read x in 8-byte pieces at 16-input offsets)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
              lib: ctypes.CDLL | None = None, tensor_cores: bool = False) -> torch.Tensor:  # fmt: skip
    """``out = x @ (q * scale[:, None]).T`` for x (M <= 16, K) bf16/fp16, q (N, K) int8, scale (N,).
    ``tensor_cores`` forces the tensor-core kernel at any row count (K a multiple of 64; for sweeps),
    ``lib`` another build of the library (sweeps, the self-test), else the checked one."""
    if lib is None:
        assert tensor_cores or usable(x, q, q.shape[1])
        lib = _library(x.device.index or 0)
    assert lib is not None
    x = _aligned(x)
    (m, k), n = x.shape, q.shape[0]
    with torch.cuda.device(x.device):  # the library launches on the calling thread's current device
        args = (x.data_ptr(), _DTYPE_CODES[x.dtype], q.data_ptr(), scale.data_ptr(),
                _DTYPE_CODES[scale.dtype])  # fmt: skip
        tail = (out.data_ptr(), m, n, k)
        if tensor_cores:
            code = lib.llmopt_mma_gemv(0, *args, None, *tail, 0, x.stride(0), out.stride(0), _stream(x))
        else:
            code = lib.llmopt_int8_gemv(*args, *tail, x.stride(0), out.stride(0), _stream(x))
    _check(code, "int8")
    return out


def int4_gemv(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group: int,
    out: torch.Tensor,
    lib: ctypes.CDLL | None = None,
    tensor_cores: bool = False,
) -> torch.Tensor:
    """``out = x @ dequant(W).T`` for the half-split int4 layout (triton_kernels.pack_int4_halves), x
    (M <= 16, K). ``tensor_cores`` forces the tensor-core kernel at any row count (K a multiple of 128; for
    sweeps), ``lib`` another build of the library."""
    if lib is None:
        assert tensor_cores or usable(x, packed, packed.shape[1] * 2, group)
        lib = _library(x.device.index or 0)
    assert lib is not None
    x = _aligned(x)
    (m, k), n = x.shape, packed.shape[0]
    entry = functools.partial(lib.llmopt_mma_gemv, 1) if tensor_cores else lib.llmopt_int4_gemv
    with torch.cuda.device(x.device):
        code = entry(
            x.data_ptr(), _DTYPE_CODES[x.dtype], packed.data_ptr(), scale.data_ptr(),
            _DTYPE_CODES[scale.dtype], zero.data_ptr(), out.data_ptr(), m, n, k, group, x.stride(0),
            out.stride(0), _stream(x),
        )  # fmt: skip
    _check(code, "int4")
    return out
