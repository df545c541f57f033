// Q4_K: super-blocks of 256 weights = 8 sub-blocks of 32: fp16 d and dmin, 12 bytes of 6-bit sub-block scales
// and mins, 128 bytes of 4-bit codes (sub-blocks 2i and 2i+1 share 32 bytes: low and high nibbles);
// w = (d * sc) * q - (dmin * m).
#pragma once
#include "common.h"
namespace hasten {
// A super-block's 8 sub-block scales and mins, decoded once for its 8 groups (the AVX-512 path).
struct KScales {
  float scale[16], min[8];
};

struct Q4_K {
  static constexpr int kBlockWeights = 256, kBlockBytes = 144;
  static inline void prepare(const uint8_t* row, int64_t g, KScales& c) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    for (int s = 0; s < 8; ++s) scale_min(b, s, c.scale[s], c.min[s]);
  }
  static inline void scale_min(const uint8_t* b, int s, float& scale, float& min) {
    uint8_t sc, m;
    k_scale_min(b + 4, s, sc, m);
    scale = load_half(b) * float(sc);
    min = load_half(b + 2) * float(m);
  }
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7), shift = (s & 1) * 4;
    float scale, min;
    scale_min(b, s, scale, min);
    const uint8_t* q = b + 16 + (s >> 1) * 32;
    for (int j = 0; j < 32; ++j) w[j] = scale * float((q[j] >> shift) & 15) - min;
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, const KScales& c, __m512& lo, __m512& hi) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7);
    const unsigned shift = (s & 1) * 4;
    const __m512 table = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(c.scale[s]), iota16(0)), _mm512_set1_ps(c.min[s]));
    const uint8_t* q = b + 16 + (s >> 1) * 32;
    lo = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes16(q), shift), table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes16(q + 16), shift), table);
  }
#endif
};
}  // namespace hasten
