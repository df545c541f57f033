"""Blockwise parallel decoding (Stern et al. 2018; Medusa's heads, Cai et al. 2024): k heads on the target's last
feature predict the tokens after the next one all at once, and the target verifies them as a tree.

The feature h_t that chose the root token x_{t+1} (the last emitted one) also carries what follows: head j
(j = 1..k) maps it to the token at t+1+j, one residual MLP block each (h + W2 silu(W1 h), normalised like the
target's final norm), read out through the target's own LM-head rows for the head vocabulary. Unlike the eagle
head, no head waits for another: the k predictions cost one batched pass, which is what makes the draft cheap.
The draft is Medusa's tree: the top `width` candidates of the first head, then of the next head under each, while
the product of the heads' probabilities down a path stays above `threshold`, at most `nodes` nodes.

Trained by `hasten train-head --heads K` on the same data as the eagle head (head_training.py::fit_blockwise);
drafts are deterministic (q = None), so greedy verification keeps exactly the target's tokens and exact
speculative sampling its distribution.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import Draft, expected_accepted
from .eagle import load_trained


class BlockwiseHeads(nn.Module):
    """k heads: h [N, D] → logits [N, k, V'] over `vocab_ids`, head j predicting the token j+1 after the root."""

    def __init__(self, dim: int, hidden: int, heads: int, vocab_ids: torch.Tensor, lm_rows: torch.Tensor):
        super().__init__()
        self.up = nn.Parameter(torch.empty(heads, dim, hidden))  # [k, D, hidden]
        self.down = nn.Parameter(torch.zeros(heads, hidden, dim))  # [k, hidden, D]: zero = each head starts as h
        nn.init.normal_(self.up, std=dim ** -0.5)
        self.norm = nn.RMSNorm(dim, eps=1e-5)
        self.register_buffer("vocab_ids", vocab_ids)  # [V']
        self.register_buffer("lm_rows", lm_rows)  # [V', D] the target's LM-head rows for them (frozen)

    @property
    def heads(self) -> int:
        return self.up.shape[0]

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """h [N, D] → each head's predicted feature [N, k, D]."""
        a = F.silu(torch.einsum("nd,kdh->nkh", h, self.up))  # [N, k, hidden]
        return self.norm(h[:, None] + torch.einsum("nkh,khd->nkd", a, self.down))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.features(h) @ self.lm_rows.T  # [N, k, V']


class BlockwiseDrafter:
    name = "blockwise"
    wants_hidden = True  # the decode loop leaves the target's final-norm features in state.hidden

    def __init__(self, heads: BlockwiseHeads, k: int | None = None, width: int = 1, threshold: float = 0.1,
                 nodes: int = 16):
        k = heads.heads if k is None else k
        self.check(k, width, threshold, nodes, heads.heads)
        self.heads, self.k, self.width, self.threshold, self.nodes = heads, k, width, threshold, nodes

    @staticmethod
    def check(k: int, width: int, threshold: float, nodes: int, trained: int | None = None) -> None:
        if k < 1 or width < 1 or not 0.0 < threshold < 1.0 or nodes < 1:
            raise ValueError("blockwise needs k ≥ 1, width ≥ 1, 0 < threshold < 1 and nodes ≥ 1")
        if trained is not None and k > trained:
            raise ValueError(f"blockwise:k={k} needs {k} heads but {trained} were trained; pass k ≤ {trained} "
                             f"or run `hasten train-head --heads {k}`")

    def begin(self, state):
        self.probs: list[float] = []  # per node of the last proposal: its head's probability of its token

    def expected_accepted(self, draft) -> float:
        """The heads' confidence: their probabilities down each path."""
        return expected_accepted(draft, self.probs[:len(draft)])

    def propose(self, state) -> Draft:
        hidden = getattr(state, "hidden", None)
        depth_limit = min(self.k, state.budget)
        self.probs = []
        if hidden is None or depth_limit <= 0:
            return Draft()
        with torch.inference_mode():
            p = self.heads(hidden[-1:].float())[0, :depth_limit].softmax(-1)  # [k, V']
            top, idx = p.topk(self.width, -1)  # [k, width]
        tokens, parents = [], []
        frontier = [(-1, 1.0)]  # (node, path confidence)
        ids = self.heads.vocab_ids[idx].tolist()
        for d in range(depth_limit):
            grown = sorted(((conf * float(top[d, w]), node, ids[d][w], float(top[d, w])) for node, conf in frontier
                            for w in range(self.width)), reverse=True)
            frontier = []
            for conf, parent, token, p_token in grown:
                if conf < self.threshold or len(tokens) >= self.nodes:
                    break
                tokens.append(token)
                parents.append(parent)
                self.probs.append(p_token)
                frontier.append((len(tokens) - 1, conf))
            if not frontier:
                break
        return Draft(tokens, parents, None, [self.name] * len(tokens))

    def commit(self, accepted, target_logits):
        pass


def heads_path(engine) -> Path:
    from ...models.loading import cache_dir
    return cache_dir() / "eagle" / f"{engine.model_hash}-blockwise.pt"


def save_heads(heads: BlockwiseHeads, path: Path, summary: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in heads.state_dict().items() if k not in ("vocab_ids", "lm_rows")}
    torch.save({"hidden": heads.up.shape[2], "heads": heads.heads, "vocab_ids": heads.vocab_ids,
                "lm_rows": heads.lm_rows, "state": state, "summary": summary}, path)
    path.with_suffix(".json").write_text(json.dumps(summary, indent=1))


def load_heads(engine) -> BlockwiseHeads:
    model = engine.model
    heads = load_trained(heads_path(engine), engine, "blockwise needs heads", "the blockwise heads",
                         "`hasten train-head --heads 3`",
                         lambda saved: BlockwiseHeads(model.config.hidden_size, saved["hidden"], saved["heads"],
                                                      saved["vocab_ids"], saved["lm_rows"]))
    return heads.to(model.device).eval()


def blockwise(engine, k: int | None = None, width: int = 1, threshold: float = 0.1, nodes: int = 16) -> BlockwiseDrafter:
    BlockwiseDrafter.check(1 if k is None else k, width, threshold, nodes)  # bad parameters before a missing file
    return BlockwiseDrafter(load_heads(engine), k, width, threshold, nodes)
