// llmopt's weight-only int8 and int4 GEMMs for Hopper (sm_90a), for prefill and large batches: CUTLASS's
// warp-specialized mixed-input GEMM (TMA loads, the narrow weight converted to 16 bits in registers and
// fed to wgmma as its register operand, fp32 sums). Built on the machine that runs it by
// llmopt/quant/cutlass_gemm.py.
//
//   int8: out (M, N) = x (M, K) @ (q (N, K) * scale (N,)[:, None]).T
//   int4: out (M, N) = x' (M, K) @ (u (N, K) * s + z).T, u the nibbles of packed (N, K/2) bytes taken in
//         order (input 2j in byte j's low nibble, 2j + 1 in its high one), s and z per (channel, group of G
//         inputs), given group-major: (K/G, N) in x's type.
//
// As a GEMM: A = the weight (N x K, row-major, the narrow operand, so it goes through registers), B = x
// (K x M, column-major: x's rows are K-contiguous), D = out^T (N x M, column-major = out row-major).
// int8's scale is a per-row alpha of that GEMM (fp32 sums times the scale, rounded once to x's type), so
// the integers reach the tensor cores exactly and the result matches dequantize-then-matmul in fp32.
// int4's s and z are CUTLASS's group-wise scale and zero: each weight becomes u * s + z in x's type before
// the mma (llmopt's half-split nibble layout and zero point map onto this in cutlass_gemm.int4_gemm).
//
// One tile configuration per translation unit, chosen by the build's -D flags:
//   LLMOPT_INT4                  1: the int4 GEMM; 0: int8
//   LLMOPT_TILE_M, LLMOPT_TILE_N  the output tile (weight channels x rows of x); K steps of 64
//   LLMOPT_COOPERATIVE           1: two consumer warpgroups share a 128-channel tile, with CUTLASS's
//                                stream-K scheduler (K split across CTAs when there are too few tiles;
//                                partial sums reduced in a fixed order, so results are deterministic);
//                                0: ping-pong warpgroups on 64-channel tiles, persistent scheduler
//   LLMOPT_HALF                  1: fp16 x, out and scale; 0: bf16
//   LLMOPT_ENTRY                 the entry point's name; <name>_workspace gives its scratch size
// Entry points return 0, or 1 (the shape cannot run: alignment, or an int4 group that is not a multiple
// of 64), 2 (workspace too small), 3 (CUTLASS refused the arguments), 4 (the launch failed).

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"
#include "cutlass/util/packed_stride.hpp"

#if !defined(LLMOPT_INT4) || !defined(LLMOPT_TILE_M) || !defined(LLMOPT_TILE_N) || !defined(LLMOPT_COOPERATIVE) || \
    !defined(LLMOPT_HALF) || !defined(LLMOPT_ENTRY)
#error "build with -DLLMOPT_INT4=0|1 -DLLMOPT_TILE_M=.. -DLLMOPT_TILE_N=.. -DLLMOPT_COOPERATIVE=0|1 -DLLMOPT_HALF=0|1 -DLLMOPT_ENTRY=name"
#endif

#define LLMOPT_CAT2(a, b) a##b
#define LLMOPT_CAT(a, b) LLMOPT_CAT2(a, b)

namespace {

using namespace cute;

using Act = std::conditional_t<LLMOPT_HALF, cutlass::half_t, cutlass::bfloat16_t>;
using Tile = Shape<Int<LLMOPT_TILE_M>, Int<LLMOPT_TILE_N>, _64>;
using Cluster = Shape<_1, _1, _1>;
using MainloopSchedule = std::conditional_t<LLMOPT_COOPERATIVE, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                                            cutlass::gemm::KernelTmaWarpSpecializedPingpong>;
using EpilogueSchedule = std::conditional_t<LLMOPT_COOPERATIVE, cutlass::epilogue::TmaWarpSpecializedCooperative,
                                            cutlass::epilogue::TmaWarpSpecialized>;
using Scheduler = std::conditional_t<LLMOPT_COOPERATIVE, cutlass::gemm::StreamKScheduler,
                                     cutlass::gemm::PersistentScheduler>;
constexpr int kAlignAct = 8;  // 16 bytes of x / out (TMA)
using Weight = std::conditional_t<LLMOPT_INT4, cutlass::uint4b_t, int8_t>;
constexpr int kAlignWeight = 128 / cutlass::sizeof_bits<Weight>::value;  // 16 bytes
// int4: the weight with its group-wise scale and zero (CUTLASS converts u to Act, then u * s + z).
using WeightOperand = std::conditional_t<LLMOPT_INT4, cute::tuple<Weight, Act, Act>, Weight>;

// int8: D = alpha[row] * acc (+ beta * C with no C, + no bias): the per-channel scale as a per-row alpha.
// int4: D = acc (the scales were applied to the weights).
using Fusion = std::conditional_t<
    LLMOPT_INT4, cutlass::epilogue::fusion::LinearCombination<Act, float, Act, float>,
    cutlass::epilogue::fusion::PerRowLinCombPerRowBiasEltAct<cutlass::epilogue::thread::Identity, Act, float, Act,
                                                             Act, Act>>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::ColumnMajor, kAlignAct,  // no C
    Act, cutlass::layout::ColumnMajor, kAlignAct, EpilogueSchedule, Fusion>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    WeightOperand, cutlass::layout::RowMajor, kAlignWeight,
    Act, cutlass::layout::ColumnMajor, kAlignAct,
    float, Tile, Cluster,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    MainloopSchedule>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, Scheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

int sm_count(int device) {
  static int counts[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (counts[device] == 0) counts[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return counts[device];
}

// The GEMM's arguments. scale: int8's (N,); int4's (K/G, N), with zero (K/G, N) and group G.
typename Gemm::Arguments arguments(const void* q, const void* x, const void* scale, const void* zero, int group,
                                   void* out, int n, int m, int k) {
  using StrideA = typename Kernel::StrideA;
  using StrideB = typename Kernel::StrideB;
  using StrideC = typename Kernel::StrideC;
  using StrideD = typename Kernel::StrideD;
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {n, m, k, 1};
  args.mainloop.ptr_A = static_cast<const Weight*>(q);
  args.mainloop.dA = cutlass::make_cute_packed_stride(StrideA{}, make_shape(n, k, 1));
  args.mainloop.ptr_B = static_cast<const Act*>(x);
  args.mainloop.dB = cutlass::make_cute_packed_stride(StrideB{}, make_shape(m, k, 1));
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = cutlass::make_cute_packed_stride(StrideC{}, make_shape(n, m, 1));
  args.epilogue.ptr_D = static_cast<Act*>(out);
  args.epilogue.dD = cutlass::make_cute_packed_stride(StrideD{}, make_shape(n, m, 1));
#if LLMOPT_INT4
  using StrideScale = typename Mainloop::StrideScale;
  args.mainloop.ptr_S = static_cast<const Act*>(scale);
  args.mainloop.dS = cutlass::make_cute_packed_stride(StrideScale{}, make_shape(n, group > 0 ? k / group : 1, 1));
  args.mainloop.group_size = group;
  args.mainloop.ptr_Z = static_cast<const Act*>(zero);
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
#else
  args.epilogue.thread.alpha_ptr = static_cast<const Act*>(scale);
  args.epilogue.thread.beta = Act(0.f);
#endif
  int device = 0;
  cudaGetDevice(&device);
  args.hw_info.device_id = device;  // the stream-K grid is sized for this GPU's SMs
  args.hw_info.sm_count = sm_count(device);
  return args;
}

// Whether CUTLASS's mixed-input kernel takes this group: a multiple of the tile's K step (64) dividing K.
bool group_ok(int group, int k) { return !LLMOPT_INT4 || (group > 0 && group % 64 == 0 && k % group == 0); }

}  // namespace

extern "C" size_t LLMOPT_CAT(LLMOPT_ENTRY, _workspace)(int n, int m, int k) {
  return Gemm::get_workspace_size(arguments(nullptr, nullptr, nullptr, nullptr, LLMOPT_INT4 ? 64 : 0, nullptr, n, m, k));
}

// zero and group are int4's (int8 ignores them).
extern "C" int LLMOPT_ENTRY(const void* q, const void* x, const void* scale, const void* zero, int group, void* out,
                            int n, int m, int k, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (!group_ok(group, k)) return 1;
  typename Gemm::Arguments args = arguments(q, x, scale, zero, group, out, n, m, k);
  if (Gemm::can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
  Gemm gemm;
  if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 4;
  return 0;
}
