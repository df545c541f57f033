// Attention for windowed layers (a sliding window, window + sinks): each query's result depends only on the keys
// it may see, in position order — not on which buffer slots they sit in. A ring cache (KV policies,
// models/kv_cache.py) moves its entries down to the start of its buffer when it compacts, at moments that depend
// on how a sequence's work was stepped, so the same key sits at another slot in another run; the streamed
// kernel's tiles and lanes follow slots (attention.h), this one does not: one exact max over the visible keys,
// then the sum of exp(s - max) and the weighted values accumulated key by key in slot order (= position order).
// Keys a query may not see add exactly nothing. So Gemma 3's ring (native policy) gives the bits of its full-cache
// reference, and a windowed sequence's output does not depend on what it was batched with. A window holds a few
// hundred keys, so one pass per (token, head) costs little there. Arguments as `attend`'s.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

inline torch::Tensor attend_window(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S,
                                   c10::optional<torch::Tensor> mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat32, "q must be contiguous f32 [T, H, d]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
              v.stride(1) == v.size(2), "k, v must be [Hkv, max_len, d] with contiguous rows");
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), Hkv = k.size(0);
  TORCH_CHECK(H % Hkv == 0 && k.size(2) == d && S <= k.size(1) && S >= T, "bad attention shapes");
  const bool* M = nullptr;
  torch::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == torch::kBool && m.size(0) == T && m.size(1) == S, "mask must be bool [T, S]");
    M = m.data_ptr<bool>();
  }
  auto out = torch::empty({T, H * d}, q.options());
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *V = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const int64_t ks = k.stride(0), vs = v.stride(0), group = H / Hkv;
  const float sc = float(scale);
  at::parallel_for(0, T * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p(S);
    std::vector<float> acc(d);
    for (int64_t th = begin; th < end; ++th) {
      const int64_t t = th / H, h = th % H, g = h / group;
      const float* qv = Q + (t * H + h) * d;
      const float* kb = K + g * ks;
      const float* vb = V + g * vs;
      const int64_t last = S - T + t;  // causal limit when no mask is given
      float mx = -INFINITY;
      for (int64_t j = 0; j < S; ++j) {
        const bool ok = M ? M[t * S + j] : j <= last;
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
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < S; ++j) {
        if (p[j] == 0.f) continue;
        const float w = p[j];
        const float* vr = vb + j * d;
#ifdef __AVX512F__
        if (d % 16 == 0) {
          const __m512 wv = _mm512_set1_ps(w);
          for (int64_t c = 0; c < d; c += 16)
            _mm512_storeu_ps(acc.data() + c, _mm512_fmadd_ps(wv, _mm512_loadu_ps(vr + c), _mm512_loadu_ps(acc.data() + c)));
          continue;
        }
#endif
        for (int64_t c = 0; c < d; ++c) acc[c] = std::fma(w, vr[c], acc[c]);
      }
      float* o = O + t * H * d + h * d;
      const float inv = 1.f / sum;
      for (int64_t c = 0; c < d; ++c) o[c] = acc[c] * inv;
    }
  });
  return out;
}
