"""llmopt's own int8 weight-only matmul for x86-64 CPUs (C++, AVX-512 or AVX2), built on first use.

torch's CPU int8 op (``aten._weight_int8pack_mm``) reaches about half the memory bandwidth with
bf16 activations and a tenth of that with fp32 ones, and decode on a CPU is a stream of such
matmuls over few rows. ``csrc/int8_linear_cpu.cpp`` streams the int8 weights from a blocked layout
(``pack_int8``), converts them in registers and accumulates in fp32 against fp32 activations, with
the per-channel scale applied once at the end (see the source for the loop).

Build (llmopt/quant/native_build.py): the first CPU int8 layer compiles the source with the
system's C++ compiler (g++; ``CXX`` overrides) against torch's headers and libraries (about 7-9 s
on 2 cores) into llmopt's cache, ``<cache>/cpp/int8_linear_cpu-<key>/``. The key hashes the source,
the compiler, the flags, torch's version and location, and the CPU's vector ISA. No ``-march``
flag: the code picks AVX-512 or AVX2 at run time, so a build runs on any x86-64 machine that shares
the cache. No ninja and no Python headers are needed: the library registers plain torch ops and is
loaded with ``torch.ops.load_library``. If it cannot be built, one warning says so and int8 layers keep
torch's op.

The op is ``torch.ops.llmopt.int8_linear_cpu(x, w_packed, scale)``, a torch library op with a fake
(meta) implementation, so ``torch.compile`` keeps it as one opaque call.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

from llmopt.quant import native_build
from llmopt.quant.kernels import LayerShape, QuantKernel, stack_channels
from llmopt.quant.native_build import BuildError, build_folder, tool_version

BLOCK = 16  # output channels per packed block (the kernel's vector width in fp32 lanes)
SOURCES = (
    Path(__file__).parent / "csrc" / "int8_linear_cpu.cpp",
    Path(__file__).parent / "csrc" / "decode_cpu.cpp",  # rms_norm and decode attention for the engine
)
LIBRARY_NAME = "int8_linear_cpu"
DISABLE_ENV = "LLMOPT_CPU_KERNELS"  # "0": never build or use llmopt's CPU kernels
CXX_FLAGS = ("-O3", "-std=c++20", "-fPIC", "-shared", "-fopenmp", "-DNDEBUG", "-Wno-c++20-extensions")
ISA_NAMES = {2: "avx512", 1: "avx2", 0: "none"}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_isa() -> str:
    """The vector ISA the kernel will use on this CPU: 'avx512', 'avx2' or 'none'."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "none"
    flags = _cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "none"


def _build_command(cxx: str, sources: tuple[Path, ...], target: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    torch_lib = library_paths()[0]
    return [
        cxx,
        *CXX_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{p}" for p in include_paths()),
        *(str(source) for source in sources),
        "-o",
        str(target),
        f"-L{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_lib}",
    ]


def build_dir() -> Path:
    """Where this source, compiler, torch and CPU ISA build to (inside llmopt's cache)."""
    cxx = _compiler() or "none"
    return build_folder("cpp", LIBRARY_NAME, (
        *(source.read_bytes() for source in SOURCES),
        tool_version(cxx),
        " ".join(CXX_FLAGS),
        torch.__version__,
        str(Path(torch.__file__).parent),  # the library links (and rpaths) this torch
        platform.machine(),
        cpu_isa(),
    ))  # fmt: skip


def build_library(force: bool = False) -> tuple[Path, float]:
    """Compile the kernel library (once per key; ``force`` rebuilds): native_build.build_library."""
    cxx = _compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (looked for $CXX, g++, c++)")
    return native_build.build_library(
        build_dir(), LIBRARY_NAME, lambda target: _build_command(cxx, SOURCES, target), force=force
    )


@functools.cache
def _load() -> str | None:
    """Build (if needed) and load the library once per process. Returns None when ready, else why not."""
    if cpu_isa() == "none":
        return f"this CPU ({platform.machine()}) has neither AVX-512 nor AVX2+FMA"
    try:
        path, seconds = build_library()
    except BuildError as exc:
        return str(exc)
    if seconds:
        print(f"llmopt: built the CPU int8 kernel in {seconds:.1f} s ({path})", file=sys.stderr)
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return f"{path} did not load ({exc})"
    if torch.ops.llmopt.int8_linear_cpu_isa() == 0:
        return "this CPU has neither AVX-512 nor AVX2+FMA"
    torch.library.register_fake("llmopt::int8_linear_cpu")(_int8_linear_fake)
    return None


def _int8_linear_fake(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], scale.shape[0]))


@functools.cache
def ready() -> bool:
    """Whether the kernel runs here (building it on first call). Warns once when it cannot."""
    reason = _load()
    if reason is not None:
        warnings.warn(
            f"llmopt's CPU kernels are unavailable: {reason}. int8 layers on the CPU use torch's "
            "slower aten._weight_int8pack_mm instead, and eager decode torch's rms_norm and attention. "
            "To fix: install a C++ compiler "
            "(Debian/Ubuntu: apt-get install g++) and run again.",
            stacklevel=2,
        )
    return reason is None


def kernel_isa() -> str:
    """The ISA the loaded kernel dispatches to ('avx512', 'avx2'); 'none' when it is not ready."""
    return ISA_NAMES[int(torch.ops.llmopt.int8_linear_cpu_isa())] if ready() else "none"


def decode_ops_available() -> bool:
    """Whether eager CPU decode can use ``llmopt::rms_norm_cpu`` and ``llmopt::decode_attention_cpu``
    (csrc/decode_cpu.cpp, AVX2+FMA; built with the int8 kernel, and off with it)."""
    return _enabled() and ready()


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """(N, K) int8 → (ceil(N/16), K, 16): block b, row k holds q[16b:16b+16, k] (zero past N)."""
    n, k = q.shape
    blocks = -(-n // BLOCK)
    padded = torch.zeros(blocks * BLOCK, k, dtype=torch.int8)
    padded[:n] = q.to(device="cpu", dtype=torch.int8)
    return padded.view(blocks, BLOCK, k).transpose(1, 2).contiguous()


def unpack_int8(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of ``pack_int8``: (N, K) int8."""
    blocks, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(blocks * BLOCK, k)[:n]


def int8_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor | None = None,
    isa: str = "auto",
) -> torch.Tensor:
    """``x @ (q * scale[:, None]).T`` for x (M, K) fp32/bf16 through the C++ kernel. With ``out``
    ((M, N), x's dtype) the result is written there (tests poison it first); ``isa`` forces a path
    ('avx2', 'avx512') for tests and benchmarks."""
    if not ready():
        raise RuntimeError("llmopt's CPU int8 kernel is not available here (see the warning).")
    if out is None and isa == "auto":
        return torch.ops.llmopt.int8_linear_cpu(x, w_packed, scale)
    if out is None:
        out = x.new_empty((x.shape[0], scale.shape[0]))
    code = {"auto": 0, "avx2": 1, "avx512": 2}[isa]
    torch.ops.llmopt.int8_linear_cpu_out(x, w_packed, scale, code, out)
    return out


class CpuInt8Kernel(QuantKernel):
    """llmopt's C++ kernel for every row count: fp32 accumulation, fp32 or bf16 activations.

    Unlike AtenInt8Kernel there is no separate many-row path (a transient fp32 weight and torch's
    fp32 matmul): the kernel is exact in fp32 at any row count and was faster at every count
    measured on 2 cores (64 to 1,024 rows, smollm2's shapes: 1.1x to 6x; it does not allocate and
    fill an fp32 copy of the weight per call)."""

    name = "llmopt.int8_linear_cpu"
    scheme = "int8"

    def supports(self, shape: LayerShape, device: torch.device, dtype: torch.dtype) -> bool:
        return (
            shape.scheme == "int8"
            and device.type == "cpu"
            and dtype in (torch.float32, torch.bfloat16)
            and ready()
        )

    def prepare(self, q, scale, zero_point, shape, device, dtype):
        return {
            "weight_packed": pack_int8(q),  # (ceil(N/16), K, 16) int8
            "scales": scale.reshape(-1).to(device="cpu", dtype=torch.float32).contiguous(),  # (N,)
        }

    def matmul(self, x, buffers, shape):
        return torch.ops.llmopt.int8_linear_cpu(x, buffers["weight_packed"], buffers["scales"])

    def concat(
        self, parts: list[dict[str, torch.Tensor]], interleave: bool = False
    ) -> dict[str, torch.Tensor]:
        """One layer from several over the same input (fused q/k/v, gate/up): output channels in order,
        or interleaved (``stack_channels``)."""
        q = stack_channels(
            [unpack_int8(p["weight_packed"], p["scales"].shape[0]) for p in parts], 0, interleave
        )
        return {
            "weight_packed": pack_int8(q),
            "scales": stack_channels([p["scales"] for p in parts], 0, interleave),
        }


def available() -> list[QuantKernel]:
    """The CPU kernel on x86-64 machines with AVX2 or AVX-512 (it is built when a CPU int8 layer
    first asks for it, so GPU-only runs never compile it). ``LLMOPT_CPU_KERNELS=0`` turns it off."""
    return [CpuInt8Kernel()] if _enabled() else []


def _enabled() -> bool:
    """Not turned off (``LLMOPT_CPU_KERNELS=0``) and a CPU the library can run on."""
    return os.environ.get(DISABLE_ENV, "1") != "0" and cpu_isa() != "none"
