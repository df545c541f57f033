// Q5_0: blocks of 32 weights: fp16 d, 32 high bits qh (bit j for weight j), 16 bytes of low nibbles;
// w = d * (q - 16) with q = nibble | high bit << 4.
#pragma once
#include "q8.h"
namespace hasten {
struct Q5_0 {
  static constexpr int kBlockWeights = 32, kBlockBytes = 22;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + g * kBlockBytes;
    const float d = load_half(b);
    const uint32_t qh = load_u32(b + 2);
    for (int j = 0; j < 16; ++j) {
      w[j] = d * float(int((b[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
      w[j + 16] = d * float(int((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
    }
  }
#ifdef HASTEN_AVX512
  // 32 distinct weights: two 16-entry tables and vpermt2ps (index bit 4 picks the table).
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* b = row + g * kBlockBytes;
    const __m512 d = _mm512_set1_ps(load_half(b));
    const __m512 t0 = _mm512_mul_ps(d, iota16(-16)), t1 = _mm512_mul_ps(d, iota16(0));
    const uint32_t qh = load_u32(b + 2);
    const __m512i q = bytes16(b + 6), sixteen = _mm512_set1_epi32(16);
    const __m512i ilo = _mm512_or_si512(_mm512_and_si512(q, _mm512_set1_epi32(15)), _mm512_maskz_mov_epi32(__mmask16(qh), sixteen));
    const __m512i ihi = _mm512_or_si512(_mm512_srli_epi32(q, 4), _mm512_maskz_mov_epi32(__mmask16(qh >> 16), sixteen));
    lo = _mm512_permutex2var_ps(t0, ilo, t1);
    hi = _mm512_permutex2var_ps(t0, ihi, t1);
  }
#endif

  // q8 path (q8.h): codes c = q (5 bits), offset 16, lane scale d.
  static constexpr int kQ8Kind = kQ8Offset, kQ8CodeOffset = 16;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + g * kBlockBytes;
    const uint32_t qh = load_u32(b + 2);
    for (int j = 0; j < 16; ++j) {
      c[j] = uint8_t((b[6 + j] & 15) | (((qh >> j) & 1) << 4));
      c[j + 16] = uint8_t((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
    s[0] = s[1] = load_half(b);
    m = 0.f;
  }
#ifdef HASTEN_AVX512
  static inline void q8_quad(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
    const uint8_t* b[4];
    __mmask16 live;
    quad_blocks(row, u, G, kBlockBytes, b, live);
    nibbles4(b, 6, w.a, w.b);
    __mmask64 ha, hb;
    high_bits4(b, 2, ha, hb);
    w.a = _mm512_or_si512(w.a, _mm512_maskz_set1_epi8(ha, 16));
    w.b = _mm512_or_si512(w.b, _mm512_maskz_set1_epi8(hb, 16));
    w.s = halves4(b, 0, live);
  }
#endif
};
}  // namespace hasten
