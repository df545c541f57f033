"""FastDraft (`hasten train-draft`, `--method fastdraft`): the trained draft is lossless under greedy decoding and
sampling, training is deterministic for a seed (and resumes bit-identically), the written GGUF computes what the
trained module computes, stage 2 teaches the target's choices, and a missing, corrupt or mismatched draft is one
line of error.

A random-weight GGUF target of hidden 64 with the default model's tokenizer stands in for a real model (what is
tested is the plumbing and the numerics, not the draft's quality); the chi-square test uses a 5-token target so
the distribution of two sampled tokens is computable."""
import json
import random

import pytest
import torch
from click.testing import CliRunner

from hasten.cli import main
from hasten.decoding.drafters import fast_draft as fd
from hasten.decoding.drafters.base import NoDraft
from hasten.decoding.drafters.draft_model import ModelDrafter
from hasten.decoding.drafters.head_training import Chat
from hasten.decoding.loop import DecodeStats, decode
from hasten.decoding.sampling import SamplingConfig
from hasten.models.loading import cache_dir
from tests.conftest import shared_kernels_cache, tiny_model

TRAIN = ["--tokens", "1024", "--chat-samples", "0", "--steps", "3", "--hidden", "32", "--layers", "1",
         "--threads", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cache_root(root, models):
    """A cache dir of its own under `root`, sharing the compiled kernels and the converted model metadata (a
    49k-token tokenizer takes ~10 s to convert: once per file, not once per test)."""
    shared_kernels_cache(root, (cache_dir() / "kernels").resolve())
    models.mkdir(parents=True, exist_ok=True)
    (root / "hasten" / "models").symlink_to(models, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(target GGUF path, corpus file, module cache root, shared models dir): a random Q8_0 Llama target and a
    small English corpus (one file: its last quarter is the held-out split)."""
    import hasten.models.synthetic as synthetic
    base = tmp_path_factory.mktemp("fastdraft")
    path = base / "tiny.gguf"
    synthetic.SHAPES["tiny-fd"] = synthetic.Shape(64, 2, 4, 2, 128, vocab=49152, context=512)
    try:
        synthetic.write_random_gguf(path, "tiny-fd", "Q8_0", progress=False)
    finally:
        del synthetic.SHAPES["tiny-fd"]
    rng = random.Random(0)
    words = "the model drafts tokens and a target verifies every one of them on a small CPU quickly".split()
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(40)))
    models = base / "models"
    return path, corpus, _cache_root(base / "cache", models), models


@pytest.fixture
def own_cache(tmp_path, monkeypatch, tiny):
    root = _cache_root(tmp_path / "cache", tiny[3])
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    return root


@pytest.fixture(scope="module")
def trained(tiny):
    """`hasten train-draft` run once on the tiny target in the module's cache: (CLI result, the draft's bytes)."""
    path, corpus, root, _ = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        result = CliRunner().invoke(main, ["train-draft", "--model", str(path), "--corpus", str(corpus), *TRAIN])
        assert result.exit_code == 0, result.output
        (draft,) = (root / "hasten" / "fastdraft").glob("*.gguf")
        return result, draft.read_bytes()


@pytest.fixture
def engine(tiny, trained, monkeypatch):
    import hasten
    monkeypatch.setenv("XDG_CACHE_HOME", str(tiny[2]))
    return hasten.load(str(tiny[0]))


def one_line_error(args, *needles):
    result = CliRunner().invoke(main, [str(a) for a in args])
    lines = [l for l in result.output.splitlines() if l.strip() and not l.startswith(("hasten: reading", "hasten: compiling"))]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("hasten: error:") and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- training, the file, the method -------------------------------------------------------------------------------

def test_train_draft_saves_a_draft_and_its_summary(tiny, trained):
    result, _ = trained
    (path,) = (tiny[2] / "hasten" / "fastdraft").glob("*.gguf")
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["steps"] == 3 and summary["hidden"] == 32 and summary["layers"] == 1 and summary["type"] == "Q8_0"
    assert 0 <= summary["heldout_text_top1"] <= 1 and summary["heldout_text_positions"] > 0
    assert 1 <= summary["tau_estimate_iid"] <= 5  # no chats: τ from the text agreement
    assert f"saved {path}" in result.output and "heldout_text_top1" in result.output
    assert not list(path.parent.glob("*.ckpt"))  # a finished run leaves no checkpoint


def test_fastdraft_and_draft_model_of_the_file_are_greedy_identical(engine):
    path = fd.draft_path(engine)
    for prompt in ("def add(a, b):", "The capital of France is", "1, 2, 3,", "Hello"):
        base = engine.generate(prompt, max_new_tokens=16).token_ids
        for method in ("fastdraft", "fastdraft:k=3", f"draft-model:{path}"):
            got = engine.generate(prompt, max_new_tokens=16, method=method)
            assert got.token_ids == base, (method, prompt)
    assert engine.drafter("fastdraft").name == "draft-model"  # the file's draft model, through draft-model


def test_tune_tries_fastdraft_once_it_is_trained(engine, own_cache):
    from hasten.bench import tune
    assert not set(tune.FASTDRAFT_SPACE) & set(tune.search_space(engine)[0])
    fd.draft_path(engine).parent.mkdir(parents=True)
    fd.draft_path(engine).write_bytes(b"")
    assert set(tune.FASTDRAFT_SPACE) <= set(tune.search_space(engine)[0])


def test_same_seed_same_file_bit_for_bit(engine, tiny, trained, own_cache):
    """train() with the CLI's arguments in another cache writes the very same bytes."""
    kwargs = dict(corpus=str(tiny[1]), corpus_tokens=1024, chat_samples=0, hidden=32, layers=1, steps=3, progress=False)
    fd.train(engine, **kwargs)
    assert fd.draft_path(engine).read_bytes() == trained[1]


def test_training_is_deterministic_for_a_seed():
    target = tiny_model(3, vocab_size=11, scale=1.0)
    corpus = torch.randint(0, 11, (8, 24), generator=torch.Generator().manual_seed(0)).tolist()
    chats = fd.distillation_targets(target, own_chats(target, 11, 3, 8), 4)
    a, b, c = (fd.fit(target, corpus, chats, hidden=32, layers=1, steps=40, batch=2, window=16, seed=s)[0]
               for s in (7, 7, 8))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.layers[0].self_attn.q_proj.weight, c.layers[0].self_attn.q_proj.weight)


def test_an_interrupted_training_resumes_where_it_stopped(tmp_path, monkeypatch):
    target = tiny_model(3, vocab_size=11, scale=1.0)
    corpus = torch.randint(0, 11, (8, 24), generator=torch.Generator().manual_seed(0)).tolist()
    args = dict(hidden=32, layers=1, steps=120, batch=2, window=16)
    whole, _ = fd.fit(target, corpus, **args)
    original = fd._generator

    def interrupt(seed, step):
        if step == 70:
            raise KeyboardInterrupt
        return original(seed, step)

    checkpoint = tmp_path / "run.ckpt"
    monkeypatch.setattr(fd, "_generator", interrupt)
    with pytest.raises(KeyboardInterrupt):
        fd.fit(target, corpus, checkpoint=checkpoint, **args)
    assert torch.load(checkpoint, weights_only=True)["step"] == fd.CHECKPOINT_EVERY
    monkeypatch.setattr(fd, "_generator", original)
    resumed, info = fd.fit(target, corpus, checkpoint=checkpoint, **args)
    assert info["resumed_at"] == fd.CHECKPOINT_EVERY and not checkpoint.exists()
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_the_written_file_computes_the_trained_modules_logits(engine, tmp_path, monkeypatch):
    """Loaded back through hasten, the GGUF (F32) gives the module's logits: llama.cpp's q/k row order is applied
    on writing exactly as the loader undoes it. The file carries a reversed token list: logits do not care, but
    as a draft for this target it is refused in one line (method and CLI)."""
    from hasten.models.loading import load
    model = fd.init_draft(engine.model, fd.draft_shape(engine.model.config, 64, 2), seed=0).eval()
    with torch.no_grad():  # weights large enough that attention (and so RoPE's row order) moves the logits
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.normal_(0, 0.3)
    real = fd.copy_tokenizer

    def reversed_tokens(w, source, vocab):
        real(w, source, vocab)
        tokens = w.kv_data[0]["tokenizer.ggml.tokens"]
        tokens.value = list(reversed(tokens.value))

    monkeypatch.setattr(fd, "copy_tokenizer", reversed_tokens)
    path = fd.write_gguf(model, tmp_path / "other.gguf", engine.loaded.source, "F32")
    x = torch.tensor([[5, 100, 2000, 7, 9, 11, 300, 12, 40000, 3]])
    with torch.no_grad():
        expected, got = model(x), load(str(path)).model(x)
    assert (expected - got).abs().max() < 1e-4 * expected.abs().max()
    with torch.no_grad():  # not vacuous: without the row order the logits differ
        q = model.layers[0].self_attn.q_proj.weight
        q.copy_(q[fd._llama_rope_order(q.shape[0], model.config.num_heads)])
        assert (model(x) - got).abs().max() > 1e-2 * expected.abs().max()
    one_line_error(["generate", "hi", "--model", engine.loaded.source, "-n", "4", "--method", f"draft-model:{path}"],
                   "different tokenizer")
    monkeypatch.setattr(fd, "draft_path", lambda engine: path)
    one_line_error(["generate", "hi", "--model", engine.loaded.source, "-n", "4", "--method", "fastdraft"],
                   "unreadable or for another model", "hasten train-draft` again")


def test_missing_corrupt_or_misshapen_drafts_are_one_line_errors(tiny, own_cache, tmp_path):
    from hasten import methods
    model = tiny[0]
    one_line_error(["generate", "hi", "--model", model, "-n", "4", "--method", "fastdraft"],
                   "fastdraft needs a draft model trained for tiny", "hasten train-draft")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"garbage" * 50)
    one_line_error(["generate", "hi", "--model", model, "-n", "4", "--method", f"draft-model:{bad}"], "not a readable GGUF")
    import hasten
    path = fd.draft_path(hasten.load(str(model)))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a model at all" * 100)
    one_line_error(["generate", "hi", "--model", model, "-n", "4", "--method", "fastdraft"],
                   "unreadable or for another model", "hasten train-draft` again")
    with pytest.raises(methods.UnknownMethodError, match="train-draft"):
        hasten.load(str(model)).drafter("fastdraft")
    one_line_error(["train-draft", "--model", model, "--hidden", "40", "--steps", "1"], "multiple of 32")


# ---- what training does ----------------------------------------------------------------------------------------------

def own_chats(target, vocab, count, n, seed=0):
    """The target's greedy answers to random prompts, with its final-norm features, as self-written chats."""
    g = torch.Generator().manual_seed(seed)
    chats = []
    for _ in range(count):
        prompt = torch.randint(0, vocab, (4,), generator=g).tolist()
        out = [t for s in decode(target, prompt, NoDraft(), SamplingConfig(), n, set(), DecodeStats()) for t in s.tokens]
        with torch.no_grad():
            hidden = target(torch.tensor([prompt + out]), return_hidden=True)[1][0]
        chats.append(Chat((prompt + out, len(prompt) - 1, hidden[len(prompt) - 1:-1].to(torch.bfloat16))))
    return chats


def test_the_kl_stage_teaches_the_targets_own_choices():
    """Stage 1 alone (random corpus text) knows nothing of the target; with stage 2 the draft's greedy chains
    follow the target's answers to prompts it never saw. The target's layers are silenced (its choice depends on
    the last token only), so what the chats teach carries over to new prompts."""
    V = 40
    target = tiny_model(1, vocab_size=V, scale=1.0)
    with torch.no_grad():
        for layer in target.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    corpus = torch.randint(0, V, (16, 48), generator=torch.Generator().manual_seed(0)).tolist()
    train, held = own_chats(target, V, 12, 24), own_chats(target, V, 4, 24, seed=1)
    args = dict(hidden=32, layers=1, steps=600, batch=4, window=32)
    lm_only, _ = fd.fit(target, corpus, **args)
    aligned, _ = fd.fit(target, corpus, fd.distillation_targets(target, train, 10), **args)
    before = fd.chain_agreement(lm_only, fd.distillation_targets(target, held, 1))
    after = fd.chain_agreement(aligned, fd.distillation_targets(target, held, 1))
    assert after["depth"][0] > before["depth"][0] + 0.3 and after["tau"] > before["tau"] + 0.5, (before, after)


def test_sampling_with_the_fastdraft_draft_keeps_the_targets_distribution():
    """Exact speculative sampling with a trained draft as q: the first two tokens follow p(x1) p(x2 | x1)
    (chi-square), and the draft is good enough that many drafts are accepted."""
    from tests.decoding.test_sampling_through_the_loop import PLAIN, TOP_K, TRIALS, exact_pairs, pvalue, sampled_pairs
    V = 5
    target = tiny_model(53, vocab_size=V, scale=0.3)
    g = torch.Generator().manual_seed(0)
    corpus = []
    for seed in range(24):  # the target's own samples: stage 1 then learns its distribution directly
        prompt = torch.randint(0, V, (4,), generator=g).tolist()
        out = [t for s in decode(target, prompt, NoDraft(), SamplingConfig(1.0, seed=seed), 28, set(), DecodeStats())
               for t in s.tokens]
        corpus.append(prompt + out)
    draft, _ = fd.fit(target, corpus, fd.distillation_targets(target, own_chats(target, V, 8, 16), 3), hidden=32,
                      layers=1, steps=300, batch=4, window=32)
    for sampling in (PLAIN, TOP_K):
        counts, proposed, accepted = sampled_pairs(target, ModelDrafter(draft, V, 2, adaptive=False), sampling, V)
        assert proposed > TRIALS // 2 and accepted > TRIALS // 4
        p = pvalue(counts, exact_pairs(target, sampling, V))
        assert p > 1e-3, f"chi-square p-value {p:.2e}: the fastdraft draft changes the target's distribution"


def test_the_embedding_starts_as_the_targets_pca():
    target = tiny_model(2, vocab_size=30, scale=1.0)
    E = target.embed_tokens.weight
    wide = fd.pca_embedding(E, 64)  # as wide as the target: a rotation, dot products kept
    assert torch.allclose(wide @ wide.T, E @ E.T, atol=1e-3)
    narrow = fd.pca_embedding(E, 8)
    assert narrow.shape == (30, 8) and (narrow[:, 0].norm() >= narrow[:, 7].norm())
    draft = fd.init_draft(target, fd.draft_shape(target.config, 32, 1))
    assert draft.lm_head.weight is draft.embed_tokens.weight  # tied
    assert torch.allclose(draft.embed_tokens.weight, fd.pca_embedding(E, 32))


def test_a_target_without_a_gguf_file_is_refused_in_one_line(tmp_path):
    class Loaded:
        source = str(tmp_path)  # a checkpoint directory: no GGUF tokenizer to copy

    class Engine:
        name, loaded = "some-hf-model", Loaded

    with pytest.raises(fd.DraftTrainingError, match="pass --model FILE.gguf"):
        fd._tokenizer_source(Engine)
