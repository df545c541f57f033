"""The native policy (the default): the model's own attention pattern, holding only what it can see. The Llama
family attends to everything (the same as full); Gemma 3's sliding layers keep a ring of their window
(config.layer_types, config.sliding_window), so their memory stays constant at any context. Exact: the window
is the model's own, so the output equals the full policy's."""
from __future__ import annotations

from .policy import LayerKV, model_windows, native_layer


class NativePolicy:
    name = "native"

    def layers(self, config) -> tuple[LayerKV, ...]:
        return tuple(native_layer(w) for w in model_windows(config))

    def lossy(self, config) -> bool:
        return False

    def __repr__(self):
        return self.name
