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
- the head is trained once per model (`hasten train-head`, cached like calibrations; head_training.py) on the
  target's own predictions — over corpus text and over answers the target writes to prompts it writes itself
  (Magpie-style self-distillation, batched), so no chat dataset needs downloading.

Under greedy decoding the verifier keeps exactly the target's tokens; under sampling the draft is deterministic
(q = None) and exact speculative sampling keeps the target's distribution.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import Draft, expected_accepted


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
        self.probs: list[float] = []  # per node of the last proposal: the head's probability of its token

    def expected_accepted(self, draft) -> float:
        """The head's confidence: its probabilities down each path (EAGLE-2's estimate of acceptance)."""
        return expected_accepted(draft, self.probs[:len(draft)])

    def propose(self, state):
        hidden = getattr(state, "hidden", None)
        depth_limit = min(self.k, state.budget)
        self.probs = []
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
                p = p.cpu()
                score = (confidence[:, None] * p).flatten()  # path confidences of the candidates
                best, j = score.topk(min(width, len(score), self.nodes - len(tokens)))
                kept = int((best >= self.threshold).sum())  # best is sorted: the kept ones lead
                if not kept:
                    break
                j = j[:kept]
                x = head.vocab_ids[i.flatten()[j.to(i.device)]]
                parents += [frontier[r] for r in (j // width).tolist()]
                tokens += x.tolist()
                self.probs += p.flatten()[j].tolist()
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
    model = engine.model
    head = load_trained(head_path(engine), engine, "eagle needs a draft head", "the eagle head", "`hasten train-head`",
                        lambda saved: FeatureHead(model.config.hidden_size, saved["hidden"], saved["vocab_ids"],
                                                  saved["lm_rows"], model.embed_tokens))
    head.quantize_for_drafting(model.lm_head)
    return head.to(model.device).eval()


def load_trained(path: Path, engine, missing: str, what: str, command: str, build):
    """A trained drafter module saved by `save_head`/`save_heads`: build(saved) makes it, its state loads into it,
    and its LM-head rows must fit this model. A missing, unreadable or mismatched file is a one-line
    HeadNotTrainedError naming `command`."""
    if not path.exists():
        raise HeadNotTrainedError(f"{missing} trained for {engine.name}; run {command} once (minutes on a CPU, cached)")
    model = engine.model
    try:
        saved = torch.load(path, map_location=model.device, weights_only=True)
        module = build(saved)
        module.load_state_dict(saved["state"], strict=False)
        if module.lm_rows.shape[1] != model.config.hidden_size or int(module.vocab_ids.max()) >= model.config.vocab_size:
            raise RuntimeError("shape mismatch")
    except (OSError, RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise HeadNotTrainedError(f"{what} {path} is unreadable or for another model ({type(e).__name__}); run "
                                  f"{command} again") from None
    return module


def eagle(engine, k: int = 4, threshold: float = 0.25, width: int = 1, nodes: int | None = None) -> EagleDrafter:
    EagleDrafter.check(k, threshold, width, nodes)  # a bad parameter is reported before a missing head
    return EagleDrafter(load_head(engine), k, threshold, width, nodes)


def save_head(head: FeatureHead, path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in head.state_dict().items() if k not in ("vocab_ids", "lm_rows")}
    torch.save({"hidden": head.fc1.out_features, "vocab_ids": head.vocab_ids, "lm_rows": head.lm_rows,
                "state": state, "summary": summary}, path)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))
