// Q8_0: blocks of 32 weights, fp16 scale d then 32 int8 codes; w = d * q.
#pragma once
#include "q8.h"
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

  // q8 path (q8.h): unsigned codes c = q + 128 (q ^ 0x80), offset 128, lane scale d.
  static constexpr int kQ8Kind = kQ8Offset, kQ8CodeOffset = 128;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + g * kBlockBytes;
    for (int j = 0; j < 32; ++j) c[j] = b[2 + j] ^ 0x80;
    s[0] = s[1] = load_half(b);
    m = 0.f;
  }
#ifdef HASTEN_AVX512
  // Blocks 0,1 and 2,3 in one register each, then A = their first 16 codes, B = their last 16.
  // One group of a 16-row tile straight from the blocks (q8.h, row lanes).
  static inline void q8_lanes(const uint8_t* const* row, __m512i rowoff, int64_t g, Q8Lanes& L, int h, Q8LaneScales&) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    rows16_bytes16(row, g * kBlockBytes + 2, L.c[h]);
    rows16_bytes16(row, g * kBlockBytes + 18, L.c[h] + 4);
    for (int k = 0; k < 8; ++k) L.c[h][k] = _mm512_xor_si512(L.c[h][k], flip);
    L.s[h] = low_halves(rows16_dword(row, rowoff, g * kBlockBytes));
  }
  static inline void q8_quad(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
    const uint8_t* b[4];
    __mmask16 live;
    quad_blocks(row, u, G, kBlockBytes, b, live);
    auto two = [](const uint8_t* p, const uint8_t* q) {
      return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2))),
                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 2)), 1);
    };
    const __m512i z01 = two(b[0], b[1]), z23 = two(b[2], b[3]), flip = _mm512_set1_epi8(char(0x80));
    w.a = _mm512_xor_si512(_mm512_shuffle_i64x2(z01, z23, _MM_SHUFFLE(2, 0, 2, 0)), flip);
    w.b = _mm512_xor_si512(_mm512_shuffle_i64x2(z01, z23, _MM_SHUFFLE(3, 1, 3, 1)), flip);
    w.s = halves4(b, 0, live);
  }
#elif defined(HASTEN_AVX2)
  // AVX2's layout (register h: blocks 4u+2h, 4u+2h+1; A: their codes 0-15, B: 16-31), straight from the blocks:
  // q8_group's codes and scales, zero past the row's end, so the same bits.
  static inline void q8_quad(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
    const __m128i flip = _mm_set1_epi8(char(0x80));
    for (int h = 0; h < 2; ++h) {
      __m128i lo[2], hi[2];
      float d[2];
      for (int e = 0; e < 2; ++e) {
        const int64_t g = 4 * u + 2 * h + e;
        if (g < G) {
          const uint8_t* b = row + g * kBlockBytes;
          lo[e] = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)), flip);
          hi[e] = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)), flip);
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
