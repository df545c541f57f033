"""`hasten tune`: find the fastest lossless method for this model on this machine, by wall clock on a sample.

For each configuration in the search space (drafters × their parameters × compositions `a+b` and fallbacks
`a|b`), every sample prompt
runs `baseline` then the configuration, back to back (so both see the same state of the machine); a
configuration counts only if every output is identical to baseline's. The ranking (speedup = Σ baseline
seconds / Σ configuration seconds over equal tokens) is saved as a profile that `--method auto` uses.
"""
from __future__ import annotations

import datetime
import json
import time

from tqdm import tqdm

from .. import methods
from ..decoding.drafters.compose import forget_all
from .context import cpu_model

SEARCH_SPACE = (
    "prompt-lookup:k=3", "prompt-lookup:k=5", "prompt-lookup:k=8", "prompt-lookup:n=2,k=5", "prompt-lookup:n=4,k=8",
    "prompt-lookup:k=4,adaptive=0", "recycling:nodes=6", "recycling:nodes=12", "recycling:nodes=24",
    "jacobi:block=2,blocks=1", "jacobi:block=3,blocks=2", "layer-skip",
    "sparse-draft:0.5", "sparse-draft:0.65", "sparse-draft:0.5,method=cats",
    "prompt-lookup+recycling", "prompt-lookup:k=5+recycling:nodes=6", "prompt-lookup+jacobi",
    "prompt-lookup+sparse-draft:0.5",
    "prompt-lookup|recycling", "prompt-lookup|recycling:nodes=6", "prompt-lookup:k=5|recycling:nodes=12",
    "prompt-lookup:n=4,k=8|recycling", "prompt-lookup|jacobi", "prompt-lookup|layer-skip",
)


def tune(engine, questions, budget_s: float = 600.0, max_new_tokens: int = 64, space=SEARCH_SPACE,
         progress: bool = True) -> dict:
    prompts = [engine.encode(q.prompt, chat=True) for q in questions]
    for m in ("baseline",) + tuple(space):  # warm-up: kernel builds, step-cost measurement, calibrations
        engine.generate(prompts[0], max_new_tokens=8, method=m)
    started = time.perf_counter()
    expected = [engine.generate(p, max_new_tokens=max_new_tokens).token_ids for p in prompts]
    ranking, skipped = [], []
    bar = tqdm(space, desc="tune", unit="config", disable=not progress, leave=False)
    for config in bar:
        if time.perf_counter() - started > budget_s:
            skipped.append(config)
            continue
        base_s = cand_s = 0.0
        identical = True
        forget_all([engine.drafter(config)])  # learned state comes from this sample only, as in `hasten bench`
        for p, ref in zip(prompts, expected):
            base = engine.generate(p, max_new_tokens=max_new_tokens)
            cand = engine.generate(p, max_new_tokens=max_new_tokens, method=config)
            base_s, cand_s = base_s + base.seconds, cand_s + cand.seconds
            identical &= cand.token_ids == ref
        ranking.append({"method": config, "speedup": base_s / cand_s, "identical": identical})
        bar.set_postfix_str(f"{config} {base_s / cand_s:.2f}x")
    ranking.sort(key=lambda r: (r["identical"], r["speedup"]), reverse=True)
    lossless = [r for r in ranking if r["identical"]]
    best = lossless[0]["method"] if lossless and lossless[0]["speedup"] > 1.0 else "baseline"
    import torch
    return {"model": engine.name, "model_hash": engine.model_hash, "machine": methods.machine_key(),
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "prompts": len(prompts),
            "max_new_tokens": max_new_tokens, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "best": best, "ranking": ranking, "skipped_for_budget": skipped}


def save(engine, profile: dict):
    path = methods.profile_path(engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    return path
