"""FFSplit (Liu et al. 2023): split each FFN into heavy-hitter neurons and the rest.

A few neurons carry most of an FFN's activation mass on real text. FFSplit computes those heavy hitters
densely, always, and makes the rest cheap; here the rest is sparse — a light neuron is computed only where its
|SiLU(gate)| passes a threshold (as CATS), calibrated on the light neurons alone so that the FFN as a whole drops
the target share. Heavy hitters: the `heavy` share of neurons with the largest mean |input of down_proj| on the
calibration corpus. Versus CATS at the same sparsity, the neurons that matter most are never dropped.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..calibrate import SEQ_LEN, ActivationStats, forward_over
from ..modules import SparseLinear, cpu_kernel_applies
from ..kernels import cpu as sparse_cpu
from ...models.quantized import QuantLinear
from .base import check_sparsity

LIGHT_TOKENS = 2048  # tokens whose light-neuron gates set the light threshold


class SplitMLP(nn.Module):
    def __init__(self, mlp: nn.Module, heavy: torch.Tensor, threshold: float, sparsity: float):
        super().__init__()
        self.gate_proj, self.up = mlp.gate_proj, mlp.up_proj
        self.down_proj = SparseLinear(mlp.down_proj, 0.0, sparsity)
        self.threshold, self.sparsity = float(threshold), float(sparsity)
        self.register_buffer("heavy_rows", heavy.to(torch.int32).contiguous(), persistent=False)
        mask = torch.zeros(mlp.gate_proj.out_features, dtype=torch.bool)
        mask[heavy.long()] = True
        self.register_buffer("heavy_mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.silu(self.gate_proj(x))
        light_gate = gate.masked_fill(self.heavy_mask, 0.0)
        ext = sparse_cpu.extension()
        if cpu_kernel_applies(x) and isinstance(self.up, QuantLinear) and self.up.qtype == "Q4_1":
            x2 = x.reshape(-1, x.shape[-1]).contiguous()
            light = ext.q4_1_rows_gated(x2, light_gate.reshape(x2.shape[0], -1).contiguous(), self.threshold, *self.up.packed)
            heavy = ext.q4_1_rows(x2, self.heavy_rows, *self.up.packed)
            h = (light + gate.reshape(light.shape) * heavy).view(gate.shape)
        else:
            up = self.up(x)
            keep = self.heavy_mask | (light_gate.abs() > self.threshold)
            h = torch.where(keep, gate * up, torch.zeros((), dtype=x.dtype))
        return self.down_proj(h)

    def extra_repr(self) -> str:
        return f"heavy={int(self.heavy_mask.sum())}, threshold={self.threshold:.4g}, sparsity={self.sparsity:.2f}"


class FFSplit:
    def __init__(self, sparsity: float = 0.5, heavy: float = 0.1):
        self.sparsity = check_sparsity(sparsity)
        self.heavy_share = float(heavy)
        if not 0.0 <= self.heavy_share < 1.0 - self.sparsity + 1e-9:
            from ...methods import UnknownMethodError
            raise UnknownMethodError(f"ffsplit needs heavy + sparsity ≤ 1 (heavy={heavy}, sparsity={sparsity})")
        self.name = f"ffsplit:{self.sparsity:g}" + (f",heavy={self.heavy_share:g}" if self.heavy_share != 0.1 else "")
        self.heavy: list[torch.Tensor] = []
        self.thresholds: list[float] = []

    def calibrate(self, engine, stats: ActivationStats) -> None:
        model = engine.model
        n_heavy = int(round(self.heavy_share * model.config.intermediate_size))
        self.heavy = [torch.from_numpy(np.argsort(-stats.channel_mean[f"layers.{i}.down_in"])[:n_heavy].copy())
                      for i in range(model.config.num_layers)]
        # Among light neurons, drop this share so the FFN as a whole drops `sparsity`.
        light_share = self.sparsity / (1.0 - self.heavy_share)
        chunks = stats.corpus_texts().token_chunks(engine.tokenizer, "calibration", LIGHT_TOKENS, SEQ_LEN)
        gates: list[list[torch.Tensor]] = [[] for _ in model.layers]
        hooks = []
        for i, layer in enumerate(model.layers):
            light = torch.ones(model.config.intermediate_size, dtype=torch.bool)
            light[self.heavy[i]] = False
            hooks.append(layer.mlp.gate_proj.register_forward_hook(
                lambda m, a, out, i=i, light=light: gates[i].append(F.silu(out)[..., light].abs().flatten())))
        forward_over(model, chunks, hooks)
        self.thresholds = []
        for parts in gates:
            values = torch.cat(parts)
            sample = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
            self.thresholds.append(float(sample.quantile(min(light_share, 1.0))) if light_share > 0 else 0.0)

    def replacements(self, model) -> dict:
        if self.sparsity <= 0:
            return {}
        return {f"layers.{i}.mlp": SplitMLP(model.layers[i].mlp, self.heavy[i], thr, self.sparsity)
                for i, thr in enumerate(self.thresholds)}
