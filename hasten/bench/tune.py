"""`hasten tune`: find the fastest lossless method for this model on this machine, by wall clock on a sample.

1. Screening: the configurations of the search space (drafters × their parameters × compositions `a+b` and
   fallbacks `a|b`) go in groups of `group`; every screening prompt (one per category of the sample) runs
   `baseline` then each configuration of the group, back to back (so all see the same state of the machine,
   and one baseline run serves the group); a configuration counts only if every output is identical to
   baseline's.
2. Final: configurations that pay are often within a few percent of each other, and which one wins can turn on
   which prompts were drawn, so the best `finalists` are measured again over the whole sample (every prompt
   of every category), interleaved per prompt with baseline, for `final_rounds` more passes (the turn order
   rotating every pass), and ranked on everything measured.
   Speedup = Σ baseline seconds / Σ seconds.
The ranking is saved as a profile that `--method auto` uses.
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
    "prompt-lookup", "recycling", "jacobi",  # each method's defaults: what a user would pick by hand
    "prompt-lookup:k=3", "prompt-lookup:k=5", "prompt-lookup:k=8", "prompt-lookup:n=2,k=5", "prompt-lookup:n=4,k=8",
    "prompt-lookup:k=4,adaptive=0", "recycling:nodes=6", "recycling:nodes=12", "recycling:nodes=24",
    "jacobi:block=2,blocks=1", "jacobi:block=3,blocks=2", "layer-skip",
    "sparse-draft:0.5", "sparse-draft:0.65", "sparse-draft:0.5,method=cats",
    "prompt-lookup+recycling", "prompt-lookup:k=5+recycling:nodes=6", "prompt-lookup+jacobi",
    "prompt-lookup+sparse-draft:0.5",
    "prompt-lookup|recycling", "prompt-lookup|recycling:nodes=6", "prompt-lookup:k=5|recycling:nodes=12",
    "prompt-lookup:n=4,k=8|recycling", "prompt-lookup|jacobi", "prompt-lookup|layer-skip",
)
# Tried where this model has a trained draft head (`hasten train-head`); left out, with a note, where not.
EAGLE_SPACE = (
    "eagle", "eagle:threshold=0.4", "eagle:width=2,nodes=4,threshold=0.2",
    "prompt-lookup|eagle", "prompt-lookup|eagle:threshold=0.4", "prompt-lookup|eagle:threshold=0.6",
    "prompt-lookup|eagle:width=2,nodes=4,threshold=0.2", "prompt-lookup|eagle:width=3,nodes=6,threshold=0.15",
    "prompt-lookup:n=2,k=5|eagle", "prompt-lookup+eagle",
)
# Tried where this model has trained blockwise heads (`hasten train-head --heads K`).
BLOCKWISE_SPACE = (
    "blockwise", "blockwise:width=2,threshold=0.2", "blockwise:k=2", "prompt-lookup|blockwise",
    "prompt-lookup+blockwise:width=2,threshold=0.2",
)


FASTDRAFT_SPACE = ("fastdraft", "fastdraft:k=3", "prompt-lookup|fastdraft")  # once `hasten train-draft` made one


def search_space(engine) -> tuple[tuple[str, ...], str | None]:
    """→ (configurations to try, a note on what was left out and why, or None)."""
    from ..decoding.drafters.blockwise import heads_path
    from ..decoding.drafters.eagle import head_path
    from ..decoding.drafters.fast_draft import draft_path
    space, missing = SEARCH_SPACE, []
    if hasattr(engine, "model_hash") and draft_path(engine).exists():  # the FastDraft draft against the head, here
        space += FASTDRAFT_SPACE
    if head_path(engine).exists():
        space += EAGLE_SPACE
    else:
        missing.append("eagle")
    if heads_path(engine).exists():
        space += BLOCKWISE_SPACE
    else:
        missing.append("blockwise")
    if not missing:
        return space, None
    return space, (f"{' and '.join(missing)} configurations left out: no trained "
                   f"{'draft head' if missing == ['eagle'] else 'heads'} for this model; after `hasten train-head` "
                   "the next `hasten tune` tries them")


def train_head_estimate(engine, step_s: float) -> float:
    """Seconds an estimate of `hasten train-head` with its defaults spends in target passes here: writing its
    self-distilled chats (batched rows, priced by the measured step cost at the batch's size) and one
    teacher-forced pass over its corpus, from `step_s`, this engine's seconds per plain decoding step. Fitting
    the head comes on top (minutes)."""
    import inspect

    from ..decoding.controller import step_cost
    from ..decoding.drafters import head_training
    train = inspect.signature(head_training.train).parameters
    chats = inspect.signature(head_training.self_distilled_chats).parameters
    samples, corpus = train["chat_samples"].default, train["corpus_tokens"].default
    batch, answer = chats["batch"].default, chats["max_new_tokens"].default
    cost = step_cost(engine)
    writing = -(-samples // batch) * answer * cost(batch)  # one batched step per answer token
    reading = corpus / 256 * cost(256)
    return step_s * (writing + reading)


def tune(engine, questions, budget_s: float = 600.0, max_new_tokens: int = 64, space=None,
         progress: bool = True, finalists: int = 6, final_rounds: int = 3, group: int = 4) -> dict:
    prompts = [engine.encode(q.prompt, chat=engine.has_chat_template) for q in questions]
    note = None
    if space is None:
        space, note = search_space(engine)
    for m in ("baseline",) + tuple(space):  # warm-up: kernel builds, step-cost measurement, calibrations
        engine.generate(prompts[0], max_new_tokens=8, method=m)
    started = time.perf_counter()
    plain = [engine.generate(p, max_new_tokens=max_new_tokens) for p in prompts]
    expected = [r.token_ids for r in plain]
    if note is not None:
        step_s = sum(r.seconds for r in plain) / max(1, sum(len(r.token_ids) for r in plain))
        minutes = max(1, round(train_head_estimate(engine, step_s) / 60))
        note += f" (`hasten train-head` costs ~{minutes} min here, an estimate from this run's step time, plus fitting)"
    results: dict[str, dict] = {}
    skipped = []

    def out_of_time() -> bool:
        return time.perf_counter() - started > budget_s

    first = {}  # category → its first prompt: the screening sample
    for i, q in enumerate(questions):
        first.setdefault(q.category, i)
    screening = sorted(first.values())

    def measure(configs: list[str], which: list[int]) -> None:
        """One pass over prompts `which`: per prompt, baseline then each configuration, from a fresh drafter state."""
        forget_all(engine.drafter(c) for c in configs)
        for p, ref in ((prompts[i], expected[i]) for i in which):
            base = engine.generate(p, max_new_tokens=max_new_tokens)
            for c in configs:
                cand = engine.generate(p, max_new_tokens=max_new_tokens, method=c)
                r = results.setdefault(c, {"method": c, "base_s": 0.0, "seconds": 0.0, "identical": True, "passes": 0,
                                                  "runs": 0})
                r["base_s"] += base.seconds
                r["seconds"] += cand.seconds
                r["identical"] &= cand.token_ids == ref
                r["runs"] += 1
        for c in configs:
            results[c]["passes"] += 1
            results[c]["speedup"] = results[c]["base_s"] / results[c]["seconds"]

    bar = tqdm(total=len(space), desc="tune", unit="config", disable=not progress, leave=False)
    for i in range(0, len(space), group):
        batch = list(space[i:i + group])
        if out_of_time():
            skipped.extend(batch)
            continue
        measure(batch, screening)
        bar.update(len(batch))
        best = max(batch, key=lambda c: results[c]["speedup"])
        bar.set_postfix_str(f"{best} {results[best]['speedup']:.2f}x")
    bar.close()
    ranked = sorted(results.values(), key=lambda r: (r["identical"], r["speedup"]), reverse=True)
    final = [r["method"] for r in ranked if r["identical"] and r["speedup"] > 1.0][:finalists]
    if len(final) > 1:
        for n in tqdm(range(final_rounds), desc="tune: finalists", unit="pass", disable=not progress, leave=False):
            if out_of_time():
                break
            measure(final[n % len(final):] + final[:n % len(final)], list(range(len(prompts))))
    ranking = sorted(results.values(), key=lambda r: (r["identical"], r["speedup"]), reverse=True)
    lossless = [r for r in ranking if r["identical"]]
    best = lossless[0]["method"] if lossless and lossless[0]["speedup"] > 1.0 else "baseline"
    import torch
    return {"model": engine.name, "model_hash": engine.model_hash, "machine": methods.machine_key(),
            "cpu": cpu_model(), "threads": torch.get_num_threads(), "prompts": len(prompts),
            "screening_prompts": len(screening),
            "max_new_tokens": max_new_tokens, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "best": best, "finalists": final, "ranking": ranking, "skipped_for_budget": skipped, "note": note}


def save(engine, profile: dict):
    path = methods.profile_path(engine)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1))
    return path
