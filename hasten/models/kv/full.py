"""The full policy: every layer holds every position (Gemma 3's sliding layers still see only their window, cut by
the mask over the full buffer). The reference every other policy is measured against."""
from __future__ import annotations

from .policy import FULL, LayerKV, model_windows


class FullPolicy:
    name = "full"

    def layers(self, config) -> tuple[LayerKV, ...]:
        return tuple(FULL if w is None else LayerKV(w, 0, ring=False) for w in model_windows(config))

    def lossy(self, config) -> bool:
        return False

    def __repr__(self):
        return self.name
