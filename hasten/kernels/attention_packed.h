// Attention of a packed forward in one call: the new tokens of several sequences, each against its own KV cache
// (decode steps, draft trees and prompt chunks side by side: the batch scheduler's step), from an f32 or an fp16
// cache (kv_dtype). Included by cpu.cpp.
//
// Why one call: a batched step used to run, per layer and per sequence, two cache copies and a kernel call from
// Python, each kernel splitting its small job over the cores on its own — 23% of an 8-stream step went there.
// Here every sequence's work becomes tasks of one list, run by all cores with dynamic scheduling (largest first):
//   - a few tokens (one token tile: decode, a draft tree): (KV head, key chunk) tasks, then each query combines
//     its chunks in order (attention.h's decode split, so one sequence's cache is spread over the cores);
//   - a prompt chunk: (KV head, token tile) tasks, each walking its key chunks in order (attention.h);
//   - a windowed layer's sequence: one task per (token, head), attention_window.h's exact window pass.
// Which thread runs a task does not change its arithmetic, and every query's arithmetic is what attention.h /
// attention_window.h define for it alone: a token's output has the same bits whatever else is in the pack.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "attention.h"
#include "attention_window.h"

namespace hasten {
namespace attn {

// For A/B measurement only (measure_attention --end-to-end): every token of a few-token segment (a draft tree's
// nodes) attends on its own pass over the cache, as verification did before prefix aggregation. Each query's
// arithmetic is its own either way (attention.h), so this changes time, never a bit.
inline std::atomic<bool>& per_node_attention() {
  static std::atomic<bool> on{false};
  return on;
}

// One sequence's share of the pack: its rows [offset, offset + T) attend to the first S slots of its cache.
struct Segment {
  int64_t offset, T, S;
  const void *K, *V;  // KV head g's rows (d values each) start at K + g * ks, V + g * vs (elements)
  int64_t ks, vs;
  const bool* M;  // [T, S] (True = may attend) or null: causal, token t sees slots 0 .. S-T+t
  bool windowed;
  bool half;  // the cache holds fp16 (kv_dtype="f16"), else f32
};

// attend_chunk over a segment's head g, in the cache's storage type.
inline void attend_chunk_of(const Segment& s, const float* q, int64_t H, int64_t d, int64_t g, int64_t group,
                            int64_t t0, int64_t t1, float sc, int64_t jb, int64_t je, Scratch& w, float* part) {
  if (s.half)
    attend_chunk(q, static_cast<const uint16_t*>(s.K) + g * s.ks, static_cast<const uint16_t*>(s.V) + g * s.vs, s.M,
                 s.T, H, d, s.S, g, group, t0, t1, sc, jb, je, w, part);
  else
    attend_chunk(q, static_cast<const float*>(s.K) + g * s.ks, static_cast<const float*>(s.V) + g * s.vs, s.M,
                 s.T, H, d, s.S, g, group, t0, t1, sc, jb, je, w, part);
}

// O [N, H*d] = attention of Q [N, H, d] for every segment (rows not in a segment are left untouched).
inline void attend_segments(const float* Q, float* O, int64_t H, int64_t Hkv, int64_t d, float sc,
                            const std::vector<Segment>& segs) {
  const int64_t group = H / Hkv, dp = (d + kLanes - 1) / kLanes * kLanes, cs = dp + 2;
  enum Kind : int32_t { kChunk, kTile, kWindow };
  struct Task {
    int32_t seg;
    Kind kind;
    int64_t a, b;  // kChunk: (g, chunk); kTile: (g, token tile); kWindow: (token, head)
    int64_t cost;  // ~ query-key pairs, for largest-first scheduling
  };
  std::vector<Task> tasks;
  std::vector<std::vector<float>> parts(segs.size());  // kChunk segments: [Hkv][nc][T * group][cs]
  int64_t max_s = 0, max_nc = 0;
  bool half = false;
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.T == 0) continue;
    const int32_t si = int32_t(i);
    const int64_t nc = (s.S + kKeyChunk - 1) / kKeyChunk, tiles = (s.T + kTokenTile - 1) / kTokenTile;
    max_s = std::max(max_s, s.S);
    max_nc = std::max(max_nc, nc);
    half |= s.half;
    if (s.windowed) {
      for (int64_t t = 0; t < s.T; ++t)
        for (int64_t h = 0; h < H; ++h) tasks.push_back({si, kWindow, t, h, s.S});
    } else if (tiles == 1) {
      parts[i].resize(Hkv * nc * s.T * group * cs);
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t c = 0; c < nc; ++c)
          tasks.push_back({si, kChunk, g, c, s.T * group * std::min(kKeyChunk, s.S - c * kKeyChunk)});
    } else {
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t tile = 0; tile < tiles; ++tile) {
          const int64_t t1 = std::min(s.T, (tile + 1) * kTokenTile);
          tasks.push_back({si, kTile, g, tile, (t1 - tile * kTokenTile) * group * (s.S - s.T + t1)});
        }
    }
  }
  if (tasks.empty()) return;
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t n_tasks = int64_t(tasks.size()), workers = std::min<int64_t>(at::get_num_threads(), n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch w(kTokenTile * group, d, dp, half);
    std::vector<float> local, p, acc(dp), kf, vf;  // kf, vf: a half cache's window rows as f32
    for (int64_t i; (i = next.fetch_add(1)) < n_tasks;) {
      const Task& task = tasks[i];
      const Segment& s = segs[task.seg];
      const float* q = Q + s.offset * H * d;
      float* o = O + s.offset * H * d;
      if (task.kind == kWindow) {
        if (int64_t(p.size()) < max_s) p.resize(max_s);
        const int64_t t = task.a, h = task.b, g = h / group;
        const float *kb, *vb;
        if (s.half) {
          kf.resize(s.S * d);
          vf.resize(s.S * d);
          to_float(static_cast<const uint16_t*>(s.K) + g * s.ks, s.S * d, kf.data());
          to_float(static_cast<const uint16_t*>(s.V) + g * s.vs, s.S * d, vf.data());
          kb = kf.data();
          vb = vf.data();
        } else {
          kb = static_cast<const float*>(s.K) + g * s.ks;
          vb = static_cast<const float*>(s.V) + g * s.vs;
        }
        window_query(q + (t * H + h) * d, kb, vb, s.M ? s.M + t * s.S : nullptr, s.S, s.S - s.T + t, d, sc,
                     p.data(), acc.data(), o + t * H * d + h * d);
        continue;
      }
      const int64_t g = task.a, nc = (s.S + kKeyChunk - 1) / kKeyChunk;
      if (task.kind == kChunk) {
        const int64_t c = task.b, nq = s.T * group;
        attend_chunk_of(s, q, H, d, g, group, 0, s.T, sc, c * kKeyChunk, (c + 1) * kKeyChunk, w,
                        parts[task.seg].data() + (g * nc + c) * nq * cs);
        continue;
      }
      const int64_t t0 = task.b * kTokenTile, t1 = std::min(s.T, t0 + kTokenTile), n = (t1 - t0) * group;
      if (int64_t(local.size()) < max_nc * kTokenTile * group * cs) local.resize(max_nc * kTokenTile * group * cs);
      for (int64_t c = 0; c < nc; ++c)
        attend_chunk_of(s, q, H, d, g, group, t0, t1, sc, c * kKeyChunk, (c + 1) * kKeyChunk, w,
                        local.data() + c * n * cs);
      for (int64_t r = 0; r < n; ++r) {
        const int64_t t = t0 + r / group, h = g * group + r % group;
        combine(local.data() + r * cs, nc, n * cs, d, o + t * H * d + h * d, acc.data());
      }
    }
  });
  std::vector<float> acc(dp);
  for (size_t i = 0; i < segs.size(); ++i) {  // the few-token segments: each query combines its chunks in order
    if (parts[i].empty()) continue;
    const Segment& s = segs[i];
    const int64_t nc = (s.S + kKeyChunk - 1) / kKeyChunk, nq = s.T * group;
    float* o = O + s.offset * H * d;
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t t = r / group, h = g * group + r % group;
        combine(parts[i].data() + (g * nc * nq + r) * cs, nc, nq * cs, d, o + t * H * d + h * d, acc.data());
      }
  }
}

// A cache tensor [1, Hkv, max_len, d] or [Hkv, max_len, d] (f32 or f16, rows of d contiguous): its head stride,
// slots.
inline std::pair<int64_t, int64_t> cache_layout(const torch::Tensor& c, int64_t Hkv, int64_t d) {
  const int64_t o = c.dim() - 3;
  TORCH_CHECK((c.dim() == 3 || (c.dim() == 4 && c.size(0) == 1)) &&
              (c.scalar_type() == torch::kFloat32 || c.scalar_type() == torch::kHalf) &&
              c.size(o) == Hkv && c.size(o + 2) == d && c.stride(o + 2) == 1 && c.stride(o + 1) == d,
              "a KV cache must be f32 or f16 [(1,) Hkv, max_len, d] with contiguous rows");
  return {c.stride(o), c.size(o + 1)};
}

inline const bool* mask_of(const torch::Tensor& m, int64_t T, int64_t S) {
  if (!m.defined() || m.numel() == 0) return nullptr;
  TORCH_CHECK(m.scalar_type() == torch::kBool && m.dim() == 2 && m.size(0) == T && m.size(1) == S && m.is_contiguous(),
              "a mask must be contiguous bool [T, S] (T new tokens, S = start + T slots)");
  return m.data_ptr<bool>();
}

}  // namespace attn
}  // namespace hasten

// The packed forward's attention: q [N, H, d], k, v [N, Hkv, d] (after RoPE) for the N packed tokens; segment i
// owns rows offset_i .. offset_i + length[i] (in order), writes its keys/values into its cache ck[i], cv[i] at
// slots start[i] .., then attends to slots 0 .. start[i] + length[i] - 1, causally (mask[i] empty) or as mask[i]
// [length, start + length] says; windowed[i]: that layer has a window in the segment's cache (a ring moves keys,
// so the slot-independent window kernel runs). All writes happen before any attention: a later prompt chunk of
// the same sequence sees an earlier one, which never sees the later one's slots. → [N, H*d].
inline torch::Tensor attend_packed(torch::Tensor q, torch::Tensor k, torch::Tensor v, std::vector<torch::Tensor> ck,
                                   std::vector<torch::Tensor> cv, std::vector<int64_t> start,
                                   std::vector<int64_t> length, std::vector<torch::Tensor> mask,
                                   std::vector<bool> windowed, double scale) {
  using namespace hasten::attn;
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat32, "q must be contiguous f32 [N, H, d]");
  const int64_t N = q.size(0), H = q.size(1), d = q.size(2);
  const size_t n = ck.size();
  TORCH_CHECK(cv.size() == n && start.size() == n && length.size() == n && mask.size() == n && windowed.size() == n,
              "attend_packed: one cache, start, length, mask and windowed flag per segment");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3, "k, v must be [N, Hkv, d]");
  const int64_t Hkv = k.size(1);
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous() && k.size(0) == N &&
              v.size(0) == N && v.size(1) == Hkv && k.size(2) == d && v.size(2) == d && H % Hkv == 0 &&
              k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32,
              "k, v must be contiguous f32 [N, Hkv, d] beside q [N, H, d]");
  std::vector<Segment> segs(n);
  const float *Kn = k.data_ptr<float>(), *Vn = v.data_ptr<float>();
  int64_t offset = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto [ks, slots] = cache_layout(ck[i], Hkv, d);
    const auto [vs, vslots] = cache_layout(cv[i], Hkv, d);
    const int64_t T = length[i], S = start[i] + T;
    TORCH_CHECK(T >= 0 && start[i] >= 0 && S <= slots && S <= vslots && offset + T <= N,
                "attend_packed: segment ", i, " does not fit its cache or the pack");
    const bool half = ck[i].scalar_type() == torch::kHalf;
    TORCH_CHECK(cv[i].scalar_type() == ck[i].scalar_type(), "attend_packed: k and v caches of different dtypes");
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < Hkv; ++g) {
        const float *kn = Kn + ((offset + t) * Hkv + g) * d, *vn = Vn + ((offset + t) * Hkv + g) * d;
        const int64_t kat = g * ks + (start[i] + t) * d, vat = g * vs + (start[i] + t) * d;
        if (half) {  // round to nearest even, as torch's f32 → f16 copy
          c10::Half *kc = ck[i].data_ptr<c10::Half>() + kat, *vc = cv[i].data_ptr<c10::Half>() + vat;
          for (int64_t c = 0; c < d; ++c) kc[c] = c10::Half(kn[c]), vc[c] = c10::Half(vn[c]);
        } else {
          std::memcpy(ck[i].data_ptr<float>() + kat, kn, d * sizeof(float));
          std::memcpy(cv[i].data_ptr<float>() + vat, vn, d * sizeof(float));
        }
      }
    segs[i] = {offset, T, S, ck[i].data_ptr(), cv[i].data_ptr(), ks, vs, mask_of(mask[i], T, S), bool(windowed[i]),
               half};
    offset += T;
  }
  TORCH_CHECK(offset == N, "attend_packed: the segments' lengths sum to ", offset, ", the pack has ", N, " tokens");
  if (per_node_attention().load(std::memory_order_relaxed)) {  // one segment per token (see per_node_attention)
    std::vector<Segment> nodes;
    for (const Segment& s : segs) {
      if (s.windowed || s.T <= 1 || s.T > kTokenTile) {
        nodes.push_back(s);
        continue;
      }
      for (int64_t t = 0; t < s.T; ++t) {  // causal: the keys it sees; a mask: its row over all S slots
        Segment one = s;
        one.offset = s.offset + t;
        one.T = 1;
        one.S = s.M ? s.S : s.S - s.T + t + 1;
        one.M = s.M ? s.M + t * s.S : nullptr;
        nodes.push_back(one);
      }
    }
    segs.swap(nodes);
  }
  auto out = torch::empty({N, H * d}, q.options());
  attend_segments(q.data_ptr<float>(), out.data_ptr<float>(), H, Hkv, d, float(scale), segs);
  return out;
}

// One sequence's attention over its cache, nothing written: q [T, H, d]; k, v [Hkv, max_len, d], the first S
// slots valid; mask [T, S] bool or none (causal); windowed: attention_window.h's kernel. → [T, H*d].
inline torch::Tensor attend_one(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S,
                                c10::optional<torch::Tensor> mask, double scale, bool windowed) {
  using namespace hasten::attn;
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == torch::kFloat32, "q must be contiguous f32 [T, H, d]");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3, "k, v must be [Hkv, max_len, d]");
  const int64_t T = q.size(0), H = q.size(1), d = q.size(2), Hkv = k.size(0);
  const auto [ks, slots] = cache_layout(k, Hkv, d);
  const auto [vs, vslots] = cache_layout(v, Hkv, d);
  TORCH_CHECK(H % Hkv == 0 && S <= slots && S <= vslots && S >= T, "bad attention shapes");
  torch::Tensor m = mask.has_value() && mask->defined() ? mask->contiguous() : torch::Tensor();
  auto out = torch::empty({T, H * d}, q.options());
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "k and v of different dtypes");
  attend_segments(q.data_ptr<float>(), out.data_ptr<float>(), H, Hkv, d, float(scale),
                  {{0, T, S, k.data_ptr(), v.data_ptr(), ks, vs, mask_of(m, T, S), windowed,
                    k.scalar_type() == torch::kHalf}});
  return out;
}

inline torch::Tensor attend(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S,
                            c10::optional<torch::Tensor> mask, double scale) {
  return attend_one(q, k, v, S, mask, scale, false);
}

inline torch::Tensor attend_window(torch::Tensor q, torch::Tensor k, torch::Tensor v, int64_t S,
                                   c10::optional<torch::Tensor> mask, double scale) {
  return attend_one(q, k, v, S, mask, scale, true);
}
