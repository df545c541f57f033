"""The Sparsifier protocol, and how a sparsifier becomes a method (`teal:0.5`) or a drafter (`sparse-draft:0.5`).

A Sparsifier decides which activations a model may drop; `calibrate` fits it on activation statistics (and,
for learned predictors, the calibration corpus), `replacements` names the modules to swap. The sparse model is
a clone of the dense one that shares its weights (sparsity/modules.py), built once per engine and method.
"""
from __future__ import annotations

import sys
import time
from typing import Protocol

from torch import nn

from ...decoding.drafters.base import NoDraft
from ..calibrate import DEFAULT_TOKENS, ActivationStats, activation_stats
from ..modules import sparsify


class Sparsifier(Protocol):
    name: str  # e.g. "teal:0.5"
    sparsity: float  # target share of dropped activations at the sites the method sparsifies

    def calibrate(self, engine, stats: ActivationStats) -> None:
        """Fit thresholds / predictors for `sparsity` on the calibration statistics (cached where slow)."""

    def replacements(self, model: nn.Module) -> dict[str, nn.Module]:
        """Module name → sparse module for the calibrated model."""


def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        s = -1.0
    if not 0.0 <= s < 1.0:
        from ...methods import UnknownMethodError
        raise UnknownMethodError(f"sparsity must be a number in [0, 1), e.g. teal:0.5 (got {sparsity!r})")
    return s


def calibration_source(engine) -> tuple[str | None, int]:
    """(corpus path or None for the default, calibration tokens): what `hasten calibrate --corpus/--tokens` set."""
    return getattr(engine, "sparsity_calibration", (None, DEFAULT_TOKENS))


def sparse_model(engine, sparsifier: Sparsifier) -> nn.Module:
    """The engine's model with `sparsifier` applied (calibrating on first use; cached on the engine)."""
    models = engine.__dict__.setdefault("_sparse_models", {})
    if sparsifier.name not in models:
        stats = activation_stats(engine, *calibration_source(engine))
        t0 = time.perf_counter()
        sparsifier.calibrate(engine, stats)
        model = sparsify(engine.model, sparsifier.replacements(engine.model))
        if time.perf_counter() - t0 > 5:
            print(f"hasten: {sparsifier.name} ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        models[sparsifier.name] = model
    return models[sparsifier.name]


class SparseDecoding(NoDraft):
    """A lossy method: plain decoding of the sparse model (`target` is the model the loop decodes with)."""

    def __init__(self, name: str, target: nn.Module, sparsifier: Sparsifier):
        self.name, self.target, self.sparsifier = name, target, sparsifier
