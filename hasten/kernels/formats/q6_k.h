// Q6_K: super-blocks of 256 weights: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per
// 16 weights), fp16 d; w = (d * scale) * (q - 32). Weights 32s..32s+31 of a super-block (s = 4h + 2i + p) take
// nibble i of bytes ql[64h + 32p + j] and bits 2(s & 3) of qh[32h + j].
#pragma once
#include "common.h"
namespace hasten {
struct Q6_K {
  static constexpr int kBlockWeights = 256, kBlockBytes = 210;
  static inline void dequant(const uint8_t* row, int64_t g, float* w) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7), h = s >> 2, shift = ((s >> 1) & 1) * 4, hshift = (s & 3) * 2;
    const uint8_t *ql = b + h * 64 + (s & 1) * 32, *qh = b + 128 + h * 32;
    const float d = load_half(b + 208);
    const float d0 = d * float(int8_t(b[192 + 2 * s])), d1 = d * float(int8_t(b[193 + 2 * s]));
    for (int j = 0; j < 32; ++j) {
      const int q = int(((ql[j] >> shift) & 15) | (((qh[j] >> hshift) & 3) << 4)) - 32;
      w[j] = (j < 16 ? d0 : d1) * float(q);
    }
  }
#ifdef HASTEN_AVX512
  static inline void dequant16x2(const uint8_t* row, int64_t g, __m512& lo, __m512& hi) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7), h = s >> 2;
    const unsigned shift = ((s >> 1) & 1) * 4, hshift = (s & 3) * 2;
    const uint8_t *ql = b + h * 64 + (s & 1) * 32, *qh = b + 128 + h * 32;
    const float d = load_half(b + 208);
    const __m512i fifteen = _mm512_set1_epi32(15), three = _mm512_set1_epi32(3), off = _mm512_set1_epi32(32);
    auto codes = [&](const uint8_t* l, const uint8_t* hb) {
      const __m512i nib = _mm512_and_si512(_mm512_srli_epi32(bytes16(l), shift), fifteen);
      const __m512i high = _mm512_slli_epi32(_mm512_and_si512(_mm512_srli_epi32(bytes16(hb), hshift), three), 4);
      return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(nib, high), off));
    };
    lo = _mm512_mul_ps(_mm512_set1_ps(d * float(int8_t(b[192 + 2 * s]))), codes(ql, qh));
    hi = _mm512_mul_ps(_mm512_set1_ps(d * float(int8_t(b[193 + 2 * s]))), codes(ql + 16, qh + 16));
  }
#endif
};
}  // namespace hasten
