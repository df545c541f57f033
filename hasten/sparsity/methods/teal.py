"""TEAL (Liu et al. 2024): training-free activation sparsity by magnitude thresholds on every linear's input.

Each site of each block — the input of q/k/v, of o, of gate/up, of down — drops its smallest-magnitude
activations; the per-site threshold is the calibrated quantile for that site's sparsity. Allocation:
- uniform: every site at the model-wide target;
- greedy (TEAL's block-wise greedy): per block, start dense and repeatedly raise by STEP the sparsity of the
  site whose raise costs the least block-output error per weight skipped, until the block's parameter-weighted
  sparsity reaches the target. The error is measured on the block's real calibration inputs. Plans are cached.
"""
from __future__ import annotations

import json
import sys

import torch

from ..calibrate import SEQ_LEN, ActivationStats, forward_over
from ..modules import SparseLinear
from .base import check_sparsity

SITE_LINEARS = {"attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "o_in": ("self_attn.o_proj",), "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "down_in": ("mlp.down_proj",)}
STEP = 0.05
GREEDY_TOKENS = 1024  # block inputs the greedy search measures error on


class Teal:
    def __init__(self, sparsity: float = 0.5, alloc: str = "uniform"):
        self.sparsity = check_sparsity(sparsity)
        if alloc not in ("uniform", "greedy"):
            from ...methods import UnknownMethodError
            raise UnknownMethodError(f"teal alloc must be 'uniform' or 'greedy' (got {alloc!r})")
        self.alloc = alloc
        self.name = f"teal:{self.sparsity:g}" + (",alloc=greedy" if alloc == "greedy" else "")
        self.levels: list[dict[str, float]] = []  # per layer: site → sparsity
        self.stats: ActivationStats | None = None

    def calibrate(self, engine, stats: ActivationStats) -> None:
        self.stats = stats
        n = engine.model.config.num_layers
        if self.alloc == "uniform":
            self.levels = [{site: self.sparsity for site in SITE_LINEARS} for _ in range(n)]
        else:
            self.levels = greedy_plan(engine, stats, self.sparsity)

    def replacements(self, model) -> dict:
        out = {}
        for i, levels in enumerate(self.levels):
            for site, names in SITE_LINEARS.items():
                s = levels[site]
                if s <= 0:
                    continue
                thr = self.stats.threshold(i, site, s)
                for name in names:
                    full = f"layers.{i}.{name}"
                    out[full] = SparseLinear(model.get_submodule(full), thr, s)
        return out


def _site_weights(block) -> dict[str, float]:
    """Each site's share of the block's linear weights (what its sparsity saves in reads)."""
    sizes = {site: sum(block.get_submodule(n).weight.numel() for n in names) for site, names in SITE_LINEARS.items()}
    total = sum(sizes.values())
    return {site: v / total for site, v in sizes.items()}


def greedy_plan(engine, stats: ActivationStats, target: float) -> list[dict[str, float]]:
    from tqdm import tqdm

    from ...models.loading import cache_dir
    path = cache_dir() / "sparsity" / f"teal-greedy-{engine.model_hash}-{target:g}-{stats.tokens}.json"
    if path.exists():
        return json.loads(path.read_text())
    model = engine.model
    chunks = stats.corpus_texts().token_chunks(engine.tokenizer, "calibration", GREEDY_TOKENS, SEQ_LEN)
    inputs = _block_inputs(model, chunks)
    positions = torch.arange(SEQ_LEN)
    cos, sin = model._rope(positions)
    plan = []
    for i, block in enumerate(tqdm(model.layers, desc="teal greedy allocation", unit="block", file=sys.stderr)):
        x = inputs[i]
        with torch.inference_mode():
            reference = block(x, cos, sin, i, None, None)
        weights = _site_weights(block)
        levels = {site: 0.0 for site in SITE_LINEARS}

        def error(candidate):
            with _masked_inputs(block, {site: stats.threshold(i, site, s) for site, s in candidate.items()}):
                with torch.inference_mode():
                    out = block(x, cos, sin, i, None, None)
            return float((out - reference).pow(2).sum() / reference.pow(2).sum())

        current = 0.0
        while sum(weights[s] * levels[s] for s in levels) < target - 1e-9:
            best = None
            for site in levels:
                if levels[site] + STEP > 0.99:
                    continue
                cand = dict(levels, **{site: round(levels[site] + STEP, 4)})
                cost = (error(cand) - current) / weights[site]
                if best is None or cost < best[0]:
                    best = (cost, site, cand)
            if best is None:
                break
            levels = best[2]
            current = error(levels)
        plan.append(levels)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan))
    return plan


def _block_inputs(model, chunks) -> list[torch.Tensor]:
    """The hidden states entering each block, [len(chunks), SEQ_LEN, D] per layer (dense model)."""
    inputs: list[list[torch.Tensor]] = [[] for _ in model.layers]
    hooks = [block.register_forward_pre_hook(lambda m, args, i=i: inputs[i].append(args[0].detach().clone()))
             for i, block in enumerate(model.layers)]
    forward_over(model, chunks, hooks)
    return [torch.cat(parts) for parts in inputs]


class _masked_inputs:
    """Within the block, each site's linears see their input with |x| ≤ threshold zeroed (search only)."""

    def __init__(self, block, thresholds: dict[str, float]):
        self.block, self.thresholds, self.hooks = block, thresholds, []

    def __enter__(self):
        for site, thr in self.thresholds.items():
            if thr <= 0:
                continue
            for name in SITE_LINEARS[site]:
                self.hooks.append(self.block.get_submodule(name).register_forward_pre_hook(
                    lambda m, args, thr=thr: (args[0] * (args[0].abs() > thr),)))
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
