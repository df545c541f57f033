// Q4_K: super-blocks of 256 weights = 8 sub-blocks of 32: fp16 d and dmin, 12 bytes of 6-bit sub-block scales
// and mins, 128 bytes of 4-bit codes (sub-blocks 2i and 2i+1 share 32 bytes: low and high nibbles);
// w = (d * sc) * q - (dmin * m).
#pragma once
#include "q8.h"
namespace hasten {
// A super-block's 8 sub-block scales and mins, decoded once for its 8 groups (the AVX-512 path).
struct KScales {
  float scale[16], min[8];
};

struct Q4_K {
  static constexpr int kBlockWeights = 256, kBlockBytes = 144;
  static inline void prepare(const uint8_t* row, int64_t g, KScales& c) { prepare_k(row + (g >> 3) * kBlockBytes, c); }
  // All 8 scales and mins of the super-block at b at once: the 6-bit fields unpacked with 32-bit masks (four at
  // a time), then d * sc and dmin * m, 8 lanes each: the values k_scale_min gives, one vector op each.
  static inline void prepare_k(const uint8_t* b, KScales& c) {
    uint32_t u[3];
    std::memcpy(u, b + 4, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    const uint32_t sc[2] = {u[0] & six, (u[2] & four) | (((u[0] >> 6) & two) << 4)};
    const uint32_t mn[2] = {u[1] & six, ((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4)};
#ifdef HASTEN_AVX512
    auto widen = [](const uint32_t* p) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    };
    _mm256_storeu_ps(c.scale, _mm256_mul_ps(_mm256_set1_ps(load_half(b)), widen(sc)));
    _mm256_storeu_ps(c.min, _mm256_mul_ps(_mm256_set1_ps(load_half(b + 2)), widen(mn)));
#else
    const float d = load_half(b), dmin = load_half(b + 2);
    for (int j = 0; j < 8; ++j) {
      c.scale[j] = d * float((sc[j >> 2] >> (8 * (j & 3))) & 0xff);
      c.min[j] = dmin * float((mn[j >> 2] >> (8 * (j & 3))) & 0xff);
    }
#endif
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
    const __m512 table = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(c.scale[s]), iota16(0)), _mm512_set1_ps(c.min[s]));
    const uint8_t* q = b + 16 + (s >> 1) * 32;
    __m512i ql = bytes16(q), qh = bytes16(q + 16);
    if (s & 1) {  // high nibbles; low ones need no shift: vpermps reads only the index's low 4 bits.
      ql = _mm512_srli_epi32(ql, 4);  // immediate shifts: a shift by a register count costs an extra uop
      qh = _mm512_srli_epi32(qh, 4);
    }
    lo = _mm512_permutexvar_ps(ql, table);
    hi = _mm512_permutexvar_ps(qh, table);
  }
#endif

  // q8 path (q8.h): codes c = q, no offset, lane scale d * sc, min -(dmin * m). A pair is sub-blocks 2i, 2i+1:
  // the low and high nibbles of the same 32 bytes.
  static constexpr int kQ8Kind = kQ8Min, kQ8CodeOffset = 0;
  static inline void q8_group(const uint8_t* row, int64_t g, uint8_t* c, float* s, float& m) {
    const uint8_t* b = row + (g >> 3) * kBlockBytes;
    const int sb = int(g & 7), shift = (sb & 1) * 4;
    float scale, min;
    scale_min(b, sb, scale, min);
    const uint8_t* q = b + 16 + (sb >> 1) * 32;
    for (int j = 0; j < 32; ++j) c[j] = (q[j] >> shift) & 15;
    s[0] = s[1] = scale;
    m = -min;
  }
#ifdef HASTEN_AVX512
  // One group of a 16-row tile straight from the blocks (q8.h, row lanes); a super-block's scales and mins are
  // unpacked at its first group for all 16 rows at once (prepare_k's fields, as lanes: the same values).
  static inline void q8_lanes(const uint8_t* const* row, __m512i, int64_t g, Q8Lanes& L, int h, Q8LaneScales& st) {
    const int64_t at = (g >> 3) * kBlockBytes;
    const int sb = int(g & 7);
    if (sb == 0) {
      __m512i v[4];  // d | dmin, then the 12 bytes of 6-bit fields
      rows16_bytes16(row, at, v);
      const __m512 d = low_halves(v[0]), dmin = high_halves(v[0]);
      const __m512i six = _mm512_set1_epi32(63), four = _mm512_set1_epi32(15), two = _mm512_set1_epi32(3);
      auto field = [](__m512i x, int shift, __m512i mask) { return _mm512_and_si512(_mm512_srli_epi32(x, shift), mask); };
      for (int j = 0; j < 4; ++j) {
        const int b = 8 * j;
        const __m512i sc = field(v[1], b, six), mn = field(v[2], b, six);
        const __m512i sc4 = _mm512_or_si512(field(v[3], b, four), _mm512_slli_epi32(field(v[1], b + 6, two), 4));
        const __m512i mn4 = _mm512_or_si512(field(v[3], b + 4, four), _mm512_slli_epi32(field(v[2], b + 6, two), 4));
        st.s[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
        st.s[j + 4] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc4));
        st.m[j] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn)));
        st.m[j + 4] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn4)));
      }
    }
    __m512i v[8];
    rows16_bytes16(row, at + 16 + 32 * (sb >> 1), v);
    rows16_bytes16(row, at + 32 + 32 * (sb >> 1), v + 4);
    const __m512i f = _mm512_set1_epi8(15);
    for (int k = 0; k < 8; ++k) L.c[h][k] = _mm512_and_si512(sb & 1 ? _mm512_srli_epi16(v[k], 4) : v[k], f);
    L.s[h] = st.s[sb];
    L.m[h] = st.m[sb];
  }
  // Quad u = sub-blocks 4(u&1) .. +3 of super-block u>>1: 64 bytes of codes, [sub-blocks s, s+1 | s+2, s+3] as
  // [low | high] nibbles of 32 bytes each; A and B pick their 16-byte halves.
  static inline void q8_quad(const uint8_t* row, int64_t u, const KScales& k, Q8W& w) {
    const uint8_t* b = row + (u >> 1) * kBlockBytes;
    const int s = int(4 * (u & 1));
    const __m512i v = _mm512_loadu_si512(b + 16 + (u & 1) * 64), f = _mm512_set1_epi8(15);
    const __m512i lo = _mm512_and_si512(v, f), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), f);
    w.a = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi);
    w.b = _mm512_permutex2var_epi64(lo, _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15), hi);
    const __m512i idx = _mm512_add_epi32(lane_group(), _mm512_set1_epi32(s));
    w.s = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(k.scale)));
    w.m = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(_mm256_loadu_ps(k.min))));
  }
#elif defined(HASTEN_AVX2)
  // The same quad in AVX2's layout (register h: groups 4u+2h, 4u+2h+1 = sub-blocks s+2h, s+2h+1, the low and
  // high nibbles of bytes 32h..32h+31), straight from the blocks instead of q8_group's scalar codes: the same
  // codes, scales and mins (m = -min, as q8_group), so the same bits.
  static inline void q8_quad(const uint8_t* row, int64_t u, const KScales& k, Q8W& w) {
    const uint8_t* q = row + (u >> 1) * kBlockBytes + 16 + (u & 1) * 64;
    const int s = int(4 * (u & 1));
    const __m128i f = _mm_set1_epi8(15);
    for (int h = 0; h < 2; ++h) {
      const __m128i va = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * h));
      const __m128i vb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 32 * h + 16));
      w.a[h] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(va, 4), f), _mm_and_si128(va, f));
      w.b[h] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(vb, 4), f), _mm_and_si128(vb, f));
      const int g = s + 2 * h;
      w.s[h] = _mm256_set_m128(_mm_set1_ps(k.scale[g + 1]), _mm_set1_ps(k.scale[g]));
      w.m[h] = _mm256_set_m128(_mm_set1_ps(-k.min[g + 1]), _mm_set1_ps(-k.min[g]));
    }
  }
#endif
};
}  // namespace hasten
