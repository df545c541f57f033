"""Deja Vu (Liu et al. 2023): contextual sparsity predicted, one step ahead, by small learned predictors.

Per layer, a two-layer predictor reads the block's attention input (the normalized residual stream, available
before attention runs — Deja Vu's look-ahead) and scores every MLP neuron (and, with heads > 0, every
attention head). Per token the MLP computes only the top (1 − sparsity) share of neurons by score: their rows of
gate_proj and up_proj, their columns of down_proj. With heads > 0 the lowest-scored heads' outputs are dropped
before o_proj (whose columns for them are then not read); q/k/v stay dense so the KV cache stays complete.

Training data come from the dense model on the calibration corpus: a neuron's label is 1 where its
|SiLU(gate)·up| is in that token's top share, a head's where its output norm is. Predictors train with BCE and
Adam on the CPU (a minute or two for the default model) and are cached per model, corpus and sparsity.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import SEQ_LEN, ActivationStats, forward_over
from ..kernels import cpu as sparse_cpu
from ..modules import SparseLinear, cpu_kernel_applies
from ...models.quantized import QuantLinear
from .base import check_sparsity

TRAIN_TOKENS = 8192
HIDDEN = 64  # predictor width: its fp32 weights are read every token, so it must stay far below the MLP's
EPOCHS = 6
BATCH = 256


class Predictor(nn.Module):
    def __init__(self, dim: int, out: int, hidden: int = HIDDEN):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, out, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class _HeadMaskedLinear(nn.Module):
    """o_proj with some heads' outputs dropped per token (`keep` [.., H] is set by the block each step)."""

    def __init__(self, linear: nn.Module, num_heads: int, sparsity: float):
        super().__init__()
        self.sparse = SparseLinear(linear, 0.0, sparsity)
        self.num_heads = num_heads
        self.keep: torch.Tensor | None = None

    def forward(self, x):
        if self.keep is not None:
            shape = x.shape
            x = (x.view(*shape[:-1], self.num_heads, -1) * self.keep[..., None]).view(shape)
        return self.sparse(x)


class DejaVuBlock(nn.Module):
    def __init__(self, block: nn.Module, mlp_predictor: Predictor, keep_neurons: int,
                 head_predictor: Predictor | None, keep_heads: int, sparsity: float, head_sparsity: float):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        self.self_attn = block.self_attn  # a clone: swapping o_proj here leaves the dense model alone
        self.gate_proj, self.up_proj = block.mlp.gate_proj, block.mlp.up_proj
        self.down_proj = SparseLinear(block.mlp.down_proj, 0.0, sparsity)
        self.mlp_predictor, self.keep_neurons = mlp_predictor, keep_neurons
        self.head_predictor, self.keep_heads = head_predictor, keep_heads
        if head_predictor is not None:
            self.self_attn.o_proj = _HeadMaskedLinear(block.self_attn.o_proj, block.self_attn.num_heads, head_sparsity)

    def forward(self, x, cos, sin, layer, cache, mask):
        h = self.input_layernorm(x)
        neurons = _top_mask(self.mlp_predictor(h), self.keep_neurons)  # [B, T, N] bool, predicted before attention
        if self.head_predictor is not None:
            self.self_attn.o_proj.keep = _top_mask(self.head_predictor(h), self.keep_heads).to(x.dtype)
        x = x + self.self_attn(h, cos, sin, layer, cache, mask)
        return x + self._mlp(self.post_attention_layernorm(x), neurons)

    def _mlp(self, x, neurons):
        if cpu_kernel_applies(x) and isinstance(self.up_proj, QuantLinear) and self.up_proj.qtype == "Q4_1" \
                and isinstance(self.gate_proj, QuantLinear) and self.gate_proj.qtype == "Q4_1":
            ext = sparse_cpu.extension()
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            rows = neurons.reshape(x2.shape[0], -1).any(0).nonzero().squeeze(1).to(torch.int32)  # union over tokens
            gate = ext.q4_1_rows(x2, rows, *self.gate_proj.packed)
            up = ext.q4_1_rows(x2, rows, *self.up_proj.packed)
            h = (F.silu(gate) * up).view(*x.shape[:-1], -1)
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h * neurons)


def _top_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    idx = scores.topk(keep, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


class DejaVu:
    def __init__(self, sparsity: float = 0.5, heads: float = 0.0, rank: int = HIDDEN):
        self.sparsity = check_sparsity(sparsity)
        self.heads = check_sparsity(heads)
        self.rank = int(rank)
        self.name = f"dejavu:{self.sparsity:g}" + (f",heads={self.heads:g}" if self.heads else "") + \
            (f",rank={self.rank}" if self.rank != HIDDEN else "")
        self.mlp_predictors: list[Predictor] = []
        self.head_predictors: list[Predictor | None] = []
        self.recall: list[float] = []  # per layer: share of true top neurons the predictor keeps (held-in)

    def calibrate(self, engine, stats: ActivationStats) -> None:
        from ...models.loading import cache_dir
        config = engine.model.config
        path = cache_dir() / "sparsity" / f"dejavu-{engine.model_hash}-{stats.corpus.replace(':', '-')}-{stats.tokens}-{self.sparsity:g}-{self.heads:g}-{self.rank}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            self.mlp_predictors = [self._predictor(config.hidden_size, config.intermediate_size, self.rank, sd)
                                   for sd in saved["mlp"]]
            self.head_predictors = [self._predictor(config.hidden_size, config.num_heads, self.rank, sd) if sd else None
                                    for sd in saved["heads"]]
            self.recall = saved["recall"]
            return
        print(f"hasten: training Deja Vu predictors for {self.name} (once per model)…", file=sys.stderr)
        chunks = stats.corpus_texts().token_chunks(engine.tokenizer, "calibration", TRAIN_TOKENS, SEQ_LEN)
        data = _training_data(engine.model, chunks, self.sparsity, self.heads)
        from tqdm import tqdm
        self.mlp_predictors, self.head_predictors, self.recall = [], [], []
        for i in tqdm(range(config.num_layers), desc="training predictors", unit="layer", file=sys.stderr):
            x, neuron_labels, head_labels = data[i]
            p, recall = _train(x, neuron_labels, seed=i, hidden=self.rank)
            self.mlp_predictors.append(p)
            self.recall.append(recall)
            self.head_predictors.append(_train(x, head_labels, seed=1000 + i, hidden=self.rank)[0] if self.heads > 0 else None)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"mlp": [p.state_dict() for p in self.mlp_predictors],
                    "heads": [p.state_dict() if p is not None else {} for p in self.head_predictors],
                    "recall": self.recall}, path)

    @staticmethod
    def _predictor(dim, out, rank, state):
        p = Predictor(dim, out, rank)
        p.load_state_dict(state)
        return p.eval()

    def replacements(self, model) -> dict:
        config = model.config
        keep_neurons = max(1, round((1 - self.sparsity) * config.intermediate_size))
        keep_heads = max(1, round((1 - self.heads) * config.num_heads))
        from ..modules import clone
        return {f"layers.{i}": DejaVuBlock(clone(model.layers[i]), self.mlp_predictors[i], keep_neurons,
                                           self.head_predictors[i], keep_heads, self.sparsity, self.heads)
                for i in range(config.num_layers)}


def _training_data(model, chunks, sparsity: float, heads: float):
    """Per layer: attention inputs [n, D], neuron labels [n, N] and head labels [n, H] (bool) from the dense model."""
    config = model.config
    keep_n = max(1, round((1 - sparsity) * config.intermediate_size))
    keep_h = max(1, round((1 - heads) * config.num_heads))
    xs, ns, hs = ([[] for _ in model.layers] for _ in range(3))
    hooks = []
    for i, layer in enumerate(model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_pre_hook(
            lambda m, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1]).clone())))
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: ns[i].append(_top_mask(a[0].abs().reshape(-1, a[0].shape[-1]), keep_n))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: hs[i].append(_top_mask(
                a[0].reshape(-1, config.num_heads, config.head_dim).norm(dim=-1), keep_h))))
    forward_over(model, chunks, hooks)
    return [(torch.cat(xs[i]), torch.cat(ns[i]), torch.cat(hs[i])) for i in range(len(model.layers))]


def _train(x: torch.Tensor, labels: torch.Tensor, seed: int, hidden: int = HIDDEN) -> tuple[Predictor, float]:
    """BCE + Adam on 90% of the tokens; → the predictor and its recall of true top units on the other 10%."""
    torch.manual_seed(seed)
    n = x.shape[0]
    perm = torch.randperm(n)
    split = int(n * 0.9)
    train, test = perm[:split], perm[split:]
    x, y = x.float(), labels.float()
    p = Predictor(x.shape[1], y.shape[1], hidden)
    opt = torch.optim.Adam(p.parameters(), lr=2e-3)
    pos_weight = ((1 - y.mean()) / y.mean().clamp_min(1e-6)).clamp(max=10.0)
    with torch.enable_grad():
        for _ in range(EPOCHS):
            for b in train[torch.randperm(split)].split(BATCH):
                loss = F.binary_cross_entropy_with_logits(p(x[b]), y[b], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
    p.eval()
    with torch.inference_mode():
        keep = int(y[0].sum())
        pred = _top_mask(p(x[test]), keep)
        recall = float((pred & labels[test]).sum() / labels[test].sum())
    return p, recall
