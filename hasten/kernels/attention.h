// Streamed attention of T new tokens over a KV cache (decode, draft trees, prefill chunks, packed batches):
// one kernel for every T, included by cpu.cpp.
//
// Work is split into tasks of (KV head g, query tile): up to kTokenTile tokens x the group's H/Hkv query heads.
// A task streams the keys in tiles of kKeyTile keys aligned at absolute key 0; each K/V tile is read once for
// all the task's queries (GQA-aware, and a draft tree's nodes share one pass over the prefix). Per query it keeps
// an online softmax: running max m, running sum l, an accumulator rescaled by exp(m_old - m_new), and ends with
// acc / l. Scores: the K tile transposed to [d, kKeyTile] once per task, then per query a chain of fmas over the
// d dims with keys in the lanes (no horizontal sums). The tiles are grouped into chunks of kKeyChunk keys, also
// aligned at key 0: each chunk's state starts afresh and a query combines its chunks in order at the end, so a
// decode step spreads one KV head's cache over all cores (tasks per chunk) while a prompt chunk's task walks its
// chunks itself — the same arithmetic either way.
//
// Exactness (the one kernel contract, DESIGN.md): a query's arithmetic depends only on its own q, the keys it may
// see and the fixed key tiles and chunks. Keys it may not see (mask, causal, past S) get score -inf and p = 0 exactly; a
// tile with none it may see leaves its m, l and acc untouched (acc += 0 * v is exact). So a token's output has
// the same bits whether it is scored alone, in a tree, in a 300-token chunk or in any query tile.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "formats/common.h"

namespace hasten {
namespace attn {

constexpr int64_t kKeyTile = 64;    // keys per tile: 16 KB of K (d = 64) stays in L1 beside its transpose
constexpr int64_t kTokenTile = 16;  // query tokens per task (x the group's heads: 48 queries for SmolLM2)
constexpr int64_t kKeyChunk = 512;  // keys per chunk: a query's softmax state restarts at every chunk

// The SIMD level of this build; A lanes per vector.
#if defined(HASTEN_AVX512)
using A = __m512;
// kScoreRows queries' scores (3 x 4 vectors), kRows queries' accumulators (4 x 4 vectors) in registers
constexpr int kLanes = 16, kScoreRows = 3, kRows = 4;
inline A load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, A a) { _mm512_storeu_ps(p, a); }
inline A set1(float x) { return _mm512_set1_ps(x); }
inline A fma(A a, A b, A c) { return _mm512_fmadd_ps(a, b, c); }
inline A fnma(A a, A b, A c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
inline A mul(A a, A b) { return _mm512_mul_ps(a, b); }
inline A add(A a, A b) { return _mm512_add_ps(a, b); }
inline A sub(A a, A b) { return _mm512_sub_ps(a, b); }
inline A vmax(A a, A b) { return _mm512_max_ps(a, b); }
inline float hmax(A a) { return _mm512_reduce_max_ps(a); }
inline float hsum(A a) { return _mm512_reduce_add_ps(a); }
inline float first(A a) { return _mm512_cvtss_f32(a); }
inline A round_nearest(A a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline A scale2(A p, A n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
inline A keep_above(A x, A y, float lo) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, set1(lo), _CMP_GE_OQ), y); }
#elif defined(HASTEN_AVX2)
using A = __m256;
constexpr int kLanes = 8, kScoreRows = 1, kRows = 2;
inline A load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, A a) { _mm256_storeu_ps(p, a); }
inline A set1(float x) { return _mm256_set1_ps(x); }
inline A fma(A a, A b, A c) { return _mm256_fmadd_ps(a, b, c); }
inline A fnma(A a, A b, A c) { return _mm256_fnmadd_ps(a, b, c); }
inline A mul(A a, A b) { return _mm256_mul_ps(a, b); }
inline A add(A a, A b) { return _mm256_add_ps(a, b); }
inline A sub(A a, A b) { return _mm256_sub_ps(a, b); }
inline A vmax(A a, A b) { return _mm256_max_ps(a, b); }
inline float hmax(A a) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
inline float hsum(A a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
inline float first(A a) { return _mm256_cvtss_f32(a); }
inline A round_nearest(A a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline A scale2(A p, A n) {  // n is an integer in [-127, 127] here (x >= -87.5)
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline A keep_above(A x, A y, float lo) { return _mm256_and_ps(_mm256_cmp_ps(x, set1(lo), _CMP_GE_OQ), y); }
#else
using A = float;
constexpr int kLanes = 1, kScoreRows = 1, kRows = 4;
inline A load(const float* p) { return *p; }
inline void store(float* p, A a) { *p = a; }
inline A set1(float x) { return x; }
inline A fma(A a, A b, A c) { return a * b + c; }  // -ffp-contract=off: a multiply, then an add
inline A fnma(A a, A b, A c) { return c - a * b; }
inline A mul(A a, A b) { return a * b; }
inline A add(A a, A b) { return a + b; }
inline A sub(A a, A b) { return a - b; }
inline A vmax(A a, A b) { return std::max(a, b); }
inline float hmax(A a) { return a; }
inline float hsum(A a) { return a; }
inline float first(A a) { return a; }
inline A round_nearest(A a) { return std::nearbyint(a); }
inline A scale2(A p, A n) { return std::ldexp(p, int(n)); }
inline A keep_above(A x, A y, float lo) { return x >= lo ? y : 0.f; }
#endif
constexpr int kTileVectors = kKeyTile / kLanes;

// e^x lane by lane (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial), x <= 0 here (a score
// minus its running max). 0 below -87 (and for -inf: masked keys). exp(0) is exactly 1, so a running max that
// does not move rescales by exactly 1.
inline A vexp(A x) {
  const A xc = vmax(x, set1(-87.5f));
  const A n = round_nearest(mul(xc, set1(1.44269504088896341f)));
  A r = fnma(n, set1(0.693359375f), xc);
  r = fnma(n, set1(-2.12194440e-4f), r);
  A y = set1(1.9875691500e-4f);
  y = fma(y, r, set1(1.3981999507e-3f));
  y = fma(y, r, set1(8.3334519073e-3f));
  y = fma(y, r, set1(4.1665795894e-2f));
  y = fma(y, r, set1(1.6666665459e-1f));
  y = fma(y, r, set1(5.0000001201e-1f));
  y = fma(y, mul(r, r), add(r, set1(1.f)));
  return keep_above(x, scale2(y, n), -87.f);
}

// kt [d, kKeyTile] = the keys j0 .. j0+nk (rows of kr, stride d), zero past nk.
inline void transpose_keys(const float* kr, int64_t nk, int64_t d, float* kt) {
#if defined(HASTEN_AVX512)
  if (nk == kKeyTile && d % 16 == 0) {  // 16 x 16 blocks through registers
    for (int64_t jb = 0; jb < kKeyTile; jb += 16)
      for (int64_t cb = 0; cb < d; cb += 16) {
        __m512 r[16], t[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(kr + (jb + i) * d + cb);
        for (int i = 0; i < 8; ++i) {
          t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
          t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 4; ++i) {
          const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
          const __m512d c = _mm512_castps_pd(t[4 * i + 2]), e = _mm512_castps_pd(t[4 * i + 3]);
          r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
          r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
          r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
          r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
        }
        // r[4i + k], 128-bit lane L: column 4L + k of rows 4i .. 4i+3
        for (int k = 0; k < 4; ++k) {
          t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);       // lanes 0, 2 of rows 0-3 | 4-7
          t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);   // lanes 1, 3
          t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
          t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
        }
        for (int k = 0; k < 4; ++k) {
          r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);        // column k
          r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);    // column 8 + k
          r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);  // column 4 + k
          r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xdd);  // column 12 + k
        }
        for (int i = 0; i < 16; ++i) _mm512_storeu_ps(kt + (cb + i) * kKeyTile + jb, r[i]);
      }
    return;
  }
#endif
  for (int64_t c = 0; c < d; ++c) {
    for (int64_t j = 0; j < nk; ++j) kt[c * kKeyTile + j] = kr[j * d + c];
    for (int64_t j = nk; j < kKeyTile; ++j) kt[c * kKeyTile + j] = 0.f;
  }
}

// p[i] = scale * (q_i . k_j) for the kKeyTile keys of kt [d, kKeyTile], QN queries at once (QN x kTileVectors
// independent fma chains, each over the d dims in order: the same per lane for every QN).
template <int QN>
inline void scores(const float* const* qv, const float* kt, int64_t d, float sc, float* p) {
  A s[QN][kTileVectors];
  for (int i = 0; i < QN; ++i)
    for (int u = 0; u < kTileVectors; ++u) s[i][u] = set1(0.f);
  for (int64_t c = 0; c < d; ++c) {
    A qc[QN];
    for (int i = 0; i < QN; ++i) qc[i] = set1(qv[i][c]);
    const float* kc = kt + c * kKeyTile;
    for (int u = 0; u < kTileVectors; ++u) {
      const A kv = load(kc + u * kLanes);
      for (int i = 0; i < QN; ++i) s[i][u] = fma(qc[i], kv, s[i][u]);
    }
  }
  for (int i = 0; i < QN; ++i)
    for (int u = 0; u < kTileVectors; ++u) store(p + i * kKeyTile + u * kLanes, mul(s[i][u], set1(sc)));
}

template <int QN>
inline void scores_rest(int n, const float* const* qv, const float* kt, int64_t d, float sc, float* p) {
  if constexpr (QN > 1) {
    if (n == QN - 1) return scores<QN - 1>(qv, kt, d, sc, p);
    return scores_rest<QN - 1>(n, qv, kt, d, sc, p);
  }
}

// acc[r] = acc[r] * alpha[r] + sum_j p[r][j] v[j] for R queries over NV vectors of dims from c0; per lane the
// same operations in the same order for every R and NV.
template <int R, int NV>
inline void accumulate(float* acc, int64_t dp, int64_t c0, const float* alpha, const float* p, const float* vr,
                       int64_t vs, int64_t nk) {
  A a[R][NV];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) a[r][u] = mul(load(acc + r * dp + c0 + u * kLanes), set1(alpha[r]));
  for (int64_t j = 0; j < nk; ++j) {
    A pj[R];
    for (int r = 0; r < R; ++r) pj[r] = set1(p[r * kKeyTile + j]);
    for (int u = 0; u < NV; ++u) {
      const A vv = load(vr + j * vs + c0 + u * kLanes);
      for (int r = 0; r < R; ++r) a[r][u] = fma(pj[r], vv, a[r][u]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < NV; ++u) store(acc + r * dp + c0 + u * kLanes, a[r][u]);
}

template <int R>
inline void accumulate_rows(float* acc, int64_t dp, const float* alpha, const float* p, const float* vr, int64_t vs,
                            int64_t nk) {
  int64_t c0 = 0;
  for (; c0 + 4 * kLanes <= dp; c0 += 4 * kLanes) accumulate<R, 4>(acc, dp, c0, alpha, p, vr, vs, nk);
  switch ((dp - c0) / kLanes) {
    case 3: return accumulate<R, 3>(acc, dp, c0, alpha, p, vr, vs, nk);
    case 2: return accumulate<R, 2>(acc, dp, c0, alpha, p, vr, vs, nk);
    case 1: return accumulate<R, 1>(acc, dp, c0, alpha, p, vr, vs, nk);
  }
}

template <int R>
inline void accumulate_rest(int n, float* acc, int64_t dp, const float* alpha, const float* p, const float* vr,
                            int64_t vs, int64_t nk) {
  if constexpr (R > 1) {
    if (n == R - 1) return accumulate_rows<R - 1>(acc, dp, alpha, p, vr, vs, nk);
    return accumulate_rest<R - 1>(n, acc, dp, alpha, p, vr, vs, nk);
  }
}

// A KV cache stored in fp16 (kv_dtype="f16": half the bytes a decode step at depth reads): n values as f32.
// Exact (every half is a float), so attention over a half cache has the bits of attention over an f32 cache
// holding the same rounded values.
inline void to_float(const uint16_t* src, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(HASTEN_AVX512)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(HASTEN_AVX2)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

// Scratch buffers of one thread's tasks, sized for nq queries (kf, vpad: a half cache's tiles as f32).
struct Scratch {
  std::vector<float> kt, p, acc, m, l, alpha, vpad, kf;
  std::vector<char> visible;
  Scratch(int64_t nq, int64_t d, int64_t dp, bool half = false)
      : kt(d * kKeyTile), p(nq * kKeyTile), acc(nq * dp), m(nq), l(nq), alpha(nq),
        vpad(half || d % kLanes ? kKeyTile * dp : 0, 0.f), kf(half ? kKeyTile * d : 0), visible(nq) {}
};

// Queries of KV head g, tokens [t0, t1), over the keys [jb, je) of one key chunk: each query's softmax state
// (m, l, unnormalised acc [dp]) into part[r * (dp + 2)], a fresh state at the chunk's start. Q [T, H, d]; kb, vb:
// head g's keys/values, rows of d, f32 or fp16 bits (KV = uint16_t: each tile converted exactly to f32 first);
// M [T, S] or null (causal: token t sees keys 0 .. S-T+t).
template <typename KV>
inline void attend_chunk(const float* Q, const KV* kb, const KV* vb, const bool* M, int64_t T, int64_t H,
                         int64_t d, int64_t S, int64_t g, int64_t group, int64_t t0, int64_t t1, float sc, int64_t jb,
                         int64_t je, Scratch& w, float* part) {
  const int64_t nq = (t1 - t0) * group, dp = (d + kLanes - 1) / kLanes * kLanes;
  std::vector<float> &kt = w.kt, &p = w.p, &acc = w.acc, &m = w.m, &l = w.l, &alpha = w.alpha, &vpad = w.vpad;
  std::vector<char>& visible = w.visible;
  std::fill(acc.begin(), acc.begin() + nq * dp, 0.f);
  std::fill(m.begin(), m.begin() + nq, -INFINITY);
  std::fill(l.begin(), l.begin() + nq, 0.f);
  const int64_t jend = std::min(je, M ? S : S - T + t1);  // one past the last key any query may see
  for (int64_t j0 = jb; j0 < jend; j0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, S - j0);
    bool tile_seen = false;
    for (int64_t r = 0; r < nq; ++r) {  // which queries see a key of this tile
      const int64_t t = t0 + r / group;
      bool any = !M && j0 <= S - T + t;
      for (int64_t j = 0; M && j < nk && !any; ++j) any = M[t * S + j0 + j];
      visible[r] = any;
      tile_seen |= any;
    }
    if (!tile_seen) continue;  // a whole tile masked for every query (a sliding window): nothing changes
    if constexpr (std::is_same_v<KV, float>) {
      transpose_keys(kb + j0 * d, nk, d, kt.data());
    } else {
      to_float(kb + j0 * d, nk * d, w.kf.data());
      transpose_keys(w.kf.data(), nk, d, kt.data());
    }
    for (int64_t r = 0; r < nq; r += kScoreRows) {
      const int n = int(std::min<int64_t>(kScoreRows, nq - r));
      const float* qv[kScoreRows];
      bool any = false;
      for (int i = 0; i < n; ++i) {
        const int64_t t = t0 + (r + i) / group, h = g * group + (r + i) % group;
        qv[i] = Q + (t * H + h) * d;
        any |= bool(visible[r + i]);
      }
      if (!any) continue;
      if (n == kScoreRows) scores<kScoreRows>(qv, kt.data(), d, sc, p.data() + r * kKeyTile);
      else scores_rest<kScoreRows>(n, qv, kt.data(), d, sc, p.data() + r * kKeyTile);
    }
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t t = t0 + r / group, last = S - T + t;
      float* pr = p.data() + r * kKeyTile;
      alpha[r] = 1.f;
      if (!visible[r]) {  // no key of this tile is visible: m, l, acc untouched (p = 0)
        std::fill(pr, pr + kKeyTile, 0.f);
        continue;
      }
      const int64_t seen = M ? nk : std::min(nk, last - j0 + 1);  // keys of the tile before any causal cut
      for (int64_t j = seen; j < kKeyTile; ++j) pr[j] = -INFINITY;
      if (M)
        for (int64_t j = 0; j < seen; ++j)
          if (!M[t * S + j0 + j]) pr[j] = -INFINITY;
      A mx = load(pr);
      for (int u = 1; u < kTileVectors; ++u) mx = vmax(mx, load(pr + u * kLanes));
      const float mt = hmax(mx), mn = std::max(m[r], mt);
      alpha[r] = first(vexp(set1(m[r] - mn)));  // 0 at the first visible tile (m = -inf), 1 if m stays
      A sum = set1(0.f);
      for (int u = 0; u < kTileVectors; ++u) {
        const A e = vexp(sub(load(pr + u * kLanes), set1(mn)));
        store(pr + u * kLanes, e);
        sum = add(sum, e);
      }
      l[r] = l[r] * alpha[r] + hsum(sum);
      m[r] = mn;
    }
    const float* vr;
    int64_t vs = d;
    if constexpr (std::is_same_v<KV, float>) {
      vr = vb + j0 * d;
      if (!vpad.empty()) {  // rows padded to whole vectors
        for (int64_t j = 0; j < nk; ++j) std::copy(vr + j * d, vr + (j + 1) * d, vpad.data() + j * dp);
        vr = vpad.data();
        vs = dp;
      }
    } else {  // a half cache: the tile's rows as f32, padded to whole vectors
      for (int64_t j = 0; j < nk; ++j) to_float(vb + (j0 + j) * d, d, vpad.data() + j * dp);
      vr = vpad.data();
      vs = dp;
    }
    int64_t r = 0;
    for (; r + kRows <= nq; r += kRows)
      accumulate_rows<kRows>(acc.data() + r * dp, dp, alpha.data() + r, p.data() + r * kKeyTile, vr, vs, nk);
    if (r < nq)
      accumulate_rest<kRows>(int(nq - r), acc.data() + r * dp, dp, alpha.data() + r, p.data() + r * kKeyTile, vr, vs, nk);
  }
  for (int64_t r = 0; r < nq; ++r) {
    float* st = part + r * (dp + 2);
    st[0] = m[r];
    st[1] = l[r];
    std::copy(acc.begin() + r * dp, acc.begin() + (r + 1) * dp, st + 2);
  }
}

// One query's output o [d] from its states over nc key chunks (stride cs floats apart), in chunk order:
// mx = the largest m of the chunks it saw, then l and acc summed with weights exp(m_c - mx). One chunk: weight 1.
inline void combine(const float* part, int64_t nc, int64_t cs, int64_t d, float* o, float* acc) {
  float mx = -INFINITY;
  for (int64_t c = 0; c < nc; ++c)
    if (part[c * cs + 1] > 0.f) mx = std::max(mx, part[c * cs]);
  float l = 0.f;
  std::fill(acc, acc + d, 0.f);
  for (int64_t c = 0; c < nc; ++c) {
    const float* st = part + c * cs;
    if (!(st[1] > 0.f)) continue;
    const float wgt = first(vexp(set1(st[0] - mx)));
    l = l + st[1] * wgt;
    for (int64_t k = 0; k < d; ++k) acc[k] = acc[k] + st[2 + k] * wgt;
  }
  const float inv = 1.f / l;
  for (int64_t k = 0; k < d; ++k) o[k] = acc[k] * inv;
}

}  // namespace attn
}  // namespace hasten
