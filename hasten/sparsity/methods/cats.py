"""CATS (Lee et al. 2024): contextually-aware thresholding of the MLP's gate activation.

In a SwiGLU MLP, down(SiLU(gate(x)) ⊙ up(x)), a neuron whose |SiLU(gate)| is below a per-layer threshold is
dropped: its row of up_proj is not computed and its column of down_proj is not read. The threshold is the
calibrated quantile of |SiLU(gate)| for the target sparsity (the paper's CDF rule). Attention stays dense, so at
the same sparsity CATS skips fewer reads than TEAL (the MLP is 75% of this model's linear weights), and gate_proj
itself is always read in full.
"""
from __future__ import annotations

from ..calibrate import ActivationStats
from ..modules import GatedMLP
from .base import check_sparsity


class Cats:
    def __init__(self, sparsity: float = 0.5):
        self.sparsity = check_sparsity(sparsity)
        self.name = f"cats:{self.sparsity:g}"
        self.thresholds: list[float] = []

    def calibrate(self, engine, stats: ActivationStats) -> None:
        self.thresholds = [stats.threshold(i, "gate_act", self.sparsity) for i in range(engine.model.config.num_layers)]

    def replacements(self, model) -> dict:
        return {f"layers.{i}.mlp": GatedMLP(model.layers[i].mlp, thr, self.sparsity)
                for i, thr in enumerate(self.thresholds) if self.sparsity > 0}
