"""llmopt's int8 and int4 weight-only GEMMs for Hopper GPUs (prefill and large batches), built on CUTLASS.

Past decode's few rows, a low-bit matmul has enough rows of x that the tensor cores' work matters as
much as the weight's bytes. Triton's int8 tiles run 1.1-1.5x slower than cuBLAS bf16 at 128 rows and
the dequantize-then-cuBLAS path pays a pass over a bf16 copy of the weight (BENCHMARKS.md §5).
CUTLASS's Hopper mixed-input GEMM keeps the weight narrow all the way to registers: TMA brings int8 or
int4 tiles of the weight and bf16 tiles of x into shared memory, a producer warp keeps the pipeline
full, consumer warpgroups convert the weight to 16 bits in registers and feed wgmma with it as the
register operand (``csrc/mixed_gemm_sm90.cu``). ``triton_kernels.int8_matmul`` and ``int4_matmul``
call it from the scheme's ``MIN_ROWS`` to its ``MAX_ROWS`` rows where it applies (``usable``,
``usable_int4``); decode's rows keep the CUDA decode kernels and the Triton tiles, and longer prefills
dequantize for cuBLAS.

int8: the per-channel scale multiplies the fp32 sums in the epilogue, so the result is exact up to the
final rounding. int4: CUTLASS scales the weights before the mma, ``u * s + z`` per (channel, group) in
x's type, from group-major copies of the scales and of ``z = -zero_point * s`` (``group_major``, made
once when the layer is prepared: 4 bytes per group and channel, 6% more than the int4 weight at groups
of 128). CUTLASS reads a byte's two nibbles as consecutive inputs while llmopt's layout holds input j
and j + G/2 of a group there, so ``int4_gemm`` permutes x's columns to match (``interleave_halves``).

Tile configurations (``CONFIGS``): 64-channel tiles with ping-pong consumer warpgroups for narrow
outputs, and 128-channel tiles whose two warpgroups cooperate, scheduled stream-K (K split across
CTAs when the tiles do not fill the GPU; the partial sums are reduced in a fixed order, so results
do not depend on timing). ``choose_config`` picks one per shape with a cost model: waves of tiles
times K steps times a per-step cost fitted to a sweep of Llama-3-8B's layers at 48-2,048 rows on an
H200, plus a fixed cost for a stream-K split.

Build (``native_build``): CUTLASS's headers come from the ``nvidia-cutlass`` package (``pip install
'llmopt[gpu]'``) or a CUTLASS checkout named by ``CUTLASS_PATH``. The first call compiles one
translation unit per (scheme, configuration, activation type) in parallel with nvcc for ``sm_90a``
(about two minutes on 16 cores; cached in llmopt's cache as ``cuda/mixed_gemm_sm90-<key>/``), links
them into one library, loads it with ctypes and checks every configuration against float64. Launches
go to torch's current stream, so CUDA graphs capture them. On a Hopper GPU without the headers or
nvcc, or when the build or self-test fails, one warning says so and the Triton path does the work.
``LLMOPT_CUTLASS=0`` turns it off (for A/B measurements).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from llmopt.quant import native_build
from llmopt.quant.cuda_gemv import nvcc_path
from llmopt.quant.native_build import BuildError, Unusable

SOURCE = Path(__file__).parent / "csrc" / "mixed_gemm_sm90.cu"
LIBRARY_NAME = "mixed_gemm_sm90"
SCHEMES = ("int8", "int4")
DISABLE_ENV = "LLMOPT_CUTLASS"
HEADERS_ENV = "CUTLASS_PATH"
ARCH_FLAG = "-gencode=arch=compute_90a,code=sm_90a"  # wgmma needs the arch-specific target
NVCC_FLAGS = ("-O3", "-std=c++17", "-DNDEBUG", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", ARCH_FLAG)
CAPABILITY = (9, 0)  # wgmma and TMA; sm_90a code runs on Hopper only

# From this many rows of x (fewer: the Triton tiles, faster there); weights of at most
# SMALL_WEIGHT elements (o_proj-sized) from SMALL_WEIGHT_MIN_ROWS. On an H200, Llama-3-8B layers, µs:
# int8 o_proj at 64 / 96 rows Triton 15.5 / 18.4 against 18.8 / 18.9; gate/up at 64 Triton 56 against 50;
# int4 gate/up at 32 / 40 rows Triton 47.8 / 82.4 against 59.2 / 59.8 (down 30.3 / 69.7 against
# 39.8 / 39.8); int4 o_proj at 128 rows Triton 18.5 against 23.3, at 256 (dequantize + cuBLAS) 27.2
# against 26.8.
MIN_ROWS = {"int8": 64, "int4": 33}
SMALL_WEIGHT = 16 << 20
SMALL_WEIGHT_MIN_ROWS = {"int8": 128, "int4": 256}
# Up to this many rows. Past it the product is compute-bound, cuBLAS's bf16 GEMM outruns the mixed-input
# one by more than a dequantized copy of the weight costs, and the matmul dequantizes instead. int8
# gate/up at 8,192 rows: 3,013 against 2,876 µs; at 4,096: 1,442 against 1,501. int4 (CUTLASS converts
# and scales every weight before the mma) crosses over sooner: q/k/v at 256 rows 31.6 against 41.4, at
# 1,024 100 against 83; down 73 / 95 and 213 / 189.
MAX_ROWS = {"int8": 4096, "int4": 512}


@dataclass(frozen=True)
class GemmTile:
    tile_m: int  # weight channels per tile
    tile_n: int  # rows of x per tile
    cooperative: bool  # True: 2 warpgroups on one 128-channel tile, stream-K; False: ping-pong, persistent
    step_cost: float  # relative time of one 64-wide K step of one tile (fitted, see choose_config)


CONFIGS = {
    "pp64x64": GemmTile(64, 64, False, 0.108),
    "pp64x128": GemmTile(64, 128, False, 0.125),
    "pp64x256": GemmTile(64, 256, False, 0.186),
    "sk128x64": GemmTile(128, 64, True, 0.161),
    "sk128x128": GemmTile(128, 128, True, 0.246),
    "sk128x256": GemmTile(128, 256, True, 0.279),
}
STREAM_K_SPLIT_COST = 5.52  # in the same units: the partial-sum reduction when K is split
_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def estimated_cost(config: GemmTile, m: int, n: int, k: int, sms: int) -> float:
    """Relative time of ``config`` on an (m rows) x (n channels) x (k inputs) product: waves of output
    tiles times K steps times the configuration's per-step cost. Ping-pong tiles run in whole waves;
    stream-K spreads the K steps of all tiles evenly over the SMs, paying a reduction when it splits
    tiles (fewer tiles than SMs)."""
    tiles = math.ceil(n / config.tile_m) * math.ceil(m / config.tile_n)
    steps = math.ceil(k / 64)
    if config.cooperative:
        return tiles / sms * steps * config.step_cost + (STREAM_K_SPLIT_COST if tiles < sms else 0.0)
    return math.ceil(tiles / sms) * steps * config.step_cost


def choose_config(m: int, n: int, k: int, sms: int) -> str:
    """The configuration ``estimated_cost`` rates fastest. Its costs were fitted to a sweep of every
    configuration on Llama-3-8B's q/k/v, o, gate/up, down and head at 48-2,048 rows (44 shapes, an
    H200): on those shapes its pick is the fastest at 38 and within 13% of it everywhere
    (BENCHMARKS.md §5 has the re-measured table)."""
    return min(CONFIGS, key=lambda name: estimated_cost(CONFIGS[name], m, n, k, sms))


def entry_name(config: str, dtype: torch.dtype, scheme: str = "int8") -> str:
    return f"llmopt_{scheme}_gemm_{config}_{_DTYPES[dtype]}"


def header_dirs() -> list[Path] | None:
    """CUTLASS's include folders: ``$CUTLASS_PATH/include`` and ``tools/util/include`` of a checkout,
    else those the ``nvidia-cutlass`` package ships; None when neither is there."""
    roots = []
    if os.environ.get(HEADERS_ENV):
        roots.append(Path(os.environ[HEADERS_ENV]))
    spec = importlib.util.find_spec("cutlass_library")  # found, not imported (it imports cuda-python)
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))) / "source")
    for root in roots:
        dirs = [root / "include", root / "tools" / "util" / "include"]
        if (dirs[0] / "cutlass" / "cutlass.h").is_file() and (dirs[1] / "cutlass" / "util").is_dir():
            return dirs
    return None


def _headers_version(include: Path) -> bytes:
    return (include / "cutlass" / "version.h").read_bytes()


def build_library(force: bool = False) -> tuple[Path, float]:
    """Compile every (scheme, configuration, activation type) as its own translation unit, in parallel,
    and link them into one library; once per key (native_build.build_library)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError("nvcc (CUDA's compiler) was not found on PATH, in $CUDA_HOME or /usr/local/cuda")
    dirs = header_dirs()
    if dirs is None:
        raise BuildError(
            f"CUTLASS's headers were not found (pip install 'llmopt[gpu]', or set {HEADERS_ENV} to a "
            "CUTLASS checkout)"
        )
    units = [(scheme, name, dtype) for scheme in SCHEMES for name in CONFIGS for dtype in _DTYPES]
    key = (
        SOURCE.read_bytes(), native_build.tool_version(nvcc), " ".join(NVCC_FLAGS), _headers_version(dirs[0]),
        repr(sorted((name, c.tile_m, c.tile_n, c.cooperative) for name, c in CONFIGS.items())),
    )  # fmt: skip
    folder = native_build.build_folder("cuda", LIBRARY_NAME, key)

    def stages(target: Path) -> list[list[list[str]]]:
        objects = [Path(f"{target}.{index}.o") for index in range(len(units))]
        compiles = [
            compile_command(nvcc, dirs, name, dtype, obj, scheme)
            for (scheme, name, dtype), obj in zip(units, objects, strict=True)
        ]
        link = [nvcc, "-shared", ARCH_FLAG, *map(str, objects), "-o", str(target)]
        return [compiles, [link]]

    return native_build.build_library(folder, LIBRARY_NAME, stages, force=force)


def compile_command(
    nvcc: str, include_dirs: list[Path], name: str, dtype: torch.dtype, obj: Path, scheme: str = "int8"
) -> list[str]:
    """nvcc's argv for one (scheme, configuration, activation type) translation unit."""
    config = CONFIGS[name]
    defines = [
        f"-DLLMOPT_INT4={int(scheme == 'int4')}",
        f"-DLLMOPT_TILE_M={config.tile_m}",
        f"-DLLMOPT_TILE_N={config.tile_n}",
        f"-DLLMOPT_COOPERATIVE={int(config.cooperative)}",
        f"-DLLMOPT_HALF={int(dtype == torch.float16)}",
        f"-DLLMOPT_ENTRY={entry_name(name, dtype, scheme)}",
    ]
    includes = [f"-I{d}" for d in include_dirs]
    return [nvcc, *NVCC_FLAGS, *includes, *defines, "-c", str(SOURCE), "-o", str(obj)]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    i32, ptr, size = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
    for scheme in SCHEMES:
        for name in CONFIGS:
            for dtype in _DTYPES:
                entry = getattr(lib, entry_name(name, dtype, scheme))
                entry.argtypes = [ptr, ptr, ptr, ptr, i32, ptr, i32, i32, i32, ptr, size, ptr]
                entry.restype = i32
                workspace = getattr(lib, entry_name(name, dtype, scheme) + "_workspace")
                workspace.argtypes = [i32, i32, i32]
                workspace.restype = size
    return lib


@functools.cache
def _library(device_index: int) -> ctypes.CDLL | None:
    """The loaded, self-tested library, or None (warned once) when it cannot be had here."""

    def open_checked(path: Path) -> ctypes.CDLL:
        lib = _declare(ctypes.CDLL(str(path)))
        if not torch.cuda.is_current_stream_capturing():  # a test launch must not land in a graph
            _self_test(lib, torch.device("cuda", device_index))
        return lib

    return native_build.load_or_warn(
        "Hopper int8/int4 GEMM",
        build_library,
        open_checked,
        consequence="int8 and int4 matmuls of prefill and large batches use the slower Triton / dequantize "
        "path",
        unusable_fix=f"a failed self-test is a bug to report; {DISABLE_ENV}=0 goes straight to Triton "
        "without this warning",
        build_fix=f"install what it names, or set {DISABLE_ENV}=0 to use that path without this warning",
    )


def _self_test(lib: ctypes.CDLL, device: torch.device) -> None:
    """Every configuration of both schemes in both activation types on a small product against float64
    (odd row count, several tiles, K split by stream-K; int4 through llmopt's own packing, zero points
    and x permutation), so that a build this GPU or driver cannot run is caught at load time, with a
    warning, rather than in the middle of a prefill."""
    from llmopt.quant.triton_kernels import pack_int4_halves  # (imports this module)

    gen = torch.Generator().manual_seed(0)
    m, n, k, group = 72, 384, 1024, 128
    x = torch.randn(m, k, generator=gen)
    q8 = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale8 = torch.rand(n, generator=gen) / 64
    q4 = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    zero_point = torch.randint(-8, 8, (n, k // group), generator=gen, dtype=torch.int8)
    scale4 = torch.rand(n, k // group, generator=gen) / 8
    zeros = (zero_point.to(torch.int16) + 8).to(torch.uint8)  # stored as zp + 8, as the kernels take them
    levels = q4.double().view(n, -1, group) - zero_point.double()[..., None]
    packed = pack_int4_halves(q4, group).to(device)
    for dtype in _DTYPES:
        xs = x.to(device, dtype)
        s8, s4 = scale8.to(dtype), scale4.to(dtype)
        scale_g, zero_g = group_major(s4.to(device), zeros.to(device), dtype)
        refs = {
            "int8": xs.cpu().double() @ (q8.double() * s8.double()[:, None]).T,
            "int4": xs.cpu().double() @ (levels * s4.double()[..., None]).view(n, k).T,
        }
        for scheme, ref in refs.items():
            for name in CONFIGS:
                out = torch.full((m, n), float("nan"), device=device, dtype=dtype)
                try:
                    if scheme == "int8":
                        int8_gemm(xs, q8.to(device), s8.to(device), out, config=name, lib=lib)
                    else:
                        int4_gemm(xs, packed, scale_g, zero_g, group, out, config=name, lib=lib)
                except RuntimeError as exc:
                    raise Unusable(f"self-test: {scheme} {name} ({dtype}): {exc}") from exc
                err = ((out.cpu().double() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:  # 16-bit rounding is ~4e-3; NaN (an unwritten output) fails too
                    raise Unusable(f"self-test: {scheme} {name} ({dtype}) off by {err:.1e} relative")


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def takes_rows(m: int, n: int, k: int, scheme: str = "int8") -> bool:
    """Whether this many rows go to this GEMM: MIN_ROWS (SMALL_WEIGHT_MIN_ROWS for small weights) to
    MAX_ROWS, per scheme."""
    small = n * k <= SMALL_WEIGHT
    return (SMALL_WEIGHT_MIN_ROWS[scheme] if small else MIN_ROWS[scheme]) <= m <= MAX_ROWS[scheme]


def _runs_here(x: torch.Tensor, out: torch.Tensor, operands: tuple[torch.Tensor, ...], k: int, n: int,
               scheme: str) -> bool:  # fmt: skip
    """What both schemes need of a call: a Hopper GPU; x bf16/fp16 (M, K) with M past the row rule; K a
    multiple of 16 and N of 8 (TMA's 16-byte rows); x, out and the weight's ``operands`` (the weight,
    its scales) contiguous and 16-byte aligned; and the library builds and passes its self-test here."""
    m = x.shape[0]
    return (
        x.is_cuda
        and x.dtype in _DTYPES
        and takes_rows(m, n, k, scheme)
        and k % 16 == 0
        and n % 8 == 0
        and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x, out, *operands))
        and enabled()
        and torch.cuda.get_device_capability(x.device) == CAPABILITY
        and _library(x.device.index or 0) is not None
    )


def usable(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether this int8 call runs here: as ``_runs_here``, with the scale in x's type."""
    return scale.dtype == x.dtype and _runs_here(x, out, (q, scale), x.shape[1], q.shape[0], "int8")


def int4_wanted(device: torch.device, dtype: torch.dtype, group: int) -> bool:
    """Whether int4 layers on ``device`` should keep ``group_major`` copies of their scales for this
    GEMM: a Hopper GPU, x bf16/fp16, a group CUTLASS takes (a multiple of its 64-input K step), not
    turned off, and nvcc and CUTLASS's headers present (the library itself is built at the first call)."""
    return (
        device.type == "cuda"
        and dtype in _DTYPES
        and group % 64 == 0
        and enabled()
        and torch.cuda.get_device_capability(device) == CAPABILITY
        and nvcc_path() is not None
        and header_dirs() is not None
    )


def group_major(
    scale: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """CUTLASS's int4 scale and zero from llmopt's: ``scale`` (N, K/G) and ``zeros`` (N, K/G) uint8, the
    zero point + 8, the same offset as the stored nibbles ``u = q + 8``. A weight ``(q - zp) * scale`` is
    ``u * scale - (zp + 8) * scale``: returns (scale, -(zp + 8) * scale), each (K/G, N) in ``dtype``."""
    offset = -(zeros.float() * scale.float())
    return scale.to(dtype).T.contiguous(), offset.to(dtype).T.contiguous()


def usable_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_g: torch.Tensor,
    zero_g: torch.Tensor,
    group: int,
    out: torch.Tensor,
) -> bool:
    """Whether this int4 call runs here: as ``_runs_here``, with a group CUTLASS takes and
    ``group_major`` scales in x's type."""
    k, n = x.shape[1], packed.shape[0]
    return (
        group % 64 == 0
        and k % group == 0
        and scale_g.dtype == zero_g.dtype == x.dtype
        and scale_g.shape == zero_g.shape == (k // group, n)
        and _runs_here(x, out, (packed, scale_g, zero_g), k, n, "int4")
    )


def interleave_halves(x: torch.Tensor, group: int) -> torch.Tensor:
    """x's columns in the order CUTLASS reads llmopt's int4 bytes: in each group of G inputs, byte j
    holds input j (low nibble) and j + G/2 (high), which CUTLASS takes as inputs 2j and 2j + 1, so
    column 2j of the result is x's column j of the group and column 2j + 1 its column j + G/2."""
    m, k = x.shape
    return x.view(m, k // group, 2, group // 2).transpose(2, 3).reshape(m, k)


def _call(
    scheme: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    group: int,
    out: torch.Tensor,
    config: str | None,
    lib: ctypes.CDLL | None,
) -> torch.Tensor:
    from llmopt.quant.triton_kernels import sm_count  # (imports this module)

    if lib is None:
        lib = _library(x.device.index or 0)
    assert lib is not None
    (m, k), n = x.shape, weight.shape[0]
    if config is None:
        config = choose_config(m, n, k, sm_count(x.device.index or 0))
    name = entry_name(config, x.dtype, scheme)
    with torch.cuda.device(x.device):  # the library launches on the calling thread's current device
        size = getattr(lib, name + "_workspace")(n, m, k)
        workspace = torch.empty(size, device=x.device, dtype=torch.uint8) if size else None
        code = getattr(lib, name)(
            weight.data_ptr(), x.data_ptr(), scale.data_ptr(), zero.data_ptr() if zero is not None else None,
            group, out.data_ptr(), n, m, k, workspace.data_ptr() if workspace is not None else None, size,
            torch.cuda.current_stream(x.device).cuda_stream,
        )  # fmt: skip
    if code != 0:
        reasons = {
            1: "the shape cannot run",
            2: "workspace too small",
            3: "arguments refused",
            4: "launch failed",
        }
        raise RuntimeError(f"llmopt's Hopper {scheme} GEMM ({config}) failed: {reasons.get(code, code)}")
    return out


def int8_gemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
              config: str | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:  # fmt: skip
    """``out = x @ (q * scale[:, None]).T`` for x (M, K) bf16/fp16, q (N, K) int8, scale (N,) in x's
    type, out (M, N) in x's type. ``config`` forces a configuration (sweeps, the self-test), ``lib``
    another build of the library (the self-test), else the checked one."""
    return _call("int8", x, q, scale, None, 0, out, config, lib)


def int4_gemm(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale_g: torch.Tensor,
    zero_g: torch.Tensor,
    group: int,
    out: torch.Tensor,
    config: str | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """``out = x @ dequant(W).T`` for x (M, K) bf16/fp16 and llmopt's half-split int4 layout: packed
    (N, K/2) uint8, with ``group_major`` scale and zero (K/G, N) in x's type. ``config`` and ``lib`` as
    in ``int8_gemm``."""
    return _call("int4", interleave_halves(x, group), packed, scale_g, zero_g, group, out, config, lib)
