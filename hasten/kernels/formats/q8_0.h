// Q8_0: blocks of 32 weights, fp16 scale d then 32 int8 codes; w = d * q.
#pragma once
#include "common.h"
namespace hasten {
struct Q8_0 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 34;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + g * kBlockBytes;
    const float d = load_half(b);
    for (int j = 0; j < 32; ++j) w[j] = d * float(int8_t(b[2 + j]));
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* b = row + g * kBlockBytes;
    const __m512 d = _mm512_set1_ps(load_half(b));
    auto codes = [](const uint8_t* p) {
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    };
    lo = _mm512_mul_ps(d, codes(b + 2));
    hi = _mm512_mul_ps(d, codes(b + 18));
  }
#endif
};
}  // namespace hasten
