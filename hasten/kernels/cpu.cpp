// hasten's CPU kernels (see kernels/cpu.py for why they exist and how they are built).
// 1. Y[T, N] = X[T, K] @ W^T computed straight from GGUF Q4_1 / Q8_0 blocks.
// 2. RMSNorm and rotary embedding for a few tokens: one call instead of ~10 small torch ops each, which cost
//    3-15 us apiece on this machine and dominated a decode step.
//
// Exactness: every weight is rebuilt as gguf-py's dequantize does it (Q4_1: d*q, rounded, then + m, rounded;
// Q8_0: d*q), so the weights are bit-identical to the dense fp32 ones. Built with -ffp-contract=off so the
// compiler never fuses that multiply-add; the accumulation uses FMA, which only changes summation rounding.
// Determinism: each (token, row) result is accumulated by the same instruction sequence whatever T is, so a
// token scored inside a draft tree gets bit-identical logits to the same token scored alone.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {
constexpr int64_t QK = 32;

#ifdef __AVX512F__
// R rows x TN tokens: 2*R*TN accumulators live in registers (R, TN compile-time constants). Several rows at once
// give the core independent FMA chains to overlap (one row's two chains leave it waiting on FMA latency); each
// (row, token) result still comes from the same instruction sequence, so interleaving changes no bit.
template <int R, int TN, typename Dequant>
inline void rows_tokens(const float* xb0, float* y, int64_t K, int64_t N, int64_t NB, int64_t i, Dequant& dequant) {
  __m512 lo_acc[R][TN], hi_acc[R][TN];
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < TN; ++k) lo_acc[r][k] = hi_acc[r][k] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const float* xb = xb0 + b * QK;
    for (int r = 0; r < R; ++r) {
      __m512 w_lo, w_hi;  // weights 0..15 and 16..31 of block b of row i + r
      dequant(i + r, b, w_lo, w_hi);
      for (int k = 0; k < TN; ++k) {
        lo_acc[r][k] = _mm512_fmadd_ps(w_lo, _mm512_loadu_ps(xb + k * K), lo_acc[r][k]);
        hi_acc[r][k] = _mm512_fmadd_ps(w_hi, _mm512_loadu_ps(xb + k * K + 16), hi_acc[r][k]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int k = 0; k < TN; ++k) y[k * N + i + r] = _mm512_reduce_add_ps(_mm512_add_ps(lo_acc[r][k], hi_acc[r][k]));
}

// All T tokens of rows [i, i + R): the same per-token instruction sequence in every specialisation, so results
// do not depend on T. Rows x tokens per pass are chosen to keep at most 16 accumulators.
template <int R, typename Dequant>
inline void rows_all_tokens(const float* X, float* Y, int64_t T, int64_t K, int64_t N, int64_t NB, int64_t i, Dequant& dequant) {
  constexpr int R4 = R < 2 ? R : 2;
  int64_t t = 0;
  for (; t + 8 <= T; t += 8)
    for (int r = 0; r < R; ++r) rows_tokens<1, 8>(X + t * K, Y + t * N, K, N, NB, i + r, dequant);
  for (; t + 4 <= T; t += 4)
    for (int r = 0; r < R; r += R4) rows_tokens<R4, 4>(X + t * K, Y + t * N, K, N, NB, i + r, dequant);
  for (; t + 2 <= T; t += 2) rows_tokens<R, 2>(X + t * K, Y + t * N, K, N, NB, i, dequant);
  for (; t < T; ++t) rows_tokens<R, 1>(X + t * K, Y + t * N, K, N, NB, i, dequant);
}

template <typename Dequant>
void run_rows(const float* X, float* Y, int64_t T, int64_t K, int64_t N, int64_t NB, Dequant dequant) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + 4 <= end; i += 4) rows_all_tokens<4>(X, Y, T, K, N, NB, i, dequant);
    for (; i < end; ++i) rows_all_tokens<1>(X, Y, T, K, N, NB, i, dequant);
  });
}
#endif

// x [..., K] (any leading shape, read as T = numel / K rows) → y [..., N], allocated here.
torch::Tensor check_and_alloc(const torch::Tensor& x, const torch::Tensor& d, int64_t block_bytes, const torch::Tensor& qs) {
  TORCH_CHECK(x.dim() >= 1 && x.is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous f32 CPU tensor [..., K]");
  TORCH_CHECK(x.size(-1) == d.size(1) * QK, "x has ", x.size(-1), " features, weights ", d.size(1) * QK);
  TORCH_CHECK(qs.size(0) == d.size(0) && qs.size(1) == d.size(1) && qs.size(2) == block_bytes, "bad block layout");
  auto shape = x.sizes().vec();
  shape.back() = d.size(0);
  return torch::empty(shape, x.options());
}
}  // namespace

// x [..., K] f32; d, m [N, K/32] f32; qs [N, K/32, 16] u8 (low nibble = weight j, high nibble = weight j+16)
torch::Tensor q4_1_matmul(torch::Tensor x, torch::Tensor d, torch::Tensor m, torch::Tensor qs) {
  auto y = check_and_alloc(x, d, 16, qs);
  const int64_t K = x.size(-1), T = x.numel() / K, N = d.size(0), NB = d.size(1);
  const float *D = d.data_ptr<float>(), *M = m.data_ptr<float>();
  const uint8_t* Q = qs.data_ptr<uint8_t>();
#ifdef __AVX512F__
  // A block has only 16 distinct weights, d*j + m for j = 0..15: build them once (one register) and look each
  // weight up with vpermps, which reads only the low 4 bits of each index, so the byte itself indexes the low
  // nibble and byte >> 4 the high one. 6 vector ops per block instead of 11, same values bit for bit.
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  run_rows(x.data_ptr<float>(), y.data_ptr<float>(), T, K, N, NB, [&](int64_t i, int64_t b, __m512& lo, __m512& hi) {
    const int64_t o = i * NB + b;
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Q + o * 16)));
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(D[o]), iota), _mm512_set1_ps(M[o]));
    lo = _mm512_permutexvar_ps(q, table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
  });
#else
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    float w[QK];
    for (int64_t i = begin; i < end; ++i)
      for (int64_t t = 0; t < T; ++t) {
        float acc[QK] = {0};
        for (int64_t b = 0; b < NB; ++b) {
          const int64_t o = i * NB + b;
          for (int j = 0; j < 16; ++j) {
            const float dq_lo = D[o] * float(Q[o * 16 + j] & 15), dq_hi = D[o] * float(Q[o * 16 + j] >> 4);
            w[j] = dq_lo + M[o];
            w[j + 16] = dq_hi + M[o];
          }
          for (int j = 0; j < QK; ++j) acc[j] += w[j] * X[t * K + b * QK + j];
        }
        float s = 0;
        for (int j = 0; j < QK; ++j) s += acc[j];
        Y[t * N + i] = s;
      }
  });
#endif
  return y;
}

// x [..., K] f32; d [N, K/32] f32; qs [N, K/32, 32] i8
torch::Tensor q8_0_matmul(torch::Tensor x, torch::Tensor d, torch::Tensor qs) {
  auto y = check_and_alloc(x, d, 32, qs);
  const int64_t K = x.size(-1), T = x.numel() / K, N = d.size(0), NB = d.size(1);
  const float* D = d.data_ptr<float>();
  const int8_t* Q = qs.data_ptr<int8_t>();
#ifdef __AVX512F__
  run_rows(x.data_ptr<float>(), y.data_ptr<float>(), T, K, N, NB, [&](int64_t i, int64_t b, __m512& lo, __m512& hi) {
    const int64_t o = i * NB + b;
    const __m512 dv = _mm512_set1_ps(D[o]);
    const int8_t* q = Q + o * 32;
    lo = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))));
    hi = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))));
  });
#else
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t t = 0; t < T; ++t) {
        float acc[QK] = {0};
        for (int64_t b = 0; b < NB; ++b)
          for (int j = 0; j < QK; ++j) acc[j] += (D[i * NB + b] * float(Q[(i * NB + b) * 32 + j])) * X[t * K + b * QK + j];
        float s = 0;
        for (int j = 0; j < QK; ++j) s += acc[j];
        Y[t * N + i] = s;
      }
  });
#endif
  return y;
}

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

// Attention for a few new tokens over the KV cache (decode and draft-tree verification): one call instead of
// SDPA's CPU flash kernel, whose set-up costs ~0.2 ms per call at these sizes (6 ms of a 24 ms decode step).
// q [T, H, d] (token-major, as projected); k, v [Hkv, max_len, d] (one layer's cache, batch 0), the first S rows
// valid; mask [T, S] bool (True = may attend) or undefined for causal (token t sees keys 0 .. S-T+t).
// Each (token, head) is computed by the same instruction sequence whatever T is, and keys a token may not see
// are skipped, so a token scored inside a draft tree gets exactly the output it gets when scored alone.
torch::Tensor attend_small(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S, c10::optional<torch::Tensor> mask,
                           double scale) {
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

// sparsity/kernels/cpu.cpp, built into this extension.
torch::Tensor q4t_sparse_in(torch::Tensor x, double thr, torch::Tensor q, torch::Tensor d, torch::Tensor m, int64_t K, int64_t N);
torch::Tensor q4_1_rows_gated(torch::Tensor x, torch::Tensor gate, double thr, torch::Tensor d, torch::Tensor m, torch::Tensor qs);
void register_sparse_kernels(pybind11::module& mod);

namespace {
// One linear layer of a decoder block, as its module's `fused_spec()` describes it (models/quantized.py,
// sparsity/modules.py): w = packed dense blocks [d, m, qs] (Q4_1) or [d, qs] (Q8_0), optionally followed by the
// transposed Q4_1 layout [q, d, m] of TEAL's sparse-input kernel; thr < 0: dense; else inputs with |x| <= thr
// are dropped, by the sparse kernel up to max_t tokens and by the dense kernel on the masked input above.
// Each branch is exactly what the module's forward runs.
torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w, double thr, int64_t max_t) {
  const bool q4_1 = w.size() == 3 || w.size() == 6;
  auto dense = [&](const torch::Tensor& in) {
    return q4_1 ? q4_1_matmul(in, w[0], w[1], w[2]) : q8_0_matmul(in, w[0], w[1]);
  };
  if (thr < 0) return dense(x);
  const int64_t K = x.size(-1), T = x.numel() / K;
  if (w.size() == 6 && T <= max_t) return q4t_sparse_in(x.view({T, K}), thr, w[3], w[4], w[5], K, w[0].size(0));
  return dense(x * (x.abs() > thr));
}
}  // namespace

// One Llama decoder block (pre-norm attention, SiLU-gated MLP) for a few tokens over the KV cache, in one call.
// A decode step used to make ~25 Python-level calls per block (~4 ms of a ~19 ms step on this 2-core machine);
// this runs the very kernels and ATen ops the Python modules run, in the same order, so every bit is the same.
// x [1, T, D]; lin, thr, max_t = q, k, v, o, gate, up, down (see `linear`); cos, sin [T, d];
// ck, cv = this layer's cache [1, Hkv, max_len, d], written at start..start+T; mask [T, start+T] or none.
// gated_up_thr < 0: SwiGLU, silu(gate) * up; else CATS: up's rows only where |silu(gate)| > gated_up_thr.
torch::Tensor decode_block(torch::Tensor x, torch::Tensor ln1, torch::Tensor ln2, double eps,
                           std::vector<std::vector<torch::Tensor>> lin, std::vector<double> thr,
                           std::vector<int64_t> max_t, torch::Tensor cos, torch::Tensor sin, torch::Tensor ck,
                           torch::Tensor cv, int64_t start, c10::optional<torch::Tensor> mask, double scale,
                           int64_t H, int64_t Hkv, double gated_up_thr) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.is_contiguous() && lin.size() == 7 && thr.size() == 7 &&
              max_t.size() == 7, "decode_block: bad arguments");
  TORCH_CHECK(start + x.size(1) <= ck.size(2), "decode_block: KV cache overflow");
  const int64_t T = x.size(1), D = x.size(2);
  auto lin_ = [&](int i, const torch::Tensor& in) { return linear(in, lin[i], thr[i], max_t[i]); };
  const auto h = rms_norm(x.view({T, D}), ln1, eps);
  auto q = lin_(0, h), k = lin_(1, h), v = lin_(2, h);
  const int64_t d = q.size(1) / H;
  q = q.view({T, H, d});
  k = k.view({T, Hkv, d});
  rope_(q, cos, sin);
  rope_(k, cos, sin);
  ck.narrow(2, start, T).copy_(k.view({1, T, Hkv, d}).transpose(1, 2));
  cv.narrow(2, start, T).copy_(v.view({1, T, Hkv, d}).transpose(1, 2));
  const auto attn = attend_small(q, ck[0], cv[0], start + T, mask, scale);
  x = x + lin_(3, attn).view({1, T, D});
  const auto h2 = rms_norm(x.view({T, D}), ln2, eps);
  const auto gate = at::silu(lin_(4, h2));
  const auto gated = gated_up_thr < 0 ? gate * lin_(5, h2)
                                      : q4_1_rows_gated(h2, gate, gated_up_thr, lin[5][0], lin[5][1], lin[5][2]);
  return x + lin_(6, gated).view({1, T, D});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("decode_block", &decode_block, "one decoder block for a few tokens over the KV cache");
  mod.def("q4_1_matmul", &q4_1_matmul, "Y = X @ W^T from Q4_1 blocks");
  mod.def("q8_0_matmul", &q8_0_matmul, "Y = X @ W^T from Q8_0 blocks");
  mod.def("rms_norm", &rms_norm, "RMSNorm over the last dim of [T, D]");
  mod.def("rope_", &rope_, "rotary embedding in place on [T, H, d]");
  mod.def("attend_small", &attend_small, "attention of a few tokens over the KV cache (causal or masked)");
  register_sparse_kernels(mod);
}
