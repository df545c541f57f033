// Activation-sparse matmuls for hasten's sparsity methods (see sparsity/kernels/cpu.py for the why and the layouts).
//
// 1. Sparse input, y[T, N] = x[T, K] @ W^T reading only the weight rows of W^T (= columns of W) whose input is
//    active: |x[t, k]| > thr for some token t (the union over the T tokens; each token still uses only its own
//    kept inputs, the others enter as exact zeros). W^T is stored row-major [K, N], so an active input's weights
//    are one contiguous row. Formats: fp32, and "q4t": GGUF Q4_1 weights transposed without changing any value —
//    4-bit codes q[k, n] plus the blocks' fp16 scale d and minimum m, which are shared by the 32 inputs of a
//    block: sum_k x_k (d q_k + m) = d * (sum_k x_k q_k) + m * (sum_k x_k) over the active k of a block (GGUF
//    Q4_0 uses the same layout with m = -8 d, exact: w = d (q - 8)). "h16t": BF16 or F16 weights transposed,
//    values unchanged, [K, N]. "q8t": GGUF Q8_0 transposed without changing any value — int8 codes
//    q[k, n] and the block scale d[k/32, n]: sum_k x_k (d q_k) = d * (sum_k x_k q_k) over a block's active k.
// 2. Row subsets, y[:, i] = W[i] @ x for the selected output rows i only (the others are 0), in the model's own
//    layout (Q4_1 blocks or fp32 rows): the neurons CATS and Deja Vu keep, the heads Deja Vu keeps.
//
// Per token, every result is accumulated by the same instruction sequence whatever T is, and inputs outside a
// token's own kept set add exact zeros, so a token's output does not depend on which tokens share the call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {
constexpr int64_t QK = 32;  // inputs per Q4_1 block

// The active inputs of x [T, K]: ascending channel ids, and their values per token (0 where that token drops it).
struct Active {
  std::vector<int32_t> k;   // [A]
  std::vector<float> xs;    // [A, T]
};

Active select(const float* X, int64_t T, int64_t K, float thr) {
  Active a;
  a.k.reserve(K);
  a.xs.reserve(K * T);
  for (int64_t k = 0; k < K; ++k) {
    bool any = false;
    for (int64_t t = 0; t < T; ++t) any |= std::fabs(X[t * K + k]) > thr;
    if (!any) continue;
    a.k.push_back(int32_t(k));
    for (int64_t t = 0; t < T; ++t) {
      const float v = X[t * K + k];
      a.xs.push_back(std::fabs(v) > thr ? v : 0.f);
    }
  }
  return a;
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be contiguous f32 [T, K]");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weights ", K);
}

// Token chunks: 4 at a time, then 2, then 1 (each chunk keeps its accumulators in registers).
template <typename F>
void token_chunks(int64_t T, F f) {
  int64_t t = 0;
  for (; t + 4 <= T; t += 4) f(t, std::integral_constant<int, 4>());
  for (; t + 2 <= T; t += 2) f(t, std::integral_constant<int, 2>());
  for (; t < T; ++t) f(t, std::integral_constant<int, 1>());
}

constexpr int64_t TILE = 64;  // outputs per work item: divides 192, 576, 1536 and every multiple of 64
constexpr int64_t PREFETCH = 48;  // rows ahead

}  // namespace

// ---- 1. sparse input ------------------------------------------------------------------------------------------

// x [T, K] f32; wt [K, N] f32 (W transposed) → y [T, N]
torch::Tensor f32t_sparse_in(torch::Tensor x, double thr, torch::Tensor wt) {
  TORCH_CHECK(wt.dim() == 2 && wt.scalar_type() == torch::kFloat32 && wt.is_contiguous(), "wt must be contiguous f32 [K, N]");
  const int64_t K = wt.size(0), N = wt.size(1), T = x.size(0);
  check_x(x, K);
  auto y = torch::zeros({T, N}, x.options());
  const Active act = select(x.data_ptr<float>(), T, K, float(thr));
  const int64_t A = act.k.size();
  if (A == 0) return y;
  const float* W = wt.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  token_chunks(T, [&](int64_t t0, auto tn) {
    constexpr int TN = decltype(tn)::value;
    at::parallel_for(0, (N + TILE - 1) / TILE, 1, [&](int64_t begin, int64_t end) {
      for (int64_t tile = begin; tile < end; ++tile) {
        const int64_t n0 = tile * TILE, width = std::min(TILE, N - n0);
#ifdef __AVX512F__
        if (width == TILE) {
          __m512 acc[TN][4];
          for (int t = 0; t < TN; ++t)
            for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_setzero_ps();
          for (int64_t a = 0; a < A; ++a) {
            const float* w = W + int64_t(act.k[a]) * N + n0;
            const float* xa = act.xs.data() + a * T + t0;
            __m512 wv[4];
            for (int v = 0; v < 4; ++v) wv[v] = _mm512_loadu_ps(w + 16 * v);
            for (int t = 0; t < TN; ++t) {
              const __m512 xv = _mm512_set1_ps(xa[t]);
              for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_fmadd_ps(wv[v], xv, acc[t][v]);
            }
          }
          for (int t = 0; t < TN; ++t)
            for (int v = 0; v < 4; ++v) _mm512_storeu_ps(Y + (t0 + t) * N + n0 + 16 * v, acc[t][v]);
          continue;
        }
#endif
        for (int t = 0; t < TN; ++t) {
          float* yr = Y + (t0 + t) * N + n0;
          for (int64_t a = 0; a < A; ++a) {
            const float xv = act.xs[a * T + t0 + t];
            const float* w = W + int64_t(act.k[a]) * N + n0;
            for (int64_t j = 0; j < width; ++j) yr[j] = std::fma(w[j], xv, yr[j]);
          }
        }
      }
    });
  });
  return y;
}

namespace {
// Accumulate TN tokens over one tile of width W (128 or 64) of the transposed Q4_1 layout (see cpu.py):
// out[t] += sum over active blocks of d * (sum_k x_k q_k) + m * (sum_k x_k).
template <int TN, int W>
inline void q4t_tile(const uint8_t* C, const at::Half* D, const at::Half* M, const Active& act, const std::vector<int64_t>& blk,
                     const std::vector<int64_t>& first, const std::vector<int64_t>& last, const std::vector<float>& sx,
                     int64_t T, int64_t t0, float* Y, int64_t N, int64_t n0, const uint8_t* next_tile, int64_t next_row) {
  constexpr int V = W / 16;  // vectors of 16 outputs
  constexpr int64_t ROW = W / 2;  // bytes of codes per input row
#ifdef __AVX512F__
  __m512 out[TN][V];
  for (int t = 0; t < TN; ++t)
    for (int v = 0; v < V; ++v) out[t][v] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(15);
  for (size_t bi = 0; bi < blk.size(); ++bi) {
    __m512 acc[TN][V];
    for (int t = 0; t < TN; ++t)
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_setzero_ps();
    for (int64_t a = first[bi]; a < last[bi]; ++a) {
      const uint8_t* row = C + int64_t(act.k[a]) * ROW;
      // Rows are read in an order the hardware prefetcher cannot guess (gaps where inputs were dropped):
      // ask for the row PREFETCH ahead so many misses are in flight at once.
      const int64_t A = act.k.size();
      if (a + PREFETCH < A)
        _mm_prefetch(reinterpret_cast<const char*>(C + int64_t(act.k[a + PREFETCH]) * ROW), _MM_HINT_T1);
      else if (next_tile != nullptr)  // the first rows of this thread's next tile
        _mm_prefetch(reinterpret_cast<const char*>(next_tile + int64_t(act.k[a + PREFETCH - A]) * next_row), _MM_HINT_T1);
      __m512 w[V];
      if constexpr (W == 128) {
        const __m512i b = _mm512_loadu_si512(row);
        const __m512i lo = _mm512_and_si512(b, low4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
        w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(lo, 0)));
        w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(lo, 1)));
        w[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(lo, 2)));
        w[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(lo, 3)));
        w[4] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(hi, 0)));
        w[5] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(hi, 1)));
        w[6] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(hi, 2)));
        w[7] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(hi, 3)));
      } else {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        const __m256i l4 = _mm256_set1_epi8(15);
        const __m256i lo = _mm256_and_si256(b, l4), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), l4);
        w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 0)));
        w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
        w[2] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 0)));
        w[3] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
      }
      const float* xa = act.xs.data() + a * T + t0;
      for (int t = 0; t < TN; ++t) {
        const __m512 xv = _mm512_set1_ps(xa[t]);
        for (int v = 0; v < V; ++v) acc[t][v] = _mm512_fmadd_ps(w[v], xv, acc[t][v]);
      }
    }
    const at::Half* d = D + blk[bi] * W;
    const at::Half* m = M + blk[bi] * W;
    if (bi + 1 < blk.size())  // the next block's scales: 2 x W x 2 bytes
      for (int64_t o = 0; o < W * 2; o += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(D + blk[bi + 1] * W) + o, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(M + blk[bi + 1] * W) + o, _MM_HINT_T0);
      }
    for (int v = 0; v < V; ++v) {
      const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d + 16 * v)));
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(m + 16 * v)));
      for (int t = 0; t < TN; ++t) {
        out[t][v] = _mm512_fmadd_ps(dv, acc[t][v], out[t][v]);
        out[t][v] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[bi * T + t0 + t]), out[t][v]);
      }
    }
  }
  for (int t = 0; t < TN; ++t)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(Y + (t0 + t) * N + n0 + 16 * v, out[t][v]);
#else
  // Portable path: the same arithmetic, one output at a time.
  for (int t = 0; t < TN; ++t)
    for (int j = 0; j < W; ++j) {
      const int64_t byte = j < W / 2 ? j : j - W / 2;
      float o = 0.f;
      for (size_t bi = 0; bi < blk.size(); ++bi) {
        float acc = 0.f;
        for (int64_t a = first[bi]; a < last[bi]; ++a) {
          const uint8_t c = C[int64_t(act.k[a]) * ROW + byte];
          acc = std::fma(float(j < W / 2 ? (c & 15) : (c >> 4)), act.xs[a * T + t0 + t], acc);
        }
        o = std::fma(float(D[blk[bi] * W + j]), acc, o);
        o = std::fma(float(M[blk[bi] * W + j]), sx[bi * T + t0 + t], o);
      }
      Y[(t0 + t) * N + n0 + j] = o;
    }
#endif
}
}  // namespace

// x [T, K] f32; q, d, m: the tiled transposed Q4_1 layout of sparsity/kernels/cpu.py (TransposedQ4) → y [T, N]
torch::Tensor q4t_sparse_in(torch::Tensor x, double thr, torch::Tensor q, torch::Tensor d, torch::Tensor m, int64_t K, int64_t N) {
  const int64_t T = x.size(0), NB = K / QK;
  TORCH_CHECK(K % QK == 0 && N % 64 == 0, "q4t needs K divisible by 32 and N by 64");
  TORCH_CHECK(q.scalar_type() == torch::kUInt8 && q.is_contiguous() && q.numel() == K * N / 2, "q must be u8 [K*N/2]");
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && m.scalar_type() == torch::kFloat16 && d.is_contiguous() &&
              m.is_contiguous() && d.numel() == NB * N && m.numel() == NB * N, "d, m must be f16 [K/32*N]");
  check_x(x, K);
  auto y = torch::zeros({T, N}, x.options());
  const Active act = select(x.data_ptr<float>(), T, K, float(thr));
  const int64_t A = act.k.size();
  if (A == 0) return y;
  // Active blocks: [first, last) ranges into the active list, and the per-token sums of their kept inputs.
  std::vector<int64_t> blk, first, last;
  std::vector<float> sx;  // [blocks, T]
  for (int64_t a = 0; a < A; ++a) {
    const int64_t b = act.k[a] / QK;
    if (blk.empty() || blk.back() != b) {
      blk.push_back(b);
      first.push_back(a);
      last.push_back(a);
      sx.insert(sx.end(), T, 0.f);
    }
    last.back() = a + 1;
    for (int64_t t = 0; t < T; ++t) sx[(blk.size() - 1) * T + t] += act.xs[a * T + t];
  }
  const uint8_t* Q = q.data_ptr<uint8_t>();
  const at::Half* D = d.data_ptr<at::Half>();
  const at::Half* M = m.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  const int64_t tiles = (N + 127) / 128;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t n0 = tile * 128, width = std::min<int64_t>(128, N - n0);
      const uint8_t* C = Q + n0 * K / 2;  // tiles before this one hold K * 64 bytes each
      const at::Half* Dt = D + n0 * NB;
      const at::Half* Mt = M + n0 * NB;
      const int64_t n1 = n0 + 128;  // this thread's next tile, if any (its first rows are prefetched at the end)
      const uint8_t* next = (tile + 1 < end && A > PREFETCH) ? Q + n1 * K / 2 : nullptr;
      const int64_t next_row = std::min<int64_t>(128, N - n1) / 2;
      int64_t t = 0;
      if (width == 128) {
        for (; t + 2 <= T; t += 2) q4t_tile<2, 128>(C, Dt, Mt, act, blk, first, last, sx, T, t, Y, N, n0, next, next_row);
        for (; t < T; ++t) q4t_tile<1, 128>(C, Dt, Mt, act, blk, first, last, sx, T, t, Y, N, n0, next, next_row);
      } else {
        for (; t + 4 <= T; t += 4) q4t_tile<4, 64>(C, Dt, Mt, act, blk, first, last, sx, T, t, Y, N, n0, next, next_row);
        for (; t < T; ++t) q4t_tile<1, 64>(C, Dt, Mt, act, blk, first, last, sx, T, t, Y, N, n0, next, next_row);
      }
    }
  });
  return y;
}

// ---- 1b. plain W^T rows, accumulated in L1: 16-bit floats (BF16, F16) and Q8_0 ----------------------------------
// Layouts (sparsity/kernels/cpu.py: TransposedH16, TransposedQ8): W^T row-major [K, N] in the file's own values
// (bf16/f16, or Q8_0's int8 codes with the fp16 block scales d^T [K/32, N]: sum_k x_k (d q_k) = d * sum_k x_k q_k
// over a block's active k). A work item owns a span of up to 2048 outputs and walks the active inputs' rows,
// reading one contiguous 2-4 KB segment of each and accumulating into per-token arrays that stay in L1.
// Why not register tiles of 64 outputs (one cache line per row, as q4t): measured on a 2-core EPYC, reading a
// random half of 64-byte rows cost as much as reading them all (the hardware prefetchers fetch the gaps, and
// without them the misses are too few in flight); segments of >= 1 KB with gaps of >= 1 KB cost about their share.
// Why the span is capped at 2048 rather than all of N: every thread needs an item (span_for).

namespace {
// Measured on the 1B shape (gate/up 8192x2048, down 2048x8192; Q8_0 and BF16, 1 thread, 50%): spans of 2048
// beat 1024 by ~15-25% and 512 or 256 by more, 4096 and 8192 were no better; 4 rows ahead beat 2 and matched 8.
constexpr int64_t kSpan = 2048;  // most outputs per work item: 8 KB of fp32 accumulators per token
constexpr int64_t kRowsAhead = 4;  // prefetch distance in active rows (2-4 KB each)
constexpr int kTokensAtOnce = 4;  // tokens per pass: their sums (and Q8_0's block sums) stay in L1 for 1-2

// The outputs per work item: the largest power of two <= kSpan (and >= 64) dividing N that still gives every
// thread an item. Each output's sum runs over the rows in the same order whatever the span: it changes speed only.
int64_t span_for(int64_t N) {
  const int64_t threads = at::get_num_threads();
  int64_t s = kSpan;
  while (s > 64 && (N % s != 0 || N / s < threads)) s /= 2;
  return N % s == 0 ? s : 64;
}

// One line (64 bytes) of a row as fp32 vectors, exactly: 4 x 16 int8 codes, or 2 x 16 bf16/f16 values.
struct I8Line {
  using E = int8_t;
  static constexpr int kPerLine = 64, kVecs = 4;
#ifdef __AVX512F__
  static inline void load(const int8_t* p, __m512* w) {
    for (int v = 0; v < 4; ++v)
      w[v] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * v))));
  }
#endif
  static inline float value(const int8_t* p, int64_t j) { return float(p[j]); }
};

template <typename H>
struct H16Line {
  using E = H;  // at::BFloat16 or at::Half
  static constexpr int kPerLine = 32, kVecs = 2;
#ifdef __AVX512F__
  static inline void load(const H* p, __m512* w) {
    for (int v = 0; v < 2; ++v) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16 * v));
      // Both widenings are exact: bf16 is the top half of an fp32, and every IEEE half is an fp32.
      if constexpr (std::is_same<H, at::BFloat16>::value)
        w[v] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      else
        w[v] = _mm512_cvtph_ps(h);
    }
  }
#endif
  static inline float value(const H* p, int64_t j) { return float(p[j]); }
};

// acc[t][j] = fma(w[k_a][n0 + j], x[a][t0 + t], acc[t][j]) for the active rows a in [a0, a1), in that order, for
// j < width (a multiple of the line). Rows are taken R = 4 at a time so each accumulator is loaded and stored
// once per 4 rows; the fma sequence per output is the same as one row at a time.
// With `scale` (Q8_0: the block's d[n0..]), the rows are one block's: acc starts from 0 (not read) and is not
// stored; instead out[t][j] = fma(scale[j], acc[t][j], out[t][j]) at the end, the same arithmetic as a separate
// pass over acc without writing and re-reading it.
template <typename Line, int TN>
inline void rows_into(const typename Line::E* W, int64_t N, int64_t n0, int64_t width, const Active& act, int64_t a0,
                      int64_t a1, int64_t T, int64_t t0, float* acc, const at::Half* scale = nullptr,
                      float* out = nullptr) {
  using E = typename Line::E;
  constexpr int PL = Line::kPerLine, NV = Line::kVecs;
  const int64_t A = act.k.size();
  auto row = [&](int64_t a) { return W + int64_t(act.k[a]) * N + n0; };
#ifdef __AVX512F__
  constexpr int R = 4;
  int64_t a = a0;
  auto step = [&](auto rn) {
    constexpr int RN = decltype(rn)::value;
    const E* rp[RN];
    __m512 xv[RN][TN];
    for (int r = 0; r < RN; ++r) {
      rp[r] = row(a + r);
      for (int t = 0; t < TN; ++t) xv[r][t] = _mm512_set1_ps(act.xs[(a + r) * T + t0 + t]);
    }
    // The rows kRowsAhead ahead (the next item's first rows are not worth guessing: items are 2-4 KB x A rows).
    const E* ahead[RN];
    for (int r = 0; r < RN; ++r) ahead[r] = a + r + kRowsAhead < A ? row(a + r + kRowsAhead) : nullptr;
    const bool fresh = scale != nullptr && a == a0, last = scale != nullptr && a + RN == a1;
    for (int64_t c = 0; c < width; c += PL) {
      for (int r = 0; r < RN; ++r)
        if (ahead[r] != nullptr) _mm_prefetch(reinterpret_cast<const char*>(ahead[r] + c), _MM_HINT_T0);
      __m512 w[RN][NV];
      for (int r = 0; r < RN; ++r) Line::load(rp[r] + c, w[r]);
      for (int v = 0; v < NV; ++v) {
        const int64_t j = c + 16 * v;
        const __m512 dv = last ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale + j)))
                               : _mm512_setzero_ps();
        for (int t = 0; t < TN; ++t) {
          float* p = acc + t * kSpan + j;
          __m512 s = fresh ? _mm512_setzero_ps() : _mm512_load_ps(p);
          for (int r = 0; r < RN; ++r) s = _mm512_fmadd_ps(w[r][v], xv[r][t], s);
          if (last) {
            float* o = out + t * kSpan + j;
            _mm512_store_ps(o, _mm512_fmadd_ps(dv, s, _mm512_load_ps(o)));
          } else {
            _mm512_store_ps(p, s);
          }
        }
      }
    }
    a += RN;
  };
  while (a + R <= a1) step(std::integral_constant<int, R>());
  while (a < a1) step(std::integral_constant<int, 1>());
#else
  if (scale != nullptr)
    for (int t = 0; t < TN; ++t) std::fill_n(acc + t * kSpan, width, 0.f);
  for (int64_t a = a0; a < a1; ++a)
    for (int t = 0; t < TN; ++t) {
      const float x = act.xs[a * T + t0 + t];
      for (int64_t j = 0; j < width; ++j) acc[t * kSpan + j] = std::fma(Line::value(row(a), j), x, acc[t * kSpan + j]);
    }
  if (scale != nullptr)
    for (int t = 0; t < TN; ++t)
      for (int64_t j = 0; j < width; ++j) out[t * kSpan + j] = std::fma(float(scale[j]), acc[t * kSpan + j], out[t * kSpan + j]);
#endif
}

// Work items of `span` outputs over torch's threads; per item, tokens kTokensAtOnce at a time.
// item(n0, t0, tn) computes outputs [n0, n0 + span) of tokens [t0, t0 + tn).
template <typename F>
void span_items(int64_t T, int64_t N, int64_t span, F item) {
  at::parallel_for(0, N / span, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t t0 = 0; t0 < T; t0 += kTokensAtOnce) item(i * span, t0, std::min<int64_t>(kTokensAtOnce, T - t0));
  });
}

template <int TN, typename F>
inline void with_tn(int64_t tn, F f) {
  if constexpr (TN > 1) {
    if (tn < TN) return with_tn<TN - 1>(tn, f);
  }
  f(std::integral_constant<int, TN>());
}

struct alignas(64) Accumulators {
  float v[kTokensAtOnce * kSpan];
};
}  // namespace

// x [T, K] f32; wt [K, N] bf16 or f16 (W transposed, values unchanged: TransposedH16) → y [T, N]
torch::Tensor h16t_sparse_in(torch::Tensor x, double thr, torch::Tensor wt, int64_t K, int64_t N) {
  const bool bf = wt.scalar_type() == torch::kBFloat16;
  TORCH_CHECK((bf || wt.scalar_type() == torch::kFloat16) && wt.is_contiguous() && wt.numel() == K * N,
              "wt must be contiguous bf16 or f16 [K, N]");
  TORCH_CHECK(N % 64 == 0, "h16t needs N divisible by 64");
  check_x(x, K);
  const int64_t T = x.size(0);
  auto y = torch::zeros({T, N}, x.options());
  const Active act = select(x.data_ptr<float>(), T, K, float(thr));
  if (act.k.empty()) return y;
  float* Y = y.data_ptr<float>();
  const int64_t span = span_for(N), A = act.k.size();
  auto run = [&](const auto* W) {
    using H = std::remove_const_t<std::remove_pointer_t<decltype(W)>>;
    span_items(T, N, span, [&](int64_t n0, int64_t t0, int64_t tn) {
      Accumulators acc;
      std::fill_n(acc.v, kTokensAtOnce * kSpan, 0.f);
      with_tn<kTokensAtOnce>(tn, [&](auto c) {
        constexpr int TN = decltype(c)::value;
        rows_into<H16Line<H>, TN>(W, N, n0, span, act, 0, A, T, t0, acc.v);
      });
      for (int64_t t = 0; t < tn; ++t) std::memcpy(Y + (t0 + t) * N + n0, acc.v + t * kSpan, span * sizeof(float));
    });
  };
  if (bf) run(wt.data_ptr<at::BFloat16>());
  else run(wt.data_ptr<at::Half>());
  return y;
}

// x [T, K] f32; q i8 [K, N] and d f16 [K/32, N]: Q8_0 transposed, values unchanged (TransposedQ8) → y [T, N]
torch::Tensor q8t_sparse_in(torch::Tensor x, double thr, torch::Tensor q, torch::Tensor d, int64_t K, int64_t N) {
  TORCH_CHECK(K % QK == 0 && N % 64 == 0, "q8t needs K divisible by 32 and N by 64");
  TORCH_CHECK(q.scalar_type() == torch::kInt8 && q.is_contiguous() && q.numel() == K * N, "q must be i8 [K, N]");
  TORCH_CHECK(d.scalar_type() == torch::kFloat16 && d.is_contiguous() && d.numel() == K / QK * N, "d must be f16 [K/32, N]");
  check_x(x, K);
  const int64_t T = x.size(0);
  auto y = torch::zeros({T, N}, x.options());
  const Active act = select(x.data_ptr<float>(), T, K, float(thr));
  if (act.k.empty()) return y;
  // Active blocks of 32 inputs: [first, last) ranges into the active list (ascending, so a block's are adjacent).
  std::vector<int64_t> blk, first, last;
  for (int64_t a = 0; a < int64_t(act.k.size()); ++a) {
    if (blk.empty() || blk.back() != act.k[a] / QK) {
      blk.push_back(act.k[a] / QK);
      first.push_back(a);
      last.push_back(a);
    }
    last.back() = a + 1;
  }
  const int8_t* Q = q.data_ptr<int8_t>();
  const at::Half* D = d.data_ptr<at::Half>();
  float* Y = y.data_ptr<float>();
  const int64_t span = span_for(N);
  span_items(T, N, span, [&](int64_t n0, int64_t t0, int64_t tn) {
    Accumulators out, acc;  // out: the sum over blocks; acc: one block's sum_k x_k q_k
    std::fill_n(out.v, kTokensAtOnce * kSpan, 0.f);
    with_tn<kTokensAtOnce>(tn, [&](auto c) {
      constexpr int TN = decltype(c)::value;
      for (size_t b = 0; b < blk.size(); ++b)
        rows_into<I8Line, TN>(Q, N, n0, span, act, first[b], last[b], T, t0, acc.v, D + blk[b] * N + n0, out.v);
    });
    for (int64_t t = 0; t < tn; ++t) std::memcpy(Y + (t0 + t) * N + n0, out.v + t * kSpan, span * sizeof(float));
  });
  return y;
}

// ---- 2. row subsets -------------------------------------------------------------------------------------------

namespace {
// One output row i of a Q4_1 matrix for TN tokens (weights rebuilt exactly as gguf-py's dequantize does).
template <int TN>
inline void q4_1_row(const float* X, int64_t K, const float* D, const float* M, const uint8_t* Q, int64_t NB, int64_t i,
                     float* out) {
#ifdef __AVX512F__
  const __m512i low4 = _mm512_set1_epi32(15);
  __m512 lo[TN], hi[TN];
  for (int t = 0; t < TN; ++t) lo[t] = hi[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t o = i * NB + b;
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(Q + o * 16)));
    const __m512 dv = _mm512_set1_ps(D[o]), mv = _mm512_set1_ps(M[o]);
    const __m512 wl = _mm512_add_ps(_mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_and_si512(c, low4))), mv);
    const __m512 wh = _mm512_add_ps(_mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4))), mv);
    for (int t = 0; t < TN; ++t) {
      lo[t] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(X + t * K + b * QK), lo[t]);
      hi[t] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(X + t * K + b * QK + 16), hi[t]);
    }
  }
  for (int t = 0; t < TN; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(lo[t], hi[t]));
#else
  for (int t = 0; t < TN; ++t) {
    float acc = 0.f;
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t o = i * NB + b;
      for (int j = 0; j < 16; ++j) {
        const float wl = D[o] * float(Q[o * 16 + j] & 15) + M[o], wh = D[o] * float(Q[o * 16 + j] >> 4) + M[o];
        acc = std::fma(wl, X[t * K + b * QK + j], acc);
        acc = std::fma(wh, X[t * K + b * QK + j + 16], acc);
      }
    }
    out[t] = acc;
  }
#endif
}

constexpr int64_t ROWS_AHEAD = 6;

inline void prefetch_q4_1_row(const float* D, const float* M, const uint8_t* Q, int64_t NB, int64_t i) {
#ifdef __AVX512F__
  for (int64_t o = 0; o < NB * 16; o += 64) _mm_prefetch(reinterpret_cast<const char*>(Q + i * NB * 16) + o, _MM_HINT_T1);
  for (int64_t o = 0; o < NB * 4; o += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(D + i * NB) + o, _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(M + i * NB) + o, _MM_HINT_T1);
  }
#endif
}

template <int TN>
inline void f32_row(const float* X, int64_t K, const float* W, int64_t i, float* out) {
  const float* w = W + i * K;
#ifdef __AVX512F__
  __m512 acc[TN];
  for (int t = 0; t < TN; ++t) acc[t] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = _mm512_loadu_ps(w + k);
    for (int t = 0; t < TN; ++t) acc[t] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(X + t * K + k), acc[t]);
  }
  for (int t = 0; t < TN; ++t) {
    float s = _mm512_reduce_add_ps(acc[t]);
    for (int64_t j = k; j < K; ++j) s = std::fma(w[j], X[t * K + j], s);
    out[t] = s;
  }
#else
  for (int t = 0; t < TN; ++t) {
    float s = 0.f;
    for (int64_t j = 0; j < K; ++j) s = std::fma(w[j], X[t * K + j], s);
    out[t] = s;
  }
#endif
}

// Rows `rows` of y [T, N] (zeros elsewhere); `row(TN, x_chunk, i, out)` computes one row for a token chunk.
// gate (optional, [T, N]): y[t, i] = gate[t, i] * (W_i · x_t) where |gate[t, i]| > thr, else 0, over the rows
// where any token's gate passes (CATS: the SiLU(gate) activations decide which rows of up_proj are computed).
struct NoPrefetch {
  void operator()(int64_t) const {}
};

template <typename Row, typename Prefetch = NoPrefetch>
torch::Tensor rows_impl(const torch::Tensor& x, int64_t K, int64_t N, const int32_t* rows, int64_t R,
                        const float* gate, float thr, Row row, Prefetch prefetch = Prefetch()) {
  const int64_t T = x.size(0);
  auto y = torch::zeros({T, N}, x.options());
  std::vector<int32_t> picked;
  if (gate != nullptr) {  // the union of rows any token keeps
    for (int64_t i = 0; i < N; ++i)
      for (int64_t t = 0; t < T; ++t)
        if (std::fabs(gate[t * N + i]) > thr) {
          picked.push_back(int32_t(i));
          break;
        }
    rows = picked.data();
    R = picked.size();
  }
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(rows[r] >= 0 && rows[r] < N, "row index ", rows[r], " out of range");
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = rows[r];
      if (r + ROWS_AHEAD < end) prefetch(rows[r + ROWS_AHEAD]);  // chosen rows: an order no prefetcher guesses
      float out[4];
      token_chunks(T, [&](int64_t t0, auto tn) {
        constexpr int TN = decltype(tn)::value;
        row(tn, X + t0 * K, i, out);
        for (int t = 0; t < TN; ++t) {
          float v = out[t];
          if (gate != nullptr) {
            const float g = gate[(t0 + t) * N + i];
            v = std::fabs(g) > thr ? g * v : 0.f;
          }
          Y[(t0 + t) * N + i] = v;
        }
      });
    }
  });
  return y;
}

void check_rows(const torch::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == torch::kInt32 && rows.is_contiguous(), "rows must be int32 [R]");
}

void check_gate(const torch::Tensor& gate, int64_t T, int64_t N) {
  TORCH_CHECK(gate.dim() == 2 && gate.scalar_type() == torch::kFloat32 && gate.is_contiguous() && gate.size(0) == T &&
              gate.size(1) == N, "gate must be contiguous f32 [T, N]");
}

void check_q4_1(const torch::Tensor& x, const torch::Tensor& d, const torch::Tensor& m, const torch::Tensor& qs) {
  TORCH_CHECK(d.scalar_type() == torch::kFloat32 && m.scalar_type() == torch::kFloat32 && qs.scalar_type() == torch::kUInt8 &&
              d.is_contiguous() && m.is_contiguous() && qs.is_contiguous() && qs.dim() == 3 && qs.size(2) == 16,
              "Q4_1 blocks must be d, m f32 [N, K/32] and qs u8 [N, K/32, 16]");
  check_x(x, d.size(1) * QK);
}
}  // namespace

// x [T, K]; rows int32 [R]; d, m [N, K/32] f32, qs [N, K/32, 16] u8 (hasten's repacked Q4_1) → y [T, N]
torch::Tensor q4_1_rows(torch::Tensor x, torch::Tensor rows, torch::Tensor d, torch::Tensor m, torch::Tensor qs) {
  check_q4_1(x, d, m, qs);
  check_rows(rows);
  const int64_t K = x.size(1), N = d.size(0), NB = d.size(1);
  const float *D = d.data_ptr<float>(), *M = m.data_ptr<float>();
  const uint8_t* Q = qs.data_ptr<uint8_t>();
  return rows_impl(x, K, N, rows.data_ptr<int32_t>(), rows.size(0), nullptr, 0.f, [&](auto tn, const float* X, int64_t i, float* out) {
    q4_1_row<decltype(tn)::value>(X, K, D, M, Q, NB, i, out);
  }, [&](int64_t i) { prefetch_q4_1_row(D, M, Q, NB, i); });
}

torch::Tensor q4_1_rows_gated(torch::Tensor x, torch::Tensor gate, double thr, torch::Tensor d, torch::Tensor m, torch::Tensor qs) {
  check_q4_1(x, d, m, qs);
  const int64_t K = x.size(1), N = d.size(0), NB = d.size(1);
  check_gate(gate, x.size(0), N);
  const float *D = d.data_ptr<float>(), *M = m.data_ptr<float>();
  const uint8_t* Q = qs.data_ptr<uint8_t>();
  return rows_impl(x, K, N, nullptr, 0, gate.data_ptr<float>(), float(thr), [&](auto tn, const float* X, int64_t i, float* out) {
    q4_1_row<decltype(tn)::value>(X, K, D, M, Q, NB, i, out);
  }, [&](int64_t i) { prefetch_q4_1_row(D, M, Q, NB, i); });
}

// x [T, K]; rows int32 [R]; w [N, K] f32 → y [T, N]
torch::Tensor f32_rows(torch::Tensor x, torch::Tensor rows, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(), "w must be contiguous f32 [N, K]");
  check_x(x, w.size(1));
  check_rows(rows);
  const int64_t K = w.size(1), N = w.size(0);
  const float* W = w.data_ptr<float>();
  return rows_impl(x, K, N, rows.data_ptr<int32_t>(), rows.size(0), nullptr, 0.f, [&](auto tn, const float* X, int64_t i, float* out) {
    f32_row<decltype(tn)::value>(X, K, W, i, out);
  });
}

torch::Tensor f32_rows_gated(torch::Tensor x, torch::Tensor gate, double thr, torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.is_contiguous(), "w must be contiguous f32 [N, K]");
  check_x(x, w.size(1));
  const int64_t K = w.size(1), N = w.size(0);
  check_gate(gate, x.size(0), N);
  const float* W = w.data_ptr<float>();
  return rows_impl(x, K, N, nullptr, 0, gate.data_ptr<float>(), float(thr), [&](auto tn, const float* X, int64_t i, float* out) {
    f32_row<decltype(tn)::value>(X, K, W, i, out);
  });
}

// Built into the same extension as kernels/cpu.cpp (one .so: its decode_block calls q4t_sparse_in directly).
void register_sparse_kernels(pybind11::module& mod) {
  mod.def("f32t_sparse_in", &f32t_sparse_in, "y = x @ W^T over the active inputs, W^T fp32 [K, N]");
  mod.def("q4t_sparse_in", &q4t_sparse_in, "y = x @ W^T over the active inputs, W^T as transposed Q4_1 codes");
  mod.def("h16t_sparse_in", &h16t_sparse_in, "y = x @ W^T over the active inputs, W^T as tiled bf16 or f16");
  mod.def("q8t_sparse_in", &q8t_sparse_in, "y = x @ W^T over the active inputs, W^T as transposed Q8_0 codes");
  mod.def("q4_1_rows", &q4_1_rows, "selected output rows of x @ W^T from Q4_1 blocks");
  mod.def("q4_1_rows_gated", &q4_1_rows_gated, "gate * (x @ W^T) on the rows where |gate| > thr, Q4_1 blocks");
  mod.def("f32_rows", &f32_rows, "selected output rows of x @ W^T, fp32 W [N, K]");
  mod.def("f32_rows_gated", &f32_rows_gated, "gate * (x @ W^T) on the rows where |gate| > thr, fp32 W");
}
