// The small per-layer ops of one eager decode step on the CPU, each one call instead of many.
//
// At batch 1 a decode step of a small model spends more time dispatching small torch ops than in
// its matmuls: torch's rms_norm takes ~11 us for 576 floats, and scaled_dot_product_attention ~50 us
// for one query row per head over a few hundred keys (its flash kernel is built for long queries).
// These do the same arithmetic in one pass (fp32, AVX2+FMA):
//
// rms_norm_cpu(x, weight, eps): weight * (x / sqrt(mean(x^2) + eps)) over the last dim
//   (transformers' Llama RMSNorm, in fp32).
// decode_attention_cpu(q, k, v, k_cache, v_cache, slots, positions, mask, scale):
//   one new token per row. Writes k, v [B, 1, KV, D] into the layer's cache [slots, KV, S, D] at
//   (slots[b], :, positions[b]), then attends: query head h*G + g of row b (q [B, 1, KV*G, D])
//   over keys 0..L-1 of its KV head h with the additive mask [B, 1, G, L] (0 or -inf) and
//   softmax(scale * q.k + mask) @ v. Output [B, 1, KV*G*D]: the layout o_proj reads.
//   A row whose keys are all masked gets zeros.
//
// Compiled into the same library as int8_linear_cpu.cpp (see llmopt/quant/cpu_kernels.py).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y += a * x
__attribute__((target("avx2,fma"))) void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

// exp(x) for 8 floats (Cephes' polynomial after range reduction, ~2 ulp); exactly 0 below -87.
__attribute__((target("avx2,fma"))) __m256 exp8(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f));
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
  return _mm256_andnot_ps(underflow, y);
}

// s[i] = exp(s[i] - max); returns the sum.
__attribute__((target("avx2,fma"))) float exp_shift_sum(float* s, int64_t n, float max) {
  const __m256 vm = _mm256_set1_ps(max);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) {
    s[i] = std::exp(s[i] - max);
    sum += s[i];
  }
  return sum;
}

void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float(x, "x");
  check_float(weight, "weight");
  const int64_t d = weight.numel();
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d && weight.is_contiguous(), "rms_norm_cpu: x [..., D], weight [D]");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = xc.numel() / d;
  const float* xp = xc.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    const float inv = 1.0f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + static_cast<float>(eps));
    float* orow = op + r * d;
    for (int64_t i = 0; i < d; ++i) orow[i] = wp[i] * (xr[i] * inv);
  }
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots,
                                const at::Tensor& positions, const at::Tensor& mask, double scale) {
  for (const auto* t : {&q, &k, &v, &k_cache, &v_cache, &mask}) check_float(*t, "q, k, v, the caches and the mask");
  TORCH_CHECK(q.dim() == 4 && q.size(1) == 1 && k.dim() == 4 && k.size(1) == 1 && v.sizes() == k.sizes(),
              "decode_attention_cpu: q [B, 1, H, D], k and v [B, 1, KV, D]");
  const int64_t b_rows = q.size(0), heads = q.size(2), d = q.size(3), kv = k.size(2);
  TORCH_CHECK(k.size(0) == b_rows && k.size(3) == d && heads % kv == 0, "decode_attention_cpu: q/k shapes disagree");
  const int64_t g = heads / kv;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == kv && k_cache.size(3) == d &&
                  k_cache.is_contiguous() && v_cache.is_contiguous(),
              "decode_attention_cpu: caches [slots, KV, S, D], contiguous");
  const int64_t n_slots = k_cache.size(0), seq = k_cache.size(2);
  TORCH_CHECK(mask.dim() == 4 && mask.size(0) == b_rows && mask.size(1) == 1 && mask.size(2) == g && mask.is_contiguous(),
              "decode_attention_cpu: mask [B, 1, G, L], contiguous");
  const int64_t len = mask.size(3);
  TORCH_CHECK(len <= seq, "decode_attention_cpu: mask longer than the cache");
  TORCH_CHECK(slots.scalar_type() == at::kLong && positions.scalar_type() == at::kLong && slots.numel() == b_rows &&
                  positions.numel() == b_rows,
              "decode_attention_cpu: slots and positions: one int64 per row");
  const at::Tensor qc = q.contiguous();
  const at::Tensor kc = k.contiguous();
  const at::Tensor vc = v.contiguous();
  const at::Tensor sl = slots.contiguous();
  const at::Tensor ps = positions.contiguous();
  const int64_t* slot_p = sl.data_ptr<int64_t>();
  const int64_t* pos_p = ps.data_ptr<int64_t>();
  float* kcache = k_cache.data_ptr<float>();
  float* vcache = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < b_rows; ++b) {  // the new keys and values first: the row attends to itself
    TORCH_CHECK(slot_p[b] >= 0 && slot_p[b] < n_slots && pos_p[b] >= 0 && pos_p[b] < seq,
                "decode_attention_cpu: slot or position outside the cache");
    for (int64_t h = 0; h < kv; ++h) {
      const int64_t offset = ((slot_p[b] * kv + h) * seq + pos_p[b]) * d;
      std::copy_n(kc.data_ptr<float>() + (b * kv + h) * d, d, kcache + offset);
      std::copy_n(vc.data_ptr<float>() + (b * kv + h) * d, d, vcache + offset);
    }
  }
  at::Tensor out = at::empty({b_rows, 1, heads * d}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* mp = mask.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, b_rows * kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(len);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv, h = task % kv;
      const float* keys = kcache + (slot_p[b] * kv + h) * seq * d;
      const float* values = vcache + (slot_p[b] * kv + h) * seq * d;
      for (int64_t j = 0; j < g; ++j) {
        const int64_t head = h * g + j;
        const float* qrow = qp + (b * heads + head) * d;
        const float* mrow = mp + (b * g + j) * len;
        float* orow = op + (b * heads + head) * d;
        float max = -std::numeric_limits<float>::infinity();
        for (int64_t l = 0; l < len; ++l) {
          const float s = mrow[l] == -std::numeric_limits<float>::infinity()
              ? mrow[l]
              : fscale * dot(qrow, keys + l * d, d) + mrow[l];
          scores[l] = s;
          max = s > max ? s : max;
        }
        std::fill_n(orow, d, 0.0f);
        if (max == -std::numeric_limits<float>::infinity()) continue;  // nothing visible
        const float sum = exp_shift_sum(scores.data(), len, max);
        for (int64_t l = 0; l < len; ++l)
          if (scores[l] != 0.0f) axpy(scores[l], values + l * d, orow, d);
        const float inv = 1.0f / sum;
        for (int64_t i = 0; i < d; ++i) orow[i] *= inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llmopt, m) {
  m.def("rms_norm_cpu(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def(
      "decode_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, "
      "Tensor positions, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llmopt, CPU, m) {
  m.impl("rms_norm_cpu", &rms_norm_cpu);
  m.impl("decode_attention_cpu", &decode_attention_cpu);
}
