// Attention for windowed layers (a sliding window, window + sinks): each query's result depends only on the keys
// it may see, in position order — not on which buffer slots they sit in. A ring cache (KV policies,
// models/kv_cache.py) moves its entries down to the start of its buffer when it compacts, at moments that depend
// on how a sequence's work was stepped, so the same key sits at another slot in another run; the streamed
// kernel's tiles and lanes follow slots (attention.h), this one does not: one exact max over the visible keys,
// then the sum of exp(s - max) and the weighted values accumulated key by key in slot order (= position order).
// Keys a query may not see add exactly nothing. So Gemma 3's ring (native policy) gives the bits of its full-cache
// reference, and a windowed sequence's output does not depend on what it was batched with. A window holds a few
// hundred keys, so one pass per (token, head) costs little there. Driven by attention_packed.h.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace hasten {
namespace attn {

// One query of a windowed layer: o [d] from q [d] over keys/values kb, vb [S, d] (rows of d), visible where
// M[j] (or, with M null, for j <= last); p [S] and acc [d] are scratch.
inline void window_query(const float* qv, const float* kb, const float* vb, const bool* M, int64_t S, int64_t last,
                         int64_t d, float sc, float* p, float* acc, float* o) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; ++j) {
    const bool ok = M ? M[j] : j <= last;
    if (!ok) { p[j] = -INFINITY; continue; }
    const float* kr = kb + j * d;
    float dot;
#ifdef __AVX512F__
    if (d % 16 == 0) {
      __m512 a = _mm512_setzero_ps();
      for (int64_t c = 0; c < d; c += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qv + c), _mm512_loadu_ps(kr + c), a);
      dot = _mm512_reduce_add_ps(a);
    } else
#endif
    {
      dot = 0.f;
      for (int64_t c = 0; c < d; ++c) dot = std::fma(qv[c], kr[c], dot);
    }
    p[j] = dot * sc;
    mx = std::max(mx, p[j]);
  }
  float sum = 0.f;
  for (int64_t j = 0; j < S; ++j) {
    const float e = p[j] == -INFINITY ? 0.f : std::exp(p[j] - mx);
    p[j] = e;
    sum += e;
  }
  std::fill(acc, acc + d, 0.f);
  for (int64_t j = 0; j < S; ++j) {
    if (p[j] == 0.f) continue;
    const float w = p[j];
    const float* vr = vb + j * d;
#ifdef __AVX512F__
    if (d % 16 == 0) {
      const __m512 wv = _mm512_set1_ps(w);
      for (int64_t c = 0; c < d; c += 16)
        _mm512_storeu_ps(acc + c, _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + c), _mm512_loadu_ps(acc + c)));
      continue;
    }
#endif
    for (int64_t c = 0; c < d; ++c) acc[c] = std::fma(w, vr[c], acc[c]);
  }
  const float inv = 1.f / sum;
  for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
}

}  // namespace attn
}  // namespace hasten
