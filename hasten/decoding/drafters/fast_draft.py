"""FastDraft (`hasten train-draft`, `--method fastdraft`): a small Llama draft model trained for one target from the
target's own data, then drafted with like any `draft-model`.

FastDraft (Zafrir et al. 2024) builds a draft for a target that has none of its family: pre-train a small model
of the target's vocabulary on text, then align it on data the target generates. Here, within a CPU budget:
- the draft is a Llama of `hidden` width and `layers` layers (heads of ≤ 64 dims, GQA 2:1, SwiGLU 8/3 wide) whose
  tied embedding starts as the PCA projection of the target's embedding to the draft's width: the directions of
  the target's token geometry that carry most of its variance, so the draft's logits (h · E) begin where the
  target's tied head already separates tokens instead of at random;
- stage 1 is next-token language modelling on corpus tokens (the corpus train-head and calibration use);
- stage 2 distils the target on chats it wrote itself (head_training.cached_chats: questions sampled after its
  chat template's user header, greedy answers, the target's final-norm features recorded): the target's
  distribution at every answer position is its LM head over those features, and the draft learns its top-K
  (cross-entropy against the renormalised top-K probabilities: the top-K KL up to the target's own entropy);
- the budget is `steps` and/or `minutes`; training follows one "progress" fraction (steps done / steps, or
  seconds spent / budget, whichever is further) for the learning rate and the switch between stages, so a step
  budget is deterministic for a seed and a time budget adapts to the machine;
- every CHECKPOINT_EVERY steps the state goes to the cache; an interrupted run with the same arguments resumes
  there, bit-identical to an uninterrupted one (each step's batch comes from its own seeded generator);
- the result is a GGUF file (Q8_0 by default: the draft's weights are read for every drafted token, and a
  quarter of the bytes is what a CPU's memory bandwidth wants) with the target's own tokenizer, at
  cache/fastdraft/<target hash>.gguf, and a JSON summary beside it.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...models.synthetic import copy_tokenizer
from ...models.transformer import ModelConfig, Transformer

CHECKPOINT_EVERY = 50
DEFAULT_STEPS = 1000  # when neither steps nor minutes is given
TYPES = ("Q8_0", "F16", "F32")
_VERSION = 1  # bump when training changes, so an old checkpoint is not resumed


class DraftNotTrainedError(ValueError):
    """No usable FastDraft draft for this target; the message names `hasten train-draft`."""


class DraftTrainingError(ValueError):
    """Bad input to train-draft (a shape, a type, a target without a GGUF file); the message names the fix."""


@dataclass(frozen=True)
class DraftShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float
    context: int

    def config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                           num_layers=self.layers, num_heads=self.heads, num_kv_heads=self.kv_heads,
                           head_dim=self.head_dim, rope_theta=self.rope_theta, rms_norm_eps=1e-5,
                           max_position_embeddings=self.context, tie_word_embeddings=True, model_type="llama")


def draft_shape(target_config: ModelConfig, hidden: int = 256, layers: int = 4) -> DraftShape:
    """The draft's shape for a target: `hidden` wide (a multiple of 32, so every row is whole Q8_0 blocks),
    heads of min(64, hidden/2) dims, half as many KV heads, a SwiGLU ≈ 8/3 · hidden wide (rounded to 32)."""
    if hidden < 32 or hidden % 32:
        raise DraftTrainingError(f"--hidden {hidden}: the draft's width must be a multiple of 32 (e.g. 128, 256, 384)")
    if layers < 1:
        raise DraftTrainingError(f"--layers {layers}: the draft needs at least one layer")
    head_dim = min(64, hidden // 2)
    heads = hidden // head_dim
    ffn = -(-(hidden * 8 // 3) // 32) * 32
    return DraftShape(hidden, layers, heads, max(1, heads // 2), head_dim, ffn, target_config.vocab_size,
                      float(target_config.rope_theta), min(int(target_config.max_position_embeddings), 8192))


def pca_embedding(embedding: torch.Tensor, width: int) -> torch.Tensor:
    """[V, D] target embedding → [V, width]: its rows projected on the top `width` eigenvectors of EᵀE (uncentred,
    so the mean direction — which carries the unigram preference of a tied head — is kept when it is large).
    Dot products between rows, hence logit geometry, are kept as far as `width` allows. Extra widths past D
    (a draft wider than the target) start at zero."""
    E = embedding.double()
    values, vectors = torch.linalg.eigh(E.T @ E)  # ascending; deterministic for the same input
    top = vectors[:, values.argsort(descending=True)[:width]]  # [D, min(D, width)]
    out = torch.zeros(E.shape[0], width, dtype=torch.float64)
    out[:, :top.shape[1]] = E @ top
    return out.float()


def init_draft(target, shape: DraftShape, seed: int = 0) -> Transformer:
    """A fresh draft Transformer (hasten's own module, trained in place: the file loads back into the same code):
    normal(0.02) linears, the output projections scaled by 1/sqrt(2·layers) (GPT-2's residual scaling), norms at
    one, the tied embedding from `pca_embedding` of the target's."""
    torch.manual_seed(seed)
    model = Transformer(shape.config())
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0, std / math.sqrt(2 * shape.layers))
            elif p.dim() == 2:
                p.normal_(0, std)
        target_embedding = target.embed_tokens.weight.detach().float()[:shape.vocab]
        model.embed_tokens.weight.copy_(pca_embedding(target_embedding, shape.hidden))
    model.lm_head.weight = model.embed_tokens.weight  # tied: one matrix, trained once, written once
    return model.train()


# ---- data ------------------------------------------------------------------------------------------------------

@dataclass
class Distillation:
    """Stage 2's data: per chat, its token ids, the first answer position's predecessor `start` (ids[start] is the
    question's last token) and the target's top-K next-token ids and probabilities at positions start .. len-2."""
    ids: list[list[int]]
    starts: list[int]
    top_ids: list[torch.Tensor]  # [n_i, K]
    top_p: list[torch.Tensor]  # [n_i, K], renormalised over the K


def distillation_targets(target, chats, top_k: int = 10, progress=None) -> Distillation:
    """The target's top-K distribution at each answer position of `chats` (head_training.Chat), from the features
    recorded while it wrote them (its LM head over them: no second target pass)."""
    out = Distillation([], [], [], [])
    with torch.no_grad():  # not inference_mode: these tensors go into the training loss
        for ids, start, hidden in (progress or iter)(chats):
            n = len(ids) - 1 - start
            if n < 1:
                continue
            logits = target.lm_head(hidden[:n].float().contiguous())  # [n, V]
            p, top = logits.float().softmax(-1).topk(top_k, -1)
            out.ids.append(list(ids)), out.starts.append(int(start))
            out.top_ids.append(top), out.top_p.append(p / p.sum(-1, keepdim=True))
    return out


def _generator(seed: int, step: int) -> torch.Generator:
    """Step `step`'s own random stream: a resumed run draws the same batches as an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lm_loss(model, corpus: torch.Tensor, rows: torch.Tensor, window: int, g: torch.Generator) -> torch.Tensor:
    """Stage 1: next-token cross-entropy over a random `window`-token slice of each chosen corpus chunk."""
    length = corpus.shape[1]
    offsets = torch.randint(0, length - window + 1, (len(rows),), generator=g)
    x = torch.stack([corpus[r, o:o + window] for r, o in zip(rows.tolist(), offsets.tolist())])  # [B, W]
    logits = model(x[:, :-1])  # [B, W-1, V]
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())


def kl_loss(model, data: Distillation, rows: torch.Tensor) -> torch.Tensor:
    """Stage 2: −Σ p̃ log q over the target's top-K at every answer position of the chosen chats (right-padded:
    the causal mask keeps padding out of the real positions, and padded positions carry no loss)."""
    rows = rows.tolist()
    width = max(len(data.ids[r]) for r in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, :len(data.ids[r]) - 1] = torch.tensor(data.ids[r][:-1])
    logq = model(x).log_softmax(-1)  # [B, W, V]
    total, count = 0.0, 0
    for i, r in enumerate(rows):
        s = data.starts[r]
        n = len(data.top_ids[r])
        picked = logq[i, s:s + n].gather(1, data.top_ids[r])  # [n, K]
        total = total - (data.top_p[r] * picked).sum()
        count += n
    return total / max(count, 1)


# ---- training --------------------------------------------------------------------------------------------------

def fit(target, corpus: list[list[int]], distill: Distillation | None = None, hidden: int = 256, layers: int = 4,
        steps: int | None = None, minutes: float | None = None, seed: int = 0, pretrain_share: float = 0.5,
        batch: int = 8, window: int = 128, lr: float = 2e-3, checkpoint: Path | None = None,
        progress: bool = False) -> tuple[Transformer, dict]:
    """Train a draft for `target` (a Transformer) on `corpus` chunks (token id lists of equal length) and, when
    `distill` has chats, on the target's top-K there. → (the draft in eval mode, {"steps", "pretrain_steps",
    "seconds", "resumed_at"}).

    The run ends at `steps` (default DEFAULT_STEPS when no `minutes` either) or after `minutes` of training,
    whichever comes first; stage 1 takes the first `pretrain_share` of it (all of it without chats). AdamW,
    linear warm-up over the first 2% then cosine to a tenth. Deterministic for a seed under a step budget.
    With `checkpoint`, the state is saved there every CHECKPOINT_EVERY steps and a run finding one resumes."""
    from tqdm import tqdm
    if steps is None and minutes is None:
        steps = DEFAULT_STEPS
    if not corpus:
        raise DraftTrainingError("train-draft needs corpus text (stage 1); pass --corpus or install the default corpus")
    chats = distill is not None and len(distill.ids) > 0
    share = pretrain_share if chats else 1.0
    shape = draft_shape(target.config, hidden, layers)
    model = init_draft(target, shape, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    data = torch.tensor(corpus)  # [N, L]
    window = min(window, data.shape[1])
    step, elapsed, resumed_at, pretrain_steps = 0, 0.0, None, 0
    if checkpoint is not None and checkpoint.exists():
        try:
            saved = torch.load(checkpoint, weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            step, elapsed, pretrain_steps = saved["step"], saved["elapsed"], saved["pretrain_steps"]
            resumed_at = step
        except Exception:  # a checkpoint cut short by the interruption itself: start over
            model = init_draft(target, shape, seed)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    budget = minutes * 60 if minutes is not None else None

    def fraction() -> float:
        by_steps = step / steps if steps else 0.0
        by_time = elapsed / budget if budget else 0.0
        return max(by_steps, by_time)

    bar = tqdm(total=steps, initial=step, desc="train-draft", disable=not progress, leave=False,
               bar_format=None if steps else "{desc}: {n} steps [{elapsed}{postfix}]")
    while fraction() < 1.0:
        began = time.perf_counter()
        done = fraction()
        warm = min(1.0, (done + 1e-9) / 0.02)
        rate = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))
        for group in opt.param_groups:
            group["lr"] = rate
        g = _generator(seed, step)
        stage = 1 if done < share else 2
        if stage == 1:
            loss = lm_loss(model, data, torch.randint(0, len(data), (batch,), generator=g), window, g)
            pretrain_steps += 1
        else:
            loss = kl_loss(model, distill, torch.randint(0, len(distill.ids), (min(batch, len(distill.ids)),), generator=g))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.perf_counter() - began
        bar.update()
        bar.set_postfix_str(f"stage {stage} loss {loss.item():.3f}")
        if checkpoint is not None and step % CHECKPOINT_EVERY == 0 and fraction() < 1.0:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                        "pretrain_steps": pretrain_steps}, tmp)
            tmp.replace(checkpoint)  # never a half-written checkpoint under the real name
    bar.close()
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    model.eval().requires_grad_(False)
    return model, {"steps": step, "pretrain_steps": pretrain_steps, "seconds": round(elapsed, 1),
                   "resumed_at": resumed_at, "shape": asdict(shape)}


# ---- how good it is ----------------------------------------------------------------------------------------------

def text_agreement(draft, target, chunks: list[list[int]]) -> tuple[float, int]:
    """How often the draft's top-1 is the target's top-1, teacher-forced over held-out text. → (share, positions)."""
    hits = total = 0
    with torch.inference_mode():
        for seq in chunks:
            ids = torch.tensor([seq])
            a, b = draft(ids)[0].argmax(-1), target(ids)[0].argmax(-1)
            hits += int((a == b).sum())
            total += len(seq)
    return hits / max(total, 1), total


def chain_agreement(draft, data: Distillation, depth: int = 4) -> dict:
    """A `depth`-token greedy chain from every answer position of held-out chats. Their answers are the target's
    own greedy choices, so a chain whose drafts all matched sees exactly the answer's tokens: the teacher-forced
    draft at each position is what drafting computes. → {"depth": [P(draft d matches | drafts 1..d-1 did)],
    "tau": expected tokens per target pass with such a chain, the bonus token included, "positions"}."""
    runs = []
    with torch.inference_mode():
        for ids, s in zip(data.ids, data.starts):
            x = torch.tensor([ids[:-1]])
            drafted = draft(x)[0, s:].argmax(-1)  # [n] at positions s .. len-2
            ok = (drafted == torch.tensor(ids[s + 1:])).tolist()
            for t in range(len(ok) - depth + 1):  # positions with a whole chain's worth of answer after them
                run = 0
                while run < depth and ok[t + run]:
                    run += 1
                runs.append(run)
    if not runs:
        return {"depth": [], "tau": None, "positions": 0}
    runs_t = torch.tensor(runs)
    hits = [round(float((runs_t > d).sum()) / max(1, int((runs_t >= d).sum())), 4) for d in range(depth)]
    return {"depth": hits, "tau": round(1 + float(runs_t.float().mean()), 3), "positions": len(runs)}


# ---- the file ------------------------------------------------------------------------------------------------------

def _llama_rope_order(rows: int, heads: int) -> np.ndarray:
    """The row order llama.cpp stores q/k in (interleaved RoPE pairs): the inverse of what the loader undoes
    (loading._llama_qk_row_order), so the file loads back into exactly the rows trained."""
    undo = np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(undo)


def write_gguf(model: Transformer, path: Path, tokenizer_source: Path, qtype: str = "Q8_0", name: str = "fastdraft") -> Path:
    """Write the draft as a Llama GGUF that hasten (and llama.cpp) load: weights in `qtype` (norms F32), the
    tokenizer copied from `tokenizer_source` (the target's GGUF file). Written beside and renamed into place."""
    import gguf
    from gguf import GGMLQuantizationType as GT
    from gguf.quants import quantize

    if qtype not in TYPES:
        raise DraftTrainingError(f"draft type {qtype} is not one of {', '.join(TYPES)}")
    c = model.config
    tmp = Path(path).with_suffix(".gguf.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(name)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    copy_tokenizer(w, tokenizer_source, c.vocab_size)

    def matrix(key: str, weight: torch.Tensor, rows: np.ndarray | None = None):
        a = weight.detach().float().numpy()
        if rows is not None:
            a = a[rows]
        a = np.ascontiguousarray(a)
        if qtype == "F32":
            w.add_tensor(key, a)
        elif qtype == "F16":
            w.add_tensor(key, a.astype(np.float16))
        else:
            w.add_tensor(key, quantize(a, GT.Q8_0), raw_dtype=GT.Q8_0)  # [rows, row bytes]: gguf infers the shape

    def vector(key: str, weight: torch.Tensor):
        w.add_tensor(key, np.ascontiguousarray(weight.detach().float().numpy()))

    matrix("token_embd.weight", model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        a, m = layer.self_attn, layer.mlp
        vector(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        matrix(f"blk.{i}.attn_q.weight", a.q_proj.weight, _llama_rope_order(a.q_proj.weight.shape[0], c.num_heads))
        matrix(f"blk.{i}.attn_k.weight", a.k_proj.weight, _llama_rope_order(a.k_proj.weight.shape[0], c.num_kv_heads))
        matrix(f"blk.{i}.attn_v.weight", a.v_proj.weight)
        matrix(f"blk.{i}.attn_output.weight", a.o_proj.weight)
        vector(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        matrix(f"blk.{i}.ffn_gate.weight", m.gate_proj.weight)
        matrix(f"blk.{i}.ffn_up.weight", m.up_proj.weight)
        matrix(f"blk.{i}.ffn_down.weight", m.down_proj.weight)
    vector("output_norm.weight", model.norm.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(path)
    return Path(path)


def draft_path(engine) -> Path:
    from ...models.loading import cache_dir
    return cache_dir() / "fastdraft" / f"{engine.model_hash}.gguf"


def _tokenizer_source(engine) -> Path:
    source = Path(engine.loaded.source)
    if not (source.is_file() and source.suffix == ".gguf"):
        raise DraftTrainingError(f"train-draft copies the target's tokenizer from its GGUF file, and {engine.name} was not "
                         "loaded from one; pass --model FILE.gguf")
    return source


def _run_key(**args) -> str:
    return hashlib.sha256(json.dumps({**args, "version": _VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def train(engine, corpus=None, corpus_tokens: int = 131_072, chat_samples: int = 512, hidden: int = 256,
          layers: int = 4, steps: int | None = None, minutes: float | None = None, top_k: int = 10, seed: int = 0,
          qtype: str = "Q8_0", progress: bool = True) -> dict:
    """Train `engine`'s FastDraft draft (`fit`) on corpus text and `chat_samples` self-written chats (cached, shared
    with train-head), write it to `draft_path(engine)` with a JSON summary beside it. → the summary: sizes, steps,
    held-out top-1 agreement with the target on corpus text and on chats, per-depth agreement and τ of a 4-token
    chain on held-out chats (or, without chats, τ as if drafts matched independently at the text agreement)."""
    from tqdm import tqdm

    from ...sparsity import corpus as corpora
    from .head_training import cached_chats

    def bar(desc):
        return (lambda it: tqdm(it, desc=desc, leave=False)) if progress else None

    started = time.perf_counter()
    source = _tokenizer_source(engine)
    draft_shape(engine.model.config, hidden, layers)  # a bad shape fails before minutes of data preparation
    if qtype not in TYPES:
        raise DraftTrainingError(f"draft type {qtype} is not one of {', '.join(TYPES)}")
    text = corpora.load(corpus)
    chunks = text.token_chunks(engine.tokenizer, "calibration", corpus_tokens, 256)
    heldout_text = text.token_chunks(engine.tokenizer, "heldout", min(corpus_tokens // 8, 4096), 256)
    chats = cached_chats(engine, chat_samples, bar("train-draft: self-written chats")) if chat_samples else []
    held = len(chats) // 10  # answers to questions the draft never saw
    distill = distillation_targets(engine.model, chats[held:], top_k, bar("train-draft: target distributions")
                                   if chats else None)
    path = draft_path(engine)
    key = _run_key(target=engine.model_hash, corpus=text.name, tokens=corpus_tokens, chats=chat_samples,
                   hidden=hidden, layers=layers, steps=steps, minutes=minutes, top_k=top_k, seed=seed)
    if minutes is not None:  # the budget is the whole run's: writing the chats spent part of it
        minutes = max(minutes - (time.perf_counter() - started) / 60, 1e-3)
    draft, info = fit(engine.model, chunks, distill, hidden, layers, steps, minutes, seed,
                      checkpoint=path.with_name(f"{engine.model_hash}-{key}.ckpt"), progress=progress)
    agreement, positions = text_agreement(draft, engine.model, heldout_text)
    summary = {"model": engine.name, "target_hash": engine.model_hash, "corpus": text.name,
               "corpus_tokens": len(chunks) * 256, "chat_answers": len(distill.ids), "hidden": hidden,
               "layers": layers, "parameters": sum(p.numel() for p in draft.parameters()), "type": qtype,
               "top_k": top_k, "seed": seed, "steps": info["steps"], "pretrain_steps": info["pretrain_steps"],
               "heldout_text_top1": round(agreement, 4), "heldout_text_positions": positions}
    if info["resumed_at"] is not None:
        summary["resumed_at_step"] = info["resumed_at"]
    if held:
        by_depth = chain_agreement(draft, distillation_targets(engine.model, chats[:held], 1))
        summary["heldout_chat_by_depth"], summary["heldout_chat_tau"] = by_depth["depth"], by_depth["tau"]
    else:
        a = agreement
        summary["tau_estimate_iid"] = round(1 + a + a ** 2 + a ** 3 + a ** 4, 3)
    summary["train_seconds"] = info["seconds"]
    write_gguf(draft, path, source, qtype, name=f"fastdraft for {engine.name}")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    return summary


# ---- drafting ----------------------------------------------------------------------------------------------------

def fastdraft(engine, k: int = 4, n: int = 1):
    """`--method fastdraft`: `draft-model` with this target's trained FastDraft file."""
    from ...models.loading import ModelLoadError
    from .draft_model import VocabularyMismatchError, draft_model
    path = draft_path(engine)
    if not path.exists():
        raise DraftNotTrainedError(f"fastdraft needs a draft model trained for {engine.name}; run `hasten "
                                   "train-draft` once (minutes on a CPU, cached)")
    try:
        return draft_model(engine, str(path), k, n)
    except (ModelLoadError, VocabularyMismatchError) as e:
        why = str(e).split(";")[0].replace(str(path), "it")
        raise DraftNotTrainedError(f"the FastDraft draft {path} is unreadable or for another model ({why}); run "
                                   "`hasten train-draft` again") from None
