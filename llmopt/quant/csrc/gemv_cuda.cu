// llmopt's weight-only int8 / int4 matrix-vector kernels for decode on NVIDIA GPUs: on the tensor cores at
// up to 16 rows of x (mma_gemv_kernel, further down, for either scheme: int4 from one row, int8 from two),
// on the CUDA cores at 1-2 rows (int8_gemv_kernel: int8's one row; int4_gemv_kernel: int4 when K is not a
// multiple of 128). The entry points pick by row count and K.
//
// out[m, n] = sum_k x[m, k] * dequant(W)[n, k] for a few rows m. At these row counts the matmul is a
// stream of the weight's bytes, so the kernel is built around reading them at the copy rate and doing
// as few instructions per byte as possible:
//   - A block of 128 threads is split into teams of KSPLIT warps; a team owns R consecutive output
//     channels and its threads take 16-byte chunks of those rows in turn (16 int8 or 32 int4
//     weights per chunk), U chunks per thread in flight at a time, with loads that bypass L1 (the
//     weights are read once; x stays cached). Each x load serves the team's R rows.
//   - Each thread keeps fp32 sums for its R x M outputs; the team reduces them in a fixed order
//     (warp shuffles, then its warps' partials in warp order): no atomics, so the result is the
//     same on every run, as greedy decoding needs.
//   - Integers become floats without conversion instructions (which run at a quarter of the FMA rate):
//     a byte permute drops the integer into the mantissa of a float power of two, whose value is then
//     the integer plus a known offset.
//       int8: the byte XOR 0x80 (= q + 128) goes into 0x4B0000__ = 2^23 + q + 128; one add of
//             -(2^23 + 128) gives q exactly.
//       int4: the nibble (stored as q + 8 in [0, 15]) goes into 0x43__0000 = 128 + nibble. The offset
//             is not subtracted per weight: per group, sum(x * (128 + nib)) - (128 + zero) * sum(x)
//             equals sum(x * (nib - zero)), and sum(x) is shared by the team's rows.
//     The per-channel (int8) or per-group (int4) scale is applied to the sums, not to every weight.
// Layouts are the Triton kernels' (llmopt/quant/triton_kernels.py): int8 (N, K) row-major; int4
// (N, K/2) bytes where, in every group of G inputs, byte j holds input j (low nibble) and input
// j + G/2 (high nibble); per (row, group) a scale and a zero point stored as zp + 8.
//
// Programmatic dependent launch (Hopper on): where two of these kernels run back to back, the second's start
// (launch, its first loads' latency) and the first's tail (its last blocks, the norm's cross-block sum) leave the
// memory bus idle. Launched with the programmatic-serialization attribute, a kernel may start before the one ahead
// of it in the stream has finished; it waits for that kernel (griddepcontrol.wait) before it touches anything that
// kernel writes or reads (x, the residual, the norm's sums, its own outputs). (Weights could be read before it, no
// kernel writes them; but ptxas schedules the wait, ACQBULK in the SASS, ahead of the tensor-core kernel's first
// weight loads although the source issues them first, and the CUDA-core kernels measured slower with loads or L2
// prefetches in front of it.) A kernel lets the next one launch with griddepcontrol.launch_dependents: the CUDA-core
// kernels once their main loop is done (the next grid's blocks then take the SMs as these leave, instead of waiting
// beside them: int8 at one row 1.1% less per step than right after the wait), the tensor-core kernel right after its
// wait (there, after the loop cost int4 4% per step, even with no kernel launched programmatically). Both
// instructions are no-ops in a normal launch. Only the matmul after a folded-in norm is launched so
// (llmopt_set_programmatic_launch switches it): but for the first layer's, the kernel ahead of it is the residual
// matmul that summed the norm's squares. Measured on an H200 (BENCHMARKS.md §5): int8 at one row 1.5% less per step;
// launching every matmul so cost int4 3% (its neighbours are Triton and inductor kernels, which never let it start
// early), and asking L2 for weights before the wait (prefetch.global.L2, in every kernel) made them 0.5-3 us slower
// each.
//
// The MLP's SiLU product (Fusion::gated): with gate's and up's weight rows interleaved, the gate/up matmul writes
// silu(gate) * up itself, half as many outputs ("The SiLU product" below): one launch fewer per layer.
//
// Plain C entry points (no torch headers, so the library builds in seconds with nvcc alone); the
// caller passes device pointers and the stream to launch on. They return the launch's cudaError_t.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

// What llmopt_fused_gemv folds into the matmul (see "RMSNorm and the residual add" below). Outside the
// anonymous namespace: the extern "C" entry takes it, and must keep external linkage.
struct Fusion {
  const float* sumsq_in;    // [m]: the sum of h^2 over each of x's rows; null: no norm before this matmul
  float eps;
  const void* residual;     // [m, n], ld n, x's type: added to the outputs; null: none
  const void* norm_weight;  // [n]: with residual, also write weighted = h * w and sumsq_out
  void* weighted;           // [m, n], ld n
  float* partials;          // [m, ceil(n / 8)]: workspace for the sums of h^2 per 8 channels
  float* sumsq_out;         // [m]
  unsigned int* counter;    // zero before the launch; zero again after it (the last block resets it)
  int gated;                // nonzero: channels 2c, 2c + 1 are an MLP's gate and up; out[m, c] = silu(gate) * up
};

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

__device__ __forceinline__ uint4 load_stream(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// ---- Programmatic dependent launch (see the header) ----
// Blocks until the kernel ahead in the stream has finished and its writes are visible; a no-op when this
// kernel was launched normally (or before Hopper).
__device__ __forceinline__ void wait_for_prior_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Lets the next kernel in the stream launch once every block of this one has got here (or exited).
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ float load_scalar(const void* ptr, int64_t index, int dtype) {
  if (dtype == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(ptr)[index]);
  if (dtype == kFloat16) return __half2float(static_cast<const __half*>(ptr)[index]);
  return static_cast<const float*>(ptr)[index];
}

// Two 16-bit floats in one 32-bit word, as fp32.
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t word);

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t word) {
  return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xFFFF0000u));
}

template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t word) {
  __half2 h = *reinterpret_cast<__half2*>(&word);
  return __half22float2(h);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half(v);
}

// A 16-bit or 32-bit float as float, by its type (float, bf16 or fp16).
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// int8 byte i of `u` (already XOR 0x80) as the float 2^23 + byte.
__device__ __forceinline__ float int8_magic(uint32_t u, int i) {
  return __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7540u | i));
}

// Nibble in byte i of `nibbles` (each byte in [0, 15]) as the float 128 + nibble.
__device__ __forceinline__ float nibble_magic(uint32_t nibbles, int i) {
  return __uint_as_float(__byte_perm(nibbles, 0x43000000u, 0x7054u | (i << 8)));
}

// Sum each of the R*M per-thread values over a team of KSPLIT warps, in a fixed order (warp shuffles,
// then the team's warps in warp order); lane j < R*M of the team's first warp returns sum j.
template <int R, int M, int KSPLIT>
__device__ __forceinline__ float team_sum(float (&acc)[R][M], float (*shared)[R * M]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float mine = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float v = acc[r][m];
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
      if (KSPLIT > 1 && lane == 0) shared[warp][r * M + m] = v;
      if (lane == r * M + m) mine = v;
    }
  }
  if constexpr (KSPLIT > 1) {
    __syncthreads();
    mine = 0.0f;
    if (lane < R * M) {
      const int first = warp - warp % KSPLIT;
#pragma unroll
      for (int w = 0; w < KSPLIT; ++w) mine += shared[first + w][lane];
    }
  }
  return mine;
}

// The block's warps form teams of KSPLIT warps; a team owns R consecutive output channels and its
// threads take the rows' 16-byte chunks in turn, U chunks in flight per thread.
template <int R, int KSPLIT>
struct Team {
  int n0, t, writer;
  __device__ __forceinline__ Team() {
    const int warp = threadIdx.x >> 5;
    n0 = (blockIdx.x * (kWarps / KSPLIT) + warp / KSPLIT) * R;
    t = (warp % KSPLIT) * 32 + (threadIdx.x & 31);
    writer = warp % KSPLIT == 0;
  }
  static constexpr int kThreadsPerTeam = KSPLIT * 32;
};

// ---- RMSNorm and the residual add folded into the decode kernels (llmopt_fused_gemv) ----
// A decoder layer computes h += o_proj(attention(norm(h))), then h += down(mlp(norm(h))), with
// norm(h) = h * rsqrt(mean(h^2) + eps) * w. Standalone, each add + norm is a small kernel between two of
// these matmuls; here it is spread over them, so it costs no launch:
//   - the matmul that ends a residual branch (o_proj, down) adds the residual to its outputs (rounded to
//     the activation type first, as `h + o_proj(x)` does), writes h, writes h * w (w: the next norm's
//     weight) as the next matmul's input, and each block the sums of h^2 over its 8-channel groups into a
//     workspace; the last block to finish (a ticket counter) adds them up into sumsq_out, one float per row;
//   - the matmul after the norm (q/k/v, gate/up) reads h * w as x, fetches its rows' sums of squares into
//     shared memory with cp.async as it starts (no register held, no wait) and multiplies its fp32 sums by
//     rsqrt(sumsq / k + eps) at the end: W (h * w) * rsqrt(...) is the norm's output through the matmul.
// (Summing the 8-channel partials in every block of the next matmul instead was measured: its short-lived
// blocks waited on those loads, +7 us per layer at one row, BENCHMARKS.md.) Every sum runs in a fixed order,
// whichever block is last, so the result is the same on every run.
constexpr int kPartialChannels = 8;

// Whether a call folds a norm or a residual in (the kFused kernels), not only the SiLU product.
__host__ __device__ inline bool folds_norm(const Fusion& f) {
  return f.sumsq_in != nullptr || f.residual != nullptr || f.norm_weight != nullptr;
}

// The consumer's start: threads 0 .. m_rows - 1 copy their row's sum of squares into sumsq[] (cp.async, 4
// bytes). Before reading sumsq: norm_sums_wait() in every thread, then a __syncthreads.
__device__ __forceinline__ void norm_sums_fetch(const Fusion& f, int m_rows, float* sumsq) {
  if (f.sumsq_in == nullptr || (int)threadIdx.x >= m_rows) return;
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(sumsq + threadIdx.x));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(f.sumsq_in + threadIdx.x));
  asm volatile("cp.async.commit_group;\n" ::);
}

__device__ __forceinline__ void norm_sums_wait() { asm volatile("cp.async.wait_all;\n" ::); }

// A ticket: the counter's old value, with release (this warp's writes before it, ordered by a __syncwarp, are
// visible to whoever acquires the counter after it) and acquire (every earlier ticket holder's writes are
// visible here) at GPU scope. Lighter than __threadfence(), a sequentially consistent fence (membar.gl).
__device__ __forceinline__ unsigned take_ticket(unsigned* counter) {
  unsigned old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(counter) : "memory");
  return old;
}

__device__ __forceinline__ float load_relaxed(const float* ptr) {
  float v;
  asm volatile("ld.relaxed.gpu.global.f32 %0, [%1];" : "=f"(v) : "l"(ptr) : "memory");
  return v;
}

// The producer's end, in one whole warp of each block after its partials are written: the last block to get
// here sums every block's partials per row (in a fixed order) into sumsq_out and resets the counter.
__device__ __forceinline__ void norm_sums_finish(const Fusion& f, int parts, int m_rows) {
  const int lane = threadIdx.x & 31;
  __syncwarp();  // the warp's partials, before lane 0's release
  unsigned last = 0;
  if (lane == 0) last = take_ticket(f.counter) == gridDim.x - 1;
  if (!__shfl_sync(0xFFFFFFFFu, last, 0)) return;
  __syncwarp();  // lane 0's acquire, before the warp's loads
  for (int m0 = 0; m0 < m_rows; m0 += 4) {  // four rows' loads in flight at a time
    float s[4] = {};
    for (int p = lane; p < parts; p += 32) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if (m0 + i < m_rows) s[i] += load_relaxed(f.partials + (int64_t)(m0 + i) * parts + p);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int offset = 16; offset > 0; offset >>= 1) s[i] += __shfl_xor_sync(0xFFFFFFFFu, s[i], offset);
      if (lane == 0 && m0 + i < m_rows) f.sumsq_out[m0 + i] = s[i];
    }
  }
  if (lane == 0) *f.counter = 0;  // ready for the next launch (a CUDA graph replays the same buffer)
}

__device__ __forceinline__ float row_rstd(const float* sumsq, int m, int k, float eps) {
  return rsqrtf(sumsq[m] / (float)k + eps);
}

// The fused output of channel `row` of x row `col`: the sum (already scaled) times the row's rstd, plus
// the residual; h * w written too. Returns h^2 for the partials (0 when no norm follows).
template <typename T>
__device__ __forceinline__ float fused_store(const Fusion& f, float value, int row, int col, int n, T* out,
                                             int64_t ldo) {
  T y = from_float<T>(value);
  const int64_t at = (int64_t)col * n + row;
  if (f.residual != nullptr) y = from_float<T>(to_float(y) + to_float(static_cast<const T*>(f.residual)[at]));
  out[col * ldo + row] = y;
  if (f.norm_weight == nullptr) return 0.0f;
  const float h = to_float(y);
  static_cast<T*>(f.weighted)[at] = from_float<T>(h * to_float(static_cast<const T*>(f.norm_weight)[row]));
  return h * h;
}

// ---- The SiLU product folded into the gate/up matmul (Fusion::gated) ----
// An MLP computes silu(gate(x)) * up(x). With gate's and up's weight rows interleaved (channel 2c is gate's c,
// 2c + 1 up's c: llmopt stacks them so), the two sums of an output pair end in lanes `mask` apart; the even one
// writes silu(gate) * up into column c of an output half as wide. Each sum is rounded to T first, as a matmul's
// output is, and the product once, as torch.compile's fused kernel does. Saves the standalone SiLU-product kernel
// and its launch per layer, and half the matmul's writes. Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ float gated_product(float value, int mask) {
  const float mine = to_float(from_float<T>(value));
  const float partner = __shfl_xor_sync(0xFFFFFFFFu, mine, mask);
  return mine / (1.0f + expf(-mine)) * partner;  // (in the even lane: silu(gate) * up)
}

// x[m, k0 .. k0+7] as four words of packed 16-bit pairs (zeros past the row count).
template <typename T, int M>
__device__ __forceinline__ void load_x8(const T* x, int64_t ldx, int m_rows, int k0, uint4 (&dst)[M]) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    dst[m] = m < m_rows ? *reinterpret_cast<const uint4*>(x + m * ldx + k0) : make_uint4(0, 0, 0, 0);
  }
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// kFused (llmopt_fused_gemv): one row, and a block is one team of 8 channels (one partial of the norm).
template <typename T, int R, int M, int U, int KSPLIT, bool kFused = false>
__global__ void __launch_bounds__(kThreads) int8_gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w,
                                                             const void* __restrict__ scale, int scale_dtype,
                                                             T* __restrict__ out, int m_rows, int n, int k, int64_t ldx,
                                                             int64_t ldo, Fusion fusion = {}) {
  static_assert(!kFused || (M == 1 && R == kPartialChannels && KSPLIT == kWarps), "fused: one row, 8 channels");
  __shared__ float partial[kWarps][R * M];
  __shared__ float norm_sumsq[16];
  const Team<R, KSPLIT> team;
  constexpr int kStride = Team<R, KSPLIT>::kThreadsPerTeam;
  const int chunks = k / 16;
  float acc[R][M] = {};
  // (The weights are not loaded before the wait here: with the first iteration's loads peeled off in front of it,
  // ptxas gave the fused kernel 95 registers instead of 80, +2.5% per step at one row; BENCHMARKS.md §5.)
  wait_for_prior_kernel();
  if constexpr (kFused) norm_sums_fetch(fusion, m_rows, norm_sumsq);
  for (int base = team.t; base < chunks; base += kStride * U) {
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * kStride;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool ok = c < chunks && team.n0 + r < n;
        wv[u][r] = ok ? load_stream(w + (int64_t)(team.n0 + r) * k + c * 16) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * kStride;
      if (c >= chunks) break;
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // 8 inputs at a time: one 16-byte load of x per row
        uint4 xv[M];
        load_x8<T, M>(x, ldx, m_rows, c * 16 + half * 8, xv);
#pragma unroll
        for (int p = 0; p < 4; ++p) {  // input pairs
          float2 xf[M];
#pragma unroll
          for (int m = 0; m < M; ++m) xf[m] = unpack2<T>(word_of(xv[m], p));
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t word = word_of(wv[u][r], half * 2 + p / 2) ^ 0x80808080u;
            const float q0 = int8_magic(word, (p % 2) * 2) - 8388736.0f;  // 2^23 + 128
            const float q1 = int8_magic(word, (p % 2) * 2 + 1) - 8388736.0f;
#pragma unroll
            for (int m = 0; m < M; ++m) acc[r][m] = fmaf(xf[m].y, q1, fmaf(xf[m].x, q0, acc[r][m]));
          }
        }
      }
    }
  }
  allow_next_kernel();  // after the main loop (the header says why)
  const float total = team_sum<R, M, KSPLIT>(acc, partial);
  const int lane = threadIdx.x & 31, r = lane / M, m = lane % M;
  const bool mine = lane < R * M && m < m_rows && team.n0 + r < n;  // lane (r, m) holds an output
  if constexpr (kFused) {
    norm_sums_wait();
    __syncthreads();  // norm_sumsq
  }
  if (!team.writer) return;
  float value = mine ? total * load_scalar(scale, team.n0 + r, scale_dtype) : 0.0f;
  if (kFused && fusion.sumsq_in != nullptr) value *= row_rstd(norm_sumsq, 0, k, fusion.eps);
  if (fusion.gated) {  // (R is even: a team's channel pairs are lanes M apart)
    value = gated_product<T>(value, M);
    if (mine && r % 2 == 0) out[m * ldo + (team.n0 + r) / 2] = from_float<T>(value);
    return;
  }
  if constexpr (kFused) {
    const float squares = mine ? fused_store<T>(fusion, value, team.n0 + r, 0, n, out, ldo) : 0.0f;
    if (fusion.norm_weight != nullptr) {
      float sum = squares;
#pragma unroll
      for (int offset = 1; offset < R; offset <<= 1) sum += __shfl_xor_sync(0xFFFFFFFFu, sum, offset);
      if (lane == 0) fusion.partials[blockIdx.x] = sum;
      norm_sums_finish(fusion, gridDim.x, 1);
    }
  } else if (mine) {
    out[m * ldo + team.n0 + r] = from_float<T>(value);
  }
}

template <typename T, int R, int M, int U, int KSPLIT>
__global__ void __launch_bounds__(kThreads) int4_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                                             const void* __restrict__ scale, int scale_dtype,
                                                             const uint8_t* __restrict__ zero, T* __restrict__ out,
                                                             int m_rows, int n, int k, int group, int64_t ldx,
                                                             int64_t ldo) {
  __shared__ float partial[kWarps][R * M];
  const Team<R, KSPLIT> team;
  constexpr int kStride = Team<R, KSPLIT>::kThreadsPerTeam;
  const int half_group = group / 2;  // bytes per group, a multiple of 16
  const int chunks = k / 32;         // 16 bytes = 32 weights each
  const int groups = k / group;
  float acc[R][M] = {};
  wait_for_prior_kernel();
  for (int base = team.t; base < chunks; base += kStride * U) {
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * kStride;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const bool ok = c < chunks && team.n0 + r < n;
        wv[u][r] = ok ? load_stream(w + (int64_t)(team.n0 + r) * (k / 2) + c * 16) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = base + u * kStride;
      if (c >= chunks) break;
      const int g = (c * 16) / half_group;
      const int lo_k = g * group + (c * 16) % half_group;  // low nibbles: inputs lo_k .. lo_k+15
      float dot[R][M] = {};
      float sum_x[M] = {};
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // bytes 0-7, then 8-15 of the chunk
        uint4 x_lo[M], x_hi[M];
        load_x8<T, M>(x, ldx, m_rows, lo_k + half * 8, x_lo);
        load_x8<T, M>(x, ldx, m_rows, lo_k + half_group + half * 8, x_hi);
#pragma unroll
        for (int p = 0; p < 4; ++p) {  // byte pairs
          float2 xl[M], xh[M];
#pragma unroll
          for (int m = 0; m < M; ++m) {
            xl[m] = unpack2<T>(word_of(x_lo[m], p));
            xh[m] = unpack2<T>(word_of(x_hi[m], p));
            sum_x[m] += (xl[m].x + xl[m].y) + (xh[m].x + xh[m].y);
          }
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint32_t word = word_of(wv[u][r], half * 2 + p / 2);
            const uint32_t lo = word & 0x0F0F0F0Fu, hi = (word >> 4) & 0x0F0F0F0Fu;
            const int i = (p % 2) * 2;
            const float l0 = nibble_magic(lo, i), l1 = nibble_magic(lo, i + 1);
            const float h0 = nibble_magic(hi, i), h1 = nibble_magic(hi, i + 1);
#pragma unroll
            for (int m = 0; m < M; ++m) {
              dot[r][m] = fmaf(xl[m].x, l0, fmaf(xl[m].y, l1, fmaf(xh[m].x, h0, fmaf(xh[m].y, h1, dot[r][m]))));
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (team.n0 + r >= n) continue;
        const int64_t sg = (int64_t)(team.n0 + r) * groups + g;
        const float s = load_scalar(scale, sg, scale_dtype);
        const float offset = 128.0f + (float)zero[sg];
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = fmaf(s, dot[r][m] - offset * sum_x[m], acc[r][m]);
      }
    }
  }
  allow_next_kernel();  // after the main loop (the header says why)
  const float total = team_sum<R, M, KSPLIT>(acc, partial);
  const int lane = threadIdx.x & 31, r = lane / M, m = lane % M;
  if (team.writer && lane < R * M && m < m_rows && team.n0 + r < n) out[m * ldo + team.n0 + r] = from_float<T>(total);
}

// ---- The tensor-core kernels (int8 and int4, 1 to 16 rows of x) ----
// A warp computes 16 channels x 8 rows of x per n8 tile (NT tiles: 8 or 16 rows) with mma.sync
// m16n8k16 and fp32 sums; the block's WARPS warps split K and their tiles are summed in warp order.
// The row bytes are read in 64-byte chunks: thread t (g = t / 4, tig = t % 4) loads 16 bytes of
// channels g and g + 8 at byte 16 * tig of a chunk, four 32-bit words of each. A word holds 4
// consecutive inputs (int8), or 4 consecutive inputs in its low nibbles and the 4 inputs half a group
// later in its high nibbles (int4), so it feeds one mma step (int8) or two (int4). Each warp loads its
// next chunk before it works on the current one, so a chunk's loads are in flight during the math.
// The mma's k slots need not be consecutive inputs, only the same for the weight (A) and x (B): thread
// tig's slots 2tig, 2tig + 1 take a word's inputs 0 and 1, slots 2tig + 8, 2tig + 9 its inputs 2 and 3.
// Then x's 4 inputs (one 8-byte load) are the B operand as they lie in memory, and one byte permute
// per pair of bytes spreads the weight's bytes to the two 16-bit halves of a word.
// Integers become 16-bit floats exactly, with logic ops and one subtraction per pair:
//   int8 fp16: (byte ^ 0x80) | 0x6400 is 1024 + q + 128; minus 1152 gives q.
//   int8 bf16: the low 7 bits in 0x4300 (128 + low) minus 0x4300 or 0x4380 (128, or 256 when the sign
//              bit is set) gives low - 128 * sign = q.
//   int4: nibble | 0x4300 (bf16) or 0x6400 (fp16) is B + nibble with B = 128 or 1024 (one LOP3 per pair);
//         minus (B + zero point) gives nibble - zero, in [-15, 15].
// Each (a & mask) | magic is written as one lop3 with both constants in registers (as C, the compiler
// makes two LOP3s, each with one immediate). The products of these small integers with x are exact in the
// mma's fp32 sums; the per-channel (int8) or per-group (int4, groups of >= 128) scale multiplies the sums,
// in fp32 (MmaMode below).
// (Taking int4's offset off with a second mma per step, whose A is all ones or -(B + zero), was tried: the
// compiler rebuilds that constant A quad with four moves before every mma, as many instructions as the
// subtractions it replaces.)

// (a & b) | c as one LOP3.
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// Per 16-bit type: its pair type, the nibble magic (B in each half), the mma, and int8's conversion.
template <typename T>
struct MmaOps;
template <>
struct MmaOps<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in each half
  static constexpr float kNibbleOffset = 128.0f;
  __device__ static V pair(float v) { return __float2bfloat162_rn(v); }
  // int8 bytes in bits 0-7 and 16-23 of `b` (bytes 1 and 3 zero) as a pair of bf16 integers:
  // (128 + low 7 bits) - (128 + 128 * sign bit).
  __device__ __forceinline__ static uint32_t int8s(uint32_t b) {
    uint32_t low = and_or(b, 0x007F007Fu, kMagic), high = and_or(b, 0x00800080u, kMagic);
    V v = __hsub2(*reinterpret_cast<V*>(&low), *reinterpret_cast<V*>(&high));
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct MmaOps<__half> {
  using V = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in each half
  static constexpr float kNibbleOffset = 1024.0f;
  __device__ static V pair(float v) { return __float2half2_rn(v); }
  // (1024 + (q ^ 0x80)) - 1152 = q; bytes 1 and 3 of `b` are zero.
  __device__ __forceinline__ static uint32_t int8s(uint32_t b) {
    uint32_t biased = (b ^ 0x00800080u) | kMagic;
    V v = __hsub2(*reinterpret_cast<V*>(&biased), __float2half2_rn(1152.0f));
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The nibbles in bits 0-3 and 16-19 of `b` minus `offset` (a pair of B + zero point), exactly.
template <typename T>
__device__ __forceinline__ uint32_t nibbles(uint32_t b, typename MmaOps<T>::V offset) {
  using V = typename MmaOps<T>::V;
  uint32_t biased = and_or(b, 0x000F000Fu, MmaOps<T>::kMagic);  // B + nibble
  V v = __hsub2(*reinterpret_cast<V*>(&biased), offset);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Bytes 0 and 1 (pair 0) or 2 and 3 (pair 1) of `w` in bytes 0 and 2 of the result (bytes 1 and 3 zero).
__device__ __forceinline__ uint32_t spread(uint32_t w, int pair) {
  return __byte_perm(w, 0u, pair == 0 ? 0x4140u : 0x4342u);
}

// x[row, i .. i + 3] (8 bytes, 16-bit) as the B operand: slots (2tig, 2tig + 1) and (2tig + 8, 2tig + 9).
__device__ __forceinline__ uint2 x_operand(const void* row, int i) {
  return *reinterpret_cast<const uint2*>(static_cast<const uint16_t*>(row) + i);
}

// What a tensor-core kernel computes: int8 with a per-channel scale, or int4 with a scale per group of
// >= 128 inputs (a 64-byte chunk of a row, 128 inputs, lies in one group, so a chunk's mma steps sum one
// group and the scale multiplies those fp32 sums), or int4 with smaller groups (the 4 lanes of an mma
// step read different groups: each weight is dequantized to (v - zero) * scale in 16 bits first, one
// rounding, as the Triton kernels do).
enum MmaMode : int { kInt8 = 0, kInt4ScaleSums = 1, kInt4ScaleWeights = 2 };

// Where a thread's int4 scales and zero points are: its two channels' rows of them (S: the scales' type).
template <typename S>
struct GroupRows {
  const S* scale_a;
  const S* scale_b;
  const uint8_t* zero_a;
  const uint8_t* zero_b;
};

// One thread's share of one 64-byte chunk of its block's 16 channels: the 16 bytes `wa` of channel
// row_a and `wb` of row_a + 8 at byte `byte` of their rows, into acc (NT tiles of 8 x rows). x_row[t]
// points at the thread's x row of tile t (rows past m_rows repeat the last one: their outputs are not
// written, and an mma's columns do not mix).
template <typename T, typename S, int kMode, int NT>
__device__ __forceinline__ void mma_chunk(const uint4& wa, const uint4& wb, unsigned byte, int group_shift,
                                          const GroupRows<S>& rows, const T* const (&x_row)[NT],
                                          float (&acc)[NT][4]) {
  using Ops = MmaOps<T>;
  using V = typename Ops::V;
  if constexpr (kMode == kInt8) {
    const T* xs[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) xs[t] = x_row[t] + byte;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t word_a = word_of(wa, j), word_b = word_of(wb, j);
      const uint32_t a[4] = {Ops::int8s(spread(word_a, 0)), Ops::int8s(spread(word_b, 0)),
                             Ops::int8s(spread(word_a, 1)), Ops::int8s(spread(word_b, 1))};
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        const uint2 b = x_operand(xs[t], 4 * j);
        Ops::mma(acc[t], a, b.x, b.y);
      }
    }
  } else {
    // Groups are powers of two >= 32: the chunk's group and the thread's first low-nibble input.
    const unsigned half_group = 1u << (group_shift - 1);
    const unsigned grp = byte >> (group_shift - 1);
    const unsigned first = (grp << group_shift) + (byte & (half_group - 1));
    const float s_a = to_float(rows.scale_a[grp]), s_b = to_float(rows.scale_b[grp]);
    // offset + zero point of the two channels (exact in 16 bits)
    const V zero_a = Ops::pair(Ops::kNibbleOffset + (float)rows.zero_a[grp]);
    const V zero_b = Ops::pair(Ops::kNibbleOffset + (float)rows.zero_b[grp]);
    const T* xs[NT][2];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      xs[t][0] = x_row[t] + first;
      xs[t][1] = xs[t][0] + half_group;
    }
    float c[NT][4] = {};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t pa[2] = {spread(word_of(wa, j), 0), spread(word_of(wa, j), 1)};
      const uint32_t pb[2] = {spread(word_of(wb, j), 0), spread(word_of(wb, j), 1)};
#pragma unroll
      for (int high = 0; high < 2; ++high) {
        const int shift = 4 * high;
        uint32_t a[4] = {nibbles<T>(pa[0] >> shift, zero_a), nibbles<T>(pb[0] >> shift, zero_b),
                         nibbles<T>(pa[1] >> shift, zero_a), nibbles<T>(pb[1] >> shift, zero_b)};
        if constexpr (kMode == kInt4ScaleWeights) {  // (v - zero) * scale in 16 bits
          const V scale_a = Ops::pair(s_a), scale_b = Ops::pair(s_b);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            V v = __hmul2(*reinterpret_cast<V*>(&a[i]), i % 2 == 0 ? scale_a : scale_b);
            a[i] = *reinterpret_cast<uint32_t*>(&v);
          }
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const uint2 b = x_operand(xs[t][high], 4 * j);
          Ops::mma(kMode == kInt4ScaleWeights ? acc[t] : c[t], a, b.x, b.y);
        }
      }
    }
    if constexpr (kMode == kInt4ScaleSums) {
#pragma unroll
      for (int t = 0; t < NT; ++t) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] = fmaf(c[t][i], i < 2 ? s_a : s_b, acc[t][i]);
      }
    }
  }
}

// Sum the warps' tiles in warp order and write the block's 16 channels x m_rows outputs (int8: times
// the channel's scale); with fusion.gated, their 8 SiLU products.
// kFused: with `fusion`'s norm and residual (rstd from norm_sumsq; a block's 16 channels are two partials).
template <typename T, int kMode, int NT, int WARPS, bool kFused, bool kGated>
__device__ __forceinline__ void mma_finish(float (&acc)[NT][4], float (*partial)[32][NT * 4], int row_a, int row_b,
                                           int n, int m_rows, int k, const void* __restrict__ scale, int scale_dtype,
                                           T* __restrict__ out, int64_t ldo, const Fusion& fusion,
                                           const float* norm_sumsq) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  if constexpr (WARPS > 1) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) partial[warp][lane][t * 4 + i] = acc[t][i];
    }
    __syncthreads();  // (also norm_sumsq)
    if (warp != 0) return;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[t][i] = 0.0f;
#pragma unroll
        for (int v = 0; v < WARPS; ++v) acc[t][i] += partial[v][lane][t * 4 + i];
      }
    }
  }
  float s_a = 1.0f, s_b = 1.0f;
  if constexpr (kMode == kInt8) {
    s_a = row_a < n ? load_scalar(scale, row_a, scale_dtype) : 0.0f;
    s_b = row_b < n ? load_scalar(scale, row_b, scale_dtype) : 0.0f;
  }
  if constexpr (kGated) {  // channel pairs (g even, g + 1): lanes 4 apart
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? row_a : row_b, col = t * 8 + 2 * tig + (i & 1);
        float value = acc[t][i] * (i < 2 ? s_a : s_b);
        if (kFused && fusion.sumsq_in != nullptr) value *= row_rstd(norm_sumsq, min(col, m_rows - 1), k, fusion.eps);
        value = gated_product<T>(value, 4);
        if ((g & 1) == 0 && row < n && col < m_rows) out[col * ldo + row / 2] = from_float<T>(value);
      }
    }
  } else if constexpr (kFused) {
    static_assert(WARPS > 1, "norm_sumsq is read after the warps' __syncthreads");
    float squares[NT][4] = {};
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? row_a : row_b, col = t * 8 + 2 * tig + (i & 1);
        if (row >= n || col >= m_rows) continue;
        float value = acc[t][i] * (i < 2 ? s_a : s_b);
        if (fusion.sumsq_in != nullptr) value *= row_rstd(norm_sumsq, col, k, fusion.eps);
        squares[t][i] = fused_store<T>(fusion, value, row, col, n, out, ldo);
      }
    }
    if (fusion.norm_weight == nullptr) return;
    // Per x row: the sum over the 8 lanes of one tig (channels g = 0..7), for row_a's and row_b's channels.
    const int parts = (n + kPartialChannels - 1) / kPartialChannels;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int offset = 4; offset < 32; offset <<= 1) {
          squares[t][i] += __shfl_xor_sync(0xFFFFFFFFu, squares[t][i], offset);
        }
        const int col = t * 8 + 2 * tig + (i & 1), part = 2 * blockIdx.x + (i >= 2);
        if (lane < 4 && col < m_rows && part < parts) fusion.partials[(int64_t)col * parts + part] = squares[t][i];
      }
    }
    norm_sums_finish(fusion, parts, m_rows);
  } else {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // acc[t][i]: channel g (+ 8 for i >= 2), x row 8t + 2tig + (i & 1)
        const int row = i < 2 ? row_a : row_b, col = t * 8 + 2 * tig + (i & 1);
        if (row < n && col < m_rows) out[col * ldo + row] = from_float<T>(acc[t][i] * (i < 2 ? s_a : s_b));
      }
    }
  }
}

// Weights read straight into registers: each thread loads its fragments' 16-byte pieces (16 rows x 64
// bytes per warp load) of U chunks, and the next U chunks' before working on these.
// kGated: the SiLU product (Fusion::gated; its own instances: a run-time switch in the plain kernel made ptxas give
// int4's 16-warp kernel 74 registers instead of 64, one block per SM instead of two).
template <typename T, typename S, int kMode, int NT, int WARPS, int U, bool kFused = false, bool kGated = false>
__global__ void __launch_bounds__(WARPS * 32) mma_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                                            const void* __restrict__ scale, int scale_dtype,
                                                            const uint8_t* __restrict__ zero, T* __restrict__ out,
                                                            int m_rows, int n, int k, int group_shift, int64_t ldx,
                                                            int64_t ldo, Fusion fusion = {}) {
  __shared__ float partial[WARPS > 1 ? WARPS : 1][32][NT * 4];
  __shared__ float norm_sumsq[16];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int row_a = blockIdx.x * 16 + g, row_b = row_a + 8;
  const bool ok_a = row_a < n, ok_b = row_b < n;
  const int64_t row_bytes = kMode == kInt8 ? k : k / 2;
  const int chunks = row_bytes / 64, groups = kMode == kInt8 ? 1 : k >> group_shift;
  const uint8_t* const base_a = w + (ok_a ? row_a : 0) * row_bytes + 16 * tig;
  const uint8_t* const base_b = w + (ok_b ? row_b : 0) * row_bytes + 16 * tig;
  const GroupRows<S> rows{static_cast<const S*>(scale) + (int64_t)(ok_a ? row_a : 0) * groups,
                          static_cast<const S*>(scale) + (int64_t)(ok_b ? row_b : 0) * groups,
                          zero + (int64_t)(ok_a ? row_a : 0) * groups, zero + (int64_t)(ok_b ? row_b : 0) * groups};
  const T* x_row[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) x_row[t] = x + min(t * 8 + g, m_rows - 1) * ldx;
  float acc[NT][4] = {};
  // Each thread's next U chunks are loaded before it works on the current ones.
  uint4 next_a[U], next_b[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int chunk = min(warp + u * WARPS, chunks - 1);
    next_a[u] = load_stream(base_a + chunk * 64);
    next_b[u] = load_stream(base_b + chunk * 64);
  }
  wait_for_prior_kernel();  // (ptxas moves it ahead of the loads above: the header)
  allow_next_kernel();       // right after the wait (the header says why)
  if constexpr (kFused) norm_sums_fetch(fusion, m_rows, norm_sumsq);
  for (int first = warp; first < chunks; first += WARPS * U) {
    uint4 wa[U], wb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      wa[u] = next_a[u];
      wb[u] = next_b[u];
      const int chunk = min(first + (U + u) * WARPS, chunks - 1);  // past the end: a load never used
      next_a[u] = load_stream(base_a + chunk * 64);
      next_b[u] = load_stream(base_b + chunk * 64);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = first + u * WARPS;
      if (chunk >= chunks) break;
      mma_chunk<T, S, kMode, NT>(wa[u], wb[u], chunk * 64 + 16 * tig, group_shift, rows, x_row, acc);
    }
  }
  if constexpr (kFused) norm_sums_wait();
  mma_finish<T, kMode, NT, WARPS, kFused, kGated>(acc, partial, row_a, row_b, n, m_rows, k, scale, scale_dtype, out,
                                                  ldo, fusion, norm_sumsq);
}

// Whether the matmuls after a folded-in norm launch programmatically (llmopt_set_programmatic_launch).
bool g_programmatic_launch = false;

// kernel<<<grid, block, 0, stream>>>(args...); with the programmatic-serialization attribute when `programmatic`
// and switched on (see the header).
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, int block, cudaStream_t stream, bool programmatic,
                   Args... args) {
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(block);
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = g_programmatic_launch && programmatic ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, static_cast<Params>(args)...);
}

template <typename T, typename S, int kMode, int NT, int WARPS, int U>
cudaError_t launch_mma_shape(const void* x, const void* w, const void* scale, int scale_dtype, const void* zero,
                             void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo, cudaStream_t stream,
                             const Fusion* fusion) {
  const dim3 grid((n + 15) / 16);
  const int shift = group > 0 ? __builtin_ctz(group) : 0;
  const auto* xt = static_cast<const T*>(x);
  const auto* wt = static_cast<const uint8_t*>(w);
  const auto* zt = static_cast<const uint8_t*>(zero);
  if (fusion != nullptr) {
    const bool after_norm = fusion->sumsq_in != nullptr;  // (the header: programmatic launch)
    if (fusion->gated) {  // (after a norm at most: the kernel scales by its rstd)
      return launch(mma_gemv_kernel<T, S, kMode, NT, WARPS, U, true, true>, grid, WARPS * 32, stream, after_norm, xt,
                    wt, scale, scale_dtype, zt, static_cast<T*>(out), m, n, k, shift, ldx, ldo, *fusion);
    }
    return launch(mma_gemv_kernel<T, S, kMode, NT, WARPS, U, true>, grid, WARPS * 32, stream, after_norm, xt, wt,
                  scale, scale_dtype, zt, static_cast<T*>(out), m, n, k, shift, ldx, ldo, *fusion);
  }
  return launch(mma_gemv_kernel<T, S, kMode, NT, WARPS, U>, grid, WARPS * 32, stream, false, xt, wt, scale,
                scale_dtype, zt, static_cast<T*>(out), m, n, k, shift, ldx, ldo, Fusion{});
}

// Warps per block (a block is 16 channels; its warps split K), from a sweep of 9 shapes (4, 8 or 16 warps x
// 1, 2 or 4 chunks in flight) on an H200 over Llama-3-8B's layers at 1-16 rows (examples/gpu_lowbit_kernels.py
// gemv-mma; BENCHMARKS.md §5): enough warps in all to fill the GPU, no more. One tile (up to 8 rows): 16 warps
// for weights of <= 4096 channels (o, down: 256 blocks), else 8; two tiles: half as many for int4 (its
// registers). One chunk in flight was best or within 5% nearly everywhere. -DMMA_WARPS / -DMMA_UNROLL force one
// shape (sweeps).
template <typename T, typename S, int kMode, int NT>
cudaError_t launch_mma_mode(const void* x, const void* w, const void* scale, int scale_dtype, const void* zero,
                            void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo, cudaStream_t stream,
                            const Fusion* fusion) {
#if defined(MMA_WARPS) || defined(MMA_UNROLL)
#ifndef MMA_WARPS
#define MMA_WARPS 8
#endif
#ifndef MMA_UNROLL
#define MMA_UNROLL 1
#endif
  return launch_mma_shape<T, S, kMode, NT, MMA_WARPS, MMA_UNROLL>(x, w, scale, scale_dtype, zero, out, m, n, k, group,
                                                                   ldx, ldo, stream, fusion);
#else
  const bool narrow = n <= 4096;
  if constexpr (NT == 1 || kMode == kInt8) {
    return narrow ? launch_mma_shape<T, S, kMode, NT, 16, 1>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx,
                                                            ldo, stream, fusion)
                  : launch_mma_shape<T, S, kMode, NT, 8, 1>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx,
                                                           ldo, stream, fusion);
  } else {
    return narrow ? launch_mma_shape<T, S, kMode, NT, 8, 1>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx,
                                                           ldo, stream, fusion)
                  : launch_mma_shape<T, S, kMode, NT, 4, 1>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx,
                                                           ldo, stream, fusion);
  }
#endif
}

template <typename T, bool kInt4>
cudaError_t launch_mma(const void* x, const void* w, const void* scale, int scale_dtype, const void* zero, void* out,
                       int m, int n, int k, int group, int64_t ldx, int64_t ldo, cudaStream_t stream,
                       const Fusion* fusion = nullptr) {
  auto go = [&]<typename S, int kMode>() {
    return m <= 8 ? launch_mma_mode<T, S, kMode, 1>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, stream,
                                                    fusion)
                  : launch_mma_mode<T, S, kMode, 2>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, stream,
                                                    fusion);
  };
  // int8's per-channel scale is read once per output (any type, at run time); int4's per group, typed.
  if constexpr (!kInt4) return go.template operator()<float, kInt8>();
  auto by_group = [&]<typename S>() {
    return group >= 128 ? go.template operator()<S, kInt4ScaleSums>() : go.template operator()<S, kInt4ScaleWeights>();
  };
  if (scale_dtype == kBFloat16) return by_group.template operator()<__nv_bfloat16>();
  if (scale_dtype == kFloat16) return by_group.template operator()<__half>();
  return by_group.template operator()<float>();
}

// The work's shape per row count (rows per team R, chunks in flight U, warps per team KSPLIT), from a
// sweep of 36 shapes on an H200 over Llama-3-8B's layers (examples/gpu_lowbit_kernels.py gemv;
// BENCHMARKS.md §5): each is within 5% of the best shape on every layer. Past 2 rows the FMAs per
// weight byte make the Triton tensor-core kernel faster. -DINT8_ROWS=... etc. override (sweeps).
template <int R_, int U_, int KSPLIT_>
struct WorkShape {
  static constexpr int R = R_, U = U_, KSPLIT = KSPLIT_;
  static constexpr int kRowsPerBlock = R * (kWarps / KSPLIT);
};
#ifdef INT8_ROWS
template <int M>
using Int8Shape = WorkShape<INT8_ROWS, INT8_UNROLL, INT8_KSPLIT>;
#else
template <int M>
using Int8Shape = std::conditional_t<M == 1, WorkShape<8, 1, 4>, WorkShape<4, 1, 2>>;
#endif
#ifdef INT4_ROWS
template <int M>
using Int4Shape = WorkShape<INT4_ROWS, INT4_UNROLL, INT4_KSPLIT>;
#else
template <int M>
using Int4Shape = std::conditional_t<M == 1, WorkShape<4, 1, 2>, WorkShape<4, 2, 1>>;
#endif

constexpr int kMaxRows = 2;      // the CUDA-core kernels
constexpr int kMaxMmaRows = 16;  // the tensor-core kernel: two n8 tiles

// From how many rows each scheme takes the tensor-core kernel (where K allows; at most 3, since the
// CUDA-core kernels stop at 2 rows): int8 from 2 (one row streams faster on the CUDA cores: q/k/v 8.9
// against 10.0 us), int4 from 1 (its conversion is cheaper for the tensor cores: gate/up 22.9 against 24.3 us
// at one row). -D overrides (sweeps).
#ifndef INT8_MMA_FROM
#define INT8_MMA_FROM 2
#endif
#ifndef INT4_MMA_FROM
#define INT4_MMA_FROM 1
#endif
static_assert(INT8_MMA_FROM <= kMaxRows + 1 && INT4_MMA_FROM <= kMaxRows + 1, "rows no kernel takes");

template <typename T, int M>
cudaError_t launch_int8(const void* x, const void* w, const void* scale, int scale_dtype, void* out, int m, int n,
                        int k, int64_t ldx, int64_t ldo, cudaStream_t stream) {
  using S = Int8Shape<M>;
  const dim3 grid((n + S::kRowsPerBlock - 1) / S::kRowsPerBlock);
  return launch(int8_gemv_kernel<T, S::R, M, S::U, S::KSPLIT>, grid, kThreads, stream, false,
                static_cast<const T*>(x), static_cast<const int8_t*>(w), scale, scale_dtype, static_cast<T*>(out), m,
                n, k, ldx, ldo, Fusion{});
}

// int8's one-row CUDA-core kernel with a fused norm / residual: its default work shape (one team of 8 channels
// per block) is one partial of the norm. Where a sweep changed the shape, the tensor-core kernel takes the call.
constexpr bool kInt8CoreFuses = Int8Shape<1>::R == kPartialChannels && Int8Shape<1>::KSPLIT == kWarps;

template <typename T>
cudaError_t launch_int8_fused(const void* x, const void* w, const void* scale, int scale_dtype, void* out, int n, int k,
                              int64_t ldx, int64_t ldo, cudaStream_t stream, const Fusion& fusion) {
  if constexpr (kInt8CoreFuses) {
    using S = Int8Shape<1>;
    const dim3 grid((n + S::kRowsPerBlock - 1) / S::kRowsPerBlock);
    const auto* xt = static_cast<const T*>(x);
    const auto* wt = static_cast<const int8_t*>(w);
    if (!folds_norm(fusion)) {  // the SiLU product only: the plain kernel does it
      return launch(int8_gemv_kernel<T, S::R, 1, S::U, S::KSPLIT>, grid, kThreads, stream, false, xt, wt, scale,
                    scale_dtype, static_cast<T*>(out), 1, n, k, ldx, ldo, fusion);
    }
    const bool after_norm = fusion.sumsq_in != nullptr;  // (the header: programmatic launch)
    return launch(int8_gemv_kernel<T, S::R, 1, S::U, S::KSPLIT, true>, grid, kThreads, stream, after_norm, xt, wt,
                  scale, scale_dtype, static_cast<T*>(out), 1, n, k, ldx, ldo, fusion);
  } else {
    return cudaErrorInvalidValue;
  }
}

template <typename T, int M>
cudaError_t launch_int4(const void* x, const void* w, const void* scale, int scale_dtype, const void* zero, void* out,
                        int m, int n, int k, int group, int64_t ldx, int64_t ldo, cudaStream_t stream) {
  using S = Int4Shape<M>;
  const dim3 grid((n + S::kRowsPerBlock - 1) / S::kRowsPerBlock);
  return launch(int4_gemv_kernel<T, S::R, M, S::U, S::KSPLIT>, grid, kThreads, stream, false, static_cast<const T*>(x),
                static_cast<const uint8_t*>(w), scale, scale_dtype, static_cast<const uint8_t*>(zero),
                static_cast<T*>(out), m, n, k, group, ldx, ldo);
}

// Dispatch on x's dtype and the row count (1 or 2).
template <typename Launch>
cudaError_t dispatch(int x_dtype, int m, Launch launch) {
  if (m < 1 || m > kMaxRows) return cudaErrorInvalidValue;
  if (x_dtype == kBFloat16) {
    return m == 1 ? launch.template operator()<__nv_bfloat16, 1>() : launch.template operator()<__nv_bfloat16, 2>();
  }
  if (x_dtype == kFloat16) {
    return m == 1 ? launch.template operator()<__half, 1>() : launch.template operator()<__half, 2>();
  }
  return cudaErrorInvalidValue;
}

// int4 groups the kernels take: a power of two >= 32 dividing K.
bool int4_group_ok(int group, int k) { return group >= 32 && (group & (group - 1)) == 0 && k % group == 0; }

}  // namespace

extern "C" {

// Launch the matmuls after a folded-in norm with the programmatic-serialization attribute (on: nonzero) or
// normally; see the header. Hopper or later (compute capability 9.0). Returns the previous setting.
int llmopt_set_programmatic_launch(int on) {
  const int previous = g_programmatic_launch;
  g_programmatic_launch = on != 0;
  return previous;
}

// The largest row count llmopt_int8_gemv (scheme 0) and llmopt_int4_gemv (scheme 1) take.
int llmopt_gemv_max_rows(int scheme) { return kMaxMmaRows; }

// The tensor-core kernel for either scheme at 1 to 16 rows: K a multiple of 64 (int8) or 128 (int4).
int llmopt_mma_gemv(int int4, const void* x, int x_dtype, const void* w, const void* scale, int scale_dtype,
                    const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                    void* stream) {
  if (m < 1 || m > kMaxMmaRows || k % (int4 ? 128 : 64) != 0) return cudaErrorInvalidValue;
  if (int4 && !int4_group_ok(group, k)) return cudaErrorInvalidValue;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_dtype == kBFloat16) {
    return int4 ? launch_mma<__nv_bfloat16, true>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s)
                : launch_mma<__nv_bfloat16, false>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s);
  }
  if (x_dtype == kFloat16) {
    return int4 ? launch_mma<__half, true>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s)
                : launch_mma<__half, false>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s);
  }
  return cudaErrorInvalidValue;
}

// out (m, n) = x (m, k) @ (q * scale[:, None]).T; q (n, k) int8 row-major, x and out rows 16-byte
// aligned with leading dimensions ldx / ldo (elements). dtypes: 1 = bf16, 2 = fp16 (x and out); scale
// 0 = fp32, 1 = bf16, 2 = fp16. From INT8_MMA_FROM rows (K a multiple of 64) on the tensor cores, up to
// 16 rows; below, or for other K at 1-2 rows (K a multiple of 16), on the CUDA cores.
int llmopt_int8_gemv(const void* x, int x_dtype, const void* q, const void* scale, int scale_dtype, void* out, int m,
                     int n, int k, int64_t ldx, int64_t ldo, void* stream) {
  if (m >= INT8_MMA_FROM && k % 64 == 0) {
    return llmopt_mma_gemv(0, x, x_dtype, q, scale, scale_dtype, nullptr, out, m, n, k, 0, ldx, ldo, stream);
  }
  if (k % 16 != 0) return cudaErrorInvalidValue;
  auto launch = [&]<typename T, int M>() {
    return launch_int8<T, M>(x, q, scale, scale_dtype, out, m, n, k, ldx, ldo, static_cast<cudaStream_t>(stream));
  };
  return dispatch(x_dtype, m, launch);
}

// out (m, n) = x (m, k) @ dequant(W).T for the half-split int4 layout: packed (n, k/2) bytes, scale and
// zero (n, k/group), zero stored as zp + 8; group a power of two >= 32 dividing k. From INT4_MMA_FROM
// rows (K a multiple of 128) on the tensor cores, up to 16 rows; below, or for other K at 1-2 rows, on
// the CUDA cores.
int llmopt_int4_gemv(const void* x, int x_dtype, const void* packed, const void* scale, int scale_dtype,
                     const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                     void* stream) {
  if (!int4_group_ok(group, k)) return cudaErrorInvalidValue;
  if (m >= INT4_MMA_FROM && k % 128 == 0) {
    return llmopt_mma_gemv(1, x, x_dtype, packed, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, stream);
  }
  auto launch = [&]<typename T, int M>() {
    return launch_int4<T, M>(x, packed, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo,
                             static_cast<cudaStream_t>(stream));
  };
  return dispatch(x_dtype, m, launch);
}

// llmopt_int8_gemv (int4 = 0) or llmopt_int4_gemv (int4 = 1) with the norm and residual of `fusion` folded in
// (see Fusion), or the SiLU product of interleaved gate/up channels (Fusion::gated; out then has n / 2 columns,
// ldo its leading dimension): int8 at one row on the CUDA cores (K a multiple of 16), else on the tensor cores
// (1-16 rows, K a multiple of 64 for int8, 128 for int4); outputs contiguous (ldo = n) when a residual or norm is
// given.
int llmopt_fused_gemv(int int4, const void* x, int x_dtype, const void* w, const void* scale, int scale_dtype,
                      const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                      const Fusion* fusion, void* stream) {
  if (fusion == nullptr || m < 1 || m > kMaxMmaRows) return cudaErrorInvalidValue;
  if (int4 && (!int4_group_ok(group, k) || k % 128 != 0)) return cudaErrorInvalidValue;
  if (fusion->norm_weight != nullptr && (fusion->residual == nullptr || fusion->weighted == nullptr ||
                                         fusion->partials == nullptr || fusion->sumsq_out == nullptr ||
                                         fusion->counter == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if ((fusion->residual != nullptr || fusion->norm_weight != nullptr) && ldo != n) return cudaErrorInvalidValue;
  // The SiLU product: channel pairs (n even), after a norm at most (a gate/up matmul ends no residual branch).
  if (fusion->gated && (n % 2 != 0 || fusion->residual != nullptr || fusion->norm_weight != nullptr)) {
    return cudaErrorInvalidValue;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool core = !int4 && m == 1 && kInt8CoreFuses && (INT8_MMA_FROM > 1 || k % 64 != 0);
  if (core && k % 16 != 0) return cudaErrorInvalidValue;
  if (!int4 && !core && k % 64 != 0) return cudaErrorInvalidValue;
  if (x_dtype == kBFloat16) {
    if (core) return launch_int8_fused<__nv_bfloat16>(x, w, scale, scale_dtype, out, n, k, ldx, ldo, s, *fusion);
    return int4 ? launch_mma<__nv_bfloat16, true>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s, fusion)
                : launch_mma<__nv_bfloat16, false>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s, fusion);
  }
  if (x_dtype == kFloat16) {
    if (core) return launch_int8_fused<__half>(x, w, scale, scale_dtype, out, n, k, ldx, ldo, s, *fusion);
    return int4 ? launch_mma<__half, true>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s, fusion)
                : launch_mma<__half, false>(x, w, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s, fusion);
  }
  return cudaErrorInvalidValue;
}

}  // extern "C"
