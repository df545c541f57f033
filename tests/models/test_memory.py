"""Memory ≈ the file: a loaded GGUF holds no dense copy of any block weight (before or after decoding), its
metadata is never parsed into Python objects, and its tokenizer keeps no Python copy of its vocabulary."""
import numpy as np
import pytest
import torch

from hasten.models import loading
from hasten.models.gguf_file import GGUFFormatError, read_index
from hasten.models.quantized import QuantEmbedding, QuantLinear


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random-weight Llama GGUF (Q4_K_M mix: Q4_K, Q6_K, tied embedding) with the default model's tokenizer."""
    import hasten.models.synthetic as synthetic
    path = tmp_path_factory.mktemp("mem") / "tiny.gguf"
    synthetic.SHAPES["tiny"] = synthetic.Shape(256, 2, 4, 2, 512, vocab=49280, context=512)
    try:
        synthetic.write_random_gguf(path, "tiny", "Q4_K_M", progress=False)
    finally:
        del synthetic.SHAPES["tiny"]
    return path


def test_the_tensor_index_is_gguf_readers(tiny_gguf):
    from gguf import GGUFReader
    ours, theirs = read_index(tiny_gguf), GGUFReader(tiny_gguf).tensors
    assert [t.name for t in ours.tensors] == [t.name for t in theirs]
    for a, b in zip(ours.tensors, theirs):
        assert a.tensor_type == b.tensor_type, a.name
        assert a.shape == tuple(int(d) for d in b.shape), a.name
        assert a.data_offset == b.data_offset, a.name
        assert np.array_equal(a.data, b.data.view(np.uint8).reshape(-1)), a.name


def test_a_damaged_file_is_one_clear_error(tmp_path, tiny_gguf):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + tiny_gguf.read_bytes()[4:4096])
    with pytest.raises(GGUFFormatError, match="magic"):
        read_index(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-4096])
    with pytest.raises(GGUFFormatError, match="past the end"):
        read_index(cut)
    with pytest.raises(loading.ModelLoadError, match="re-download"):
        loading.load(cut)


def test_loading_never_parses_the_metadata(tiny_gguf, monkeypatch):
    """gguf's GGUFReader turns a tokenizer's metadata into ~1M small arrays (700 MB for gemma-3); once the config
    and tokenizer are cached, loading must not open it."""
    loading.load(tiny_gguf)  # the first load converts the config and tokenizer through transformers
    import gguf

    def refuse(*args, **kwargs):
        raise AssertionError("GGUFReader opened while loading")
    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)
    monkeypatch.setattr(gguf.gguf_reader.GGUFReader, "__init__", refuse)
    loaded = loading.load(tiny_gguf)
    assert isinstance(loaded.model.lm_head, QuantLinear)


def _tensors(obj, seen, depth=0):
    """Every tensor reachable from `obj` through module attributes and plain containers."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, torch.nn.Module):
        for v in vars(obj).values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)


def test_no_dense_copy_of_a_block_weight_after_prefill_and_decode(tiny_gguf):
    from hasten.engine import Engine
    loaded = loading.load(tiny_gguf)
    engine = Engine(loaded)
    engine.generate("The quick brown fox", max_new_tokens=4)
    engine.generate("A longer prompt, so that prefill runs the many-token tile " * 4, max_new_tokens=2)
    dense = set()
    for m in loaded.model.modules():
        if isinstance(m, QuantLinear):
            dense |= {(m.out_features, m.in_features), (m.in_features, m.out_features)}
        elif isinstance(m, QuantEmbedding):
            dense |= {(m.num_embeddings, m.embedding_dim), (m.embedding_dim, m.num_embeddings)}
    assert (49280, 256) in dense
    seen: set[int] = set()
    for t in _tensors(loaded.model, seen):
        if t.is_floating_point() and t.dim() >= 2:
            assert tuple(t.shape[-2:]) not in dense, f"a dense {t.dtype} copy {tuple(t.shape)} of a block weight"
    # the file's bytes are the weights: nothing but norms is a parameter
    assert sum(p.numel() for p in loaded.model.parameters()) < 10_000


def test_the_tokenizer_keeps_no_python_copy_of_its_vocabulary():
    """transformers' BPE classes (GemmaTokenizer, LlamaTokenizer) keep the vocab dict and merges list they were
    built from (~180 MB for gemma-3); the Rust tokenizer holds its own, so the loader drops them."""
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
             **{c: 5 + i for i, c in enumerate("▁abcdefgh")}, "▁a": 14, "bc": 15, "▁abc": 16}
    merges = [("▁", "a"), ("b", "c"), ("▁a", "bc")]
    fresh = GemmaTokenizer(vocab=dict(vocab), merges=list(merges))
    slim = loading._slim(GemmaTokenizer(vocab=dict(vocab), merges=list(merges)))
    assert "_vocab" in vars(fresh) and "_merges" in vars(fresh)  # what the slimming is for
    assert "_vocab" not in vars(slim) and "_merges" not in vars(slim)
    text = "abc abcd hag"
    assert slim(text)["input_ids"] == fresh(text)["input_ids"]
    ids = fresh(text)["input_ids"]
    assert 16 in ids  # the merges are used
    assert slim.decode(ids) == fresh.decode(ids)
    assert slim.get_vocab() == fresh.get_vocab()
