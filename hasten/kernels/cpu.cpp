// hasten's CPU kernels (see kernels/cpu.py for why they exist and how they are built).
// 1. Y[T, N] = X[T, K] @ W^T computed straight from a GGUF tensor's bytes (the memory-mapped file), for every
//    block format in formats/*.h: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.
// 2. RMSNorm, rotary embedding, streamed attention over the KV cache (attention.h), and one whole decoder block
//    in one call.
//
// Exactness: every weight is rebuilt as gguf-py's dequantize does it (formats/common.h), so the weights are
// bit-identical to the dense fp32 ones; the accumulation uses FMA, which only changes summation rounding.
// Determinism (the one kernel contract, DESIGN.md): each (token, row) result is accumulated by the same
// instruction sequence whatever T is and whatever tile the token shares — decode, draft trees, prefill chunks
// and batches all see the same bits for the same token.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "attention_packed.h"
#include "formats/bf16.h"
#include "formats/f16.h"
#include "formats/f32.h"
#include "formats/q4_0.h"
#include "formats/q4_1.h"
#include "formats/q4_k.h"
#include "formats/q5_0.h"
#include "formats/q5_1.h"
#include "formats/q5_k.h"
#include "formats/q6_k.h"
#include "formats/q8_0.h"

namespace {
using namespace hasten;
constexpr int64_t QK = 32;

// The SIMD level of this build: 32 weights of a group as NV vectors of L lanes; acc = fma(w, x, acc) per
// vector, then reduce(acc) sums the NV vectors and their lanes in a fixed order.
#if defined(HASTEN_AVX512)
constexpr const char* kIsa = "avx512";
using V = __m512;
constexpr int L = 16;
inline V vzero() { return _mm512_setzero_ps(); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline float vreduce(const V* a) { return _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])); }
struct NoScales {};
template <class F> using Scales = std::conditional_t<F::kBlockWeights == 256, KScales, NoScales>;
// The K-quants decode a super-block's scales once, at its first group, for all 8 of its groups.
template <class F> inline void weights(const uint8_t* row, int64_t g, V* w, Scales<F>& c) {
  if constexpr (F::kBlockWeights == 256) {
    if ((g & 7) == 0) F::prepare(row, g, c);
    F::dequant16x2(row, g, c, w[0], w[1]);
  } else {
    F::dequant16x2(row, g, w[0], w[1]);
  }
}
constexpr int kRowsSmall = 4, kRowsLarge = 2, kTokensLarge = 6;  // 8 / 24 accumulators of 32 registers
#elif defined(HASTEN_AVX2)
constexpr const char* kIsa = "avx2";
using V = __m256;
constexpr int L = 8;
inline V vzero() { return _mm256_setzero_ps(); }
inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vfma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline float vreduce(const V* a) {
  const __m256 s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
struct NoScales {};
template <class F> using Scales = std::conditional_t<F::kBlockWeights == 256, KScales, NoScales>;
// Formats with a vector widening (F16, BF16: dequant8x4) use it; the others dequantize through a buffer.
template <class F, class = void> struct HasVec8 : std::false_type {};
template <class F> struct HasVec8<F, std::void_t<decltype(&F::dequant8x4)>> : std::true_type {};
template <class F> inline void weights(const uint8_t* row, int64_t g, V* w, Scales<F>&) {
  if constexpr (HasVec8<F>::value) {
    F::dequant8x4(row, g, w);
  } else {
    alignas(32) float buf[32];
    F::dequant(row, g, buf);
    for (int v = 0; v < 4; ++v) w[v] = _mm256_load_ps(buf + 8 * v);
  }
}
constexpr int kRowsSmall = 1, kRowsLarge = 1, kTokensLarge = 2;  // 16 registers: 8 accumulators
#else
constexpr const char* kIsa = "portable";
using V = float;
constexpr int L = 1;
inline V vzero() { return 0.f; }
inline V vload(const float* p) { return *p; }
inline V vfma(V a, V b, V c) { return a * b + c; }  // -ffp-contract=off: a multiply, then an add
inline float vreduce(const V* a) {
  float s = 0.f;
  for (int j = 0; j < 32; ++j) s += a[j];
  return s;
}
template <class F> using Scales = int;
template <class F> inline void weights(const uint8_t* row, int64_t g, V* w, Scales<F>&) { F::dequant(row, g, w); }
constexpr int kRowsSmall = 1, kRowsLarge = 1, kTokensLarge = 1;
#endif
constexpr int NV = 32 / L;

// Software prefetch (why: a decode step streams every weight from DRAM once, and a tile reads R short rows in
// lockstep — SmolLM2's Q4_1 rows are 360 bytes — a pattern the hardware prefetchers follow poorly: measured on
// a 2-core EPYC, one layer's matmuls took 72 us with its weights in cache and 202 us streamed from DRAM).
// Each tile, over its `steps` iterations, touches the bytes that the tile kPrefetchTiles ahead will read, so
// their DRAM latency overlaps this tile's arithmetic. A hint only: the results are the same bits. 4 tiles ahead
// measured best (2026-12-03, greedy decode in process, interleaved: SmolLM2 Q4_1 1.3-1.6x over none, 2 and 8
// within 5% of 4; the 1B Llama-3 shape at Q4_K_M 3.0x); BENCHMARKS.md, "Prefetching the weights".
constexpr int64_t kPrefetchTiles = 4;
// Into L2 only (locality 1: prefetcht2), not L1: L1 (32 KiB) also holds the tiles in flight, and there the
// prefetched rows evicted them (2026-12-04, AMD EPYC, all of SmolLM2's block matmuls, T = 1, locality 3 ->
// 1: BF16 1.13x, F16 1.24x faster; the q8 tiles below: Q8_0 1.77x, Q4_1 1.28x).
constexpr int kPrefetchLocality = 1;
inline void prefetch_share(const uint8_t* base, int64_t bytes, int64_t s, int64_t steps) {
#if defined(__GNUC__)
  const int64_t lines = (bytes + 63) / 64;
  for (int64_t l = s * lines / steps, e = (s + 1) * lines / steps; l < e; ++l) __builtin_prefetch(base + 64 * l, 0, kPrefetchLocality);
#endif
}

// Rows [i, i + R) x tokens [t, t + TN): R * TN * NV accumulators in registers. Each (row, token) pair gets
// fma(w, x) over its groups in order, then vreduce: the same sequence for every R and TN.
template <class F, int R, int TN>
inline void tile(const uint8_t* W, int64_t rb, const float* X, float* Y, int64_t K, int64_t N, int64_t i, int64_t t) {
  V acc[R][TN][NV];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < TN; ++k)
      for (int v = 0; v < NV; ++v) acc[r][k][v] = vzero();
  const int64_t G = K / QK;
  Scales<F> scales[R];
  const uint8_t* ahead = W + (i + kPrefetchTiles * R) * rb;
  for (int64_t g = 0; g < G; ++g) {
    prefetch_share(ahead, R * rb, g, G);
    V w[R][NV];
    for (int r = 0; r < R; ++r) weights<F>(W + (i + r) * rb, g, w[r], scales[r]);
    for (int k = 0; k < TN; ++k) {
      const float* xg = X + (t + k) * K + g * QK;
      for (int v = 0; v < NV; ++v) {
        const V xv = vload(xg + v * L);
        for (int r = 0; r < R; ++r) acc[r][k][v] = vfma(w[r][v], xv, acc[r][k][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < TN; ++k) Y[(t + k) * N + i + r] = vreduce(acc[r][k]);
}

template <class F, int R, int TN>
inline void tokens_rest(const uint8_t* W, int64_t rb, const float* X, float* Y, int64_t K, int64_t N, int64_t i, int64_t t, int64_t n) {
  if constexpr (TN > 1) {
    if (n == TN - 1) return tile<F, R, TN - 1>(W, rb, X, Y, K, N, i, t);
    return tokens_rest<F, R, TN - 1>(W, rb, X, Y, K, N, i, t, n);
  }
}

// Rows [i, i + R), tokens [t0, t1): full tiles of TN tokens, then one tile of the rest.
template <class F, int R, int TN>
inline void rows(const uint8_t* W, int64_t rb, const float* X, float* Y, int64_t K, int64_t N, int64_t i, int64_t t0, int64_t t1) {
  int64_t t = t0;
  for (; t + TN <= t1; t += TN) tile<F, R, TN>(W, rb, X, Y, K, N, i, t);
  if (t < t1) tokens_rest<F, R, TN>(W, rb, X, Y, K, N, i, t, t1 - t);
}

// Token chunks of 48 keep a chunk of X in L2 while every row of W streams past it (prefill).
constexpr int64_t kTokenChunk = 48;

template <class F>
void matmul(const float* X, const uint8_t* W, int64_t rb, float* Y, int64_t T, int64_t K, int64_t N) {
  for (int64_t t0 = 0; t0 < T; t0 += kTokenChunk) {
    const int64_t t1 = std::min(T, t0 + kTokenChunk);
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      int64_t i = begin;
      if (t1 - t0 <= 2) {  // decode: more rows at once, for independent FMA chains
        for (; i + kRowsSmall <= end; i += kRowsSmall) rows<F, kRowsSmall, 2>(W, rb, X, Y, K, N, i, t0, t1);
      } else {
        for (; i + kRowsLarge <= end; i += kRowsLarge) rows<F, kRowsLarge, kTokensLarge>(W, rb, X, Y, K, N, i, t0, t1);
      }
      for (; i < end; ++i) rows<F, 1, kTokensLarge>(W, rb, X, Y, K, N, i, t0, t1);
    });
  }
}

// ---- The q8 path (activations="q8", formats/q8.h): activations quantized once per call to int8 per group,
// then integer dot products with the weights' codes, kQ8Lanes rows per vector lane set. Each (row, token) pair
// gets q8_lanes_step's sequence over its groups in order (q8_tile; q8_dot_tile takes the same integer sums
// another way and combines them identically): the same bits for every tile, T and build.
#if defined(HASTEN_AVX2)
template <class F, class = void> struct HasQ8Quad : std::false_type {};
template <class F> struct HasQ8Quad<F, std::void_t<decltype(&F::q8_quad)>> : std::true_type {};
#endif
template <class F>
inline void q8_weights(const uint8_t* row, int64_t u, int64_t G, Q8W& w, Scales<F>& c) {
#if defined(HASTEN_AVX512)
  if constexpr (F::kBlockWeights == 256) {  // a super-block is 2 quads: its scales decoded at the first
    if ((u & 1) == 0) F::prepare(row, 4 * u, c);
    F::q8_quad(row, u, c, w);
  } else {
    F::q8_quad(row, u, G, w);
  }
#elif defined(HASTEN_AVX2)
  if constexpr (HasQ8Quad<F>::value && F::kBlockWeights == 256) {  // straight from the blocks (Q4_K, Q6_K),
    if ((u & 1) == 0) F::prepare(row, 4 * u, c);                     // scales decoded per super-block
    F::q8_quad(row, u, c, w);
  } else if constexpr (HasQ8Quad<F>::value) {  // Q4_0, Q8_0
    F::q8_quad(row, u, G, w);
  } else {
    q8_quad_from_groups<F>(row, u, G, w);
  }
#else
  q8_quad_from_groups<F>(row, u, G, w);
#endif
}

template <class F>
inline Q8Acc q8_step_of(Q8Acc acc, const Q8Lanes& L, int h, const uint8_t* rec) {
  return q8_lanes_step<F::kQ8Kind, (F::kQ8CodeOffset > 64)>(acc, L, h, rec);  // 8-bit codes: AVX2 widens (maddubs saturates)
}

// The q8 tiles prefetch the next tile (16 rows) into L2 (kPrefetchLocality). Into L1 the next tile's 16 rows
// evicted the current one's wherever 2 x 16 rows pass L1's 32 KiB: measured 2026-12-04 on all of SmolLM2's block
// matmuls, T = 1, the previous (4-row quad) kernel = 1.00x: Q8_0 (1.6 KiB rows) 0.57x into L1, 1.01x into L2,
// 0.58x non-temporal; Q4_1 0.78x / 1.00x; 32 rows ahead no better than 16.
constexpr int64_t kQ8PrefetchRows = 16;
// Rows [i, i + n) (n <= kQ8Lanes; past N the last row is read again and not stored) x tokens [t, t + TN).
// Per quad: each row's codes and scales once (the format's q8_quad), transposed to row lanes, then every token.
template <class F, int TN>
inline void q8_tile(const uint8_t* W, int64_t rb, const uint8_t* Xq, int64_t xs, float* Y, int64_t K, int64_t N, int64_t i, int n, int64_t t) {
  Q8Acc acc[TN];
  for (int k = 0; k < TN; ++k) acc[k] = q8_zero();
  const int64_t G = K / QK, U = q8_quads(K);
  const uint8_t* row[kQ8Lanes];
  for (int r = 0; r < kQ8Lanes; ++r) row[r] = W + std::min<int64_t>(i + r, N - 1) * rb;
  Scales<F> scales[kQ8Lanes];
  const uint8_t* ahead = W + std::min<int64_t>(i + kQ8PrefetchRows, N - 1) * rb;
  const int64_t ahead_bytes = std::min<int64_t>(kQ8Lanes, N - std::min<int64_t>(i + kQ8PrefetchRows, N - 1)) * rb;
#if defined(HASTEN_AVX512)
  __m512i rowoff = _mm512_setzero_si512();
  Q8LaneScales lane_scales;
  if constexpr (HasQ8Lanes<F>::value) {
    alignas(64) int32_t off[16];
    for (int r = 0; r < 16; ++r) off[r] = int32_t(row[r] - row[0]);
    rowoff = _mm512_load_si512(off);
  }
#endif
  for (int64_t u = 0; u < U; ++u) {
    prefetch_share(ahead, ahead_bytes, u, U);
    const int64_t live = std::min<int64_t>(4, G - 4 * u);
    Q8Lanes lanes;
#if defined(HASTEN_AVX512)
    if constexpr (HasQ8Lanes<F>::value) {
      for (int h = 0; h < live; ++h) F::q8_lanes(row, rowoff, 4 * u + h, lanes, h, lane_scales);
    } else
#endif
    {
      Q8W w[kQ8Lanes];
      for (int r = 0; r < kQ8Lanes; ++r) q8_weights<F>(row[r], u, G, w[r], scales[r]);
      q8_transpose<F::kQ8Kind>(w, lanes);
    }
    for (int h = 0; h < live; ++h)
      for (int k = 0; k < TN; ++k) acc[k] = q8_step_of<F>(acc[k], lanes, h, Xq + (t + k) * xs + (4 * u + h) * kQ8GroupBytes);
  }
  for (int k = 0; k < TN; ++k) q8_store(Y + (t + k) * N + i, acc[k], n);
}

#if defined(HASTEN_AVX512)
// The same (row, token) results as q8_tile, for one or two tokens: the integer sums taken row by row in the
// quad layout (each row's codes against the token's activations, as llama.cpp's vec_dot does), then added up
// per group across the 16 rows (group_sums16) into row lanes, where the fp32 combination runs exactly as in
// q8_lanes_step. The integer sums are exact, so the bits equal q8_tile's: a token's result does not depend on
// which of the two tiles scored it. Why a second tile: at one token nothing amortizes q8_tile's 16-row code
// transpose, and decode is one token.
template <class F, int TN>
inline void q8_dot_tile(const uint8_t* W, int64_t rb, const uint8_t* Xq, int64_t xs, float* Y, int64_t K, int64_t N, int64_t i, int n, int64_t t) {
  constexpr int kKind = F::kQ8Kind;
  Q8Acc acc[TN];
  for (int k = 0; k < TN; ++k) acc[k] = q8_zero();
  const int64_t G = K / QK, U = q8_quads(K);
  const uint8_t* row[16];
  for (int r = 0; r < 16; ++r) row[r] = W + std::min<int64_t>(i + r, N - 1) * rb;
  Scales<F> scales[16];
  const uint8_t* ahead = W + std::min<int64_t>(i + kQ8PrefetchRows, N - 1) * rb;
  const int64_t ahead_bytes = std::min<int64_t>(16, N - std::min<int64_t>(i + kQ8PrefetchRows, N - 1)) * rb;
  for (int64_t u = 0; u < U; ++u) {
    prefetch_share(ahead, ahead_bytes, u, U);
    const int64_t live = std::min<int64_t>(4, G - 4 * u);
    __m512i xa[TN], xb[TN];
    for (int k = 0; k < TN; ++k) quad_acts(Xq + (t + k) * xs + 4 * u * kQ8GroupBytes, live, xa[k], xb[k]);
    __m512i ia[TN][16], ib[TN][16];
    __m512 s[16], s2[16], m[16];
    for (int r = 0; r < 16; ++r) {
      Q8W w;
      q8_weights<F>(row[r], u, G, w, scales[r]);
      s[r] = w.s;
      if constexpr (kKind == kQ8Split) s2[r] = w.s2;
      if constexpr (kKind == kQ8Min) m[r] = w.m;
      for (int k = 0; k < TN; ++k) {
        const __m512i a = dot_u8s8(_mm512_setzero_si512(), w.a, xa[k]);
        if constexpr (kKind == kQ8Split) ib[k][r] = dot_u8s8(_mm512_setzero_si512(), w.b, xb[k]), ia[k][r] = a;
        else ia[k][r] = dot_u8s8(a, w.b, xb[k]);
      }
    }
    __m512 S[4], S2[4], M[4];
    scales16(s, S);
    if constexpr (kKind == kQ8Split) scales16(s2, S2);
    if constexpr (kKind == kQ8Min) scales16(m, M);
    for (int k = 0; k < TN; ++k) {
      __m512i IA[4], IB[4];
      group_sums16(ia[k], IA);
      if constexpr (kKind == kQ8Split) group_sums16(ib[k], IB);
      for (int h = 0; h < live; ++h) {
        const uint8_t* rec = Xq + (t + k) * xs + (4 * u + h) * kQ8GroupBytes;
        const __m512 d = _mm512_set1_ps(rec_d(rec));
        if constexpr (kKind == kQ8Split) {
          acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(IA[h], _mm512_set1_epi32(rec_e1(rec)))), _mm512_mul_ps(S[h], d), acc[k]);
          acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(IB[h], _mm512_set1_epi32(rec_e2(rec)))), _mm512_mul_ps(S2[h], d), acc[k]);
        } else {
          const __m512i isum = kKind == kQ8Min ? IA[h] : _mm512_add_epi32(IA[h], _mm512_set1_epi32(rec_e1(rec)));
          acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(S[h], d), acc[k]);
          if constexpr (kKind == kQ8Min) acc[k] = _mm512_fmadd_ps(M[h], _mm512_set1_ps(rec_dsum(rec)), acc[k]);
        }
      }
    }
  }
  for (int k = 0; k < TN; ++k) q8_store(Y + (t + k) * N + i, acc[k], n);
}
// Calls of at most this many tokens take q8_dot_tile (measured against q8_tile, all SmolLM2 block matmuls,
// 2026-12-04: T = 1 Q4_1 1.19x, Q4_K_M 1.27x; T = 3 Q4_K_M 1.18x; from 4 tokens q8_tile is ahead).
constexpr int64_t kQ8DotTokens = 3;
#endif

// Tokens [t0, t1) for rows [i, i + n): at most kQ8DotTokens of them in q8_dot_tile, else tiles of kQ8Tokens,
// tiles of 8 and one tile of the rest (a token's cost in q8_tile is its own; the rows' codes are gathered and
// transposed once per tile, so wider tiles pay that less often). AVX-512: 24 (its 32 registers hold 24
// accumulators beside a group's 8 code vectors; 2026-12-08, Intel Xeon, one layer's block matmuls, two builds
// interleaved in one process, 48 / 512 tokens against 8: the 1B Llama-3 shape Q4_K_M 1.24x / 1.24x with 16,
// a further 1.15x / 1.09x with 24, 0.73x / 1.01x with 32 (spills); SmolLM2 Q4_1 1.13x / 1.05x, Q6_K 1.38x /
// 1.34x, Q4_0 1.19x / 1.17x with 24). AVX2 and portable keep 8: 16 registers. Same bits either way (tested).
#ifndef HASTEN_Q8_TOKENS  // overridable for an A/B build only (-DHASTEN_Q8_TOKENS=N): a token's bits do not depend on it
#if defined(HASTEN_AVX512)
#define HASTEN_Q8_TOKENS 24
#else
#define HASTEN_Q8_TOKENS 8
#endif
#endif
constexpr int kQ8Tokens = HASTEN_Q8_TOKENS;
template <class F, int TN = 7>
inline void q8_rest(const uint8_t* W, int64_t rb, const uint8_t* Xq, int64_t xs, float* Y, int64_t K, int64_t N, int64_t i, int n, int64_t t, int64_t rest) {
  if constexpr (TN > 0) {
    if (rest == TN) return q8_tile<F, TN>(W, rb, Xq, xs, Y, K, N, i, n, t);
    q8_rest<F, TN - 1>(W, rb, Xq, xs, Y, K, N, i, n, t, rest);
  }
}
template <class F>
inline void q8_rows(const uint8_t* W, int64_t rb, const uint8_t* Xq, int64_t xs, float* Y, int64_t K, int64_t N, int64_t i, int n, int64_t t0, int64_t t1) {
  int64_t t = t0;
#if defined(HASTEN_AVX512)
  if (t1 - t0 <= kQ8DotTokens) {
    if (t1 - t0 == 3) return q8_dot_tile<F, 3>(W, rb, Xq, xs, Y, K, N, i, n, t);
    if (t1 - t0 == 2) return q8_dot_tile<F, 2>(W, rb, Xq, xs, Y, K, N, i, n, t);
    return q8_dot_tile<F, 1>(W, rb, Xq, xs, Y, K, N, i, n, t);
  }
#endif
  for (; t + kQ8Tokens <= t1; t += kQ8Tokens) q8_tile<F, kQ8Tokens>(W, rb, Xq, xs, Y, K, N, i, n, t);
  if constexpr (kQ8Tokens > 8)
    for (; t + 8 <= t1; t += 8) q8_tile<F, 8>(W, rb, Xq, xs, Y, K, N, i, n, t);
  if (t < t1) q8_rest<F>(W, rb, Xq, xs, Y, K, N, i, n, t, t1 - t);
}

template <class F>
void matmul_q8(const float* X, const uint8_t* W, int64_t rb, float* Y, int64_t T, int64_t K, int64_t N) {
  // Every token quantized once, for all rows and tiles: K/32 group records per token.
  const int64_t xs = q8_record_bytes(K);
  auto buf = torch::empty({T * xs + 64}, torch::kUInt8);
  uint8_t* Xq = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(buf.data_ptr<uint8_t>()) + 63) & ~uintptr_t(63));
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) quantize_q8(X + t * K, K, F::kQ8CodeOffset, F::kQ8Kind, Xq + t * xs);
  });
  const int64_t tiles = (N + kQ8Lanes - 1) / kQ8Lanes;
  for (int64_t t0 = 0; t0 < T; t0 += kTokenChunk) {
    const int64_t t1 = std::min(T, t0 + kTokenChunk);
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t i = b * kQ8Lanes;
        q8_rows<F>(W, rb, Xq, xs, Y, K, N, i, int(std::min<int64_t>(kQ8Lanes, N - i)), t0, t1);
      }
    });
  }
}

enum Format : int64_t { kF32, kF16, kBF16, kQ4_0, kQ4_1, kQ5_0, kQ5_1, kQ8_0, kQ4_K, kQ5_K, kQ6_K };
// A format id with this bit set asks for the q8 path (formats.py Q8_ACTIVATIONS); formats without one (F32,
// F16, BF16) ignore it.
constexpr int64_t kQ8Flag = 256;

template <class Fn>
auto dispatch(int64_t fmt, Fn&& fn) {
  switch (fmt) {
    case kF32: return fn(F32{});
    case kF16: return fn(F16{});
    case kBF16: return fn(BF16{});
    case kQ4_0: return fn(Q4_0{});
    case kQ4_1: return fn(Q4_1{});
    case kQ5_0: return fn(Q5_0{});
    case kQ5_1: return fn(Q5_1{});
    case kQ8_0: return fn(Q8_0{});
    case kQ4_K: return fn(Q4_K{});
    case kQ5_K: return fn(Q5_K{});
    case kQ6_K: return fn(Q6_K{});
  }
  TORCH_CHECK(false, "unknown block format id ", fmt);
}

template <class F>
int64_t row_bytes(int64_t K) { return K / F::kBlockWeights * F::kBlockBytes; }

void check_blocks(const torch::Tensor& w, int64_t K, int64_t fmt) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kUInt8 && w.is_cpu() && w.stride(1) == 1,
              "weights must be a u8 CPU tensor [N, row bytes] with contiguous rows");
  const int64_t rb = dispatch(fmt, [&](auto f) {
    using F = decltype(f);
    TORCH_CHECK(K % F::kBlockWeights == 0 && K % QK == 0, K, " inputs is not a whole number of blocks of ", F::kBlockWeights);
    return row_bytes<F>(K);
  });
  TORCH_CHECK(w.size(1) == rb, "weights have ", w.size(1), " bytes per row, ", K, " inputs need ", rb);
}
}  // namespace

// x [..., K] f32 (any leading shape, read as T = numel / K rows); w [N, row bytes] u8 in format `fmt` → y [..., N].
// fmt | kQ8Flag: the q8 path where the format has one.
torch::Tensor block_matmul(torch::Tensor x, torch::Tensor w, int64_t fmt) {
  TORCH_CHECK(x.dim() >= 1 && x.is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous f32 CPU tensor [..., K]");
  const bool q8 = fmt & kQ8Flag;
  fmt &= ~kQ8Flag;
  const int64_t K = x.size(-1), T = x.numel() / std::max<int64_t>(K, 1), N = w.size(0);
  check_blocks(w, K, fmt);
  auto shape = x.sizes().vec();
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  if (T == 0) return y;
  dispatch(fmt, [&](auto f) {
    using F = decltype(f);
    if constexpr (HasQ8<F>::value) {
      if (q8) {
        matmul_q8<F>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), w.stride(0), y.data_ptr<float>(), T, K, N);
        return 0;
      }
    }
    matmul<F>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), w.stride(0), y.data_ptr<float>(), T, K, N);
    return 0;
  });
  return y;
}

// Rows `ids` of w, dequantized exactly: [n, K] f32 (embedding lookups; a dense copy of one layer on demand).
torch::Tensor dequantize_rows(torch::Tensor w, torch::Tensor ids, int64_t K, int64_t fmt) {
  check_blocks(w, K, fmt);
  auto idx = ids.to(torch::kLong).contiguous();
  const int64_t n = idx.numel(), N = w.size(0);
  auto out = torch::empty({n, K}, torch::dtype(torch::kFloat32));
  const int64_t* I = idx.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r) TORCH_CHECK(I[r] >= 0 && I[r] < N, "row ", I[r], " out of range [0, ", N, ")");
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* O = out.data_ptr<float>();
  const int64_t rb = w.stride(0);
  dispatch(fmt, [&](auto f) {
    using F = decltype(f);
    at::parallel_for(0, n, 64, [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r)
        for (int64_t g = 0; g < K / QK; ++g) F::dequant(W + I[r] * rb, g, O + r * K + g * QK);
    });
    return 0;
  });
  return out;
}

std::string isa() { return kIsa; }

// x [T, D] f32 → w * x / sqrt(mean(x^2) + eps), row by row (the same arithmetic for every T).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "x must be contiguous f32 [T, D]");
  const int64_t T = x.size(0), D = x.size(1);
  auto y = torch::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = X + t * D;
    float ss = 0.f;
    for (int64_t j = 0; j < D; ++j) ss += xr[j] * xr[j];
    const float r = 1.f / std::sqrt(ss / float(D) + float(eps));
    for (int64_t j = 0; j < D; ++j) Y[t * D + j] = W[j] * (xr[j] * r);
  }
  return y;
}

// In place on x [T, H, d] (token-major, contiguous): x = x * cos + rotate_half(x) * sin, cos/sin [T, d].
void rope_(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == torch::kFloat32, "x must be contiguous f32 [T, H, d]");
  const int64_t T = x.size(0), H = x.size(1), d = x.size(2), h2 = d / 2;
  float* X = x.data_ptr<float>();
  const float *C = cos.contiguous().data_ptr<float>(), *S = sin.contiguous().data_ptr<float>();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      float* v = X + (t * H + h) * d;
      const float *c = C + t * d, *s = S + t * d;
      for (int64_t j = 0; j < h2; ++j) {
        const float a = v[j], b = v[j + h2];
        v[j] = a * c[j] - b * s[j];
        v[j + h2] = b * c[j + h2] + a * s[j + h2];
      }
    }
}

// sparsity/kernels/cpu.cpp, built into this extension.
torch::Tensor q4t_sparse_in(torch::Tensor x, double thr, torch::Tensor q, torch::Tensor d, torch::Tensor m, int64_t K, int64_t N);
torch::Tensor q8t_sparse_in(torch::Tensor x, double thr, torch::Tensor q, torch::Tensor d, int64_t K, int64_t N);
torch::Tensor h16t_sparse_in(torch::Tensor x, double thr, torch::Tensor wt, int64_t K, int64_t N);
torch::Tensor f32t_sparse_in(torch::Tensor x, double thr, torch::Tensor wt);
torch::Tensor q4_1_rows_gated(torch::Tensor x, torch::Tensor gate, double thr, torch::Tensor d, torch::Tensor m, torch::Tensor qs);
void register_sparse_kernels(pybind11::module& mod);

namespace {
// One linear layer of a decoder block, as its module's `fused_spec()` describes it (models/quantized.py,
// sparsity/modules.py): w = [blocks [N, row bytes] u8, bias [N] or empty, extra…] in block format `fmt`;
// extra = the transposed layout of TEAL's sparse-input kernel (sparsity/kernels/cpu.py): [q u8, d, m] (q4t:
// Q4_1, Q4_0), [q i8, d] (q8t: Q8_0), [wt bf16/f16] (h16t: BF16, F16) or [wt f32] (f32t), or CATS' repacked
// Q4_1 rows [d, m, qs]. thr < 0: dense; else inputs with |x| <= thr are dropped, by the sparse kernel up to
// max_t tokens and by the dense kernel on the masked input above. Each branch is exactly what the module's
// forward runs.
torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w, int64_t fmt, double thr, int64_t max_t) {
  auto dense = [&](const torch::Tensor& in) {
    auto y = block_matmul(in, w[0], fmt);
    if (w[1].numel() > 0) y += w[1];
    return y;
  };
  if (thr < 0) return dense(x);
  const int64_t K = x.size(-1), T = x.numel() / K;
  if (T <= max_t && w.size() > 2) {
    const auto x2 = x.view({T, K});
    const int64_t N = w[0].size(0);
    if (w.size() == 5) return q4t_sparse_in(x2, thr, w[2], w[3], w[4], K, N);
    if (w.size() == 4) return q8t_sparse_in(x2, thr, w[2], w[3], K, N);
    if (w[2].scalar_type() == torch::kFloat32) return f32t_sparse_in(x2, thr, w[2]);
    return h16t_sparse_in(x2, thr, w[2], K, N);
  }
  return dense(x * (x.abs() > thr));
}
}  // namespace

// The weights of one decoder block, as Block._fused() and Gemma3Block._fused() describe them (models/): pre-norm
// attention and a gated MLP. lin, fmt, thr, max_t = q, k, v, o, gate, up, down (see `linear`); gated_up_thr < 0:
// act(gate) * up; else CATS: up's rows only where |silu(gate)| > gated_up_thr. Optional parts (empty tensor:
// none): q_norm / k_norm per head before RoPE (Qwen3, Gemma 3), post_attn / post_ffw on the attention and MLP
// outputs before they join the residual (Gemma 3); gelu: gelu_tanh(gate) (Gemma 3's GeGLU), else silu(gate).
// Gemma's norms arrive as their effective scales 1 + w, as GemmaRMSNorm multiplies by them.
struct BlockWeights {
  torch::Tensor ln1, ln2;
  double eps;
  std::vector<std::vector<torch::Tensor>> lin;
  std::vector<double> thr;
  std::vector<int64_t> max_t, fmt;
  double gated_up_thr, scale;
  int64_t H, Hkv;
  torch::Tensor q_norm, k_norm, post_attn, post_ffw;
  bool gelu;
};

inline bool present(const torch::Tensor& t) { return t.defined() && t.numel() > 0; }

// One decoder block for a few tokens over the KV cache. A decode step used to make ~25 Python-level calls per
// block (~4 ms of a ~19 ms step on this 2-core machine); this runs the very kernels and ATen ops the Python
// modules run, in the same order, so every bit is the same. x [1, N, D]: the packed tokens of one or more
// sequences (a decode step, a draft tree, a batch of them); cos, sin [N, d]; per segment (attend_packed): its
// layer cache ck, cv [1, Hkv, max_len, d], written at start..start+length, its mask [length, start+length] or
// empty, and whether the layer is windowed in its cache (attention_window.h: bits independent of slots).
torch::Tensor decode_block(const BlockWeights& b, torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                           const std::vector<torch::Tensor>& ck, const std::vector<torch::Tensor>& cv,
                           const std::vector<int64_t>& start, const std::vector<int64_t>& length,
                           const std::vector<torch::Tensor>& mask, const std::vector<bool>& windowed) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.is_contiguous(), "decode_block: x must be contiguous [1, N, D]");
  const int64_t T = x.size(1), D = x.size(2), H = b.H, Hkv = b.Hkv;
  auto lin_ = [&](int i, const torch::Tensor& in) { return linear(in, b.lin[i], b.fmt[i], b.thr[i], b.max_t[i]); };
  auto norm = [&](const torch::Tensor& in, const torch::Tensor& w, int64_t rows, int64_t dim) {
    return rms_norm(in.reshape({rows, dim}).contiguous(), w, b.eps);
  };
  const auto h = rms_norm(x.view({T, D}), b.ln1, b.eps);
  auto q = lin_(0, h), k = lin_(1, h), v = lin_(2, h);
  const int64_t d = q.size(1) / H;
  if (present(b.q_norm)) {
    q = norm(q, b.q_norm, T * H, d);
    k = norm(k, b.k_norm, T * Hkv, d);
  }
  q = q.view({T, H, d});
  k = k.view({T, Hkv, d});
  rope_(q, cos, sin);
  rope_(k, cos, sin);
  const auto attn = attend_packed(q, k, v.view({T, Hkv, d}), ck, cv, start, length, mask, windowed, b.scale);
  auto o = lin_(3, attn);
  if (present(b.post_attn)) o = norm(o, b.post_attn, T, D);
  x = x + o.view({1, T, D});
  const auto h2 = rms_norm(x.view({T, D}), b.ln2, b.eps);
  const auto gate = b.gelu ? at::gelu(lin_(4, h2), "tanh") : at::silu(lin_(4, h2));
  const auto gated = b.gated_up_thr < 0 ? gate * lin_(5, h2)
                                        : q4_1_rows_gated(h2, gate, b.gated_up_thr, b.lin[5][2], b.lin[5][3], b.lin[5][4]);
  auto down = lin_(6, gated);
  if (present(b.post_ffw)) down = norm(down, b.post_ffw, T, D);
  return x + down.view({1, T, D});
}

// Every block of a model in one call, for forwards whose caches have no windowed layer (Transformer._run): the
// per-block Python work (~13 us a block, 0.4 ms of a 5.5 ms SmolLM2 step) happens once, when the stack is
// built. Each block runs decode_block, so the bits are the same.
class DecodeStack {
 public:
  explicit DecodeStack(std::vector<BlockWeights> blocks) : blocks_(std::move(blocks)) {}
  // x [1, N, D]; per segment: its cache's per-layer (k, v) buffers, start, length and mask (decode_block's).
  torch::Tensor forward(torch::Tensor x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const std::vector<std::vector<std::pair<torch::Tensor, torch::Tensor>>>& caches,
                        const std::vector<int64_t>& start, const std::vector<int64_t>& length,
                        const std::vector<torch::Tensor>& mask) const {
    const size_t S = caches.size();
    for (size_t s = 0; s < S; ++s)
      TORCH_CHECK(caches[s].size() == blocks_.size(), "DecodeStack: segment ", s, "'s cache has ", caches[s].size(),
                  " layers, the model ", blocks_.size());
    const std::vector<bool> windowed(S, false);
    std::vector<torch::Tensor> ck(S), cv(S);
    for (size_t l = 0; l < blocks_.size(); ++l) {
      for (size_t s = 0; s < S; ++s) {
        ck[s] = caches[s][l].first;
        cv[s] = caches[s][l].second;
      }
      x = decode_block(blocks_[l], x, cos, sin, ck, cv, start, length, mask, windowed);
    }
    return x;
  }
  size_t size() const { return blocks_.size(); }

 private:
  std::vector<BlockWeights> blocks_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  // The heavy calls release the GIL as torch's own ops do: a server's HTTP thread runs while a step computes
  // (they touch no Python object; arguments are converted before and results after, under the GIL).
  using no_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  namespace py = pybind11;  // module_local: each build (avx512, avx2, portable) may be loaded in one process
  py::class_<BlockWeights>(mod, "BlockWeights", "one decoder block's weights, as decode_block takes them", py::module_local())
      .def(py::init([](torch::Tensor ln1, torch::Tensor ln2, double eps, std::vector<std::vector<torch::Tensor>> lin,
                       std::vector<double> thr, std::vector<int64_t> max_t, std::vector<int64_t> fmt,
                       double gated_up_thr, double scale, int64_t H, int64_t Hkv, torch::Tensor q_norm,
                       torch::Tensor k_norm, torch::Tensor post_attn, torch::Tensor post_ffw, bool gelu) {
             TORCH_CHECK(lin.size() == 7 && thr.size() == 7 && max_t.size() == 7 && fmt.size() == 7,
                         "BlockWeights: 7 linears (q, k, v, o, gate, up, down), each with a threshold, limit, format");
             return BlockWeights{ln1, ln2, eps, std::move(lin), std::move(thr), std::move(max_t), std::move(fmt),
                                 gated_up_thr, scale, H, Hkv, q_norm, k_norm, post_attn, post_ffw, gelu};
           }),
           py::arg("ln1"), py::arg("ln2"), py::arg("eps"), py::arg("lin"), py::arg("thr"), py::arg("max_t"),
           py::arg("fmt"), py::arg("gated_up_thr"), py::arg("scale"), py::arg("H"), py::arg("Hkv"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("post_attn"), py::arg("post_ffw"), py::arg("gelu"));
  mod.def("decode_block", &decode_block, "one decoder block for a few tokens over the KV cache", no_gil());
  py::class_<DecodeStack>(mod, "DecodeStack", "every decoder block of a model, run in one call", py::module_local())
      .def(py::init<std::vector<BlockWeights>>())
      .def("forward", &DecodeStack::forward, "x through every block (decode_block's bits)", no_gil())
      .def("__len__", &DecodeStack::size);
  mod.def("block_matmul", &block_matmul, "Y = X @ W^T from a GGUF tensor's bytes in a block format", no_gil());
  mod.def("dequantize_rows", &dequantize_rows, "rows of a GGUF tensor, dequantized exactly to f32");
  mod.def("isa", &isa, "the instruction set this build targets: avx512, avx2 or portable");
  mod.def("rms_norm", &rms_norm, "RMSNorm over the last dim of [T, D]");
  mod.def("rope_", &rope_, "rotary embedding in place on [T, H, d]");
  mod.def("set_per_node_attention", [](bool on) { hasten::attn::per_node_attention() = on; },
          "A/B measurement only: a draft tree's nodes each attend on their own pass over the cache (same bits)");
  mod.def("attend", &attend, "streamed attention of T tokens over the KV cache (causal or masked; attention.h)");
  mod.def("attend_packed", &attend_packed,
          "a packed forward's attention: each segment's keys/values into its cache, then all segments in one call",
          no_gil());
  mod.def("attend_window", &attend_window,
          "a windowed layer's attention: the same bits wherever its keys sit in the buffer (attention_window.h)");
  register_sparse_kernels(mod);
}
