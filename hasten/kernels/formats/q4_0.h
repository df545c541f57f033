// Q4_0: blocks of 32 weights, fp16 scale d then 16 bytes of 4-bit codes (low nibbles: weights 0-15, high: 16-31);
// w = d * (q - 8).
#pragma once
#include "q8.h"
namespace hasten {
struct Q4_0 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 18;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + g * kBlockBytes;
    const float d = load_half(b);
    for (int j = 0; j < 16; ++j) {
      w[j] = d * float(int(b[2 + j] & 15) - 8);
      w[j + 16] = d * float(int(b[2 + j] >> 4) - 8);
    }
  }
#ifdef HASTEN_AVX512
  // A block has 16 distinct weights: build them once and look each up with vpermps (low 4 index bits only).
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* b = row + g * kBlockBytes;
    const __m512 table = _mm512_mul_ps(_mm512_set1_ps(load_half(b)), iota16(-8));
    const __m512i q = bytes16(b + 2);
    lo = _mm512_permutexvar_ps(q, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
  }
#endif

  // q8 path (q8.h): codes c = q, offset 8, lane scale d.
  static constexpr int kQ8Kind = kQ8Offset, kQ8CodeOffset = 8;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + g * kBlockBytes;
    for (int j = 0; j < 16; ++j) {
      c[j] = b[2 + j] & 15;
      c[j + 16] = b[2 + j] >> 4;
    }
    s[0] = s[1] = load_half(b);
    m = 0.f;
  }
#ifdef HASTEN_AVX512
  // One group of a 16-row tile straight from the blocks (q8.h, row lanes).
  static inline void q8_lanes(const uint8_t* const* row, __m512i rowoff, int64_t g, Q8Lanes& L, int h, Q8LaneScales&) {
    nibbles_lanes(row, g * kBlockBytes + 2, L.c[h]);
    L.s[h] = low_halves(rows16_dword(row, rowoff, g * kBlockBytes));
  }
  static inline void q8_quad(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
    const uint8_t* b[4];
    __mmask16 live;
    quad_blocks(row, u, G, kBlockBytes, b, live);
    nibbles4(b, 2, w.a, w.b);
    w.s = halves4(b, 0, live);
  }
#elif defined(HASTEN_AVX2)
  // AVX2's layout (register h: blocks 4u+2h, 4u+2h+1; A: their low nibbles, B: their high ones), straight from
  // the blocks: q8_group's codes and scales, zero past the row's end, so the same bits.
  static inline void q8_quad(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
    const __m128i f = _mm_set1_epi8(15);
    for (int h = 0; h < 2; ++h) {
      __m128i lo[2], hi[2];
      float d[2];
      for (int e = 0; e < 2; ++e) {
        const int64_t g = 4 * u + 2 * h + e;
        if (g < G) {
          const uint8_t* b = row + g * kBlockBytes;
          const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2));
          lo[e] = _mm_and_si128(v, f);
          hi[e] = _mm_and_si128(_mm_srli_epi16(v, 4), f);
          d[e] = load_half(b);
        } else {
          lo[e] = hi[e] = _mm_setzero_si128();
          d[e] = 0.f;
        }
      }
      w.a[h] = _mm256_set_m128i(lo[1], lo[0]);
      w.b[h] = _mm256_set_m128i(hi[1], hi[0]);
      w.s[h] = w.s2[h] = _mm256_set_m128(_mm_set1_ps(d[1]), _mm_set1_ps(d[0]));
      w.m[h] = _mm256_setzero_ps();
    }
  }
#endif
};
}  // namespace hasten
