// The q8 path (activations="q8"): each token's activations quantized once per call to int8 per 32-value group
// (llama.cpp's Q8_0: d = max|x| / 127, q = rint(x / d)), then every (token, row) result built from integer dot
// products of the weights' unsigned codes with those int8 codes. What is shared by every format lives here:
// the activation record, its quantizer, and the lane arithmetic; a format's header only says how to get its
// codes and scales (q8_group: scalar, every build; q8_quad: one row's 4 groups in the build's registers).
//
// Why: the fp32 path spends most of its time rebuilding fp32 weights and on 16-lane FMAs; vpdpbusd does 64
// multiply-adds on the codes as they are. A format's weight is w = s * (c - offset) + m for unsigned code c,
// so per group  sum w x = dx * (s * sum (c - offset) q + m * sum q).
//
// Layout ("row lanes"): a vector lane is a row. A tile takes kQ8Lanes rows (16 in AVX-512, 8 in AVX2, 1
// portable); each row's quad of groups comes from the format's q8_quad (A = values 0-15 of each of 4 groups,
// B = values 16-31), and the tile transposes them in registers so that vector k of group g holds, in lane r,
// values 4k..4k+3 of row r. A token's 4 activation bytes are then one broadcast operand of vpdpbusd for all
// the rows, and a lane sums the whole group: one convert, multiply and FMA per group, token and 16 rows (the
// quad layout before it paid them per 8 values, 6 vector operations per 128 multiply-adds; this pays ~3).
// One to three tokens (decode) take cpu.cpp's q8_dot_tile instead: each row's integer sums in the quad layout
// against the token, then added up per group across 16 rows (group_sums16) into the same row lanes, where the
// same fp32 combination runs. The sums are exact integers, so both give the same bits.
//
// The arithmetic, per (row, token), groups g = 0 .. K/32 - 1 in order (fixed: every build computes these
// very operations, so the results are bit identical between avx512, avx2 and portable, and for a token
// whatever tile or T it is scored in):
//   isum  = corr + sum of the group's 32 code * q products              exact int32 (corr = -offset * sum q)
//   acc   = fma(float(isum), s * d, acc)                                s: weight scale, d: the group's dx
//   acc   = fma(m, dsum, acc)                   formats with a min (kQ8Min); dsum = d * sum of the 32 q
//   Q6_K (kQ8Split: a scale per 16 weights) sums values 0-15 and 16-31 apart: two such FMAs, corrA and corrB
//   y     = acc
#pragma once
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common.h"

namespace hasten {

enum Q8Kind { kQ8Offset = 0, kQ8Min = 1, kQ8Split = 2 };  // what a group record carries beside q and d

// One token's record per group, kQ8GroupBytes each: q [0, 32) int8; d at 32 (f32); e1 at 36: corr (int32,
// kQ8Offset), dsum (f32, kQ8Min) or corrA (kQ8Split); e2 at 40: corrB (kQ8Split only).
constexpr int64_t kQ8GroupBytes = 48;
inline int64_t q8_quads(int64_t K) { return (K / 32 + 3) / 4; }
inline int64_t q8_record_bytes(int64_t K) { return (K / 32) * kQ8GroupBytes; }

// A format has a q8 path when its header defines kQ8Kind (and kQ8CodeOffset, the offset its codes carry).
template <class F, class = void> struct HasQ8 : std::false_type {};
template <class F> struct HasQ8<F, std::void_t<decltype(F::kQ8Kind)>> : std::true_type {};

// x [K] -> K/32 group records at out. Scalar and exact: max is exact, d and 1/d are IEEE divisions, rint
// rounds half to even (llama.cpp's _MM_ROUND_NEAREST), integer sums are exact, so every build writes the same
// bytes; an O(T K) step beside the O(T K N) products.
inline void quantize_q8(const float* x, int64_t K, int offset, int kind, uint8_t* out) {
  for (int64_t g = 0; g < K / 32; ++g) {
    uint8_t* rec = out + g * kQ8GroupBytes;
    int8_t* q = reinterpret_cast<int8_t*>(rec);
    const float* xg = x + g * 32;
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xg[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    int sa = 0, sb = 0;
    for (int j = 0; j < 32; ++j) {
      q[j] = int8_t(std::nearbyint(xg[j] * id));
      (j < 16 ? sa : sb) += q[j];
    }
    float* f = reinterpret_cast<float*>(rec + 32);
    int32_t* e = reinterpret_cast<int32_t*>(rec + 36);
    f[0] = d;
    if (kind == kQ8Min) {
      f[1] = d * float(sa + sb);
      e[1] = 0;
    } else if (kind == kQ8Split) {
      e[0] = -offset * sa;
      e[1] = -offset * sb;
    } else {
      e[0] = -offset * (sa + sb);
      e[1] = 0;
    }
  }
}
inline float rec_d(const uint8_t* rec) { return reinterpret_cast<const float*>(rec + 32)[0]; }
inline float rec_dsum(const uint8_t* rec) { return reinterpret_cast<const float*>(rec + 32)[1]; }
inline int32_t rec_e1(const uint8_t* rec) { return reinterpret_cast<const int32_t*>(rec + 36)[0]; }
inline int32_t rec_e2(const uint8_t* rec) { return reinterpret_cast<const int32_t*>(rec + 36)[1]; }
inline int32_t rec_q4(const uint8_t* rec, int k) { int32_t v; std::memcpy(&v, rec + 4 * k, 4); return v; }

// One row's weights for one quad, in the build's registers (as a format's q8_quad writes them): codes aligned
// with A and B, lane scales s (s2: for B, kQ8Split), lane mins m (kQ8Min); lane 4h .. 4h+3: group 4u + h.
#if defined(HASTEN_AVX512)
struct Q8W { __m512i a, b; __m512 s, s2, m; };
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
// kQ8Lanes rows' quad, transposed: c[h][k] lane r = values 4k..4k+3 of group 4u+h of row r; s, s2, m: lane r
// = that row's scale (of values 16-31: s2), min.
constexpr int kQ8Lanes = 16;
using Q8Acc = __m512;
inline Q8Acc q8_zero() { return _mm512_setzero_ps(); }
struct Q8Lanes { __m512i c[4][8]; __m512 s[4], s2[4], m[4]; };
// v[16] -> v[j] lane r = old v[r] lane j: 4 rounds of 16 two-source shuffles.
inline void transpose16(__m512i* v) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  __m512i s[16];  // s[4i + c], 128-bit lane L: rows 4i..4i+3 of dword 4L + c
  for (int i = 0; i < 4; ++i) {
    s[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    s[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i u0 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(s[c], s[4 + c], 0xEE);
    const __m512i u2 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0x44), u3 = _mm512_shuffle_i32x4(s[8 + c], s[12 + c], 0xEE);
    v[c] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    v[4 + c] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
    v[8 + c] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    v[12 + c] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
  }
}
// 16 rows' lane scales (lanes 4h .. 4h+3 all group h's) -> out[h] lane r = row r's scale of group h: rows
// 4i .. 4i+3 blended into one vector (lane 4h + j from row 4i + j), then a 4 x 4 transpose of 128-bit chunks.
// in[j] chunk c (128 bits) -> out[c] chunk j: a 4 x 4 transpose of 128-bit chunks.
inline void transpose_chunks4(const __m512i* in, __m512i* out) {
  const __m512i u0 = _mm512_shuffle_i32x4(in[0], in[1], 0x44), u1 = _mm512_shuffle_i32x4(in[0], in[1], 0xEE);
  const __m512i u2 = _mm512_shuffle_i32x4(in[2], in[3], 0x44), u3 = _mm512_shuffle_i32x4(in[2], in[3], 0xEE);
  out[0] = _mm512_shuffle_i32x4(u0, u2, 0x88);
  out[1] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
  out[2] = _mm512_shuffle_i32x4(u1, u3, 0x88);
  out[3] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
}
// v[r]: row r's lane scales (lane 4h: group h) -> out[h] lane r = row r's scale of group h.
inline void scales16(const __m512* v16, __m512* out) {
  __m512i v[4], o[4];
  for (int i = 0; i < 4; ++i) {
    __m512 x = v16[4 * i];
    x = _mm512_mask_mov_ps(x, __mmask16(0x2222), v16[4 * i + 1]);
    x = _mm512_mask_mov_ps(x, __mmask16(0x4444), v16[4 * i + 2]);
    x = _mm512_mask_mov_ps(x, __mmask16(0x8888), v16[4 * i + 3]);
    v[i] = _mm512_castps_si512(x);
  }
  transpose_chunks4(v, o);
  for (int h = 0; h < 4; ++h) out[h] = _mm512_castsi512_ps(o[h]);
}
inline void scales16(const Q8W* w, __m512 Q8W::*f, __m512* out) {
  __m512 v[16];
  for (int r = 0; r < 16; ++r) v[r] = w[r].*f;
  scales16(v, out);
}
// v[r]: row r's int32 partial sums in the quad layout (lanes 4h..4h+3: group h) -> out[h] lane r = the sum of
// row r's group h. Integer adds, exact in any order: the same sums as q8_lanes_step's chains.
inline void group_sums16(const __m512i* v, __m512i* out) {
  __m512i p[8], q[4];
  for (int i = 0; i < 8; ++i)  // lanes of rows 2i, 2i+1 interleaved, pairs of dwords added
    p[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j)  // chunk h of q[j]: the sums of rows 4j .. 4j+3 for group h
    q[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * j], p[2 * j + 1]), _mm512_unpackhi_epi64(p[2 * j], p[2 * j + 1]));
  transpose_chunks4(q, out);
}
// One token's q values for quad u (rec: its record of group 4u) in the quad layout: chunk h of xa = values
// 0-15 of group 4u+h, of xb = values 16-31; zero for the live..3 groups past the row's end.
inline void quad_acts(const uint8_t* rec, int64_t live, __m512i& xa, __m512i& xb) {
  auto ld = [&](int h, int at) {
    return h < live ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + h * kQ8GroupBytes + at)) : _mm_setzero_si128();
  };
  for (int at = 0; at < 32; at += 16) {
    __m512i x = _mm512_castsi128_si512(ld(0, at));
    x = _mm512_inserti32x4(x, ld(1, at), 1);
    x = _mm512_inserti32x4(x, ld(2, at), 2);
    x = _mm512_inserti32x4(x, ld(3, at), 3);
    (at ? xb : xa) = x;
  }
}
// w[r] (one row's quad each) -> the transposed tile. Lane 4h of a row's s, s2, m is group h's.
template <int kKind>
inline void q8_transpose(const Q8W* w, Q8Lanes& L) {
  __m512i a[16], b[16];
  for (int r = 0; r < 16; ++r) {
    a[r] = w[r].a;
    b[r] = w[r].b;
  }
  transpose16(a);
  transpose16(b);
  for (int h = 0; h < 4; ++h)
    for (int k = 0; k < 4; ++k) {
      L.c[h][k] = a[4 * h + k];
      L.c[h][4 + k] = b[4 * h + k];
    }
  scales16(w, &Q8W::s, L.s);
  if (kKind == kQ8Split) scales16(w, &Q8W::s2, L.s2);
  if (kKind == kQ8Min) scales16(w, &Q8W::m, L.m);
}
// Formats whose blocks are 32 weights can fill a group of the tile straight from the 16 rows' blocks
// (q8_lanes: no per-row quad, no 16 x 16 transpose; decode reads each weight once, so this is its cost).
template <class F, class = void> struct HasQ8Lanes : std::false_type {};
template <class F> struct HasQ8Lanes<F, std::void_t<decltype(&F::q8_lanes)>> : std::true_type {};
// What a super-block format keeps from its first group for the other 7 (16 rows' scales and mins as lanes).
struct Q8LaneScales { __m512 s[16], m[8]; };
// The 16 bytes at `off` of each of the 16 rows -> v[k] lane r = bytes 4k .. 4k+3 of row r's: four rows per
// register (128-bit chunk c of m[e]: row 4c + e), then a 4 x 4 transpose of dwords inside each chunk.
inline void rows16_bytes16(const uint8_t* const* row, int64_t off, __m512i* v) {
  auto load = [&](int r) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + off)); };
  __m512i m[4];
  for (int e = 0; e < 4; ++e) {
    __m512i x = _mm512_castsi128_si512(load(e));
    x = _mm512_inserti32x4(x, load(4 + e), 1);
    x = _mm512_inserti32x4(x, load(8 + e), 2);
    m[e] = _mm512_inserti32x4(x, load(12 + e), 3);
  }
  const __m512i t0 = _mm512_unpacklo_epi32(m[0], m[1]), t1 = _mm512_unpackhi_epi32(m[0], m[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(m[2], m[3]), t3 = _mm512_unpackhi_epi32(m[2], m[3]);
  v[0] = _mm512_unpacklo_epi64(t0, t2);
  v[1] = _mm512_unpackhi_epi64(t0, t2);
  v[2] = _mm512_unpacklo_epi64(t1, t3);
  v[3] = _mm512_unpackhi_epi64(t1, t3);
}
// The 4 bytes at `off` of each row (rowoff: the rows' byte offsets from row[0]) as lane r.
inline __m512i rows16_dword(const uint8_t* const* row, __m512i rowoff, int64_t off) {
  return _mm512_i32gather_epi32(_mm512_add_epi32(rowoff, _mm512_set1_epi32(int32_t(off))), row[0], 1);
}
// fp16 in the low (high) half of each lane -> f32.
inline __m512 low_halves(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(v)); }
inline __m512 high_halves(__m512i v) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16))); }
// 16 bytes of nibbles per row (weights j and j + 16 in byte j) -> the group's 8 code vectors.
inline void nibbles_lanes(const uint8_t* const* row, int64_t off, __m512i* c) {
  __m512i v[4];
  rows16_bytes16(row, off, v);
  const __m512i f = _mm512_set1_epi8(15);
  for (int k = 0; k < 4; ++k) {
    c[k] = _mm512_and_si512(v[k], f);
    c[4 + k] = _mm512_and_si512(_mm512_srli_epi16(v[k], 4), f);
  }
}
// acc (kQ8Lanes rows, one token) += group h of the tile against the token's record of that group.
template <int kKind, bool kWide = false>
inline Q8Acc q8_lanes_step(Q8Acc acc, const Q8Lanes& L, int h, const uint8_t* rec) {
  const __m512 d = _mm512_set1_ps(rec_d(rec));
  auto dot = [&](__m512i sum, int k) { return dot_u8s8(sum, L.c[h][k], _mm512_set1_epi32(rec_q4(rec, k))); };
  if constexpr (kKind == kQ8Split) {
    __m512i ia = _mm512_set1_epi32(rec_e1(rec)), ib = _mm512_set1_epi32(rec_e2(rec));
    for (int k = 0; k < 4; ++k) ia = dot(ia, k);
    for (int k = 4; k < 8; ++k) ib = dot(ib, k);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), _mm512_mul_ps(L.s[h], d), acc);
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(ib), _mm512_mul_ps(L.s2[h], d), acc);
  } else {
    __m512i ia = kKind == kQ8Min ? _mm512_setzero_si512() : _mm512_set1_epi32(rec_e1(rec)), ib = _mm512_setzero_si512();
    for (int k = 0; k < 4; ++k) ia = dot(ia, k);  // two chains: integer sums are exact in any order
    for (int k = 4; k < 8; ++k) ib = dot(ib, k);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(ia, ib)), _mm512_mul_ps(L.s[h], d), acc);
    if constexpr (kKind == kQ8Min) acc = _mm512_fmadd_ps(L.m[h], _mm512_set1_ps(rec_dsum(rec)), acc);
    return acc;
  }
}
inline void q8_store(float* y, Q8Acc acc, int n) {
  if (n == kQ8Lanes) _mm512_storeu_ps(y, acc);
  else _mm512_mask_storeu_ps(y, __mmask16((1u << n) - 1), acc);
}
#elif defined(HASTEN_AVX2)
// Lanes 8h'..8h'+7 (groups 4u+2h', 4u+2h'+1) in register h' of each pair.
struct Q8W { __m256i a[2], b[2]; __m256 s[2], s2[2], m[2]; };
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
constexpr int kQ8Lanes = 8;
using Q8Acc = __m256;
inline Q8Acc q8_zero() { return _mm256_setzero_ps(); }
struct Q8Lanes { __m256i c[4][8]; __m256 s[4], s2[4], m[4]; };
// v[8] -> v[j] lane r = old v[r] lane j.
inline void transpose8(__m256i* v) {
  __m256i t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    s[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    s[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    s[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // s[c] 128-bit half L: rows 0-3 of dword 4L + c; s[4 + c]: rows 4-7
    v[c] = _mm256_permute2x128_si256(s[c], s[4 + c], 0x20);
    v[4 + c] = _mm256_permute2x128_si256(s[c], s[4 + c], 0x31);
  }
}
// AVX2's Q8W: register p holds groups 4u+2p (lanes 0-3) and 4u+2p+1 (lanes 4-7).
template <int kKind>
inline void q8_transpose(const Q8W* w, Q8Lanes& L) {
  for (int p = 0; p < 2; ++p) {
    __m256i a[8], b[8], s[8], s2[8], m[8];
    for (int r = 0; r < 8; ++r) {
      a[r] = w[r].a[p];
      b[r] = w[r].b[p];
      s[r] = _mm256_castps_si256(w[r].s[p]);
      if (kKind == kQ8Split) s2[r] = _mm256_castps_si256(w[r].s2[p]);
      if (kKind == kQ8Min) m[r] = _mm256_castps_si256(w[r].m[p]);
    }
    transpose8(a);
    transpose8(b);
    transpose8(s);
    if (kKind == kQ8Split) transpose8(s2);
    if (kKind == kQ8Min) transpose8(m);
    for (int e = 0; e < 2; ++e) {
      const int h = 2 * p + e;
      for (int k = 0; k < 4; ++k) {
        L.c[h][k] = a[4 * e + k];
        L.c[h][4 + k] = b[4 * e + k];
      }
      L.s[h] = _mm256_castsi256_ps(s[4 * e]);
      if (kKind == kQ8Split) L.s2[h] = _mm256_castsi256_ps(s2[4 * e]);
      if (kKind == kQ8Min) L.m[h] = _mm256_castsi256_ps(m[4 * e]);
    }
  }
}
template <int kKind, bool kWide = false>
inline Q8Acc q8_lanes_step(Q8Acc acc, const Q8Lanes& L, int h, const uint8_t* rec) {
  const __m256 d = _mm256_set1_ps(rec_d(rec));
  auto dot = [&](__m256i sum, int k) { return dot_u8s8<kWide>(sum, L.c[h][k], _mm256_set1_epi32(rec_q4(rec, k))); };
  if constexpr (kKind == kQ8Split) {
    __m256i ia = _mm256_set1_epi32(rec_e1(rec)), ib = _mm256_set1_epi32(rec_e2(rec));
    for (int k = 0; k < 4; ++k) ia = dot(ia, k);
    for (int k = 4; k < 8; ++k) ib = dot(ib, k);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_mul_ps(L.s[h], d), acc);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_mul_ps(L.s2[h], d), acc);
  } else {
    __m256i ia = kKind == kQ8Min ? _mm256_setzero_si256() : _mm256_set1_epi32(rec_e1(rec)), ib = _mm256_setzero_si256();
    for (int k = 0; k < 4; ++k) ia = dot(ia, k);
    for (int k = 4; k < 8; ++k) ib = dot(ib, k);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(ia, ib)), _mm256_mul_ps(L.s[h], d), acc);
    if constexpr (kKind == kQ8Min) acc = _mm256_fmadd_ps(L.m[h], _mm256_set1_ps(rec_dsum(rec)), acc);
    return acc;
  }
}
inline void q8_store(float* y, Q8Acc acc, int n) {
  alignas(32) float v[8];
  _mm256_store_ps(v, acc);
  for (int r = 0; r < n; ++r) y[r] = v[r];
}
#else
struct Q8W { uint8_t a[64], b[64]; float s[16], s2[16], m[16]; };
constexpr int kQ8Lanes = 1;
using Q8Acc = float;
inline Q8Acc q8_zero() { return 0.f; }
struct Q8Lanes { uint8_t c[4][32]; float s[4], s2[4], m[4]; };
template <int kKind>
inline void q8_transpose(const Q8W* w, Q8Lanes& L) {
  for (int h = 0; h < 4; ++h) {
    std::memcpy(L.c[h], w->a + 16 * h, 16);
    std::memcpy(L.c[h] + 16, w->b + 16 * h, 16);
    L.s[h] = w->s[4 * h];
    L.s2[h] = w->s2[4 * h];
    L.m[h] = w->m[4 * h];
  }
}
template <int kKind, bool kWide = false>
inline Q8Acc q8_lanes_step(Q8Acc acc, const Q8Lanes& L, int h, const uint8_t* rec) {
  const int8_t* q = reinterpret_cast<const int8_t*>(rec);
  const float d = rec_d(rec);
  int32_t ia = 0, ib = 0;
  for (int j = 0; j < 16; ++j) ia += int32_t(L.c[h][j]) * int32_t(q[j]);
  for (int j = 16; j < 32; ++j) ib += int32_t(L.c[h][j]) * int32_t(q[j]);
  if (kKind == kQ8Split) {  // std::fma: one rounding, as vfmadd
    acc = std::fma(float(rec_e1(rec) + ia), L.s[h] * d, acc);
    return std::fma(float(rec_e2(rec) + ib), L.s2[h] * d, acc);
  }
  acc = std::fma(float((kKind == kQ8Min ? 0 : rec_e1(rec)) + ia + ib), L.s[h] * d, acc);
  if (kKind == kQ8Min) acc = std::fma(L.m[h], rec_dsum(rec), acc);
  return acc;
}
inline void q8_store(float* y, Q8Acc acc, int) { *y = acc; }
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
