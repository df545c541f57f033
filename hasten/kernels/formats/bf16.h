// BF16: the top 16 bits of an fp32; widening is a shift, exact.
#pragma once
#include "common.h"
namespace hasten {
struct BF16 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 64;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* p = row + g * 64;
    for (int j = 0; j < 32; ++j) w[j] = bf16_to_float(load_u16(p + 2 * j));
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* p = row + g * 64;
    auto widen = [](const uint8_t* q) {
      const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    };
    lo = widen(p);
    hi = widen(p + 32);
  }
#elif defined(HASTEN_AVX2)
  // 8 at a time, widened and shifted in registers (the same exact values as dequant).
  static inline void dequant8x4(const uint8_t* row, int64_t g, __m256* w) {
    const uint8_t* p = row + g * 64;
    for (int v = 0; v < 4; ++v) {
      const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v)));
      w[v] = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
    }
  }
#endif
};
}  // namespace hasten
