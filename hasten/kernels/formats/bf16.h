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
#endif
};
}  // namespace hasten
