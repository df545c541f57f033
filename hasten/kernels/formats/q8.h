// The q8 path (activations="q8"): each token's activations quantized once per call to int8 per 32-value group
// (llama.cpp's Q8_0: d = max|x| / 127, q = rint(x / d)), then every (token, row) result built from integer dot
// products of the weights' unsigned codes with those int8 codes. What is shared by every format lives here:
// the activation record, its quantizer, and the lane arithmetic; a format's header only says how to get its
// codes and scales (q8_group: scalar, every build; q8_pair: AVX-512).
//
// Why: the fp32 path spends most of its time rebuilding fp32 weights and on 16-lane FMAs; vpdpbusd does 64
// multiply-adds on the codes as they are. A format's weight is w = s * (c - offset) + m for unsigned code c,
// so per group  sum w x = dx * (s * sum (c - offset) q + m * sum q).
//
// The arithmetic, lane by lane (fixed: every build computes these very operations, so the results are bit
// identical between avx512, avx2 and portable, and for a token whatever tile or T it is scored in). Groups go
// in pairs p (groups 2p, 2p+1: 64 values, 16 lanes of 4 values; lanes 0-7 group 2p, 8-15 group 2p+1):
//   isum[l] = corr[l] + sum_{i<4} c[4l+i] * q[4l+i]          exact int32 (corr = -offset * sum of the 4 q)
//   acc[l]  = fma(float(isum[l]), s[l] * d[l], acc[l])       s: the weight scale of the lane, d: the group's dx
//   acc[l]  = fma(m[l], dsum[l], acc[l])                     formats with a min only; dsum = d * sum of the 4 q
//   y       = ((acc[0..7] + acc[8..15]) halved twice more) : the tree of q8_reduce
// An odd last group (K/32 odd) is a pair whose second group has zero codes, scales and mins.
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"

namespace hasten {

// One token's activations, pair by pair: 64 int8 codes, 16 floats d, 16 int32 corr or 16 floats dsum.
constexpr int64_t kQ8PairBytes = 192;
inline int64_t q8_pairs(int64_t K) { return (K / 32 + 1) / 2; }

// A format has a q8 path when its header defines kQ8Offset (the code offset) and kQ8Min (w has a min term).
template <class F, class = void> struct HasQ8 : std::false_type {};
template <class F> struct HasQ8<F, std::void_t<decltype(F::kQ8Offset)>> : std::true_type {};

// x [K] → the record of q8_pairs(K) pairs at out (64-byte aligned). Scalar and exact: max is exact, d and 1/d
// are IEEE divisions, rint rounds half to even (llama.cpp's _MM_ROUND_NEAREST), integer sums are exact, so
// every build gets the same bytes; the compiler vectorises the inner loops well enough for an O(T K) step.
inline void quantize_q8(const float* x, int64_t K, int offset, bool has_min, uint8_t* out) {
  const int64_t G = K / 32;
  for (int64_t p = 0; p < q8_pairs(K); ++p) {
    uint8_t* rec = out + p * kQ8PairBytes;
    int8_t* q = reinterpret_cast<int8_t*>(rec);
    float* d = reinterpret_cast<float*>(rec + 64);
    for (int h = 0; h < 2; ++h) {
      const int64_t g = 2 * p + h;
      float amax = 0.f, dg = 0.f, id = 0.f;
      if (g < G) {
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[g * 32 + j]));
        dg = amax / 127.f;
        id = dg != 0.f ? 1.f / dg : 0.f;
      }
      for (int j = 0; j < 32; ++j) q[32 * h + j] = g < G ? int8_t(std::nearbyint(x[g * 32 + j] * id)) : 0;
      for (int l = 0; l < 8; ++l) d[8 * h + l] = dg;
    }
    for (int l = 0; l < 16; ++l) {
      const int s = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
      if (has_min) reinterpret_cast<float*>(rec + 128)[l] = d[l] * float(s);
      else reinterpret_cast<int32_t*>(rec + 128)[l] = -offset * s;
    }
  }
}

// Weights of one row for one pair, in the build's registers: 64 unsigned codes, 16 lane scales, 16 lane mins.
#if defined(HASTEN_AVX512)
struct Q8W { __m512i c; __m512 s, m; };
using Q8Acc = __m512;
inline Q8Acc q8_zero() { return _mm512_setzero_ps(); }
inline __m512 halves(float a, float b) { return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1); }
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
template <bool kMin>
inline void q8_step(Q8Acc& acc, const Q8W& w, const uint8_t* rec) {
  const __m512i q = _mm512_load_si512(rec);
  const __m512 d = _mm512_load_ps(reinterpret_cast<const float*>(rec + 64));
  const __m512i corr = kMin ? _mm512_setzero_si512() : _mm512_load_si512(rec + 128);
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot_u8s8(corr, w.c, q)), _mm512_mul_ps(w.s, d), acc);
  if (kMin) acc = _mm512_fmadd_ps(w.m, _mm512_load_ps(reinterpret_cast<const float*>(rec + 128)), acc);
}
inline float q8_reduce(Q8Acc a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
// 16 bytes of nibbles at each of p0, p1 → 64 codes [low nibbles p0, high p0, low p1, high p1]: weights 0-31 of
// two Q4_0/Q4_1 blocks in order.
inline __m512i nibbles2(const uint8_t* p0, const uint8_t* p1) {
  const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)), 1);
  const __m256i f = _mm256_set1_epi8(15);
  const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, f)), _mm256_and_si256(_mm256_srli_epi16(v, 4), f), 1);
  return _mm512_shuffle_i64x2(w, w, _MM_SHUFFLE(3, 1, 2, 0));
}
#elif defined(HASTEN_AVX2)
struct Q8W { __m256i c[2]; __m256 s[2], m[2]; };
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
template <bool kMin, bool kWide = false>
inline void q8_step(Q8Acc& acc, const Q8W& w, const uint8_t* rec) {
  for (int h = 0; h < 2; ++h) {
    const __m256i q = _mm256_load_si256(reinterpret_cast<const __m256i*>(rec + 32 * h));
    const __m256 d = _mm256_load_ps(reinterpret_cast<const float*>(rec + 64) + 8 * h);
    const __m256i corr = kMin ? _mm256_setzero_si256() : _mm256_load_si256(reinterpret_cast<const __m256i*>(rec + 128) + h);
    acc.a[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u8s8<kWide>(corr, w.c[h], q)), _mm256_mul_ps(w.s[h], d), acc.a[h]);
    if (kMin) acc.a[h] = _mm256_fmadd_ps(w.m[h], _mm256_load_ps(reinterpret_cast<const float*>(rec + 128) + 8 * h), acc.a[h]);
  }
}
inline float q8_reduce(const Q8Acc& a) {
  const __m256 s8 = _mm256_add_ps(a.a[0], a.a[1]);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#else
struct Q8W { uint8_t c[64]; float s[16], m[16]; };
struct Q8Acc { float a[16]; };
inline Q8Acc q8_zero() { return Q8Acc{}; }
template <bool kMin>
inline void q8_step(Q8Acc& acc, const Q8W& w, const uint8_t* rec) {
  const int8_t* q = reinterpret_cast<const int8_t*>(rec);
  const float* d = reinterpret_cast<const float*>(rec + 64);
  for (int l = 0; l < 16; ++l) {
    int32_t isum = kMin ? 0 : reinterpret_cast<const int32_t*>(rec + 128)[l];
    for (int i = 0; i < 4; ++i) isum += int32_t(w.c[4 * l + i]) * int32_t(q[4 * l + i]);
    acc.a[l] = std::fma(float(isum), w.s[l] * d[l], acc.a[l]);  // std::fma: one rounding, as vfmadd
    if (kMin) acc.a[l] = std::fma(w.m[l], reinterpret_cast<const float*>(rec + 128)[l], acc.a[l]);
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
// AVX2 and portable: a pair's codes and scales from the format's scalar q8_group (codes c[32], lane scales for
// values 0-15 and 16-31, min), then into the build's registers. Groups past the row's last (g >= G) are zero.
template <class F>
inline void q8_pair_from_groups(const uint8_t* row, int64_t p, int64_t G, Q8W& w) {
  alignas(32) uint8_t c[64] = {};
  alignas(32) float s[16] = {}, m[16] = {};
  for (int h = 0; h < 2 && 2 * p + h < G; ++h) {
    float sg[2], mg = 0.f;
    F::q8_group(row, 2 * p + h, c + 32 * h, sg, mg);
    for (int l = 0; l < 8; ++l) {
      s[8 * h + l] = sg[l >> 2];
      m[8 * h + l] = mg;
    }
  }
#if defined(HASTEN_AVX2)
  for (int h = 0; h < 2; ++h) {
    w.c[h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(c + 32 * h));
    w.s[h] = _mm256_load_ps(s + 8 * h);
    w.m[h] = _mm256_load_ps(m + 8 * h);
  }
#else
  std::memcpy(w.c, c, 64);
  std::memcpy(w.s, s, 64);
  std::memcpy(w.m, m, 64);
#endif
}
#endif

}  // namespace hasten
