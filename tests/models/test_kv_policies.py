"""KV policies: parsing, ring compaction, rollback and tree compaction inside a ring, exactness (a window as long as
the context is the full cache; Gemma 3's native rings are its full-cache path, bit for bit), and memory."""
import pytest
import torch
from torch import nn

from hasten.decoding.loop import DecodeStats, Sequence, decode
from hasten.decoding.scheduler import Scheduler
from hasten.decoding.sampling import SamplingConfig
from hasten.kernels import cpu as cpu_kernels
from hasten.kernels.quantize import quantize
from hasten.models.kv import FULL, KVPolicyError, LayerKV, parse
from hasten.models.kv_cache import ContextOverflowError, KVCache
from hasten.models.quantized import QuantLinear
from hasten.models.transformer import ModelConfig
from tests.conftest import tiny_model

VOCAB = 64


def quantized(model):
    """Q8_0 block linears: the kernels whose result for a token does not depend on how many are scored with it."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attr = name.rpartition(".")
            q = QuantLinear("Q8_0", torch.from_numpy(quantize(module.weight.detach().numpy(), "Q8_0")),
                            module.in_features)
            setattr(model.get_submodule(parent) if parent else model, attr, q)
    return model


@pytest.mark.parametrize("text", ["windo:4", "window:0", "window:x", "window:", "window:8,sink:2",
                                  "hybrid:global=all,window=8", "hybrid:window=8,extra=1", "hybrid:sinks=2",
                                  "full:3", "hybrid:global=every0,window=8"])
def test_bad_policy_strings_name_the_fix(text):
    with pytest.raises(KVPolicyError) as e:
        parse(text)
    assert "\n" not in str(e.value) and ("window" in str(e.value) or "use full" in str(e.value))


def test_policies_per_layer_on_llama_and_gemma():
    llama = tiny_model(0).config  # 2 layers, full attention
    assert parse("full").layers(llama) == parse("native").layers(llama) == (FULL, FULL)
    assert parse("window:8,sinks:2").layers(llama) == (LayerKV(8, 2, True),) * 2
    assert parse("window:8,sinks:2").lossy(llama) and not parse("native").lossy(llama)
    six = ModelConfig(97, 48, 80, 6, 4, 2, 16)
    hybrid = parse("hybrid:global=every3,window=8,sinks=4").layers(six)
    assert [s.window for s in hybrid] == [8, 8, None, 8, 8, None]  # LongGen: 1/3 full, 2/3 window + sinks
    gemma = ModelConfig(97, 48, 80, 4, 4, 2, 16, model_type="gemma3", sliding_window=6,
                        layer_types=("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"))
    assert parse("native").layers(gemma) == (LayerKV(6, 0, True),) * 2 + (FULL, LayerKV(6, 0, True))
    assert parse("full").layers(gemma)[0] == LayerKV(6, 0, False)  # full buffers, the window cut by the mask
    assert not parse("native").lossy(gemma) and parse("window:16").lossy(gemma)
    assert parse("window:16").layers(gemma)[0] == LayerKV(6, 0, True)  # its own sliding layers stay exact


def test_ring_compaction_keeps_exactly_the_sinks_and_the_window():
    """Entries tagged with their position: after compactions the ring holds the sinks and the last W positions,
    in order, right after the sinks; nothing is lost while it still has room."""
    spec = LayerKV(window=5, sinks=2, ring=True)
    cache = KVCache(2, 1, 1, 100, 4, torch.float32, layout=(spec, FULL), slack=3)
    ring = cache.groups[0]
    assert ring.capacity == 2 + 5 + 3 and cache.groups[1].capacity == 100
    p = 0
    for n in [3, 3, 3, 2, 1, 3, 3, 1, 2]:
        room = cache.make_room(n)
        assert room >= n
        tag = torch.arange(p, p + n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 1, n, 4)
        for layer in (0, 1):
            cache.append(layer, tag, tag)
        cache.advance(n)
        p += n
        held = ring.held(p, "cpu")
        assert torch.equal(ring.k[0, 0, 0, :held.numel(), 0], held.float())
        assert torch.equal(cache.groups[1].k[0, 0, 0, :p, 0], torch.arange(p).float())  # the full layer: all
        if ring.dropped:
            assert held.tolist()[:2] == [0, 1] and held.tolist()[2] <= p - 5  # sinks, then at least the window
    assert ring.dropped > 0 and cache.dropped
    assert held.numel() <= ring.capacity


@pytest.mark.skipif(cpu_kernels.extension() is None, reason="bit-exactness rests on the C++ kernels")
def test_rollback_and_tree_keep_inside_a_ring_across_compactions():
    """A window policy whose ring compacts every few tokens: a draft tree scored right after a compaction, its
    accepted path kept (one copy, in slot space), a rejected chain rolled back — the next logits equal those of a
    cache that never compacts (the same window, slots = positions) fed the accepted tokens, bit for bit."""
    model = quantized(tiny_model(1, vocab_size=VOCAB, scale=1.0))
    policy = "window:6,sinks:2"
    ring = model.new_cache(200, policy=policy, slack=7)
    wide = model.new_cache(200, policy=policy, slack=200)  # capacity ≥ max_len: never compacts
    assert ring.rings and not wide.rings
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, VOCAB, (1, 60), generator=g)
    with torch.inference_mode():
        ring_logits = model(text[:, :40], cache=ring)  # in pieces of at most the slack
        wide_logits = model(text[:, :40], cache=wide)
        assert torch.equal(ring_logits, wide_logits) and ring.dropped
        compacted = 0
        for step in range(4):
            before = ring.groups[0].dropped
            ring.make_room(7)
            compacted += ring.groups[0].dropped > before  # the tree comes right after a compaction
            # a tree: root + two branches [root, a, b | c], accepted path root → c
            root, a, b, c = text[0, 40 + 4 * step: 44 + 4 * step].tolist()
            tokens = torch.tensor([[root, a, b, c]])
            start = ring.length
            positions = torch.tensor([start, start + 1, start + 2, start + 1])
            mask = torch.ones(4, start + 4, dtype=torch.bool)
            mask[:, start:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
            tree = model(tokens, positions, cache=ring, mask=mask)[0]
            ring.keep(start, torch.tensor([0, 3]))
            chain = model(torch.tensor([[root, c]]), cache=wide)[0]
            assert torch.equal(tree[[0, 3]], chain)
            model(torch.tensor([[a, b, c]]), cache=ring)  # scored, then rejected
            ring.rollback(3)
            assert ring.length == wide.length
        assert torch.equal(model(text[:, 59:60], cache=ring), model(text[:, 59:60], cache=wide))
    assert compacted >= 2
    ring.make_room(7)
    with pytest.raises(ContextOverflowError):
        ring.rollback(ring.length - ring.groups[0].dropped - 3)  # back past what the ring still holds
    ring.length = 1  # only sinks left: the ring starts over
    assert not ring.dropped


def test_a_window_as_long_as_the_context_is_the_full_cache():
    """window:W with W ≥ every position (and a ring that never needs to compact): the full policy's greedy output,
    and its logits up to rounding (a windowed layer runs kernels/attention_window.h, the full one the streamed
    kernel: the same attention, summed in another order)."""
    model = tiny_model(2, vocab_size=VOCAB, scale=1.0)
    prompt = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    runs = {}
    for policy in ("full", "window:200,sinks:0"):
        stats = DecodeStats()
        cache = model.new_cache(200, policy=policy)
        steps = list(decode(model, prompt, _no_draft(), SamplingConfig(), 30, set(), stats, cache=cache))
        runs[policy] = ([t for s in steps for t in s.tokens], torch.cat([s.logits for s in steps]))
    (a, la), (b, lb) = runs.values()
    assert a == b and torch.allclose(la, lb, rtol=1e-4, atol=2e-3)


def _no_draft():
    from hasten.decoding.drafters.base import NoDraft
    return NoDraft()


def test_gemma3_native_rings_are_its_full_cache_path_bit_for_bit():
    """A tiny Gemma 3 (window 6) at a context seven windows long: its sliding layers keep rings of 6 + slack entries
    that compact many times; greedy decoding with a prompt-lookup drafter, and the teacher-forced logits, equal
    the full-cache path's (every layer holds everything, the window cut by the mask) bit for bit."""
    from hasten.decoding.drafters.prompt_lookup import PromptLookup
    from tests.models.test_gemma3 import WINDOW, tiny_gemma3
    _, model = tiny_gemma3(4)
    prompt = torch.randint(0, 97, (14,), generator=torch.Generator().manual_seed(6)).tolist()
    prompt += prompt
    out = {}
    for policy in ("full", "native"):
        for drafter in (_no_draft, lambda: PromptLookup(n=2, k=3, adaptive=False)):
            cache = model.new_cache(120, policy=policy, slack=5)
            # prompt chunks of 5 under both policies: fp32 nn.Linear gives bits that depend on the chunk's length
            seq = Sequence(model, prompt, drafter(), SamplingConfig(), 7 * WINDOW - len(prompt), set(), cache)
            steps = list(Scheduler(step_tokens=5).steps(seq))
            out[policy, drafter] = ([t for s in steps for t in s.tokens], torch.cat([s.logits for s in steps]))
        assert (cache.groups[0].dropped > 0) == (policy == "native")  # the rings did compact
    full_tokens, full_logits = out["full", _no_draft]
    for (policy, drafter), (tokens, logits) in out.items():
        assert tokens == full_tokens, (policy, drafter)
        if drafter is _no_draft:
            assert torch.equal(logits, full_logits), policy
    # The tiny model's greedy output settles on one token, where a window hardly shows: teacher-force a random
    # text too, in the same pieces under both policies, a draft tree among them.
    ids = torch.randint(0, 97, (1, 7 * WINDOW), generator=torch.Generator().manual_seed(8))
    got = {}
    with torch.inference_mode():
        for policy in ("full", "native"):
            cache, rows, t = model.new_cache(64, policy=policy, slack=5), [], 0
            for n in [5, 5, 5, 1, 2, 3] + [1] * (7 * WINDOW - 21):
                cache.make_room(5)
                rows.append(model(ids[:, t:t + n], cache=cache)[0])
                t += n
            start = cache.length
            mask = torch.ones(3, start + 3, dtype=torch.bool)
            mask[1, start + 2] = mask[2, start + 1] = False  # root and two siblings
            tree = model(ids[:, :3], torch.tensor([start, start + 1, start + 1]), cache=cache, mask=mask)[0]
            cache.keep(start, torch.tensor([0, 2]))
            got[policy] = torch.cat(rows + [tree, model(ids[:, 3:4], cache=cache)[0]])
    assert torch.equal(got["full"], got["native"])
    assert (got["full"][20:] - got["full"][19:-1]).abs().max() > 0.1  # the rows differ: a window would show


def test_gemma3_native_rings_decode_as_transformers_does():
    """Against an independent reference: transformers' own cached decode (its sliding layers keep the window),
    one token at a time after a prefill, with rings of 6 + 3 entries compacting every few tokens."""
    from transformers import DynamicCache
    from tests.models.test_gemma3 import WINDOW, tiny_gemma3
    hf, ours = tiny_gemma3(5)
    ids = torch.randint(0, 97, (1, 7 * WINDOW), generator=torch.Generator().manual_seed(7))
    cache, hf_cache = ours.new_cache(64, policy="native", slack=3), DynamicCache(config=hf.config)
    worst = 0.0
    with torch.inference_mode():
        for t, n in [(0, 8)] + [(t, 1) for t in range(8, ids.shape[1])]:
            got = ours(ids[:, t:t + n], cache=cache)  # the prefill in pieces of at most the slack
            expected = hf(ids[:, t:t + n], cache=hf_cache, use_cache=True).logits
            worst = max(worst, float((got - expected).abs().max()))
        assert cache.groups[0].dropped > 4 * WINDOW
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4
    assert worst < 1e-4


def test_gemma3_native_kv_memory_at_8k_is_under_a_quarter_of_full():
    """gemma-3-270m's shape (18 layers, every 6th global, window 512, one KV head of 256): at 8192 positions its
    native cache's buffers hold ≤ 1/4 of a full cache's bytes, and the ring size does not grow with the context."""
    layer_types = tuple("full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(18))
    config = ModelConfig(262144, 640, 2048, 18, 4, 1, 256, model_type="gemma3", layer_types=layer_types,
                         sliding_window=512)

    def nbytes(policy, n):
        return KVCache(18, 1, 1, n, 256, torch.float32, "meta", parse(policy).layers(config)).nbytes

    assert nbytes("native", 8192) <= nbytes("full", 8192) / 4
    ring = KVCache(18, 1, 1, 8192, 256, torch.float32, "meta", parse("native").layers(config)).groups[0]
    assert ring.capacity == KVCache(18, 1, 1, 32768, 256, torch.float32, "meta",
                                    parse("native").layers(config)).groups[0].capacity == 512 + 128
