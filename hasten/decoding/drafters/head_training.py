"""Training the draft head behind `eagle` (`hasten train-head`): what the head learns from, and how.

The data is the target's own: teacher-forced passes over corpus text, and chats it writes itself (a question
sampled after its chat template's user header, then its greedy answer, features recorded on the way). The
objective is EAGLE's (the target's next token, and its next feature) with HASS's two harmonizations on top (see
`fit`). The head itself, its drafting and its file are in eagle.py.
"""
from __future__ import annotations

import math
import pickle
import time

import torch
import torch.nn.functional as F

from . import eagle
from .eagle import FeatureHead, _rows, save_head


Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # h_t, x_{t+1}, choice after it, h_{t+1}


def text_features(model, sequences: list[tuple[list[int], int]], progress=iter) -> Features:
    """Teacher-forced target passes → (h_t [N, D], x_{t+1} [N], the target's choice after x_{t+1} [N],
    h_{t+1} [N, D]) for every position t from each sequence's start index on."""
    H, X, Y, HN = [], [], [], []
    with torch.inference_mode():
        for seq, start in progress(sequences):
            ids = torch.tensor([seq])
            hidden = model(ids, return_hidden=True)
            logits, h = hidden[0][0], hidden[1][0].float()  # [T, V], [T, D]
            choice = logits.argmax(-1)  # [T] what the target would say next at each position
            idx = torch.arange(max(start, 0), len(seq) - 2)
            H.append(h[idx]), HN.append(h[idx + 1]), X.append(ids[0, idx + 1]), Y.append(choice[idx + 1])
    return tuple(torch.cat(a) for a in (H, X, Y, HN))


class Chat(tuple):
    """(token ids, start, hidden): a self-written question and the target's greedy answer, where ids[start] is
    the question's last token, and hidden [len(ids) - 1 - start, D] the target's final-norm features at
    positions start .. len(ids) - 2, recorded while it wrote the answer."""


def chat_features(chats: list[Chat]) -> Features:
    """The training pairs of `chats`, as `text_features` gives them for text; a greedy answer is the target's own
    choice at every position, so the features recorded while writing it need no second pass."""
    H, X, Y, HN = [], [], [], []
    for ids, start, hidden in chats:
        n = len(ids) - start - 2  # pairs at t = start .. len(ids) - 3
        if n > 0:
            hidden = hidden.float()
            H.append(hidden[:n]), HN.append(hidden[1:n + 1])
            X.append(torch.tensor(ids[start + 1:start + 1 + n])), Y.append(torch.tensor(ids[start + 2:start + 2 + n]))
    return tuple(torch.cat(a) for a in (H, X, Y, HN))


def self_distilled_chats(engine, samples: int, max_new_tokens: int = 128, progress=None, batch: int = 64,
                         seed: int = 0) -> list[Chat]:
    """Magpie-style: the target writes user turns after its own chat template's user header (sampled), then
    answers them greedily, its final-norm features recorded as it goes (see `Chat`).

    Generation runs batched through transformers' `generate` on the target's own weights (shared, no copy): on
    a 2-core CPU 64 rows at once cost ~0.2 s per row per 64 tokens against ~0.8 s one at a time, and recording
    the features on the way saves a teacher-forced pass per answer. More self-written answers is what raises the
    head's agreement most (each doubling of the chats gave ~+3-5 points)."""
    from ...models.hf import shared_transformers

    tok, hf = engine.tokenizer, shared_transformers(engine)
    marker = "\x00"
    full = tok.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True, tokenize=False)
    header = tok(full[:full.index(marker)], add_special_tokens=False).input_ids
    eos = sorted(engine.eos_ids)
    bar = (progress or (lambda it: it))
    torch.manual_seed(seed)

    def generate(rows: list[list[int]], new: int, sample: bool) -> list[list[int]]:
        width = max(map(len, rows))  # left padding: every row's last token is where generation starts
        ids = torch.tensor([[eos[0]] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=sample, eos_token_id=eos,
                              pad_token_id=eos[0], **({"temperature": 1.0, "top_k": 0, "top_p": 0.95} if sample else {}))
        result = []
        for row in out[:, width:].tolist():
            ends = [i for i, t in enumerate(row) if t in engine.eos_ids]
            result.append(row[:ends[0]] if ends else row)
        return result

    prompts = []
    for start in bar(range(0, samples, batch)):  # the questions: all rows share the header, no padding
        for ids in generate([header] * min(batch, samples - start), 64, sample=True):
            question = tok.decode(ids).split("\n\n")[0].strip()
            if len(question) >= 12:
                prompts.append(engine.encode(question, chat=True))
    prompts.sort(key=len)  # batches of similar lengths waste little on padding
    steps: list[torch.Tensor] = []  # [B, D] per forward: the newest position's final-norm feature of every row
    hook = hf.model.norm.register_forward_hook(lambda module, args, out: steps.append(out[:, -1].to(torch.bfloat16)))
    out = []
    try:
        for start in bar(range(0, len(prompts), batch)):
            rows = prompts[start:start + batch]
            steps.clear()
            answers = generate(rows, max_new_tokens, sample=False)
            hidden = torch.stack(steps, 1) if steps else None  # [B, forwards, D]
            out += [Chat((p + a, len(p) - 1, hidden[b, :len(a)].clone())) for b, (p, a) in enumerate(zip(rows, answers))
                    if len(a) > 1]
    finally:
        hook.remove()
    return out


STEP_WEIGHT = 0.2  # unrolled step j's loss weighs STEP_WEIGHT**(j-1): the first draft matters most (measured: 0.2 > 0.5 > 1)


def fit(model, sequences: list[tuple[list[int], int]], hidden: int = 1024, vocab: int = 4096, epochs: int = 3,
        progress=None, seed: int = 0, chats: list[Chat] = (), steps: int = 3, top_k: int = 10) -> tuple[FeatureHead, dict]:
    """Fit a head to the target's predictions over `sequences` ((token ids, first position to learn from)) and
    `chats`. → (head, {"positions", "vocab_coverage"}).

    EAGLE's objective — the target's next token (cross-entropy) and its next feature (regression) — plus HASS's
    two harmonizations (Zhang et al. 2024):
    - objective distillation (`top_k` > 0): the head also learns the target's whole distribution over its `top_k`
      most likely tokens (−Σ p log q there; p = the target's softmax over the head's vocabulary, computed from
      the target's own next feature and LM-head rows), not only its argmax: a draft token accepted under
      sampling, and the runner-up a tree offers, come from there;
    - context alignment (`steps` > 1): drafting feeds the head its own predicted feature for every token after
      the first, so training unrolls the same way — step j takes step j−1's prediction where the target's
      feature was, for `steps` consecutive positions of a text or chat — and the head learns to draft from
      what it will actually see.
    steps=1, top_k=0 is EAGLE's original training. Deterministic for a seed."""
    torch.manual_seed(seed)
    H, X, Y, HN = training_features(model, sequences, chats, progress)
    vocab_ids, remap, lm_rows, coverage = vocabulary(model, Y, vocab)
    D = model.config.hidden_size
    head = FeatureHead(D, hidden, vocab_ids, lm_rows, model.embed_tokens)
    following = chained(H, HN)

    def batch_loss(rows):
        h, loss = H[rows], 0.0
        for step in range(steps):
            predicted = head(h, X[rows])  # [n, D]
            logits = head.logits(predicted)  # [n, V']
            # EAGLE's two losses: the target's choice (classification) and its feature (regression)
            step_loss = F.cross_entropy(logits, remap[Y[rows]], ignore_index=-100) \
                + 0.1 * D * F.smooth_l1_loss(predicted, HN[rows])
            if top_k:
                with torch.no_grad():
                    p, ids = (HN[rows] @ lm_rows.T).softmax(-1).topk(top_k, -1)  # [n, K] the target's top-K
                step_loss = step_loss - (p * logits.log_softmax(-1).gather(1, ids)).sum(-1).mean()
            loss = loss + STEP_WEIGHT ** step * step_loss
            more = following[rows]  # positions whose next one continues the same text
            if step + 1 == steps or not bool(more.any()):
                return loss
            rows, h = rows[more] + 1, predicted[more].detach()  # the head's own feature, as drafting feeds it
        return loss

    optimise(head, len(Y), batch_loss, epochs, "train-head: training", progress)
    return head.eval(), {"positions": len(Y), "vocab_coverage": round(coverage, 4)}


def training_features(model, sequences, chats, progress=None) -> Features:
    """`text_features` of the sequences and `chat_features` of the chats, concatenated."""
    parts = ([text_features(model, sequences, progress or iter)] if sequences else []) + ([chat_features(chats)] if chats else [])
    return tuple(torch.cat(t) for t in zip(*parts))


def optimise(module, n: int, batch_loss, epochs: int, desc: str, progress=None, batch: int = 512) -> None:
    """AdamW with a one-cycle schedule over `epochs` passes of shuffled batches of the n training rows;
    batch_loss(rows) → the loss of those rows. A progress bar when `progress` is given."""
    from tqdm import tqdm
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.05)
    total = epochs * math.ceil(n / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=total)
    bar = tqdm(total=total, desc=desc, disable=progress is None, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, batch):
            loss = batch_loss(order[i:i + batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
            bar.set_postfix_str(f"epoch {epoch + 1} loss {loss.item():.2f}")
    bar.close()


def vocabulary(model, Y: torch.Tensor, vocab: int):
    """The `vocab` most frequent target choices in Y → (vocab_ids [V'], remap [V] (-100 outside), the target's
    LM-head rows for them [V', D], the share of Y they cover)."""
    V = model.config.vocab_size
    counts = torch.bincount(Y, minlength=V)
    vocab_ids = counts.argsort(descending=True)[:min(vocab, V)].sort().values  # [V'] the most frequent choices
    remap = torch.full((V,), -100, dtype=torch.long)  # -100: a choice outside the head's vocabulary (ignored)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    return vocab_ids, remap, _rows(model.lm_head, vocab_ids), float(counts[vocab_ids].sum() / counts.sum())


def chained(H: torch.Tensor, HN: torch.Tensor) -> torch.Tensor:
    """[N] bool: pair i+1 continues pair i (the same text, one position on), i.e. its feature is pair i's next."""
    out = torch.zeros(len(H), dtype=torch.bool)
    out[:-1] = (HN[:-1] == H[1:]).all(-1)
    return out


def top1_agreement(head: FeatureHead, features: Features) -> tuple[float, int]:
    """How often the head's first drafted token is the target's choice, over `features` (`text_features`,
    `chat_features`). → (agreement, positions)."""
    H, X, Y, _ = features
    with torch.no_grad():
        drafted = head.vocab_ids[head.logits(head(H, X)).argmax(-1)]
    return float((drafted == Y).float().mean()), len(Y)


def agreement_by_depth(head: FeatureHead, features: Features, depth: int = 4) -> dict:
    """Drafting as it runs, over `features`: from every position, a chain of `depth` drafts, each from the head's
    own previous feature and the target's token (the tokens a verified draft holds). → {"depth": [P(draft d is
    the target's choice | drafts 1..d-1 were)], "tau": expected tokens per target pass with such a chain, the
    bonus token included}."""
    H, X, Y, HN = features
    following = chained(H, HN)
    rows = torch.arange(len(H) - depth)
    alive = torch.ones(len(rows), dtype=torch.bool)  # every draft so far matched
    hits, tau = [], 1.0
    with torch.no_grad():
        h = H[rows]
        for d in range(depth):
            h = head(h, X[rows + d])
            ok = (head.vocab_ids[head.logits(h).argmax(-1)] == Y[rows + d]) & alive
            hits.append(round(float(ok.sum()) / max(1, int(alive.sum())), 4))
            tau += float(ok.float().mean())
            alive = ok & following[rows + d]
    return {"depth": hits, "tau": round(tau, 3)}


def ahead(Y: torch.Tensor, following: torch.Tensor, k: int, remap: torch.Tensor | None = None) -> torch.Tensor:
    """[N, k]: the target's choice j+1 tokens after each pair's token (Y[i + j], remapped), or -100 where the text
    ends before it — what blockwise head j learns to predict from pair i's feature."""
    N = len(Y)
    out = torch.full((N, k), -100, dtype=torch.long)
    ok = torch.ones(N, dtype=torch.bool)
    ids = remap[Y] if remap is not None else Y
    for j in range(k):
        out[:N - j, j] = torch.where(ok[:N - j], ids[j:], -100)
        ok[:N - j - 1] &= following[j:N - 1]  # the text goes on past pair i + j
        ok[N - j - 1:] = False
    return out


def fit_blockwise(model, sequences: list[tuple[list[int], int]], heads: int = 3, hidden: int = 1024,
                  vocab: int = 4096, epochs: int = 3, progress=None, seed: int = 0, chats: list[Chat] = ()):
    """Fit `heads` blockwise heads (blockwise.py) on the same data as `fit`: head j learns the target's choice j+1
    tokens after each position's token, from that position's feature (cross-entropy, Medusa-1 style, the target
    frozen). Deterministic for a seed. → (heads, {"positions", "vocab_coverage"})."""

    from .blockwise import BlockwiseHeads
    torch.manual_seed(seed)
    H, X, Y, HN = training_features(model, sequences, chats, progress)
    vocab_ids, remap, lm_rows, coverage = vocabulary(model, Y, vocab)
    targets = ahead(Y, chained(H, HN), heads, remap)  # [N, k]
    module = BlockwiseHeads(model.config.hidden_size, hidden, heads, vocab_ids, lm_rows)

    def batch_loss(rows):
        logits = module(H[rows])  # [n, k, V']
        return F.cross_entropy(logits.flatten(0, 1), targets[rows].flatten(), ignore_index=-100)

    optimise(module, len(Y), batch_loss, epochs, "train-head: blockwise heads", progress)
    return module.eval(), {"positions": len(Y), "vocab_coverage": round(coverage, 4)}


def blockwise_agreement(module, features: Features) -> dict:
    """A chain of the heads' first choices, from every position of `features`: → {"depth": [P(head j is the
    target's choice | heads before it were)], "tau": expected tokens per target pass, bonus included}."""
    H, X, Y, HN = features
    k = module.heads
    truth = ahead(Y, chained(H, HN), k)  # [N, k]
    with torch.no_grad():
        drafted = module.vocab_ids[module(H).argmax(-1)]  # [N, k]
    alive = truth[:, 0] != -100
    hits, tau, n = [], 1.0, max(1, int(alive.sum()))
    for j in range(k):
        ok = alive & (drafted[:, j] == truth[:, j])
        hits.append(round(float(ok.sum()) / max(1, int(alive.sum())), 4))
        tau += float(ok.sum()) / n
        alive = ok & (truth[:, j + 1] != -100) if j + 1 < k else ok
    return {"depth": hits, "tau": round(tau, 3)}


def train(engine, corpus_tokens: int = 65_536, chat_samples: int = 2048, hidden: int = 1024, vocab: int = 4096,
          epochs: int = 3, corpus=None, progress: bool = True, steps: int = 3, top_k: int = 10,
          heads: int = 3) -> dict:
    """Train the head for `engine`'s model on corpus text and self-distilled chats (`fit`: EAGLE's objective with
    HASS's `steps` and `top_k`), and `heads` blockwise heads on the same data (`fit_blockwise`; 0: none); save
    them to the cache. → a summary (sizes, held-out top-1 agreement with the
    target, agreement per draft depth and τ of a 4-token chain on held-out chats, seconds)."""
    from tqdm import tqdm

    from ...sparsity import corpus as corpora

    def bar(desc):
        return (lambda it: tqdm(it, desc=desc, leave=False)) if progress else None

    started = time.perf_counter()
    text = corpora.load(corpus)
    sequences = [(c, 0) for c in text.token_chunks(engine.tokenizer, "calibration", corpus_tokens, 256)]
    chats = cached_chats(engine, chat_samples, bar("train-head: self-distilled chats"))
    held = len(chats) // 10  # answers to questions the head never saw, for the agreement it reports
    head, fitted = fit(engine.model, sequences, hidden, vocab, epochs, progress=bar("train-head: corpus features"),
                       chats=chats[held:], steps=steps, top_k=top_k)
    summary = {"model": engine.name, "train_positions": fitted["positions"], "corpus": text.name,
               "chat_answers": len(chats) - held, "hidden": hidden, "vocab": len(head.vocab_ids),
               "vocab_coverage": fitted["vocab_coverage"], "epochs": epochs, "steps": steps, "top_k": top_k}
    if held:
        heldout = chat_features(chats[:held])
        summary["heldout_top1"], summary["heldout_positions"] = top1_agreement(head, heldout)
        summary["heldout_top1"] = round(summary["heldout_top1"], 4)
        by_depth = agreement_by_depth(head, heldout)
        summary["heldout_by_depth"], summary["heldout_tau"] = by_depth["depth"], by_depth["tau"]
    if heads:
        from .blockwise import heads_path, save_heads
        module, _ = fit_blockwise(engine.model, sequences, heads, hidden, vocab, epochs,
                                  progress=bar("train-head: corpus features"), chats=chats[held:])
        summary["blockwise_heads"] = heads
        if held:
            by_head = blockwise_agreement(module, heldout)
            summary["blockwise_heldout_by_depth"], summary["blockwise_heldout_tau"] = by_head["depth"], by_head["tau"]
        save_heads(module, heads_path(engine), summary)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    save_head(head, eagle.head_path(engine), summary)
    return summary


def cached_chats(engine, samples: int, progress) -> list[Chat]:
    """Self-written chats kept beside the head: a second `train-head` for the same model (another --hidden,
    --epochs, --tokens), and `train-draft` (fast_draft.py), reuse them instead of spending most of their time
    writing them again."""
    path = eagle.head_path(engine).with_name(f"{engine.model_hash}-chats-{samples}.pt")
    try:
        return [Chat(c) for c in torch.load(path, weights_only=True)]
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        chats = self_distilled_chats(engine, samples, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([tuple(c) for c in chats], path)
        return chats
