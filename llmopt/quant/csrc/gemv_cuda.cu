// llmopt's weight-only int8 / int4 matrix-vector kernels for decode on NVIDIA GPUs: int8 at 1-2 rows of
// x and int4 at 1 row on the CUDA cores; int4 at 2-8 rows on the tensor cores (see int4_mma_kernel).
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
// Plain C entry points (no torch headers, so the library builds in seconds with nvcc alone); the
// caller passes device pointers and the stream to launch on. They return the launch's cudaError_t.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

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

template <typename T, int R, int M, int U, int KSPLIT>
__global__ void __launch_bounds__(kThreads) int8_gemv_kernel(const T* __restrict__ x, const int8_t* __restrict__ w,
                                                             const void* __restrict__ scale, int scale_dtype,
                                                             T* __restrict__ out, int m_rows, int n, int k, int64_t ldx,
                                                             int64_t ldo) {
  __shared__ float partial[kWarps][R * M];
  const Team<R, KSPLIT> team;
  constexpr int kStride = Team<R, KSPLIT>::kThreadsPerTeam;
  const int chunks = k / 16;
  float acc[R][M] = {};
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
  const float total = team_sum<R, M, KSPLIT>(acc, partial);
  const int lane = threadIdx.x & 31, r = lane / M, m = lane % M;
  if (team.writer && lane < R * M && m < m_rows && team.n0 + r < n) {
    out[m * ldo + team.n0 + r] = from_float<T>(total * load_scalar(scale, team.n0 + r, scale_dtype));
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
  const float total = team_sum<R, M, KSPLIT>(acc, partial);
  const int lane = threadIdx.x & 31, r = lane / M, m = lane % M;
  if (team.writer && lane < R * M && m < m_rows && team.n0 + r < n) out[m * ldo + team.n0 + r] = from_float<T>(total);
}

// ---- int4 on the tensor cores (1 to 8 rows of x) ----
// A warp computes a 16-channel x 8-row tile with mma.sync m16n8k16 (fp32 sums); the block's WARPS
// warps split K and their tiles are summed in warp order. Thread t (g = t / 4, tig = t % 4) loads 16
// bytes of channels g and g + 8 at byte 16 * tig of each 64-byte chunk: four words, each 4 bytes of
// one group. A word's low nibbles are 4 consecutive inputs, its high nibbles the 4 inputs half a group
// later, so each word feeds two mma steps. The mma's k slots need not be consecutive inputs: thread
// tig's slots 2tig, 2tig + 1 take the word's bytes 0, 1 and slots 2tig + 8, 2tig + 9 bytes 2, 3, and
// the x operand is loaded at the same inputs (x[g, i .. i + 3], one 8-byte load), so A and B agree.
// Nibbles become 16-bit floats with a byte permute and one logic op (0x4300 | nib = 128 + nib in
// bf16, 0x6400 | nib = 1024 + nib in fp16), then (v - (offset + zero)) * scale, exactly as the Triton
// kernels dequantize (one rounding, in the activation's type).
template <typename T>
struct Half2Ops;
template <>
struct Half2Ops<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in each half
  static constexpr float kOffset = 128.0f;
  __device__ static V pair(float v) { return __float2bfloat162_rn(v); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Half2Ops<__half> {
  using V = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in each half
  static constexpr float kOffset = 1024.0f;
  __device__ static V pair(float v) { return __float2half2_rn(v); }
  __device__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// (v - zero) * scale on a pair of 16-bit floats held in `bits`, rounded once per operation in V's type.
template <typename V>
__device__ __forceinline__ V dequant_pair(uint32_t bits, V zero, V scale) {
  return __hmul2(__hsub2(*reinterpret_cast<V*>(&bits), zero), scale);
}

// Nibbles of bytes 2p and 2p + 1 of `word` (low nibbles, or high with `high`) as a 16-bit pair
// magic + nibble.
__device__ __forceinline__ uint32_t nibble_pair(uint32_t word, int p, bool high, uint32_t magic) {
  uint32_t t = __byte_perm(word, 0u, p == 0 ? 0x4140u : 0x4342u);  // bytes 2p, 2p+1 -> halves 0, 1
  if (high) t >>= 4;
  return (t & 0x000F000Fu) | magic;
}

template <typename T, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32) int4_mma_kernel(const T* __restrict__ x, const uint8_t* __restrict__ w,
                                                            const void* __restrict__ scale, int scale_dtype,
                                                            const uint8_t* __restrict__ zero, T* __restrict__ out,
                                                            int m_rows, int n, int k, int group, int64_t ldx,
                                                            int64_t ldo) {
  using Ops = Half2Ops<T>;
  using V = typename Ops::V;
  __shared__ float partial[WARPS][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tig = lane & 3;
  const int row_a = blockIdx.x * 16 + g, row_b = row_a + 8;
  const bool ok_a = row_a < n, ok_b = row_b < n, x_ok = g < m_rows;
  const int64_t row_bytes = k / 2;
  const int half_group = group / 2, groups = k / group, chunks = k / 128;  // a chunk: 64 bytes of a row
  const T* x_row = x + (x_ok ? g : 0) * ldx;
  float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int base = warp; base < chunks; base += WARPS * U) {
    uint4 wa[U], wb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = base + u * WARPS;
      const int64_t offset = (int64_t)chunk * 64 + 16 * tig;
      wa[u] = chunk < chunks && ok_a ? load_stream(w + row_a * row_bytes + offset) : make_uint4(0, 0, 0, 0);
      wb[u] = chunk < chunks && ok_b ? load_stream(w + row_b * row_bytes + offset) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = base + u * WARPS;
      if (chunk >= chunks) break;
      const int byte = chunk * 64 + 16 * tig;
      const int grp = byte / half_group;
      const int lo = grp * group + byte % half_group;  // the thread's first low-nibble input
      const int64_t sa = (int64_t)(ok_a ? row_a : 0) * groups + grp, sb = (int64_t)(ok_b ? row_b : 0) * groups + grp;
      const V scale_a = Ops::pair(load_scalar(scale, sa, scale_dtype));
      const V scale_b = Ops::pair(load_scalar(scale, sb, scale_dtype));
      const V zero_a = Ops::pair(Ops::kOffset + (float)zero[sa]);
      const V zero_b = Ops::pair(Ops::kOffset + (float)zero[sb]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t word_a = word_of(wa[u], j), word_b = word_of(wb[u], j);
#pragma unroll
        for (int high = 0; high < 2; ++high) {
          const int input = lo + high * half_group + 4 * j;
          const uint2 xv = x_ok ? *reinterpret_cast<const uint2*>(x_row + input) : make_uint2(0, 0);
          uint32_t a[4];
          V v;
          v = dequant_pair<V>(nibble_pair(word_a, 0, high, Ops::kMagic), zero_a, scale_a);
          a[0] = *reinterpret_cast<uint32_t*>(&v);
          v = dequant_pair<V>(nibble_pair(word_b, 0, high, Ops::kMagic), zero_b, scale_b);
          a[1] = *reinterpret_cast<uint32_t*>(&v);
          v = dequant_pair<V>(nibble_pair(word_a, 1, high, Ops::kMagic), zero_a, scale_a);
          a[2] = *reinterpret_cast<uint32_t*>(&v);
          v = dequant_pair<V>(nibble_pair(word_b, 1, high, Ops::kMagic), zero_b, scale_b);
          a[3] = *reinterpret_cast<uint32_t*>(&v);
          Ops::mma(c, a, xv.x, xv.y);
        }
      }
    }
  }
  if constexpr (WARPS > 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) partial[warp][lane][i] = c[i];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      c[i] = 0.0f;
#pragma unroll
      for (int v = 0; v < WARPS; ++v) c[i] += partial[v][lane][i];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // c[i]: channel g (+ 8 for i >= 2), x row 2 * tig + (i & 1)
    const int row = i < 2 ? row_a : row_b, col = 2 * tig + (i & 1);
    if (row < n && col < m_rows) out[col * ldo + row] = from_float<T>(c[i]);
  }
}

// 8 warps per block, one chunk in flight per thread: within 10% of the best of 9 shapes on every
// Llama-3-8B layer at 1-8 rows on an H200 (examples/gpu_lowbit_kernels.py gemv-mma). -D overrides.
#ifndef MMA_WARPS
#define MMA_WARPS 8
#endif
#ifndef MMA_UNROLL
#define MMA_UNROLL 1
#endif

template <typename T>
cudaError_t launch_int4_mma(const void* x, const void* w, const void* scale, int scale_dtype, const void* zero,
                            void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo, cudaStream_t stream) {
  const dim3 grid((n + 15) / 16);
  int4_mma_kernel<T, MMA_WARPS, MMA_UNROLL><<<grid, MMA_WARPS * 32, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint8_t*>(w), scale, scale_dtype, static_cast<const uint8_t*>(zero),
      static_cast<T*>(out), m, n, k, group, ldx, ldo);
  return cudaGetLastError();
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
constexpr int kMaxMmaRows = 8;   // the int4 tensor-core kernel: one n8 tile

template <typename T, int M>
cudaError_t launch_int8(const void* x, const void* w, const void* scale, int scale_dtype, void* out, int m, int n,
                        int k, int64_t ldx, int64_t ldo, cudaStream_t stream) {
  using S = Int8Shape<M>;
  const dim3 grid((n + S::kRowsPerBlock - 1) / S::kRowsPerBlock);
  int8_gemv_kernel<T, S::R, M, S::U, S::KSPLIT><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const int8_t*>(w), scale, scale_dtype, static_cast<T*>(out), m, n, k, ldx,
      ldo);
  return cudaGetLastError();
}

template <typename T, int M>
cudaError_t launch_int4(const void* x, const void* w, const void* scale, int scale_dtype, const void* zero, void* out,
                        int m, int n, int k, int group, int64_t ldx, int64_t ldo, cudaStream_t stream) {
  using S = Int4Shape<M>;
  const dim3 grid((n + S::kRowsPerBlock - 1) / S::kRowsPerBlock);
  int4_gemv_kernel<T, S::R, M, S::U, S::KSPLIT><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const uint8_t*>(w), scale, scale_dtype, static_cast<const uint8_t*>(zero),
      static_cast<T*>(out), m, n, k, group, ldx, ldo);
  return cudaGetLastError();
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

}  // namespace

extern "C" {

// The largest row count llmopt_int8_gemv (scheme 0) and llmopt_int4_gemv (scheme 1) take.
int llmopt_gemv_max_rows(int scheme) { return scheme == 0 ? kMaxRows : kMaxMmaRows; }

// out (m, n) = x (m, k) @ (q * scale[:, None]).T; q (n, k) int8 row-major, k a multiple of 16, x and out
// rows 16-byte aligned with leading dimensions ldx / ldo (elements). dtypes: 1 = bf16, 2 = fp16 (x and
// out); scale 0 = fp32, 1 = bf16, 2 = fp16.
int llmopt_int8_gemv(const void* x, int x_dtype, const void* q, const void* scale, int scale_dtype, void* out, int m,
                     int n, int k, int64_t ldx, int64_t ldo, void* stream) {
  if (k % 16 != 0) return cudaErrorInvalidValue;
  auto launch = [&]<typename T, int M>() {
    return launch_int8<T, M>(x, q, scale, scale_dtype, out, m, n, k, ldx, ldo, static_cast<cudaStream_t>(stream));
  };
  return dispatch(x_dtype, m, launch);
}

// out (m, n) = x (m, k) @ dequant(W).T for the half-split int4 layout: packed (n, k/2) bytes, scale and
// zero (n, k/group), zero stored as zp + 8; group a power of two >= 32 dividing k. One row runs on the
// CUDA cores; 2 to 8 rows on the tensor cores when k is a multiple of 128 (else 2 rows on the CUDA
// cores, and more are refused).
int llmopt_int4_gemv(const void* x, int x_dtype, const void* packed, const void* scale, int scale_dtype,
                     const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                     void* stream);
int llmopt_int4_mma_gemv(const void* x, int x_dtype, const void* packed, const void* scale, int scale_dtype,
                         const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                         void* stream);

int llmopt_int4_gemv(const void* x, int x_dtype, const void* packed, const void* scale, int scale_dtype,
                     const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                     void* stream) {
  if (group < 32 || (group & (group - 1)) != 0 || k % group != 0) return cudaErrorInvalidValue;
  if (m >= 2 && k % 128 == 0) {
    return llmopt_int4_mma_gemv(x, x_dtype, packed, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, stream);
  }
  auto launch = [&]<typename T, int M>() {
    return launch_int4<T, M>(x, packed, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo,
                             static_cast<cudaStream_t>(stream));
  };
  return dispatch(x_dtype, m, launch);
}

// llmopt_int4_gemv on the tensor cores at any of 1 to 8 rows (k a multiple of 128); sweeps call it directly.
int llmopt_int4_mma_gemv(const void* x, int x_dtype, const void* packed, const void* scale, int scale_dtype,
                         const void* zero, void* out, int m, int n, int k, int group, int64_t ldx, int64_t ldo,
                         void* stream) {
  if (group < 32 || (group & (group - 1)) != 0 || k % group != 0 || k % 128 != 0 || m < 1 || m > kMaxMmaRows) {
    return cudaErrorInvalidValue;
  }
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (x_dtype == kBFloat16) return launch_int4_mma<__nv_bfloat16>(x, packed, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s);
  if (x_dtype == kFloat16) return launch_int4_mma<__half>(x, packed, scale, scale_dtype, zero, out, m, n, k, group, ldx, ldo, s);
  return cudaErrorInvalidValue;
}

}  // extern "C"
