// Q4_1: blocks of 32 weights, fp16 scale d and minimum m, then 16 bytes of 4-bit codes; w = d * q + m.
#pragma once
#include "q8.h"
namespace hasten {
struct Q4_1 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 20;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + g * kBlockBytes;
    const float d = load_half(b), m = load_half(b + 2);
    for (int j = 0; j < 16; ++j) {
      w[j] = d * float(b[4 + j] & 15) + m;
      w[j + 16] = d * float(b[4 + j] >> 4) + m;
    }
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* b = row + g * kBlockBytes;
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(load_half(b)), iota16(0)), _mm512_set1_ps(load_half(b + 2)));
    const __m512i q = bytes16(b + 4);
    lo = _mm512_permutexvar_ps(q, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
  }
#endif

  // q8 path (q8.h): codes c = q, no offset, lane scale d, min m.
  static constexpr int kQ8Kind = kQ8Min, kQ8CodeOffset = 0;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + g * kBlockBytes;
    for (int j = 0; j < 16; ++j) {
      c[j] = b[4 + j] & 15;
      c[j + 16] = b[4 + j] >> 4;
    }
    s[0] = s[1] = load_half(b);
    m = load_half(b + 2);
  }
#ifdef HASTEN_AVX512
  // One group of a 16-row tile straight from the blocks (q8.h, row lanes).
  static inline void q8_lanes(const uint8_t* const* row, __m512i rowoff, int64_t g, Q8Lanes& L, int h, Q8LaneScales&) {
    nibbles_lanes(row, g * kBlockBytes + 4, L.c[h]);
    const __m512i dm = rows16_dword(row, rowoff, g * kBlockBytes);
    L.s[h] = low_halves(dm);
    L.m[h] = high_halves(dm);
  }
  static inline void q8_quad(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
    const uint8_t* b[4];
    __mmask16 live;
    quad_blocks(row, u, G, kBlockBytes, b, live);
    nibbles4(b, 4, w.a, w.b);
    w.s = halves4(b, 0, live);
    w.m = halves4(b, 2, live);
  }
#endif
};
}  // namespace hasten
