import pytest
import torch

from hasten.models.hf import to_transformers
from hasten.models.loading import _build
from hasten.models.transformer import ModelConfig, UnsupportedModelError
from tests.conftest import block_quantized, tiny_hf_config, tiny_model


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_logits_match_transformers(model_type):
    """Native logits equal transformers' within 1e-4 (fp32) for every supported family."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    hf_config = tiny_hf_config(model_type)
    hf = AutoModelForCausalLM.from_config(hf_config).eval()
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    ours = _build(ModelConfig.from_hf(hf_config), state)
    ids = torch.randint(0, hf_config.vocab_size, (2, 40))
    with torch.inference_mode():
        expected = hf(ids).logits
        got = ours(ids)
    assert (got - expected).abs().max() < 1e-4


def test_llama3_rope_scaling_matches_transformers():
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1)
    hf_config = tiny_hf_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    hf = AutoModelForCausalLM.from_config(hf_config).eval()
    ours = _build(ModelConfig.from_hf(hf_config), {k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    ids = torch.randint(0, hf_config.vocab_size, (1, 120))
    with torch.inference_mode():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_incremental_and_tree_scoring_match_full_pass():
    """Prefill + one-token steps + a tree scored against the cache give the full causal pass's logits."""
    model = tiny_model(3)
    ids = torch.randint(0, 97, (1, 30))
    with torch.inference_mode():
        full = model(ids)[0]
        cache = model.new_cache(64)
        parts = [model(ids[:, :20], cache=cache)[0]]
        for t in range(20, 30):
            parts.append(model(ids[:, t:t + 1], cache=cache)[0])
        assert (torch.cat(parts) - full).abs().max() < 1e-4
        # A tree at position 20: root ids[20] with two branches; the branch equal to ids[21:24] must match.
        cache.rollback(10)
        tokens = torch.tensor([[ids[0, 20], 5, ids[0, 21], ids[0, 22], 7, ids[0, 23]]])
        parents = [-1, 0, 0, 2, 3, 3]  # node 1 and node 2 are siblings; chain 0→2→3→5 is the true text
        depth = [0, 1, 1, 2, 3, 3]
        mask = torch.zeros(6, 26, dtype=torch.bool)
        mask[:, :20] = True
        for i in range(6):
            j = i
            while j >= 0:
                mask[i, 20 + j] = True
                j = parents[j]
        logits = model(tokens, torch.tensor(depth) + 20, cache, mask)[0]
        assert (logits[[0, 2, 3, 5]] - full[20:24]).abs().max() < 1e-4


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config
    with pytest.raises(UnsupportedModelError, match="not supported"):
        ModelConfig.from_hf(GPT2Config())


@pytest.mark.integration
def test_default_model_matches_transformers(default_engine):
    hf = to_transformers(default_engine.model, default_engine.loaded.hf_config)
    ids = default_engine.encode("The quick brown fox jumps over the lazy dog because", chat=False)
    with torch.inference_mode():
        expected = hf(torch.tensor([ids])).logits
    assert (default_engine.logits(ids) - expected).abs().max() < 1e-3


@pytest.mark.integration
def record_stacks(monkeypatch) -> list:
    """Every forward's DecodeStack (None where the forward did not take one), in order."""
    from hasten.models import transformer
    stacks, build = [], transformer.Transformer._decode_stack
    monkeypatch.setattr(transformer.Transformer, "_decode_stack",
                        lambda self, *a: stacks.append(build(self, *a)) or stacks[-1])
    return stacks


def test_fused_decode_block_is_bit_identical_to_the_modules(default_engine, monkeypatch):
    """decode_block (one C++ call per block) and the DecodeStack (one call for all blocks) must give exactly the
    logits of the module-by-module path, for a prompt, single tokens, a draft chain and a draft tree."""
    from hasten.decoding.tree import Draft, flatten
    from hasten.models import transformer

    model = default_engine.model
    g = torch.Generator().manual_seed(0)
    tree = Draft([5, 6, 7, 8], [-1, 0, -1, 2])

    def run():
        cache = model.new_cache(300)
        outs = []
        with torch.inference_mode():
            outs.append(model(torch.randint(0, 1000, (1, 40), generator=g), cache=cache))
            for n in (1, 1, 6, 1):
                outs.append(model(torch.randint(0, 1000, (1, n), generator=g), cache=cache))
            tokens, positions, mask = flatten(9, tree, cache.length)
            outs.append(model(tokens[None], positions, cache, mask))
        return outs

    calls = record_stacks(monkeypatch)
    g.manual_seed(0)
    stacked = run()  # all blocks in one DecodeStack call
    assert sum(s is not None for s in calls) == 6 and len(calls[-1]) == len(model.layers)
    monkeypatch.setattr(transformer.Transformer, "_decode_stack", lambda self, *a: None)
    g.manual_seed(0)
    fused = run()  # one decode_block call per block
    assert model.layers[0]._fused() is not None  # the fused path was taken
    monkeypatch.setattr(transformer.Block, "_fused", lambda self: None)
    g.manual_seed(0)
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert all(torch.equal(a, b) for a, b in zip(stacked, plain))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_fused_families_are_bit_identical_to_the_modules(model_type, monkeypatch):
    """Block-quantized Llama, Qwen2 (q/k/v biases) and Qwen3 (q/k norms) run every block in decode_block and all
    of them in one DecodeStack call, with exactly the module path's logits: a prompt, steps, a draft tree."""
    from hasten.decoding.tree import Draft, flatten
    from hasten.models import transformer
    model = block_quantized(tiny_model(8, model_type))
    assert (model.layers[0].self_attn.q_proj.bias is not None) == (model_type == "qwen2")
    assert all(block._fused() is not None for block in model.layers)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(9))

    def run():
        cache, outs = model.new_cache(64), []
        with torch.inference_mode():
            outs.append(model(ids[:, :12], cache=cache))
            for t in range(12, 20):
                outs.append(model(ids[:, t:t + 1], cache=cache))
            tokens, positions, mask = flatten(3, Draft([4, 5, 6, 7], [-1, 0, -1, 2]), cache.length)
            outs.append(model(tokens[None], positions, cache, mask))
        return outs

    stacks = record_stacks(monkeypatch)
    stacked = run()
    assert len(stacks) == 10 and all(s is stacks[0] for s in stacks)  # built once, every forward through it
    monkeypatch.setattr(transformer.Transformer, "_decode_stack", lambda self, *a: None)
    fused = run()
    monkeypatch.setattr(transformer.Block, "_fused", lambda self: None)
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert all(torch.equal(a, b) for a, b in zip(stacked, plain))


@pytest.mark.parametrize("kv_dtype", [None, torch.float16])
def test_fused_packed_batch_is_bit_identical_to_each_sequence_alone(default_engine, monkeypatch, kv_dtype):
    """A packed forward of several sequences (single tokens, a draft tree, a prompt chunk, and a sequence whose
    cache has windowed layers) runs each block in one decode_block call, and every row has the bits of its
    sequence scored alone, and of the module-by-module path; with an f32 cache and an fp16 one."""
    import copy

    from hasten.decoding.tree import Draft, flatten
    from hasten.models import transformer
    from hasten.models.kv_cache import Segment

    model = copy.copy(default_engine.model)
    model.kv_dtype = kv_dtype
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (30, 12, 50, 20)]
    policies = [None, None, None, "window:16,sinks:4"]
    tree = Draft([5, 6, 7, 8], [-1, 0, -1, 2])
    new = [[11], [12, 13, 14], None, [15]]  # sequence 2 scores the tree

    def caches():
        out = []
        for p, policy in zip(prompts, policies):
            cache = model.new_cache(128, policy=policy)
            assert cache.groups[0].k.dtype == (kv_dtype or torch.float32)
            with torch.inference_mode():
                model(torch.tensor([p]), cache=cache)
            out.append(cache)
        return out

    def work(cache, i):
        if new[i] is None:
            tokens, positions, mask = flatten(9, tree, cache.length)
            return tokens, positions, mask
        return torch.tensor(new[i]), torch.arange(cache.length, cache.length + len(new[i])), None

    with torch.inference_mode():
        alone = []
        for i, cache in enumerate(caches()):
            tokens, positions, mask = work(cache, i)
            alone.append(model(tokens[None], positions, cache, mask)[0])

        def packed():
            cs = caches()
            parts = [work(c, i) for i, c in enumerate(cs)]
            for c, (t, _, _) in zip(cs, parts):
                c.make_room(len(t))
            segments = [Segment(c, c.length, len(t), m) for c, (t, _, m) in zip(cs, parts)]
            return model.packed(torch.cat([t for t, _, _ in parts]), torch.cat([p for _, p, _ in parts]), segments)

        fused = packed()
        assert model.layers[0]._fused() is not None  # the fused path was taken
        monkeypatch.setattr(transformer.Block, "_fused", lambda self: None)
        plain = packed()
    assert torch.equal(fused, torch.cat(alone))
    assert torch.equal(fused, plain)


@pytest.mark.integration
def test_swapped_modules_leave_the_fused_path(default_engine):
    """A sparse clone swaps linears; its blocks must run their own modules, not the dense block's kernels."""
    from torch import nn

    from hasten.sparsity.modules import sparsify
    model = default_engine.model
    assert model.layers[3]._fused() is not None
    clone = sparsify(model, {"layers.3.mlp.down_proj": nn.Identity()})
    assert clone.layers[3]._fused() is None and clone.layers[2]._fused() is not None
    assert model.layers[3]._fused() is not None


@pytest.mark.integration
@pytest.mark.parametrize("method", ["teal:0.25", "teal:0.65", "cats:0.5"])
def test_sparse_blocks_fuse_bit_identically(default_engine, monkeypatch, method):
    """TEAL's sparse linears describe themselves to decode_block (sparse kernel up to their token limit, dense
    kernel on the masked input above it), and so does CATS' gated MLP: the fused blocks must reproduce the module
    path bit for bit."""
    from hasten.models import transformer

    model = default_engine.drafter(method).target
    assert all(block._fused() is not None for block in model.layers)

    def run():
        g = torch.Generator().manual_seed(0)
        cache = model.new_cache(300)
        with torch.inference_mode():
            outs = [model(torch.randint(0, 1000, (1, 40), generator=g), cache=cache)]
            outs += [model(torch.randint(0, 1000, (1, n), generator=g), cache=cache) for n in (1, 2, 1, 6, 1)]
        return outs

    fused = run()
    monkeypatch.setattr(transformer.Block, "_fused", lambda self: None)
    assert all(torch.equal(a, b) for a, b in zip(fused, run()))


@pytest.mark.integration
def test_an_fp16_kv_cache_is_marked_lossy_and_stays_close_to_f32(default_engine, tmp_path, monkeypatch):
    """hasten.load(kv_dtype="f16"): caches in fp16 (half the bytes), results marked lossy, logits within a small
    KL of the f32 cache's on a prompt plus decode steps; a bad dtype is a one-line error."""
    import hasten
    from hasten.engine import Engine, GenerationError

    engine = Engine(default_engine.loaded, kv_dtype="f16")
    assert engine.model.new_cache(16).groups[0].k.dtype == torch.float16
    assert default_engine.model.new_cache(16).groups[0].k.dtype == torch.float32  # the shared model keeps f32
    result = engine.generate("Name three colours.", max_new_tokens=8)
    assert result.kv_policy == "native + f16" and result.kv_lossy and result.tokens == 8
    tokens = torch.randint(0, 1000, (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        outs = []
        for model in (default_engine.model, engine.model):
            cache = model.new_cache(80)
            prompt = model(tokens[:, :50], cache=cache)
            steps = [model(tokens[:, i:i + 1], cache=cache) for i in range(50, 60)]
            outs.append(torch.cat([prompt, *steps], 1)[0].log_softmax(-1))
    kl = (outs[0].exp() * (outs[0] - outs[1])).sum(-1)
    assert float(kl.max()) < 1e-3 and not torch.equal(outs[0], outs[1])
    with pytest.raises(GenerationError, match="unknown KV cache dtype"):
        hasten.load(kv_dtype="int4")
