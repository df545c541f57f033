"""KV policies: which positions each layer's cache keeps, and what a query there may attend to.

A policy is a property of the cache, not of the decoding method: `Transformer.new_cache` asks the model's policy
(or the one passed) for a `LayerKV` per layer, and the cache (kv_cache.py) groups layers of the same layout into
buffers of their own. Every drafter then composes with every policy, since the forward pass alone reads the cache.

Per layer, a LayerKV says:
- `window` W (None: no window): a query at position p sees keys at positions > p - W, and the first `sinks` S
  positions always (StreamingLLM's attention sinks);
- `ring`: the layer's buffers hold only the S sinks and the last W (+ slack) positions, compacted as the context
  grows (kv_cache.py), so its memory stays constant at any context; otherwise they hold every position.
The mask follows positions only, never where or when the cache compacted, so a token's result is the same
whatever was scored beside it (batches, trees, prompt chunks).

Policies (parse): "full" (every layer holds everything; Gemma 3's sliding layers still see only their window),
"native" (the model's own: full for the Llama family; for Gemma 3 its sliding layers keep a ring of their window,
which is exact), "window:W,sinks:S" (every layer windowed), "hybrid:global=every3,window=W,sinks=S" (LongGen:
every third layer full, the rest windowed). A window on a layer the model trained with full attention is lossy
(`lossy(config)`); Gemma 3's sliding layers always keep their own exact window under every policy but "full".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class KVPolicyError(ValueError):
    """A policy string that does not parse; the message names the problem and the fix."""


@dataclass(frozen=True)
class LayerKV:
    window: int | None = None  # a query at p sees keys at positions > p - window (None: every position)
    sinks: int = 0  # ... and always positions < sinks
    ring: bool = False  # the buffers hold only the sinks and the window (+ slack), not the whole context

    def __post_init__(self):
        if self.ring and self.window is None:
            raise ValueError("a ring needs a window")


FULL = LayerKV()


class KVPolicy(Protocol):
    name: str  # the string it parses from, normalised

    def layers(self, config) -> tuple[LayerKV, ...]:
        """One LayerKV per layer of a model with this ModelConfig."""

    def lossy(self, config) -> bool:
        """True when some layer sees less than the model was trained to see (output may differ from full)."""


def model_windows(config) -> list[int | None]:
    """Per layer, the window the model itself attends within (Gemma 3's sliding layers), else None."""
    if config.layer_types is None:
        return [None] * config.num_layers
    return [config.sliding_window if t == "sliding_attention" else None for t in config.layer_types]


def native_layer(window: int | None) -> LayerKV:
    """A layer as the model defines it, holding only what it can ever see."""
    return FULL if window is None else LayerKV(window, 0, ring=True)


def windowed_layer(model_window: int | None, window: int, sinks: int) -> LayerKV:
    """A layer a policy windows: a model's own sliding layer keeps its exact window; a full-attention one gets the
    policy's window and sinks (lossy)."""
    return native_layer(model_window) if model_window is not None else LayerKV(window, sinks, ring=True)


def is_lossy(layers: tuple[LayerKV, ...], config) -> bool:
    return any(spec.window is not None and spec.window != own for spec, own in zip(layers, model_windows(config)))


def _fields(body: str, text: str, sep: str) -> dict[str, str]:
    out = {}
    for part in filter(None, body.split(",")):
        key, eq, value = part.partition(sep)
        if not eq or not value:
            raise KVPolicyError(f"KV policy {text!r}: {part!r} is not {sep.join(('key', 'value'))}; "
                                "e.g. window:512,sinks:4 or hybrid:global=every3,window=512,sinks=4")
        out[key.strip()] = value.strip()
    return out


def _positive(text: str, key: str, value: str, minimum: int) -> int:
    try:
        n = int(value)
    except ValueError:
        n = minimum - 1
    if n < minimum:
        raise KVPolicyError(f"KV policy {text!r}: {key} must be an integer ≥ {minimum} (got {value!r})")
    return n


def parse(text: str | KVPolicy | None) -> KVPolicy:
    """"full" | "native" | "window:W,sinks:S" | "hybrid:global=everyK,window=W,sinks=S" → a policy (None: native).
    Raises KVPolicyError naming the problem and the fix."""
    from .full import FullPolicy
    from .hybrid import HybridPolicy
    from .native import NativePolicy
    from .window import WindowPolicy
    if text is None:
        return NativePolicy()
    if not isinstance(text, str):
        return text
    s = text.strip().lower()
    kind, _, body = s.partition(":")
    if kind in ("full", "native") and not body:
        return FullPolicy() if kind == "full" else NativePolicy()
    if kind == "window":  # window:512,sinks:4 — the first field is the window itself
        first, _, rest = body.partition(",")
        f = _fields(rest, text, ":")
        if not first or set(f) - {"sinks"}:
            raise KVPolicyError(f"KV policy {text!r}: write window:W,sinks:S (e.g. window:512,sinks:4)")
        return WindowPolicy(_positive(text, "window", first, 1), _positive(text, "sinks", f.get("sinks", "0"), 0))
    if kind == "hybrid":
        f = _fields(body, text, "=")
        unknown = set(f) - {"global", "window", "sinks"}
        every = f.get("global", "every3")
        if unknown or "window" not in f or not every.startswith("every"):
            raise KVPolicyError(f"KV policy {text!r}: write hybrid:global=everyK,window=W,sinks=S "
                                "(e.g. hybrid:global=every3,window=512,sinks=4)")
        return HybridPolicy(_positive(text, "global=every", every[5:], 1), _positive(text, "window", f["window"], 1),
                            _positive(text, "sinks", f.get("sinks", "0"), 0))
    raise KVPolicyError(f"unknown KV policy {text!r}; use full, native, window:W,sinks:S or "
                        "hybrid:global=everyK,window=W,sinks=S")
