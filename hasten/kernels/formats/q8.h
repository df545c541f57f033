// The q8 path (activations="q8"): each token's activations quantized once per call to int8 per 32-value group
// (llama.cpp's Q8_0: d = max|x| / 127, q = rint(x / d)), then every (token, row) result built from integer dot
// products of the weights' unsigned codes with those int8 codes. What is shared by every format lives here:
// the activation record, its quantizer, and the lane arithmetic; a format's header only says how to get its
// codes and scales (q8_group: scalar, every build; q8_quad: AVX-512).
//
// Why: the fp32 path spends most of its time rebuilding fp32 weights and on 16-lane FMAs; vpdpbusd does 64
// multiply-adds on the codes as they are. A format's weight is w = s * (c - offset) + m for unsigned code c,
// so per group  sum w x = dx * (s * sum (c - offset) q + m * sum q).
//
// Layout: groups go in quads (groups 4u .. 4u+3, 128 values); a quad's int8 activations are two 64-byte
// vectors, A = values 0-15 of each of the 4 groups and B = values 16-31 of each (16-byte chunk h: group 4u+h).
// Lane l (16 int32 lanes) sums 8 values of group 4u + (l >> 2): A[4l..4l+3] and B[4l..4l+3]. Why this layout:
// Q4_0/Q4_1/Q5 blocks keep weights j and j+16 in one byte, so 4 blocks' low nibbles are A's codes and their
// high nibbles B's, without shuffles; and a lane's 8 products share one scale, so both vpdpbusd go into one
// int32 sum before the fp32 step (one convert, multiply and FMA per 128 values and token).
//
// The arithmetic, lane by lane (fixed: every build computes these very operations, so the results are bit
// identical between avx512, avx2 and portable, and for a token whatever tile or T it is scored in):
//   isum[l] = corr[l] + sum of the lane's 8 code * q products          exact int32 (corr = -offset * sum q)
//   acc[l]  = fma(float(isum[l]), s[l] * d[l], acc[l])                 s: weight scale, d: the group's dx
//   acc[l]  = fma(m[l], dsum[l], acc[l])        formats with a min (kQ8Min); dsum = d * sum of the 8 q
//   Q6_K (kQ8Split: a scale per 16 weights) keeps A and B apart: two such FMAs with corrA and corrB
//   y       = ((acc[0..7] + acc[8..15]) halved twice more): the tree of q8_reduce
// Groups past the row's end (K/32 not a multiple of 4) have zero activations, scales and mins.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"

namespace hasten {

enum Q8Kind { kQ8Offset = 0, kQ8Min = 1, kQ8Split = 2 };  // what a quad record carries beside A, B and d

// One token's record per quad: A [0, 64), B [64, 128) int8; d [128, 192) 16 f32; e1 [192, 256): corr (int32,
// kQ8Offset), dsum (f32, kQ8Min) or corrA (kQ8Split); e2 [256, 320): corrB (kQ8Split only).
inline int64_t q8_quads(int64_t K) { return (K / 32 + 3) / 4; }
inline int64_t q8_record_bytes(int kind) { return kind == kQ8Split ? 320 : 256; }

// A format has a q8 path when its header defines kQ8Kind (and kQ8CodeOffset, the offset its codes carry).
template <class F, class = void> struct HasQ8 : std::false_type {};
template <class F> struct HasQ8<F, std::void_t<decltype(F::kQ8Kind)>> : std::true_type {};

// x [K] → q8_quads(K) records at out (64-byte aligned). Scalar and exact: max is exact, d and 1/d are IEEE
// divisions, rint rounds half to even (llama.cpp's _MM_ROUND_NEAREST), integer sums are exact, so every build
// writes the same bytes; an O(T K) step beside the O(T K N) products.
inline void quantize_q8(const float* x, int64_t K, int offset, int kind, uint8_t* out) {
  const int64_t G = K / 32, stride = q8_record_bytes(kind);
  for (int64_t u = 0; u < q8_quads(K); ++u) {
    uint8_t* rec = out + u * stride;
    int8_t *a = reinterpret_cast<int8_t*>(rec), *b = a + 64;
    float* d = reinterpret_cast<float*>(rec + 128);
    for (int h = 0; h < 4; ++h) {
      const int64_t g = 4 * u + h;
      float amax = 0.f, dg = 0.f, id = 0.f;
      if (g < G) {
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[g * 32 + j]));
        dg = amax / 127.f;
        id = dg != 0.f ? 1.f / dg : 0.f;
      }
      for (int j = 0; j < 16; ++j) {
        a[16 * h + j] = g < G ? int8_t(std::nearbyint(x[g * 32 + j] * id)) : 0;
        b[16 * h + j] = g < G ? int8_t(std::nearbyint(x[g * 32 + 16 + j] * id)) : 0;
      }
      for (int l = 0; l < 4; ++l) d[4 * h + l] = dg;
    }
    for (int l = 0; l < 16; ++l) {
      const int sa = a[4 * l] + a[4 * l + 1] + a[4 * l + 2] + a[4 * l + 3];
      const int sb = b[4 * l] + b[4 * l + 1] + b[4 * l + 2] + b[4 * l + 3];
      if (kind == kQ8Min) {
        reinterpret_cast<float*>(rec + 192)[l] = d[l] * float(sa + sb);
      } else if (kind == kQ8Split) {
        reinterpret_cast<int32_t*>(rec + 192)[l] = -offset * sa;
        reinterpret_cast<int32_t*>(rec + 256)[l] = -offset * sb;
      } else {
        reinterpret_cast<int32_t*>(rec + 192)[l] = -offset * (sa + sb);
      }
    }
  }
}

// One row's weights for one quad, in the build's registers: codes aligned with A and B, lane scales s (s2: for
// B, kQ8Split), lane mins m (kQ8Min).
#if defined(HASTEN_AVX512)
struct Q8W { __m512i a, b; __m512 s, s2, m; };
using Q8Acc = __m512;
inline Q8Acc q8_zero() { return _mm512_setzero_ps(); }
// u8 codes × s8 activations, 4 at a time, into int32 lanes.
inline __m512i dot_u8s8(__m512i acc, __m512i c, __m512i q) {
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, c, q);
#else  // no VNNI (Skylake-X): widen to int16 (maddubs would saturate for 8-bit codes), pair sums, then pairs of pairs
  const __m512i lo = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(c)), _mm512_cvtepi8_epi16(_mm512_castsi512_si256(q)));
  const __m512i hi = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(c, 1)), _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(q, 1)));
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_permutex2var_epi32(lo, even, hi), _mm512_permutex2var_epi32(lo, odd, hi)));
#endif
}
template <int kKind>
inline void q8_step(Q8Acc& acc, const Q8W& w, const uint8_t* rec) {
  const __m512i a = _mm512_load_si512(rec), b = _mm512_load_si512(rec + 64);
  const __m512 d = _mm512_load_ps(reinterpret_cast<const float*>(rec + 128));
  if constexpr (kKind == kQ8Split) {
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8s8(_mm512_load_si512(rec + 192), w.a, a)), _mm512_mul_ps(w.s, d), acc);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8s8(_mm512_load_si512(rec + 256), w.b, b)), _mm512_mul_ps(w.s2, d), acc);
  } else {
    const __m512i corr = kKind == kQ8Min ? _mm512_setzero_si512() : _mm512_load_si512(rec + 192);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8s8(dot_u8s8(corr, w.a, a), w.b, b)), _mm512_mul_ps(w.s, d), acc);
    if (kKind == kQ8Min) acc = _mm512_fmadd_ps(w.m, _mm512_load_ps(reinterpret_cast<const float*>(rec + 192)), acc);
  }
}
inline float q8_reduce(Q8Acc a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
inline __m512i lane_group() { return _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3); }
// The 4 blocks of quad u of a row of 32-weight blocks (G of them): past the row's end, its last block again
// (read, never used: `live` masks the lanes of real groups, and their scales are what is zeroed).
inline void quad_blocks(const uint8_t* row, int64_t u, int64_t G, int64_t bytes, const uint8_t* b[4], __mmask16& live) {
  for (int h = 0; h < 4; ++h) b[h] = row + std::min<int64_t>(4 * u + h, G - 1) * bytes;
  const int64_t n = std::min<int64_t>(4, G - 4 * u);
  live = __mmask16((1u << (4 * n)) - 1);
}
// The fp16 at offset `at` of each of the 4 blocks, as lane values (lanes 4h..4h+3: block h), 0 where not live.
inline __m512 halves4(const uint8_t* const b[4], int at, __mmask16 live) {
  const uint64_t v = uint64_t(load_u16(b[0] + at)) | uint64_t(load_u16(b[1] + at)) << 16 |
                     uint64_t(load_u16(b[2] + at)) << 32 | uint64_t(load_u16(b[3] + at)) << 48;
  const __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128(int64_t(v)));
  return _mm512_maskz_permutexvar_ps(live, lane_group(), _mm512_castps128_ps512(f));
}
// 16 bytes of nibbles at offset `at` of each block: low nibbles (weights 0-15) are A's codes, high ones B's.
inline void nibbles4(const uint8_t* const b[4], int at, __m512i& a, __m512i& hi) {
  __m512i v = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[0] + at)));
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[1] + at)), 1);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[2] + at)), 2);
  v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(b[3] + at)), 3);
  const __m512i f = _mm512_set1_epi8(15);
  a = _mm512_and_si512(v, f);
  hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), f);
}
// The 32 high bits qh at offset `at` of each block (bit j: weight j) as the byte masks of A and B.
inline void high_bits4(const uint8_t* const b[4], int at, __mmask64& ma, __mmask64& mb) {
  uint64_t a = 0, hb = 0;
  for (int h = 0; h < 4; ++h) {
    const uint64_t q = load_u32(b[h] + at);
    a |= (q & 0xffff) << (16 * h);
    hb |= (q >> 16) << (16 * h);
  }
  ma = __mmask64(a);
  mb = __mmask64(hb);
}
#elif defined(HASTEN_AVX2)
// Lanes 8h'..8h'+7 (groups 4u+2h', 4u+2h'+1) in register h' of each pair.
struct Q8W { __m256i a[2], b[2]; __m256 s[2], s2[2], m[2]; };
struct Q8Acc { __m256 a[2]; };
inline Q8Acc q8_zero() { return {{_mm256_setzero_ps(), _mm256_setzero_ps()}}; }
// 32 u8 codes × s8 activations: 8 int32 lanes of 4. maddubs saturates at 8-bit codes (255 * 127 * 2 > 32767),
// so Q8_0 (kWide) widens to int16 first; codes up to 6 bits (63 * 127 * 2 < 32767) take the short way.
template <bool kWide>
inline __m256i dot_u8s8(__m256i acc, __m256i c, __m256i q) {
  if (kWide) {
    const __m256i a = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(c)), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(q)));
    const __m256i b = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(c, 1)), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(q, 1)));
    return _mm256_add_epi32(acc, _mm256_permute4x64_epi64(_mm256_hadd_epi32(a, b), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), _mm256_set1_epi16(1)));
}
template <int kKind, bool kWide = false>
inline void q8_step(Q8Acc& acc, const Q8W& w, const uint8_t* rec) {
  for (int h = 0; h < 2; ++h) {
    const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(rec) + h);
    const __m256i b = _mm256_load_si256(reinterpret_cast<const __m256i*>(rec + 64) + h);
    const __m256 d = _mm256_load_ps(reinterpret_cast<const float*>(rec + 128) + 8 * h);
    const __m256i* e1 = reinterpret_cast<const __m256i*>(rec + 192) + h;
    if constexpr (kKind == kQ8Split) {
      const __m256i* e2 = reinterpret_cast<const __m256i*>(rec + 256) + h;
      acc.a[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8<kWide>(_mm256_load_si256(e1), w.a[h], a)), _mm256_mul_ps(w.s[h], d), acc.a[h]);
      acc.a[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8<kWide>(_mm256_load_si256(e2), w.b[h], b)), _mm256_mul_ps(w.s2[h], d), acc.a[h]);
    } else {
      const __m256i corr = kKind == kQ8Min ? _mm256_setzero_si256() : _mm256_load_si256(e1);
      const __m256i isum = dot_u8s8<kWide>(dot_u8s8<kWide>(corr, w.a[h], a), w.b[h], b);
      acc.a[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(w.s[h], d), acc.a[h]);
      if (kKind == kQ8Min) acc.a[h] = _mm256_fmadd_ps(w.m[h], _mm256_load_ps(reinterpret_cast<const float*>(e1)), acc.a[h]);
    }
  }
}
inline float q8_reduce(const Q8Acc& a) {
  const __m256 s8 = _mm256_add_ps(a.a[0], a.a[1]);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#else
struct Q8W { uint8_t a[64], b[64]; float s[16], s2[16], m[16]; };
struct Q8Acc { float a[16]; };
inline Q8Acc q8_zero() { return Q8Acc{}; }
template <int kKind>
inline void q8_step(Q8Acc& acc, const Q8W& w, const uint8_t* rec) {
  const int8_t *a = reinterpret_cast<const int8_t*>(rec), *b = a + 64;
  const float* d = reinterpret_cast<const float*>(rec + 128);
  const int32_t *c1 = reinterpret_cast<const int32_t*>(rec + 192), *c2 = reinterpret_cast<const int32_t*>(rec + 256);
  for (int l = 0; l < 16; ++l) {
    int32_t ia = 0, ib = 0;
    for (int i = 0; i < 4; ++i) {
      ia += int32_t(w.a[4 * l + i]) * int32_t(a[4 * l + i]);
      ib += int32_t(w.b[4 * l + i]) * int32_t(b[4 * l + i]);
    }
    if (kKind == kQ8Split) {  // std::fma: one rounding, as vfmadd
      acc.a[l] = std::fma(float(c1[l] + ia), w.s[l] * d[l], acc.a[l]);
      acc.a[l] = std::fma(float(c2[l] + ib), w.s2[l] * d[l], acc.a[l]);
    } else {
      acc.a[l] = std::fma(float((kKind == kQ8Min ? 0 : c1[l]) + ia + ib), w.s[l] * d[l], acc.a[l]);
      if (kKind == kQ8Min) acc.a[l] = std::fma(w.m[l], reinterpret_cast<const float*>(rec + 192)[l], acc.a[l]);
    }
  }
}
inline float q8_reduce(const Q8Acc& a) {
  float s8[8], s4[4];
  for (int l = 0; l < 8; ++l) s8[l] = a.a[l] + a.a[l + 8];
  for (int l = 0; l < 4; ++l) s4[l] = s8[l] + s8[l + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}
#endif

#if !defined(HASTEN_AVX512)
// AVX2 and portable: a quad's codes and scales from the format's scalar q8_group (codes c[32] in weight order,
// the scales of weights 0-15 and 16-31, the min), then into the build's registers. Groups g >= G are zero.
template <class F>
inline void q8_quad_from_groups(const uint8_t* row, int64_t u, int64_t G, Q8W& w) {
  alignas(32) uint8_t a[64] = {}, b[64] = {};
  alignas(32) float s[16] = {}, s2[16] = {}, m[16] = {};
  for (int h = 0; h < 4 && 4 * u + h < G; ++h) {
    uint8_t c[32];
    float sg[2], mg = 0.f;
    F::q8_group(row, 4 * u + h, c, sg, mg);
    std::memcpy(a + 16 * h, c, 16);
    std::memcpy(b + 16 * h, c + 16, 16);
    for (int l = 4 * h; l < 4 * h + 4; ++l) {
      s[l] = sg[0];
      s2[l] = sg[1];
      m[l] = mg;
    }
  }
#if defined(HASTEN_AVX2)
  for (int h = 0; h < 2; ++h) {
    w.a[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(a) + h);
    w.b[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(b) + h);
    w.s[h] = _mm256_load_ps(s + 8 * h);
    w.s2[h] = _mm256_load_ps(s2 + 8 * h);
    w.m[h] = _mm256_load_ps(m + 8 * h);
  }
#else
  std::memcpy(w.a, a, 64);
  std::memcpy(w.b, b, 64);
  std::memcpy(w.s, s, 64);
  std::memcpy(w.s2, s2, 64);
  std::memcpy(w.m, m, 64);
#endif
}
#endif

}  // namespace hasten
