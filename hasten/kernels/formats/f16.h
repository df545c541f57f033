// F16: IEEE half precision weights, converted exactly to fp32.
#pragma once
#include "common.h"
namespace hasten {
struct F16 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 64;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* p = row + g * 64;
    for (int j = 0; j < 32; ++j) w[j] = load_half(p + 2 * j);
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* p = row + g * 64;
    lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32)));
  }
#elif defined(HASTEN_AVX2)
  // F16C: 8 halves per instruction instead of 32 scalar conversions through a buffer (the same exact values).
  static inline void dequant8x4(const uint8_t* row, int64_t g, __m256* w) {
    const uint8_t* p = row + g * 64;
    for (int v = 0; v < 4; ++v) w[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)));
  }
#endif
};
}  // namespace hasten
