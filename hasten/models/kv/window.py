"""window:W,sinks:S — every layer keeps the first S positions (attention sinks) and a ring of the last W
(StreamingLLM). Constant memory at any context; lossy on layers the model trained with full attention. A model's
own sliding layers (Gemma 3) keep their exact window."""
from __future__ import annotations

from dataclasses import dataclass

from .policy import LayerKV, is_lossy, model_windows, windowed_layer


@dataclass(frozen=True)
class WindowPolicy:
    window: int
    sinks: int = 0

    @property
    def name(self) -> str:
        return f"window:{self.window},sinks:{self.sinks}"

    def layers(self, config) -> tuple[LayerKV, ...]:
        return tuple(windowed_layer(w, self.window, self.sinks) for w in model_windows(config))

    def lossy(self, config) -> bool:
        return is_lossy(self.layers(config), config)

    def __repr__(self):
        return self.name
