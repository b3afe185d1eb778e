// What llmopt's CPU low-bit kernels (int8_linear_cpu.cpp, int4_linear_cpu.cpp) share: the packed
// block width, the vector ISA picked at run time, and how rows are grouped into tiles.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace llmopt_cpu {

constexpr int64_t kBlock = 16;  // output channels per packed block (one AVX-512 vector of fp32)
constexpr int64_t kPrefetchBytes = 512;  // how far ahead of each weight stream to prefetch

enum Isa : int64_t { kAuto = 0, kAvx2 = 1, kAvx512 = 2 };

inline bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl");
}

inline bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

// The ISA to run: `requested` (kAuto: the best this CPU has); refuses, naming `op`, what it lacks.
inline Isa resolve_isa(int64_t requested, const char* op) {
  static const bool has512 = cpu_has_avx512();
  static const bool has2 = cpu_has_avx2();
  if (requested == kAvx512 || (requested == kAuto && has512)) {
    TORCH_CHECK(has512, "llmopt ", op, ": this CPU has no AVX-512 (F/BW/VL)");
    return kAvx512;
  }
  TORCH_CHECK(has2, "llmopt ", op, ": this CPU has neither AVX-512 nor AVX2+FMA");
  return kAvx2;
}

// Rows per tile: as many as fit, spread evenly (7 rows run as 4 + 3, not 6 + 1).
inline int rows_per_tile(int64_t rows_left, int max_rows) {
  const int64_t tiles = (rows_left + max_rows - 1) / max_rows;
  return static_cast<int>((rows_left + tiles - 1) / tiles);
}

}  // namespace llmopt_cpu
