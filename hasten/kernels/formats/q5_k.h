// Q5_K: Q4_K's super-block plus 32 bytes of high bits (bit s of byte j: weight j of sub-block s);
// w = (d * sc) * q - (dmin * m) with q = nibble | high bit << 4.
#pragma once
#include "q4_k.h"
namespace hasten {
struct Q5_K {
  static constexpr int kBlockWeights = 256, kBlockBytes = 176;
  static inline void prepare(const uint8_t* row, int64_t g, KScales& c) { Q4_K::prepare_k(row + (g >> 3) * kBlockBytes, c); }
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7), shift = (s & 1) * 4;
    float scale, min;
    Q4_K::scale_min(b, s, scale, min);
    const uint8_t *qh = b + 16, *q = b + 48 + (s >> 1) * 32;
    for (int j = 0; j < 32; ++j) w[j] = scale * float(((q[j] >> shift) & 15) | (((qh[j] >> s) & 1) << 4)) - min;
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, const KScales& c, __m512& lo, __m512& hi) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7);
    const __m512 sv = _mm512_set1_ps(c.scale[s]), mv = _mm512_set1_ps(c.min[s]);
    const __m512 t0 = _mm512_sub_ps(_mm512_mul_ps(sv, iota16(0)), mv), t1 = _mm512_sub_ps(_mm512_mul_ps(sv, iota16(16)), mv);
    const uint8_t *qh = b + 16, *q = b + 48 + (s >> 1) * 32;
    const __m512i fifteen = _mm512_set1_epi32(15), sixteen = _mm512_set1_epi32(16), bit = _mm512_set1_epi32(1 << s);
    auto index = [&](const uint8_t* ql, const uint8_t* h) {
      __m512i v = bytes16(ql);
      if (s & 1) v = _mm512_srli_epi32(v, 4);  // immediate shifts only (a register count costs an extra uop)
      const __mmask16 high = _mm512_test_epi32_mask(bytes16(h), bit);
      return _mm512_mask_or_epi32(_mm512_and_si512(v, fifteen), high, _mm512_and_si512(v, fifteen), sixteen);
    };
    lo = _mm512_permutex2var_ps(t0, index(q, qh), t1);
    hi = _mm512_permutex2var_ps(t0, index(q + 16, qh + 16), t1);
  }
#endif

  // q8 path (q8.h): codes c = q (5 bits), no offset, lane scale d * sc, min -(dmin * m).
  static constexpr int kQ8Offset = 0;
  static constexpr bool kQ8Min = true;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int sb = int(g & 7), shift = (sb & 1) * 4;
    float scale, min;
    Q4_K::scale_min(b, sb, scale, min);
    const uint8_t *qh = b + 16, *q = b + 48 + (sb >> 1) * 32;
    for (int j = 0; j < 32; ++j) c[j] = uint8_t(((q[j] >> shift) & 15) | (((qh[j] >> sb) & 1) << 4));
    s[0] = s[1] = scale;
    m = -min;
  }
#ifdef HASTEN_AVX512
  // Sub-blocks s, s+1 take bits s, s+1 of the same 32 qh bytes: a 16-bit shift by s (bits from the next byte
  // land above bit 1) and one byte test for both.
  static inline void q8_pair(const uint8_t* row, int64_t p, const KScales& k, Q8W& w) {
    const uint8_t* b = row + (p >> 2) * kBlockBytes;
    const int s = int(2 * (p & 3));
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 48 + (p & 3) * 32)), f = _mm256_set1_epi8(15);
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16));
    switch (s) {  // immediate shifts (a register count costs an extra uop)
      case 0: break;
      case 2: h = _mm256_srli_epi16(h, 2); break;
      case 4: h = _mm256_srli_epi16(h, 4); break;
      default: h = _mm256_srli_epi16(h, 6);
    }
    const __mmask64 high = _mm512_test_epi8_mask(_mm512_broadcast_i64x4(h),
        _mm512_inserti64x4(_mm512_set1_epi8(1), _mm256_set1_epi8(2), 1));
    const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, f)), _mm256_and_si256(_mm256_srli_epi16(v, 4), f), 1);
    w.c = _mm512_or_si512(c, _mm512_maskz_set1_epi8(high, 16));
    w.s = halves(k.scale[s], k.scale[s + 1]);
    w.m = halves(-k.min[s], -k.min[s + 1]);
  }
#endif
};
}  // namespace hasten
