// llmopt's int4 (group-wise, with zero points) weight-only linear for the CPU: y = x @ W.T with
// W[n, k] = (u[n, k] - zero[n, g]) * scale[n, g], u = q + 8 in [0, 15], g = k / G.
//
// x: (M, K) fp32 or bf16. Weights packed by llmopt.quant.cpu_kernels.pack_int4 as (NB, K/2, 16)
// bytes, NB = ceil(N / 16): block b holds output channels 16b..16b+15, and its row j holds, for each
// of them, u[., 2j] in the low nibble and u[., 2j+1] in the high one (16 bytes = 32 weights).
// scales and zeros: (N, K/G) fp32; zeros hold zp + 8 (the u of a zero weight). Padding channels past
// N in the last block are zero and never stored.
//
// Inner loop, per pair of inputs: widen the block's 16 bytes to 16 int32 lanes, split the nibbles
// (and / shift), convert to fp32 and FMA against x[m, k] and x[m, k+1] of every row in the tile
// into a per-group accumulator. At the end of a group the zero point and scale are applied once:
// acc += scale * (sum_k x * u - zero * sum_k x), with sum_k x over the group computed once per row.
// Everything is exact fp32 arithmetic on the weights' integers, as in int8_linear_cpu.cpp (same
// tiling, threading and ISA choice; see cpu_common.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include "cpu_common.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace {

using namespace llmopt_cpu;

// What one tile needs: MT rows of x, NB blocks of weights, their groups' scales and zeros.
struct Int4Tile {
  const float* x;
  int64_t ldx;
  const uint8_t* w;  // the tile's first block
  int64_t K, G;
  const float* scale;  // the tile's first channel's row of (N, K/G)
  const float* zero;
  float* y;
  int64_t ldy, n_valid;
};

// The 16 channels of block j: their scales and zeros for group gi (zeros past N).
inline void block_params(const Int4Tile& t, int j, int64_t gi, float* s, float* z) {
  const int64_t groups = t.K / t.G;
  for (int c = 0; c < kBlock; ++c) {
    const int64_t channel = j * kBlock + c;
    const bool ok = channel < t.n_valid;
    s[c] = ok ? t.scale[channel * groups + gi] : 0.0f;
    z[c] = ok ? t.zero[channel * groups + gi] : 0.0f;
  }
}

template <int MT>
inline void group_sums(const Int4Tile& t, int64_t g0, float (&sx)[MT]) {
  for (int i = 0; i < MT; ++i) {
    float s = 0.0f;
    for (int64_t k = g0; k < g0 + t.G; ++k) s += t.x[i * t.ldx + k];
    sx[i] = s;
  }
}

// ---- AVX-512 ---------------------------------------------------------------------------------

template <int MT, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile4_avx512(const Int4Tile& t) {
  __m512 acc[MT][NB];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t stride = (t.K / 2) * kBlock;  // bytes between blocks
  const __m512i low = _mm512_set1_epi32(0xF);
  for (int64_t g0 = 0; g0 < t.K; g0 += t.G) {
    __m512 gacc[MT][NB];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NB; ++j) gacc[i][j] = _mm512_setzero_ps();
    for (int64_t k = g0; k < g0 + t.G; k += 2) {
      const uint8_t* line = t.w + (k / 2) * kBlock;
      if ((k & 7) == 0)
        for (int j = 0; j < NB; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(line + j * stride + kPrefetchBytes), _MM_HINT_T0);
      __m512 x0[MT], x1[MT];
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        x0[i] = _mm512_set1_ps(t.x[i * t.ldx + k]);
        x1[i] = _mm512_set1_ps(t.x[i * t.ldx + k + 1]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(line + j * stride)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(u, low));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4));
#pragma GCC unroll 8
        for (int i = 0; i < MT; ++i) gacc[i][j] = _mm512_fmadd_ps(hi, x1[i], _mm512_fmadd_ps(lo, x0[i], gacc[i][j]));
      }
    }
    float sx[MT];
    group_sums<MT>(t, g0, sx);
    const int64_t gi = g0 / t.G;
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      alignas(64) float sb[kBlock], zb[kBlock];
      block_params(t, j, gi, sb, zb);
      const __m512 s = _mm512_load_ps(sb), z = _mm512_load_ps(zb);
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        const __m512 centred = _mm512_fnmadd_ps(z, _mm512_set1_ps(sx[i]), gacc[i][j]);
        acc[i][j] = _mm512_fmadd_ps(s, centred, acc[i][j]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t left = t.n_valid - j * kBlock;
    if (left <= 0) break;
    const __mmask16 mask = left >= kBlock ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    for (int i = 0; i < MT; ++i) _mm512_mask_storeu_ps(t.y + i * t.ldy + j * kBlock, mask, acc[i][j]);
  }
}

// ---- AVX2: the same tile with two 8-lane halves per block ------------------------------------

template <int MT, int NB>
__attribute__((target("avx2,fma"))) void tile4_avx2(const Int4Tile& t) {
  __m256 acc[MT][NB][2];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
  const int64_t stride = (t.K / 2) * kBlock;
  const __m256i low = _mm256_set1_epi32(0xF);
  for (int64_t g0 = 0; g0 < t.K; g0 += t.G) {
    __m256 gacc[MT][NB][2];
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < NB; ++j) gacc[i][j][0] = gacc[i][j][1] = _mm256_setzero_ps();
    for (int64_t k = g0; k < g0 + t.G; k += 2) {
      const uint8_t* line = t.w + (k / 2) * kBlock;
      if ((k & 7) == 0)
        for (int j = 0; j < NB; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(line + j * stride + kPrefetchBytes), _MM_HINT_T0);
      for (int j = 0; j < NB; ++j) {
        for (int h = 0; h < 2; ++h) {
          const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(line + j * stride + h * 8)));
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(u, low));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(u, 4));
          for (int i = 0; i < MT; ++i) {
            const __m256 x0 = _mm256_set1_ps(t.x[i * t.ldx + k]), x1 = _mm256_set1_ps(t.x[i * t.ldx + k + 1]);
            gacc[i][j][h] = _mm256_fmadd_ps(hi, x1, _mm256_fmadd_ps(lo, x0, gacc[i][j][h]));
          }
        }
      }
    }
    float sx[MT];
    group_sums<MT>(t, g0, sx);
    const int64_t gi = g0 / t.G;
    for (int j = 0; j < NB; ++j) {
      alignas(32) float sb[kBlock], zb[kBlock];
      block_params(t, j, gi, sb, zb);
      for (int h = 0; h < 2; ++h) {
        const __m256 s = _mm256_load_ps(sb + h * 8), z = _mm256_load_ps(zb + h * 8);
        for (int i = 0; i < MT; ++i) {
          const __m256 centred = _mm256_fnmadd_ps(z, _mm256_set1_ps(sx[i]), gacc[i][j][h]);
          acc[i][j][h] = _mm256_fmadd_ps(s, centred, acc[i][j][h]);
        }
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t left = t.n_valid - j * kBlock;
    if (left <= 0) break;
    const int64_t valid = std::min(left, kBlock);
    for (int i = 0; i < MT; ++i) {
      alignas(32) float out[kBlock];
      _mm256_store_ps(out, acc[i][j][0]);
      _mm256_store_ps(out + 8, acc[i][j][1]);
      std::memcpy(t.y + i * t.ldy + j * kBlock, out, sizeof(float) * valid);
    }
  }
}

// ---- tile tables: MT rows (1..max) x NB blocks (1..max) ----------------------------------------

using TileFn = void (*)(const Int4Tile&);

constexpr int kMaxRows512 = 4, kMaxBlocks512 = 2;  // 2 x MT x NB zmm accumulators (16 at most)
constexpr int kMaxRows2 = 2, kMaxBlocks2 = 1;  // 8 ymm accumulators

template <template <int, int> class Fn, int MaxBlocks, int MT, int... NBs>
constexpr auto table_row(std::integer_sequence<int, NBs...>) {
  return std::array<TileFn, sizeof...(NBs)>{&Fn<MT, NBs + 1>::run...};
}
template <template <int, int> class Fn, int MaxBlocks, int... MTs>
constexpr auto table(std::integer_sequence<int, MTs...>) {
  return std::array<std::array<TileFn, MaxBlocks>, sizeof...(MTs)>{
      table_row<Fn, MaxBlocks, MTs + 1>(std::make_integer_sequence<int, MaxBlocks>{})...};
}
template <int MT, int NB>
struct Avx512Tile {
  static void run(const Int4Tile& t) { tile4_avx512<MT, NB>(t); }
};
template <int MT, int NB>
struct Avx2Tile {
  static void run(const Int4Tile& t) { tile4_avx2<MT, NB>(t); }
};

const auto kTable512 = table<Avx512Tile, kMaxBlocks512>(std::make_integer_sequence<int, kMaxRows512>{});
const auto kTable2 = table<Avx2Tile, kMaxBlocks2>(std::make_integer_sequence<int, kMaxRows2>{});

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                  int64_t group) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu() && zero.device().is_cpu(),
              "int4_linear_cpu: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "int4_linear_cpu: x must be (M, K), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int4_linear_cpu: x must be float32 or bfloat16");
  const int64_t k = x.size(1);
  TORCH_CHECK(group >= 2 && group % 2 == 0 && k % group == 0, "int4_linear_cpu: group ", group,
              " must be even and divide K=", k);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kBlock && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * 2 == k,
              "int4_linear_cpu: weights must be contiguous uint8 (ceil(N/16), K/2, 16), got ", w.sizes(), " for K=", k);
  for (const at::Tensor* t : {&scale, &zero}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == scale.size(0) &&
                    t->size(1) == k / group,
                "int4_linear_cpu: scales and zeros must be contiguous float32 (N, K/group)");
  }
  const int64_t n = scale.size(0);
  TORCH_CHECK(n > 0 && (n + kBlock - 1) / kBlock == w.size(0), "int4_linear_cpu: N=", n, " does not match ", w.size(0), " blocks");
}

void run(const at::Tensor& x32, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t n,
         int64_t group, float* y, int64_t ldy, Isa isa) {
  const int64_t M = x32.size(0), K = x32.size(1), blocks = w.size(0);
  const float* xp = x32.data_ptr<float>();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* zp = zero.data_ptr<float>();
  const int max_rows = isa == kAvx512 ? kMaxRows512 : kMaxRows2;
  const int max_blocks = isa == kAvx512 ? kMaxBlocks512 : kMaxBlocks2;
  const int64_t block_bytes = (K / 2) * kBlock, groups = K / group;
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, block_bytes));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1;) {
      const int nb = static_cast<int>(std::min<int64_t>(max_blocks, b1 - b));
      const int64_t n0 = b * kBlock;
      for (int64_t m = 0; m < M;) {
        const int mt = rows_per_tile(M - m, max_rows);
        const Int4Tile tile{xp + m * K, K, wp + b * block_bytes, K, group, sp + n0 * groups,
                            zp + n0 * groups, y + m * ldy + n0, ldy, std::min<int64_t>(n - n0, nb * kBlock)};
        (isa == kAvx512 ? kTable512[mt - 1][nb - 1] : kTable2[mt - 1][nb - 1])(tile);
        m += mt;
      }
      b += nb;
    }
  });
}

void linear_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero, int64_t n,
                 int64_t group, at::Tensor& out, Isa isa) {
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  if (out.scalar_type() == at::kFloat && out.is_contiguous()) {
    run(x32, w, scale, zero, n, group, out.data_ptr<float>(), n, isa);
  } else {
    at::Tensor y32 = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
    run(x32, w, scale, zero, n, group, y32.data_ptr<float>(), n, isa);
    out.copy_(y32);
  }
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                           int64_t group) {
  check_inputs(x, w, scale, zero, group);
  const int64_t n = scale.size(0);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  linear_into(x, w, scale, zero, n, group, out, resolve_isa(kAuto, "int4_linear_cpu"));
  return out;
}

// Test and benchmark entry: writes into a given (M, N) tensor of x's dtype; isa 0 = auto, 1 = AVX2, 2 = AVX-512.
void int4_linear_cpu_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& zero,
                         int64_t group, int64_t isa, at::Tensor out) {
  check_inputs(x, w, scale, zero, group);
  const int64_t n = scale.size(0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n && out.scalar_type() == x.scalar_type(),
              "int4_linear_cpu_out: out must be (M, N) in x's dtype");
  linear_into(x, w, scale, zero, n, group, out, resolve_isa(isa, "int4_linear_cpu"));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmopt, m) {
  m.def("int4_linear_cpu(Tensor x, Tensor w_packed, Tensor scales, Tensor zeros, int group) -> Tensor");
  m.def("int4_linear_cpu_out(Tensor x, Tensor w_packed, Tensor scales, Tensor zeros, int group, int isa, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(llmopt, CPU, m) {
  m.impl("int4_linear_cpu", &int4_linear_cpu);
  m.impl("int4_linear_cpu_out", &int4_linear_cpu_out);
}
