"""hybrid:global=everyK,window=W,sinks=S — LongGen's per-layer mix: every K-th layer (layers K-1, 2K-1, …, as
Gemma 3 places its global layers) holds the full context, the others a ring of S sinks + the last W positions.
With K=3, 1/3 of the layers full and 2/3 windowed. Lossy on a model trained with full attention; a model's own
sliding layers keep their exact window."""
from __future__ import annotations

from dataclasses import dataclass

from .policy import LayerKV, is_lossy, model_windows, native_layer, windowed_layer


@dataclass(frozen=True)
class HybridPolicy:
    every: int
    window: int
    sinks: int = 0

    @property
    def name(self) -> str:
        return f"hybrid:global=every{self.every},window={self.window},sinks={self.sinks}"

    def layers(self, config) -> tuple[LayerKV, ...]:
        return tuple(native_layer(w) if (i + 1) % self.every == 0 else windowed_layer(w, self.window, self.sinks)
                     for i, w in enumerate(model_windows(config)))

    def lossy(self, config) -> bool:
        return is_lossy(self.layers(config), config)

    def __repr__(self):
        return self.name
