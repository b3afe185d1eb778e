// llmopt's int8 weight-only linear for the CPU, for few rows (decode): y = (x @ q.T) * scale.
//
// x: (M, K) fp32 or bf16 activations. Weights: int8, packed by llmopt.quant.cpu_kernels.pack_int8
// as (NB, K, 16) with NB = ceil(N / 16): block b holds output channels 16b..16b+15, and for each
// k their 16 weights sit in one 16-byte row (rows past N are zero). scale: (N,) fp32, one per
// output channel, applied once to the fp32 accumulator at the end.
//
// Inner loop, per k: sign-extend 16 int8 weights of each block in the tile straight from memory
// into 16 int32 lanes, convert to fp32, and FMA against the broadcast x[m, k] of every row in the
// tile. Accumulators are vectors over output channels, so there is no horizontal reduction, and
// one weight conversion serves all the rows of the tile. A thread streams a contiguous range of
// blocks; the hardware prefetcher sees NB sequential streams (one per block of the tile) and a
// software prefetch runs a few cache lines ahead of each.
//
// ISA: AVX-512 (F/BW/VL) or AVX2+FMA, picked at run time from the CPU (no -march flags: the same
// build runs on any x86-64, and refuses cleanly on CPUs without AVX2). Threads: at::parallel_for
// over blocks of 16 output channels (torch's OpenMP pool).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

namespace {

constexpr int64_t kBlock = 16;  // output channels per packed block
constexpr int64_t kPrefetchBytes = 512;  // how far ahead of each weight stream to prefetch

enum Isa : int64_t { kAuto = 0, kAvx2 = 1, kAvx512 = 2 };

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// ---- AVX-512: a tile of MT rows x NB blocks (16 * NB output channels) ------------------------

template <int MT, int NB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void tile_avx512(
    const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale, float* y,
    int64_t ldy, int64_t n_valid) {
  __m512 acc[MT][NB];
#pragma GCC unroll 8
  for (int i = 0; i < MT; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t stride = K * kBlock;  // bytes between consecutive blocks
  int64_t k = 0;
  // Main loop: 4 k at a time = one 64-byte cache line of every block in the tile.
  for (; k + 4 <= K; k += 4) {
    const int8_t* line = w + k * kBlock;
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(line + j * stride + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int kk = 0; kk < 4; ++kk) {
      __m512 wv[NB];
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(line + j * stride + kk * kBlock));
        wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
      }
#pragma GCC unroll 8
      for (int i = 0; i < MT; ++i) {
        const __m512 xv = _mm512_set1_ps(x[i * ldx + k + kk]);
#pragma GCC unroll 8
        for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
      }
    }
  }
  for (; k < K; ++k) {
    __m512 wv[NB];
    for (int j = 0; j < NB; ++j) {
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * stride + k * kBlock));
      wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
    for (int i = 0; i < MT; ++i) {
      const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    const int64_t left = n_valid - j * kBlock;
    if (left <= 0) break;
    const __mmask16 mask = left >= kBlock ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
    const __m512 s = _mm512_maskz_loadu_ps(mask, scale + j * kBlock);
#pragma GCC unroll 8
    for (int i = 0; i < MT; ++i) _mm512_mask_storeu_ps(y + i * ldy + j * kBlock, mask, _mm512_mul_ps(acc[i][j], s));
  }
}

// ---- AVX2: the same tile with two 8-lane halves per block ------------------------------------

__attribute__((target("avx2,fma"))) inline __m256 cvt8_avx2(const int8_t* p) {
  const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

template <int MT, int NB>
__attribute__((target("avx2,fma"))) void tile_avx2(
    const float* x, int64_t ldx, const int8_t* w, int64_t K, const float* scale, float* y,
    int64_t ldy, int64_t n_valid) {
  __m256 acc[MT][NB][2];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
  const int64_t stride = K * kBlock;
  for (int64_t k = 0; k < K; ++k) {
    if ((k & 3) == 0)
      for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(w + j * stride + k * kBlock + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      const int8_t* p = w + j * stride + k * kBlock;
      const __m256 lo = cvt8_avx2(p), hi = cvt8_avx2(p + 8);
#pragma GCC unroll 4
      for (int i = 0; i < MT; ++i) {
        const __m256 xv = _mm256_set1_ps(x[i * ldx + k]);
        acc[i][j][0] = _mm256_fmadd_ps(lo, xv, acc[i][j][0]);
        acc[i][j][1] = _mm256_fmadd_ps(hi, xv, acc[i][j][1]);
      }
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t left = n_valid - j * kBlock;
    if (left <= 0) break;
    const int64_t valid = std::min(left, kBlock);
    alignas(32) float s[kBlock] = {};
    std::memcpy(s, scale + j * kBlock, sizeof(float) * valid);
    for (int i = 0; i < MT; ++i) {
      alignas(32) float out[kBlock];
      _mm256_store_ps(out, _mm256_mul_ps(acc[i][j][0], _mm256_load_ps(s)));
      _mm256_store_ps(out + 8, _mm256_mul_ps(acc[i][j][1], _mm256_load_ps(s + 8)));
      std::memcpy(y + i * ldy + j * kBlock, out, sizeof(float) * valid);
    }
  }
}

// ---- tile tables: MT rows (1..kMaxRows) x NB blocks (1..kMaxBlocks) ---------------------------

using TileFn = void (*)(const float*, int64_t, const int8_t*, int64_t, const float*, float*, int64_t, int64_t);

constexpr int kMaxRows512 = 6, kMaxBlocks512 = 4;  // up to 24 zmm accumulators
constexpr int kMaxRows2 = 3, kMaxBlocks2 = 2;  // up to 12 ymm accumulators

template <int MT, int... NBs>
constexpr auto row_512(std::integer_sequence<int, NBs...>) {
  return std::array<TileFn, sizeof...(NBs)>{&tile_avx512<MT, NBs + 1>...};
}
template <int... MTs>
constexpr auto table_512(std::integer_sequence<int, MTs...>) {
  return std::array<std::array<TileFn, kMaxBlocks512>, sizeof...(MTs)>{
      row_512<MTs + 1>(std::make_integer_sequence<int, kMaxBlocks512>{})...};
}
template <int MT, int... NBs>
constexpr auto row_2(std::integer_sequence<int, NBs...>) {
  return std::array<TileFn, sizeof...(NBs)>{&tile_avx2<MT, NBs + 1>...};
}
template <int... MTs>
constexpr auto table_2(std::integer_sequence<int, MTs...>) {
  return std::array<std::array<TileFn, kMaxBlocks2>, sizeof...(MTs)>{
      row_2<MTs + 1>(std::make_integer_sequence<int, kMaxBlocks2>{})...};
}

const auto kTable512 = table_512(std::make_integer_sequence<int, kMaxRows512>{});
const auto kTable2 = table_2(std::make_integer_sequence<int, kMaxRows2>{});

Isa resolve_isa(int64_t requested) {
  static const bool has512 = cpu_has_avx512();
  static const bool has2 = cpu_has_avx2();
  if (requested == kAvx512 || (requested == kAuto && has512)) {
    TORCH_CHECK(has512, "llmopt int8_linear_cpu: this CPU has no AVX-512 (F/BW/VL)");
    return kAvx512;
  }
  TORCH_CHECK(has2, "llmopt int8_linear_cpu: this CPU has neither AVX-512 nor AVX2+FMA");
  return kAvx2;
}

// Rows per tile: as many as fit, spread evenly (7 rows run as 4 + 3, not 6 + 1).
int rows_per_tile(int64_t rows_left, int max_rows) {
  const int64_t tiles = (rows_left + max_rows - 1) / max_rows;
  return static_cast<int>((rows_left + tiles - 1) / tiles);
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int64_t n = scale.numel();
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && scale.device().is_cpu(), "int8_linear_cpu: CPU tensors only");
  TORCH_CHECK(x.dim() == 2, "int8_linear_cpu: x must be (M, K), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_linear_cpu: x must be float32 or bfloat16");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kBlock && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_linear_cpu: weights must be contiguous int8 (ceil(N/16), K, 16), got ", w.sizes());
  TORCH_CHECK(w.size(1) == x.size(1), "int8_linear_cpu: x has K=", x.size(1), " but the weights K=", w.size(1));
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "int8_linear_cpu: scale must be contiguous float32 (N,)");
  TORCH_CHECK(n > 0 && (n + kBlock - 1) / kBlock == w.size(0), "int8_linear_cpu: N=", n, " does not match ", w.size(0), " blocks");
}

// y32: (M, n) fp32 with row stride ldy.
void run(const at::Tensor& x32, const at::Tensor& w, const at::Tensor& scale, int64_t n, float* y, int64_t ldy, Isa isa) {
  const int64_t M = x32.size(0), K = x32.size(1), blocks = w.size(0);
  const float* xp = x32.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int max_rows = isa == kAvx512 ? kMaxRows512 : kMaxRows2;
  const int max_blocks = isa == kAvx512 ? kMaxBlocks512 : kMaxBlocks2;
  // Split the blocks over threads; a small layer (< 64 KiB of weights per thread) stays on fewer
  // threads, where waking another costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * kBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1;) {
      const int nb = static_cast<int>(std::min<int64_t>(max_blocks, b1 - b));
      const int64_t n0 = b * kBlock;
      const int64_t n_valid = std::min<int64_t>(n - n0, nb * kBlock);
      for (int64_t m = 0; m < M;) {
        const int mt = rows_per_tile(M - m, max_rows);
        const TileFn fn = isa == kAvx512 ? kTable512[mt - 1][nb - 1] : kTable2[mt - 1][nb - 1];
        fn(xp + m * K, K, wp + b * K * kBlock, K, sp + n0, y + m * ldy + n0, ldy, n_valid);
        m += mt;
      }
      b += nb;
    }
  });
}

void linear_into(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t n, at::Tensor& out, Isa isa) {
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  if (out.scalar_type() == at::kFloat && out.is_contiguous()) {
    run(x32, w, scale, n, out.data_ptr<float>(), n, isa);
  } else {
    at::Tensor y32 = at::empty({x.size(0), n}, x.options().dtype(at::kFloat));
    run(x32, w, scale, n, y32.data_ptr<float>(), n, isa);
    out.copy_(y32);
  }
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  check_inputs(x, w, scale);
  const int64_t n = scale.numel();
  const Isa isa = resolve_isa(kAuto);
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  linear_into(x, w, scale, n, out, isa);
  return out;
}

// Test and benchmark entry: writes into a given (M, N) tensor of x's dtype; isa 0 = auto, 1 = AVX2, 2 = AVX-512.
void int8_linear_cpu_out(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, int64_t isa, at::Tensor out) {
  check_inputs(x, w, scale);
  const int64_t n = scale.numel();
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == n && out.scalar_type() == x.scalar_type(),
              "int8_linear_cpu_out: out must be (M, N) in x's dtype");
  linear_into(x, w, scale, n, out, resolve_isa(isa));
}

// 2 = AVX-512, 1 = AVX2, 0 = neither (the op refuses).
int64_t int8_linear_cpu_isa() {
  return cpu_has_avx512() ? kAvx512 : (cpu_has_avx2() ? kAvx2 : 0);
}

}  // namespace

// A fragment, not TORCH_LIBRARY: other parts of llmopt may define ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(llmopt, m) {
  m.def("int8_linear_cpu(Tensor x, Tensor w_packed, Tensor scale) -> Tensor");
  m.def("int8_linear_cpu_out(Tensor x, Tensor w_packed, Tensor scale, int isa, Tensor(a!) out) -> ()");
  m.def("int8_linear_cpu_isa() -> int", &int8_linear_cpu_isa);
}

TORCH_LIBRARY_IMPL(llmopt, CPU, m) {
  m.impl("int8_linear_cpu", &int8_linear_cpu);
  m.impl("int8_linear_cpu_out", &int8_linear_cpu_out);
}
