"""Layer-skip self-speculation (in the spirit of Draft & Verify / LayerSkip): the target's own weights with some
layers skipped draft for the full target. No second model, no training.

Which layers to skip is decided once per model by a short calibration and cached: teacher-forced over a few
prompts, each layer is scored by how much the draft's top-1 agreement with the full model drops when it alone
is skipped; layers are then skipped greedily, least harmful first, and the set with the best expected speed —
tokens per step from the measured agreement, over the step's cost (target pass + drafting with the kept
layers) — is kept.
"""
from __future__ import annotations

import json

import torch

from ..controller import DraftSizeController
from .draft_model import ModelDrafter

CALIBRATION_PROMPTS = (
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "def quicksort(items):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "Summarize the causes of the French Revolution in a few sentences.",
)


def _agreement(model, ids: torch.Tensor, reference: torch.Tensor, layers) -> float:
    with torch.inference_mode():
        return float((model(ids, layers=layers).argmax(-1) == reference).float().mean())


def calibrate(engine, k: int = 4) -> dict:
    """→ {"skip": [...], "agreement": a, "expected_speedup": s}; a few forward passes per layer."""
    from ..controller import step_cost
    model = engine.model
    n = model.config.num_layers
    texts = []
    for prompt in CALIBRATION_PROMPTS:  # the model's own greedy continuations are what drafts must match
        texts.append(engine.generate(prompt, max_new_tokens=48, chat=True).token_ids)
    ids = torch.tensor([[t for text in texts for t in text]])
    with torch.inference_mode():
        reference = model(ids).argmax(-1)
    harm = sorted(range(1, n - 1), key=lambda i: -_agreement(model, ids, reference,
                                                              tuple(j for j in range(n) if j != i)))
    cost = step_cost(engine)
    best = {"skip": [], "agreement": 1.0, "expected_speedup": 1.0}
    skip: list[int] = []
    for layer in harm[: n // 2 + 1]:
        skip.append(layer)
        keep = tuple(j for j in range(n) if j not in skip)
        a = _agreement(model, ids, reference, keep)
        ctl = DraftSizeController(cost, k, prior=a, draft_cost=len(keep) / n)
        ctl.accepted, ctl.stops = a, 1 - a
        kk = ctl.next()
        speed = (ctl.expected(kk) + 1) / (cost(kk + 1) + kk * len(keep) / n)
        if speed > best["expected_speedup"]:
            best = {"skip": sorted(skip), "agreement": a, "expected_speedup": speed}
    return best


def layer_skip(engine, skip: str | None = None, k: int = 4) -> ModelDrafter:
    from ...models.loading import cache_dir
    from ..controller import step_cost
    n = engine.model.config.num_layers
    prior = 0.8
    if skip is not None:  # e.g. skip=10-19 or skip=3/5/7
        layers = _parse_layers(str(skip), n)
    else:
        path = cache_dir() / "layer_skip" / f"{engine.model_hash}.json"
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            import sys
            print("hasten: calibrating layer-skip once for this model (cached)…", file=sys.stderr)
            result = calibrate(engine, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result))
        layers, prior = result["skip"], result["agreement"]
    keep = tuple(i for i in range(n) if i not in set(layers))
    return ModelDrafter(engine.model, len(engine.tokenizer), k, 1, layers=keep, cost=step_cost(engine),
                        draft_cost=len(keep) / n, name="layer-skip", prior=prior)


def _parse_layers(text: str, n: int) -> list[int]:
    layers = set()
    for part in text.replace(";", " ").replace("/", " ").split():
        lo, _, hi = part.partition("-")
        layers.update(range(int(lo), int(hi or lo) + 1))
    if not layers or min(layers) < 0 or max(layers) >= n:
        raise ValueError(f"skip= must name layers between 0 and {n - 1}, e.g. skip=10-19")
    return sorted(layers)
