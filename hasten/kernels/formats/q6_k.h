// Q6_K: super-blocks of 256 weights: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per
// 16 weights), fp16 d; w = (d * scale) * (q - 32). Weights 32s..32s+31 of a super-block (s = 4h + 2i + p) take
// nibble i of bytes ql[64h + 32p + j] and bits 2(s & 3) of qh[32h + j].
#pragma once
#include "q4_k.h"
namespace hasten {
struct Q6_K {
  static constexpr int kBlockWeights = 256, kBlockBytes = 210;
  static inline void prepare(const uint8_t* row, int64_t g, KScales& c) {  // d * scale for each 16 weights
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
#ifdef HASTEN_AVX512
    const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192));
    _mm512_storeu_ps(c.scale, _mm512_mul_ps(_mm512_set1_ps(load_half(b + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc))));
#else
    const float d = load_half(b + 208);
    for (int u = 0; u < 16; ++u) c.scale[u] = d * float(int8_t(b[192 + u]));
#endif
  }
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
  // All 32 codes in one 256-bit register of bytes (16-bit shifts, then byte masks drop the bits that crossed
  // from the neighbouring byte): half the vector operations of widening first.
  static inline void dequant16x2(const uint8_t* row, int64_t g, const KScales& c, __m512& lo, __m512& hi) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int s = int(g & 7), h = s >> 2;
    const uint8_t *ql = b + h * 64 + (s & 1) * 32, *qh = b + 128 + h * 32;
    __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
    if ((s >> 1) & 1) l = _mm256_srli_epi16(l, 4);  // immediate shifts only (a register count costs an extra uop)
    switch (s & 3) {  // bring bits 2(s & 3) .. 2(s & 3) + 1 of each byte to bits 4..5
      case 0: hb = _mm256_slli_epi16(hb, 4); break;
      case 1: hb = _mm256_slli_epi16(hb, 2); break;
      case 2: break;
      default: hb = _mm256_srli_epi16(hb, 2);
    }
    const __m256i nib = _mm256_and_si256(l, _mm256_set1_epi8(15));
    const __m256i high = _mm256_and_si256(hb, _mm256_set1_epi8(0x30));
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nib, high), _mm256_set1_epi8(32));  // int8 -32..31
    lo = _mm512_mul_ps(_mm512_set1_ps(c.scale[2 * s]),
                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))));
    hi = _mm512_mul_ps(_mm512_set1_ps(c.scale[2 * s + 1]),
                       _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))));
  }
#endif

  // q8 path (q8.h): codes c = q (6 bits), offset 32, lane scales d * scale (one per 16 weights: 4 lanes).
  static constexpr int kQ8Kind = kQ8Split, kQ8CodeOffset = 32;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int sb = int(g & 7), h = sb >> 2, shift = ((sb >> 1) & 1) * 4, hshift = (sb & 3) * 2;
    const uint8_t *ql = b + h * 64 + (sb & 1) * 32, *qh = b + 128 + h * 32;
    for (int j = 0; j < 32; ++j) c[j] = uint8_t(((ql[j] >> shift) & 15) | (((qh[j] >> hshift) & 3) << 4));
    const float d = load_half(b + 208);
    s[0] = d * float(int8_t(b[192 + 2 * sb]));
    s[1] = d * float(int8_t(b[193 + 2 * sb]));
    m = 0.f;
  }
#ifdef HASTEN_AVX512
  // One group of a 16-row tile straight from the blocks (q8.h, row lanes); a super-block's 16 scales (d *
  // scale, as prepare) are built at its first group for all 16 rows at once. d is read as the high half of
  // the dword at 206, so nothing past the block is read.
  static inline void q8_lanes(const uint8_t* const* row, __m512i rowoff, int64_t g, Q8Lanes& L, int h, Q8LaneScales& st) {
    const int64_t at = (g >> 3) * kBlockBytes;
    const int sb = int(g & 7);
    if (sb == 0) {
      __m512i v[4];
      rows16_bytes16(row, at + 192, v);
      const __m512 d = high_halves(rows16_dword(row, rowoff, at + 206));
      for (int j = 0; j < 16; ++j)
        st.s[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v[j >> 2], 24 - 8 * (j & 3)), 24)));
    }
    const int half = sb >> 2, shift = ((sb >> 1) & 1) * 4, hshift = (sb & 3) * 2;
    const int64_t ql = at + half * 64 + (sb & 1) * 32, qh = at + 128 + half * 32;
    __m512i lo[8], hi[8];
    rows16_bytes16(row, ql, lo);
    rows16_bytes16(row, ql + 16, lo + 4);
    rows16_bytes16(row, qh, hi);
    rows16_bytes16(row, qh + 16, hi + 4);
    const __m512i f = _mm512_set1_epi8(15), three = _mm512_set1_epi8(3);
    for (int k = 0; k < 8; ++k) {
      const __m512i l = _mm512_and_si512(_mm512_srli_epi16(lo[k], shift), f);
      const __m512i t = _mm512_and_si512(_mm512_srli_epi16(hi[k], hshift), three);
      L.c[h][k] = _mm512_or_si512(l, _mm512_slli_epi16(t, 4));
    }
    L.s[h] = st.s[2 * sb];
    L.s2[h] = st.s[2 * sb + 1];
  }
  // Quad u = sub-blocks 4h .. 4h+3 (h = u&1) of super-block u>>1: 64 bytes of ql (sub-blocks +0, +1: low
  // nibbles of bytes 0-31, 32-63; +2, +3: high nibbles) and 32 of qh (sub-block +j: bits 2j, 2j+1).
  static inline void q8_quad(const uint8_t* row, int64_t u, const KScales& k, Q8W& w) {
    const uint8_t* b = row + (u >> 1) * kBlockBytes;
    const int h = int(u & 1);
    const __m512i v = _mm512_loadu_si512(b + h * 64), f = _mm512_set1_epi8(15);
    const __m512i lo = _mm512_and_si512(v, f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), f);
    // Sub-block +j's two bits to bits 4..5: 16-bit shifts left by 4, 2, 0 and right by 2 (chunk j); bits that
    // cross from a neighbouring byte fall outside 0x30.
    const __m512i left = _mm512_setr_epi32(0x00040004, 0x00040004, 0x00040004, 0x00040004, 0x00020002, 0x00020002,
                                           0x00020002, 0x00020002, 0, 0, 0, 0, 0, 0, 0, 0);
    auto high = [&](const uint8_t* q) {
      const __m512i t = _mm512_sllv_epi16(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), left);
      return _mm512_and_si512(_mm512_mask_srli_epi16(t, __mmask32(0xff000000u), t, 2), _mm512_set1_epi8(0x30));
    };
    const uint8_t* qh = b + 128 + h * 32;
    w.a = _mm512_or_si512(_mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)), high(qh));
    w.b = _mm512_or_si512(_mm512_shuffle_i64x2(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)), high(qh + 16));
    const __m512i idx = _mm512_add_epi32(_mm512_add_epi32(lane_group(), lane_group()), _mm512_set1_epi32(8 * h));
    const __m512 sc = _mm512_loadu_ps(k.scale);
    w.s = _mm512_permutexvar_ps(idx, sc);
    w.s2 = _mm512_permutexvar_ps(_mm512_add_epi32(idx, _mm512_set1_epi32(1)), sc);
  }
#elif defined(HASTEN_AVX2)
  // The same quad in AVX2's layout (register p: sub-blocks 4h+2p, 4h+2p+1 = nibble p of ql bytes 0-31 and
  // 32-63, and bits 4p..4p+3 of qh), straight from the blocks: q8_group's codes and scales, so the same bits.
  static inline void q8_quad(const uint8_t* row, int64_t u, const KScales& k, Q8W& w) {
    const uint8_t* b = row + (u >> 1) * kBlockBytes;
    const int h = int(u & 1);
    const uint8_t *ql = b + h * 64, *qh = b + 128 + h * 32;
    const __m128i f = _mm_set1_epi8(15), top = _mm_set1_epi8(0x30);
    auto load = [](const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); };
    for (int c = 0; c < 2; ++c) {  // c = 0: values 0-15 (A), 1: values 16-31 (B)
      const __m128i l0 = load(ql + 16 * c), l1 = load(ql + 32 + 16 * c), hb = load(qh + 16 * c);
      // sub-block +j's two high bits (bits 2j, 2j+1 of hb) to bits 4..5
      const __m128i h0 = _mm_and_si128(_mm_slli_epi16(hb, 4), top), h1 = _mm_and_si128(_mm_slli_epi16(hb, 2), top);
      const __m128i h2 = _mm_and_si128(hb, top), h3 = _mm_and_si128(_mm_srli_epi16(hb, 2), top);
      const __m256i p0 = _mm256_set_m128i(_mm_or_si128(_mm_and_si128(l1, f), h1), _mm_or_si128(_mm_and_si128(l0, f), h0));
      const __m256i p1 = _mm256_set_m128i(_mm_or_si128(_mm_and_si128(_mm_srli_epi16(l1, 4), f), h3),
                                          _mm_or_si128(_mm_and_si128(_mm_srli_epi16(l0, 4), f), h2));
      (c == 0 ? w.a : w.b)[0] = p0;
      (c == 0 ? w.a : w.b)[1] = p1;
    }
    for (int p = 0; p < 2; ++p) {
      const int s = 4 * h + 2 * p;  // sub-blocks s, s + 1: scales 2s, 2s+1 and 2s+2, 2s+3
      w.s[p] = _mm256_set_m128(_mm_set1_ps(k.scale[2 * s + 2]), _mm_set1_ps(k.scale[2 * s]));
      w.s2[p] = _mm256_set_m128(_mm_set1_ps(k.scale[2 * s + 3]), _mm_set1_ps(k.scale[2 * s + 1]));
      w.m[p] = _mm256_setzero_ps();
    }
  }
#endif
};
}  // namespace hasten
