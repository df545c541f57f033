"""The streamed attention kernel (kernels/attention.h), in every build this CPU runs: it equals a float64 reference
for every query, and a query's output has the same bits whatever is scored with it — alone, in a draft tree, in a
prompt chunk of any length, or split into query tiles at any token — the property that makes tree verification
lossless and batching invariant."""
import pytest
import torch

from hasten.kernels import cpu

BUILDS = [isa for isa in cpu.supported_isas() if cpu.extension(isa) is not None]
H, HKV, D = 9, 3, 64  # SmolLM2's attention shape: 3 query heads per KV head


@pytest.fixture(params=BUILDS)
def ext(request):
    return cpu.extension(request.param)


def reference(q, k, v, S, mask):
    """float64 softmax(q k^T * scale) v per query over the keys its mask row allows: [T, H*d]."""
    T, h, d = q.shape
    kk = k[:, :S].double().repeat_interleave(h // k.shape[0], 0)  # [H, S, d]
    vv = v[:, :S].double().repeat_interleave(h // v.shape[0], 0)
    scores = torch.einsum("thd,hsd->hts", q.double(), kk) * d ** -0.5
    scores = scores.masked_fill(~mask[None], float("-inf"))
    return torch.einsum("hts,hsd->thd", scores.softmax(-1), vv).reshape(T, h * d)


def causal(T, S):
    return torch.ones(T, S, dtype=torch.bool).tril(S - T)


def data(seed, T, S, d=D):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(HKV, S + 7, d, generator=g), torch.randn(HKV, S + 7, d, generator=g)  # rows past S: ignored
    return torch.randn(T, H, d, generator=g) * 2, k, v


@pytest.mark.parametrize("T,S", [(1, 1), (1, 700), (2, 130), (5, 64), (64, 64), (64, 1000), (300, 300), (300, 1345)])
def test_causal_attention_equals_the_reference_and_each_token_scored_alone(ext, T, S):
    q, k, v = data(T * 7 + S, T, S)
    out = ext.attend(q, k, v, S, None, D ** -0.5)  # causal: token t sees keys 0 .. S-T+t
    assert torch.allclose(out.double(), reference(q, k, v, S, causal(T, S)), atol=2e-5)
    for t in sorted({0, T // 2, T - 1}):  # alone, over exactly the keys it may see: the same bits
        alone = ext.attend(q[t:t + 1].contiguous(), k, v, S - T + t + 1, None, D ** -0.5)
        assert torch.equal(alone[0], out[t])


@pytest.mark.parametrize("cuts", [(1,), (5,), (16, 17), (3, 64, 65, 200)])
def test_a_chunked_prompt_gets_the_bits_of_the_whole_prompt_for_every_query_tile_split(ext, cuts):
    T, S = 300, 1100
    q, k, v = data(3, T, S)
    whole = ext.attend(q, k, v, S, None, D ** -0.5)
    bounds = [0, *cuts, T]
    for a, b in zip(bounds, bounds[1:]):  # tokens a..b as one call after the cache of the earlier ones
        part = ext.attend(q[a:b].contiguous(), k, v, S - T + b, None, D ** -0.5)
        assert torch.equal(part, whole[a:b])


def test_a_tree_mask_after_a_long_cache_equals_the_reference_and_each_node_alone(ext):
    g = torch.Generator().manual_seed(4)
    prefix, n = 1500, 23
    S = prefix + n
    q, k, v = data(5, n, S)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, n)]
    mask = torch.zeros(n, S, dtype=torch.bool)
    mask[:, :prefix] = True  # every node sees the prefix once: one pass over it for all nodes
    for i, p in enumerate(parents):
        mask[i, prefix + i] = True
        if p >= 0:
            mask[i, prefix:] |= mask[p, prefix:]
    mask[2, 100:228] = False  # whole key tiles a node may not see are skipped
    out = ext.attend(q, k, v, S, mask, D ** -0.5)
    assert torch.allclose(out.double(), reference(q, k, v, S, mask), atol=2e-5)
    order = torch.randperm(n, generator=g)
    assert torch.equal(ext.attend(q[order].contiguous(), k, v, S, mask[order], D ** -0.5), out[order])
    for i in (0, 2, n - 1):
        assert torch.equal(ext.attend(q[i:i + 1].contiguous(), k, v, S, mask[i:i + 1], D ** -0.5)[0], out[i])
        visible = int(mask[i].nonzero().max()) + 1  # the same mask cut at its last visible key
        cut = ext.attend(q[i:i + 1].contiguous(), k, v, visible, mask[i:i + 1, :visible], D ** -0.5)
        assert torch.equal(cut[0], out[i])


@pytest.mark.parametrize("d", [24, 32])  # 24: rows that are not whole vectors (padded V tiles, scalar transpose)
def test_other_head_sizes_and_groups(ext, d):
    g = torch.Generator().manual_seed(6)
    T, S, h, hkv = 37, 250, 4, 2
    k, v = torch.randn(hkv, S, d, generator=g), torch.randn(hkv, S, d, generator=g)
    q = torch.randn(T, h, d, generator=g)
    out = ext.attend(q, k, v, S, None, d ** -0.5)
    assert torch.allclose(out.double(), reference(q, k, v, S, causal(T, S)), atol=2e-5)
    assert torch.equal(ext.attend(q[-1:].contiguous(), k, v, S, None, d ** -0.5)[0], out[-1])


def test_large_scores_do_not_overflow(ext):
    q, k, v = data(7, 8, 200)
    q = q * 40  # scores in the hundreds: the online max keeps every exp argument <= 0
    out = ext.attend(q, k, v, 200, None, D ** -0.5)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), reference(q, k, v, 200, causal(8, 200)), atol=1e-4)


@pytest.mark.parametrize("T", [3, 40])  # decode-sized (tasks per key chunk) and prompt-sized (per token tile)
def test_the_thread_count_changes_no_bit(ext, T):
    q, k, v = data(8, T, 2100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.attend(q, k, v, 2100, None, D ** -0.5)
        torch.set_num_threads(2)
        two = ext.attend(q, k, v, 2100, None, D ** -0.5)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@pytest.mark.parametrize("shift", [1, 37, 64, 200])
def test_the_window_kernel_does_not_depend_on_where_the_keys_sit(ext, shift):
    """attention_window.h: the same visible keys at other buffer slots (a ring after it compacted, with stale
    entries masked before them) give the same bits; what the streamed kernel does not promise, since its tiles
    and lanes follow slots."""
    T, S = 5, 300
    q, k, v = data(3, T, S)
    mask = causal(T, S)
    mask[:, :40] = False  # out of the window
    moved_k = torch.cat([torch.randn(k.shape[0], shift, k.shape[2]), k], 1).contiguous()
    moved_v = torch.cat([torch.randn(v.shape[0], shift, v.shape[2]), v], 1).contiguous()
    moved_mask = torch.cat([torch.zeros(T, shift, dtype=torch.bool), mask], 1)
    here = ext.attend_window(q, k, v, S, mask, 0.125)
    there = ext.attend_window(q, moved_k, moved_v, S + shift, moved_mask, 0.125)
    assert torch.equal(here, there)
    assert torch.allclose(here, reference(q, k, v, S, mask).float(), atol=1e-5)


def packed_args(segments):
    """attend_packed's arguments for segments (q, k_new, v_new, cache_k, cache_v, start, mask or None, windowed)."""
    q = torch.cat([s[0] for s in segments]).contiguous()
    k = torch.cat([s[1] for s in segments]).contiguous()
    v = torch.cat([s[2] for s in segments]).contiguous()
    empty = torch.empty(0, dtype=torch.bool)
    return (q, k, v, [s[3] for s in segments], [s[4] for s in segments], [s[5] for s in segments],
            [s[0].shape[0] for s in segments], [empty if s[6] is None else s[6] for s in segments],
            [s[7] for s in segments], D ** -0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_packed_call_gives_every_segment_the_bits_of_its_own_call(ext, dtype):
    """attend_packed (kernels/attention_packed.h): decode tokens, a draft tree, a prompt chunk and a windowed
    sequence in one call, each written into its own cache and attended there: every row has the bits of its
    segment scored alone by attend / attend_window over the same cache, for f32 and fp16 caches."""
    g = torch.Generator().manual_seed(5)
    shapes = [(1, 300, None, False), (4, 40, "tree", False), (70, 600, None, False), (2, 90, "window", True),
              (1, 1, None, False)]
    segments = []
    for T, start, kind, windowed in shapes:
        S = start + T
        cache_k = torch.randn(HKV, S + 9, D, generator=g).to(dtype)
        cache_v = torch.randn(HKV, S + 9, D, generator=g).to(dtype)
        mask = None
        if kind == "tree":
            mask = causal(T, S)
            mask[2, start + 1] = False  # node 2 does not descend from node 1
        elif kind == "window":
            mask = causal(T, S)
            mask[:, 3:30] = False  # past the window, after 3 sinks
        segments.append((torch.randn(T, H, D, generator=g), torch.randn(T, HKV, D, generator=g),
                         torch.randn(T, HKV, D, generator=g), cache_k, cache_v, start, mask, windowed))
    out = ext.attend_packed(*packed_args(segments))
    row = 0
    for q, k, v, cache_k, cache_v, start, mask, windowed in segments:
        T = q.shape[0]
        assert torch.equal(cache_k[:, start:start + T], k.transpose(0, 1).to(dtype))  # written, rounded as torch does
        assert torch.equal(cache_v[:, start:start + T], v.transpose(0, 1).to(dtype))
        kernel = ext.attend_window if windowed else ext.attend
        alone = kernel(q.contiguous(), cache_k, cache_v, start + T, mask, D ** -0.5)
        assert torch.equal(out[row:row + T], alone)
        if dtype == torch.float16:  # an fp16 cache reads exactly as the f32 cache of the same rounded values
            assert torch.equal(alone, kernel(q.contiguous(), cache_k.float(), cache_v.float(), start + T, mask,
                                             D ** -0.5))
        row += T


def test_per_node_attention_changes_time_not_bits(ext):
    """The A/B switch of measure_attention --end-to-end (each node of a few-token segment on its own pass over
    the cache, as verification was before prefix aggregation) gives every row the same bits, for a causal chain
    and a tree mask, beside a prompt chunk it leaves alone."""
    g = torch.Generator().manual_seed(9)
    segments = []
    for T, start, kind in [(5, 700, None), (6, 300, "tree"), (40, 200, None)]:
        S = start + T
        mask = None
        if kind == "tree":
            mask = causal(T, S)
            mask[3, start + 1:start + 3] = False  # node 3 hangs off the root
        segments.append((torch.randn(T, H, D, generator=g), torch.randn(T, HKV, D, generator=g),
                         torch.randn(T, HKV, D, generator=g), torch.randn(HKV, S + 3, D, generator=g),
                         torch.randn(HKV, S + 3, D, generator=g), start, mask, False))
    aggregated = ext.attend_packed(*packed_args(segments))
    ext.set_per_node_attention(True)
    try:
        per_node = ext.attend_packed(*packed_args(segments))
    finally:
        ext.set_per_node_attention(False)
    assert torch.equal(per_node, aggregated)
    assert torch.equal(ext.attend_packed(*packed_args(segments)), aggregated)  # switched back
