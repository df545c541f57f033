// F32: plain little-endian floats; a "block" here is 32 consecutive weights.
#pragma once
#include "common.h"
namespace hasten {
struct F32 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 128;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) { std::memcpy(w, row + g * 128, 128); }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const float* p = reinterpret_cast<const float*>(row + g * 128);
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  }
#endif
};
}  // namespace hasten
