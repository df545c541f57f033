"""Activation statistics at every sparsified input → per-layer thresholds for a requested sparsity.

Teacher-forced over windows of a real corpus (sparsity/corpus.py, calibration split), forward pre-hooks record
|x| at each site of each layer:
    attn_in   the input of q/k/v_proj (after input_layernorm)      down_in   the input of down_proj
    o_in      the input of o_proj (the heads' outputs)              gate_act  |SiLU(gate_proj(x))| (CATS)
    mlp_in    the input of gate/up_proj (after post_attention_layernorm)
A random sample of magnitudes per site is kept and reduced to quantiles: the threshold for sparsity s is the
s-quantile (TEAL: drop the s smallest-magnitude entries). down_in also keeps each channel's mean |x| (FFSplit's
heavy hitters). Statistics are cached per model hash, corpus and size, so each model calibrates once.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import corpus as corpus_mod

SITES = ("attn_in", "o_in", "mlp_in", "down_in", "gate_act")
QUANTILE_STEPS = 1000  # thresholds at every 0.1% of sparsity
SEQ_LEN = 256
DEFAULT_TOKENS = 16384
SAMPLE_PER_CHUNK = 4096  # magnitudes sampled per site per window


@dataclass
class ActivationStats:
    corpus: str
    tokens: int
    quantiles: dict[str, np.ndarray]  # "layers.{i}.{site}" → [QUANTILE_STEPS + 1] magnitudes
    channel_mean: dict[str, np.ndarray]  # "layers.{i}.down_in" → [intermediate] mean |x|
    source: str | None = None  # the corpus path given (None: the default corpus)

    def corpus_texts(self):
        """The corpus these statistics came from (methods that need more than statistics read it again)."""
        return corpus_mod.load(self.source)

    def threshold(self, layer: int, site: str, sparsity: float) -> float:
        """The magnitude below which a `sparsity` share of this site's activations falls (0 → keep all)."""
        if sparsity <= 0:
            return 0.0
        q = self.quantiles[f"layers.{layer}.{site}"]
        pos = min(max(sparsity, 0.0), 1.0) * QUANTILE_STEPS
        lo = int(pos)
        hi = min(lo + 1, QUANTILE_STEPS)
        return float(q[lo] + (q[hi] - q[lo]) * (pos - lo))

    def save(self, path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"q/{k}": v for k, v in self.quantiles.items()} | {f"c/{k}": v for k, v in self.channel_mean.items()}
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, meta=np.array(json.dumps({"corpus": self.corpus, "tokens": self.tokens, "source": self.source})), **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path) -> "ActivationStats":
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            quantiles = {k[2:]: z[k] for k in z.files if k.startswith("q/")}
            channel = {k[2:]: z[k] for k in z.files if k.startswith("c/")}
        return cls(meta["corpus"], meta["tokens"], quantiles, channel, meta.get("source"))


def stats_path(engine, corpus_name: str, tokens: int):
    from ..models.loading import cache_dir
    safe = "".join(c if c.isalnum() else "-" for c in corpus_name)
    return cache_dir() / "sparsity" / f"{engine.model_hash}-{safe}-{tokens}.npz"


def activation_stats(engine, corpus: str | None = None, tokens: int = DEFAULT_TOKENS, progress: bool = True,
                     refresh: bool = False) -> ActivationStats:
    """Cached statistics for this model, or a calibration run (with a progress bar) that makes them."""
    source = corpus_mod.load(corpus)
    path = stats_path(engine, source.name, tokens)
    if path.exists() and not refresh:
        return ActivationStats.load(path)
    if progress:
        print(f"hasten: calibrating activation sparsity on {tokens} tokens of {source.name} (once per model)…",
              file=sys.stderr)
    chunks = source.token_chunks(engine.tokenizer, "calibration", tokens, SEQ_LEN)
    stats = collect(engine.model, chunks, progress=progress)
    stats.corpus, stats.source = source.name, None if corpus is None else str(corpus)
    stats.save(path)
    return stats


def collect(model, chunks: list[list[int]], progress: bool = False, seed: int = 0) -> ActivationStats:
    """Run the dense model over `chunks` and record magnitudes at every site (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, torch.Tensor] = {}
    count = [0]

    def record(key: str, x: torch.Tensor) -> None:
        flat = x.detach().abs().reshape(-1).float()
        idx = torch.randint(0, flat.numel(), (min(SAMPLE_PER_CHUNK, flat.numel()),), generator=gen)
        samples.setdefault(key, []).append(flat[idx])

    hooks = []
    for i, layer in enumerate(model.layers):
        def pre(site, i=i):
            return lambda module, args: record(f"layers.{i}.{site}", args[0])

        def down_pre(module, args, i=i):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).float()
            key = f"layers.{i}.down_in"
            sums[key] = sums.get(key, 0) + x.sum(0)
            record(key, args[0])

        hooks += [layer.self_attn.q_proj.register_forward_pre_hook(pre("attn_in")),
                  layer.self_attn.o_proj.register_forward_pre_hook(pre("o_in")),
                  layer.mlp.gate_proj.register_forward_pre_hook(pre("mlp_in")),
                  layer.mlp.down_proj.register_forward_pre_hook(down_pre),
                  layer.mlp.gate_proj.register_forward_hook(
                      lambda module, args, out, i=i: record(f"layers.{i}.gate_act", F.silu(out)))]
    forward_over(model, chunks, hooks, "calibrating" if progress else None)
    count[0] = sum(len(ids) for ids in chunks)
    levels = torch.linspace(0, 1, QUANTILE_STEPS + 1)
    quantiles = {}
    for key, parts in samples.items():
        values = torch.cat(parts).sort().values
        pos = (levels * (values.numel() - 1)).round().long()
        quantiles[key] = values[pos].numpy()
    channel = {k: (v / count[0]).numpy() for k, v in sums.items()}
    return ActivationStats("", count[0], quantiles, channel)


def forward_over(model, chunks: list[list[int]], hooks: list, progress: str | None = None) -> None:
    """Run the model teacher-forced over token windows while `hooks` (handles) record what they need, then remove
    the hooks whatever happens. `progress` names a progress bar."""
    from tqdm import tqdm
    try:
        with torch.inference_mode():
            for ids in tqdm(chunks, desc=progress, unit="window", disable=progress is None, file=sys.stderr):
                model(torch.tensor([ids], device=model.device), last_only=True)
    finally:
        for h in hooks:
            h.remove()


def measured_sparsity(model, chunks: list[list[int]]) -> dict[str, float]:
    """The share of inputs each sparse layer of `model` actually drops on `chunks` (held-out checks)."""
    from .modules import SparseLinear
    dropped: dict[str, list[float]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: dropped.setdefault(name, []).append(
                    float((args[0].abs() <= m.threshold).float().mean()))))
    forward_over(model, chunks, hooks)
    return {k: float(np.mean(v)) for k, v in dropped.items()}
