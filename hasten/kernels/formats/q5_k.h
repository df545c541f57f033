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
  static constexpr int kQ8Kind = kQ8Min, kQ8CodeOffset = 0;
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
  // Q4_K's codes plus high bits: sub-block s + j takes bit s + j of qh bytes 0-15 (A) and 16-31 (B).
  static inline void q8_quad(const uint8_t* row, int64_t u, const KScales& k, Q8W& w) {
    const uint8_t* b = row + (u >> 1) * kBlockBytes;
    const int s = int(4 * (u & 1));
    const __m512i v = _mm512_loadu_si512(b + 48 + (u & 1) * 64), f = _mm512_set1_epi8(15);
    const __m512i lo = _mm512_and_si512(v, f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), f);
    __m512i bits = _mm512_setr_epi32(0x01010101, 0x01010101, 0x01010101, 0x01010101, 0x02020202, 0x02020202, 0x02020202,
                                     0x02020202, 0x04040404, 0x04040404, 0x04040404, 0x04040404, 0x08080808, 0x08080808,
                                     0x08080808, 0x08080808);
    if (s) bits = _mm512_slli_epi32(bits, 4);  // bytes of at most 0x80: nothing crosses into the next byte
    const __m512i ha = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
    const __m512i hb = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 32)));
    const __m512i sixteen = _mm512_set1_epi8(16);
    w.a = _mm512_or_si512(_mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi),
                          _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(ha, bits), sixteen));
    w.b = _mm512_or_si512(_mm512_permutex2var_epi64(lo, _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15), hi),
                          _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(hb, bits), sixteen));
    const __m512i idx = _mm512_add_epi32(lane_group(), _mm512_set1_epi32(s));
    w.s = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(k.scale)));
    w.m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(k.min))));
  }
#endif
};
}  // namespace hasten
