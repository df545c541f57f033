"""EAGLE-style feature drafting: a small head trained on the target's own last hidden state drafts the next tokens.

EAGLE (Li et al. 2024) observed that the target's top-layer feature is far easier to extrapolate than its tokens:
given the feature h_t that chose token x_{t+1}, and x_{t+1}'s embedding, a small network predicts h_{t+1}, and the
target's own LM head turns it into x_{t+2}; feeding the predicted feature back drafts a chain. HASS and EAGLE-2
add that the head's own confidence says well how likely a draft is to be accepted.

What is kept here, and why (each measured on SmolLM2-135M on a 2-core CPU):
- the head is one residual MLP over [h_t ; e(x_{t+1})] instead of EAGLE's decoder layer: a CPU pays for every
  weight read on every drafted token, and the target's step is only ~12 ms;
- the LM head is cut to the most frequent output tokens (`vocab`, default 4096), as FR-Spec does: the full
  49k-row head would cost a fifth of a target step per drafted token;
- a draft grows while the product of the head's confidences down its path stays above `threshold`, so it is
  empty (and the step costs nothing extra beyond one head pass) where the head is unsure; `width > 1` makes it
  an EAGLE-2 tree of the most confident paths;
- while drafting, the head's layers run from Q8_0 blocks through hasten's block kernel (`quantize_for_drafting`);
- the head is trained once per model (`hasten train-head`, cached like calibrations) on the target's own
  predictions — over corpus text and over answers the target writes to prompts it writes itself (Magpie-style
  self-distillation, batched), so no chat dataset needs downloading.

Under greedy decoding the verifier keeps exactly the target's tokens; under sampling the draft is deterministic
(q = None) and exact speculative sampling keeps the target's distribution.
"""
from __future__ import annotations

import json
import math
import pickle
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import Draft


class HeadNotTrainedError(ValueError):
    pass


class FeatureHead(nn.Module):
    """[h_t ; e(x_{t+1})] → ĥ_{t+1} (normalised like the target's final norm output); logits = ĥ · W_vocab."""

    def __init__(self, dim: int, hidden: int, vocab_ids: torch.Tensor, lm_rows: torch.Tensor, embed: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.register_buffer("vocab_ids", vocab_ids)  # [V'] target token ids the head can draft
        self.register_buffer("lm_rows", lm_rows)  # [V', D] the target's LM head rows for them (frozen)
        # The target's input embedding module (ids → [N, D]; shared, frozen): kept outside the module tree so it is
        # neither saved with the head nor copied.
        self.__dict__["embed"] = embed

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """h [N, D], x [N] token ids → predicted next feature [N, D]."""
        z = torch.cat([h, self.embed(x).float()], -1)  # [N, 2D]
        quantized = getattr(self, "_q8", None)
        if quantized is not None and not torch.is_grad_enabled():  # drafting: Q8_0 blocks, no module calls
            ext, fc1, fc2 = quantized
            a = F.silu(torch.add(fc1(z), self.fc1.bias))
            # hasten's RMSNorm kernel: torch's costs ~45 us on one row here, as much as a layer
            return ext.rms_norm(h + fc2(a) + self.fc2.bias, self.norm.weight, self.norm.eps)
        return self.norm(h + self.fc2(F.silu(self.fc1(z))))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        lm = getattr(self, "_lm", None)
        if lm is not None and not torch.is_grad_enabled():
            return lm(h.contiguous())  # [N, V']
        return h @ self.lm_rows.T  # [N, V']

    def quantize_for_drafting(self, lm_head) -> None:
        """Draft with a quarter of the bytes: the target's own quantized LM-head rows (its GGUF blocks, the same
        values as lm_rows) and the head's two layers in Q8_0 blocks, through hasten's block kernels. A drafted
        token's head pass fell from 0.55 ms to ~0.3 ms (fp32 layers were read from L3 each time: the target's
        pass in between evicts them). The drafts change a little; what is accepted is still exactly the
        target's, since the target verifies every draft."""
        from ...kernels import cpu as cpu_kernels
        from ...models.quantized import QuantLinear
        if isinstance(lm_head, QuantLinear):
            self._lm = lm_head.rows(self.vocab_ids)
        ext = cpu_kernels.extension()
        if ext is not None and all(fc.in_features % cpu_kernels.QK == 0 for fc in (self.fc1, self.fc2)):
            self._q8 = (ext, q8_0_linear(self.fc1.weight), q8_0_linear(self.fc2.weight))


def _rows(linear: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a linear layer's dense weight (only those rows, for a block-quantized one)."""
    rows = getattr(linear, "rows", None)
    return (rows(ids).weight if rows is not None else linear.weight.detach()[ids]).float().clone()


def q8_0_linear(weight: torch.Tensor):
    """[N, K] fp32 → a QuantLinear of its GGUF Q8_0 quantization (gguf-py's, as llama.cpp's quantizer does it)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from ...models.quantized import QuantLinear
    blocks = quantize(weight.detach().float().contiguous().numpy(), GGMLQuantizationType.Q8_0)  # [N, K/32*34] u8
    return QuantLinear("Q8_0", torch.from_numpy(blocks), weight.shape[1])


class EagleDrafter:
    """Drafts depth by depth, as EAGLE-2 does: at each depth one batched head pass extends the `width` most
    confident nodes (confidence = product of the head's probabilities down the path), and a node enters the
    draft while its confidence stays ≥ `threshold`, up to `nodes` nodes and depth `k`. width=1 is a chain; wider
    trees also offer the runners-up, which pays where the head is often right but not in first place, since the
    head's pass costs the same for a few rows as for one."""

    name = "eagle"
    wants_hidden = True  # the decode loop leaves the target's final-norm features in state.hidden

    def __init__(self, head: FeatureHead, k: int = 4, threshold: float = 0.25, width: int = 1, nodes: int | None = None):
        self.check(k, threshold, width, nodes)
        self.head, self.k, self.threshold, self.width = head, k, threshold, width
        self.nodes = k if nodes is None else nodes

    @staticmethod
    def check(k: int, threshold: float, width: int, nodes: int | None) -> None:
        if k < 1 or not 0.0 < threshold < 1.0 or width < 1 or (nodes is not None and nodes < 1):
            raise ValueError("eagle needs k ≥ 1, 0 < threshold < 1, width ≥ 1 and nodes ≥ 1")

    def begin(self, state):
        pass

    def propose(self, state):
        hidden = getattr(state, "hidden", None)
        depth_limit = min(self.k, state.budget)
        if hidden is None or depth_limit <= 0:
            return Draft()
        head, width = self.head, self.width
        tokens: list[int] = []
        parents: list[int] = []
        # the frontier: draft node indices (-1 = the root) with their path confidences, and as the head's inputs
        # the features before them and their tokens
        frontier, confidence = [-1], torch.ones(1)
        h, x = hidden[-1:].float(), torch.tensor([state.tokens[-1]], device=hidden.device)
        with torch.inference_mode():
            for _ in range(depth_limit):
                h = head(h, x)  # [m, D] the features after each frontier node
                p, i = head.logits(h).softmax(-1).topk(width, -1)  # [m, width]
                score = (confidence[:, None] * p.cpu()).flatten()  # path confidences of the candidates
                best, j = score.topk(min(width, len(score), self.nodes - len(tokens)))
                kept = int((best >= self.threshold).sum())  # best is sorted: the kept ones lead
                if not kept:
                    break
                j = j[:kept]
                x = head.vocab_ids[i.flatten()[j.to(i.device)]]
                parents += [frontier[r] for r in (j // width).tolist()]
                tokens += x.tolist()
                frontier = list(range(len(tokens) - kept, len(tokens)))
                confidence = best[:kept]
                h = h[(j // width).to(h.device)]
                if len(tokens) >= self.nodes:
                    break
        return Draft(tokens, parents, None, [self.name] * len(tokens))

    def commit(self, accepted, target_logits):
        pass


# ---- training --------------------------------------------------------------------------------------------------

def head_path(engine) -> Path:
    from ...models.loading import cache_dir
    return cache_dir() / "eagle" / f"{engine.model_hash}.pt"


def load_head(engine) -> FeatureHead:
    path = head_path(engine)
    if not path.exists():
        raise HeadNotTrainedError(f"eagle needs a draft head trained for {engine.name}; run `hasten train-head` "
                                  "once (minutes on a CPU, cached)")
    model = engine.model
    try:
        saved = torch.load(path, map_location=model.device, weights_only=True)
        head = FeatureHead(model.config.hidden_size, saved["hidden"], saved["vocab_ids"], saved["lm_rows"],
                           model.embed_tokens)
        head.load_state_dict(saved["state"], strict=False)
    except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise HeadNotTrainedError(f"the eagle head {path} is unreadable ({type(e).__name__}); run `hasten "
                                  "train-head` again") from None
    head.quantize_for_drafting(model.lm_head)
    return head.to(model.device).eval()


def eagle(engine, k: int = 4, threshold: float = 0.25, width: int = 1, nodes: int | None = None) -> EagleDrafter:
    EagleDrafter.check(k, threshold, width, nodes)  # a bad parameter is reported before a missing head
    return EagleDrafter(load_head(engine), k, threshold, width, nodes)


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


def fit(model, sequences: list[tuple[list[int], int]], hidden: int = 1024, vocab: int = 4096, epochs: int = 3,
        progress=None, seed: int = 0, chats: list[Chat] = ()) -> tuple[FeatureHead, dict]:
    """Fit a head to the target's predictions over `sequences` ((token ids, first position to learn from)) and
    `chats`. → (head, {"positions", "vocab_coverage"})."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    parts = ([text_features(model, sequences, progress or iter)] if sequences else []) + ([chat_features(chats)] if chats else [])
    H, X, Y, HN = (torch.cat(t) for t in zip(*parts))
    V = model.config.vocab_size
    counts = torch.bincount(Y, minlength=V)
    vocab_ids = counts.argsort(descending=True)[:min(vocab, V)].sort().values  # [V'] the most frequent choices
    coverage = float(counts[vocab_ids].sum() / counts.sum())
    remap = torch.full((V,), -100, dtype=torch.long)  # -100: a choice outside the head's vocabulary (ignored)
    remap[vocab_ids] = torch.arange(len(vocab_ids))
    lm_rows = _rows(model.lm_head, vocab_ids)  # [V', D]
    D = model.config.hidden_size
    head = FeatureHead(D, hidden, vocab_ids, lm_rows, model.embed_tokens)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    batch = 512
    total = epochs * math.ceil(len(Y) / batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-3, total_steps=total)
    bar = tqdm(total=total, desc="train-head: training", disable=progress is None, leave=False)
    for epoch in range(epochs):
        order = torch.randperm(len(Y))
        for i in range(0, len(Y), batch):
            b = order[i:i + batch]
            predicted = head(H[b], X[b])
            # EAGLE's two losses: the target's choice (classification) and its feature (regression)
            loss = F.cross_entropy(head.logits(predicted), remap[Y[b]], ignore_index=-100) \
                + 0.1 * D * F.smooth_l1_loss(predicted, HN[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            bar.update()
            bar.set_postfix_str(f"epoch {epoch + 1} loss {loss.item():.2f}")
    bar.close()
    return head.eval(), {"positions": len(Y), "vocab_coverage": round(coverage, 4)}


def top1_agreement(head: FeatureHead, features: Features) -> tuple[float, int]:
    """How often the head's first drafted token is the target's choice, over `features` (`text_features`,
    `chat_features`). → (agreement, positions)."""
    H, X, Y, _ = features
    with torch.no_grad():
        drafted = head.vocab_ids[head.logits(head(H, X)).argmax(-1)]
    return float((drafted == Y).float().mean()), len(Y)


def train(engine, corpus_tokens: int = 65_536, chat_samples: int = 2048, hidden: int = 1024, vocab: int = 4096,
          epochs: int = 3, corpus=None, progress: bool = True) -> dict:
    """Train the head for `engine`'s model on corpus text and self-distilled chats; save it to the cache.
    → a summary (sizes, held-out top-1 agreement with the target, seconds)."""
    from tqdm import tqdm

    from ...sparsity import corpus as corpora

    def bar(desc):
        return (lambda it: tqdm(it, desc=desc, leave=False)) if progress else None

    started = time.perf_counter()
    text = corpora.load(corpus)
    sequences = [(c, 0) for c in text.token_chunks(engine.tokenizer, "calibration", corpus_tokens, 256)]
    chats = _cached_chats(engine, chat_samples, bar("train-head: self-distilled chats"))
    held = len(chats) // 10  # answers to questions the head never saw, for the agreement it reports
    head, fitted = fit(engine.model, sequences, hidden, vocab, epochs, progress=bar("train-head: corpus features"),
                       chats=chats[held:])
    summary = {"model": engine.name, "train_positions": fitted["positions"], "corpus": text.name,
               "chat_answers": len(chats) - held, "hidden": hidden, "vocab": len(head.vocab_ids),
               "vocab_coverage": fitted["vocab_coverage"], "epochs": epochs}
    if held:
        summary["heldout_top1"], summary["heldout_positions"] = top1_agreement(head, chat_features(chats[:held]))
        summary["heldout_top1"] = round(summary["heldout_top1"], 4)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    save_head(head, head_path(engine), summary)
    return summary


def _cached_chats(engine, samples: int, progress) -> list[Chat]:
    """Self-written chats kept beside the head: a second `train-head` for the same model (another --hidden,
    --epochs, --tokens) reuses them instead of spending most of its time writing them again."""
    path = head_path(engine).with_name(f"{engine.model_hash}-chats-{samples}.pt")
    try:
        return [Chat(c) for c in torch.load(path, weights_only=True)]
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        chats = self_distilled_chats(engine, samples, progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save([tuple(c) for c in chats], path)
        return chats


def save_head(head: FeatureHead, path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in head.state_dict().items() if k not in ("vocab_ids", "lm_rows")}
    torch.save({"hidden": head.fc1.out_features, "vocab_ids": head.vocab_ids, "lm_rows": head.lm_rows,
                "state": state, "summary": summary}, path)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
