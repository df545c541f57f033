"""`hasten bench`: every method and peer on the same weights and prompts, interleaved, per MEASURING.md.

For each round, for each prompt, the methods run in turn (A B C, A B C, …) so a slow minute of the machine
hurts all of them alike, and the turn order rotates by one every round (B C A in the second) so that no method
always runs right after the same neighbour: in one run, a configuration listed twice under two names differed
by 1.2% at a fixed order. Each method is warmed up on one prompt first. Timing covers prefill to last token.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from tqdm import tqdm

from ..decoding.drafters.compose import forget_all
from .peers import PEERS, HFPeer
from .suite import Question


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...]
    reference: str = "baseline"
    rounds: int = 3
    max_new_tokens: int = 128
    temperature: float = 0.0
    seed: int = 0


def run(engine, questions: list[Question], config: BenchConfig, progress: bool = True) -> list[dict]:
    """→ one record per (round, prompt, method). Prompts go through the chat template when the model has one,
    raw otherwise (base models: gemma-3-270m, a random-weight shape)."""
    peers = {m: HFPeer(engine, m) for m in config.methods if m in PEERS}
    # A peer that cannot run here (llama.cpp not installed) said so in one line and leaves no records.
    methods = tuple(m for m in config.methods if not getattr(peers.get(m), "skipped", None))
    prompts = {q.question_id: engine.encode(q.prompt, chat=engine.has_chat_template) for q in questions}

    def once(method: str, ids: list[int]) -> dict:
        if method in peers:
            return peers[method].run(ids, config.max_new_tokens)
        r = engine.generate(ids, max_new_tokens=config.max_new_tokens, method=method,
                            temperature=config.temperature, seed=config.seed)
        return {"token_ids": r.token_ids, "seconds": r.seconds, "first_token_seconds": r.first_token_seconds,
                "target_passes": r.target_passes, "draft_seconds": r.draft_seconds, "accepted_per_step": r.accepted_per_step, "sources": r.sources}

    warm = prompts[questions[0].question_id]
    for method in methods:  # first calls pay for allocation, kernel builds, drafter set-up
        once(method, warm)
    records = []
    bar = tqdm(total=config.rounds * len(questions) * len(methods), desc="bench", unit="run",
               disable=not progress, leave=False)
    for rnd in range(config.rounds):
        # Every round starts from the same drafter state: drafters that learn across prompts (Token Recycling,
        # Jacobi) learn from the prompts before this one in the round, never from this prompt's previous round.
        forget_all(engine.drafter(m) for m in methods if m not in peers)
        turn = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        for q in questions:
            for method in turn:
                rec = once(method, prompts[q.question_id])
                if rnd == 0:  # token texts for the HTML view of where tokens came from
                    rec["pieces"] = [engine.tokenizer.decode([t]) for t in rec["token_ids"]]
                records.append({"method": method, "question_id": q.question_id, "category": q.category, "round": rnd,
                                "prompt_tokens": len(prompts[q.question_id]), "tokens": len(rec["token_ids"]), **rec})
                bar.update()
    bar.close()
    return records


def summarize(records: list[dict], reference: str, sampling: bool = False) -> dict:
    """Per method: tokens/s overall and per group, speedup vs reference (per round; median, min, max), τ, identical."""
    methods = list(dict.fromkeys(r["method"] for r in records))
    groups = sorted({r["category"] for r in records})
    rounds = sorted({r["round"] for r in records})
    by = defaultdict(list)
    for r in records:
        by[(r["method"], r["round"])].append(r)

    def throughput(rs, group=None):
        rs = [r for r in rs if group is None or r["category"] == group]
        seconds = sum(r["seconds"] for r in rs)
        return sum(r["tokens"] for r in rs) / seconds if seconds else 0.0

    first = {(r["method"], r["question_id"]): r["token_ids"] for r in records if r["round"] == rounds[0]}
    # Under sampling, outputs differ from the reference by design (exactness is a distribution property, tested
    # with chi-square tests), so identical counts are reported as not applicable.
    summary = {"reference": reference, "groups": groups, "rounds": len(rounds), "sampling": sampling, "methods": {}}
    for m in methods:
        all_rs = [r for rnd in rounds for r in by[(m, rnd)]]
        entry = {"tokens_per_s": {"overall": throughput(all_rs), **{g: throughput(all_rs, g) for g in groups}},
                 "speedup": {}, "prompts": len(by[(m, rounds[0])])}
        for g in [None] + groups:
            per_round = [throughput(by[(m, rnd)], g) / throughput(by[(reference, rnd)], g)
                         for rnd in rounds if throughput(by[(reference, rnd)], g) > 0]
            if per_round:
                entry["speedup"][g or "overall"] = {"median": statistics.median(per_round), "min": min(per_round),
                                                    "max": max(per_round)}
        timed = lambda rs: rs and all(r.get("first_token_seconds") is not None for r in rs)  # noqa: E731
        if timed(all_rs):  # decode tokens/s after the first token, and its speedup (per round; median)
            entry["decode_tokens_per_s"], entry["decode_speedup"] = {}, {}
            for g in [None] + groups:
                pick = lambda rs: [r for r in rs if g is None or r["category"] == g]  # noqa: E731
                entry["decode_tokens_per_s"][g or "overall"] = decode_rate(pick(all_rs))
                ratios = [decode_rate(pick(by[(m, rnd)])) / decode_rate(pick(by[(reference, rnd)])) for rnd in rounds
                          if timed(pick(by[(reference, rnd)])) and decode_rate(pick(by[(reference, rnd)])) > 0]
                entry["decode_speedup"][g or "overall"] = statistics.median(ratios) if ratios else None
        entry["mean_accepted"] = _tau(all_rs)
        entry["mean_accepted_groups"] = {g: _tau([r for r in all_rs if r["category"] == g]) for g in groups}
        draft = sum(r.get("draft_seconds", 0.0) for r in all_rs)
        entry["draft_share"] = draft / sum(r["seconds"] for r in all_rs) if "draft_seconds" in all_rs[0] else None
        qids = [r["question_id"] for r in by[(m, rounds[0])]]
        same = [qid for qid in qids if first.get((m, qid)) == first.get((reference, qid))]
        entry["identical"] = len(same)
        cat = {r["question_id"]: r["category"] for r in all_rs}
        entry["identical_groups"] = {g: [sum(cat[q] == g for q in same), sum(cat[q] == g for q in qids)] for g in groups}
        entry["different"] = sorted(set(qids) - set(same))
        entry["unstable"] = sorted({r["question_id"] for r in all_rs if r["token_ids"] != first[(m, r["question_id"])]})
        summary["methods"][m] = entry
    return summary


def decode_rate(records: list[dict]) -> float:
    """Decode tokens/s after the first token: Σ tokens after the first / Σ seconds after the first (prefill and
    the first step excluded, as llama-bench's -n and vLLM's inter-token latency count)."""
    seconds = sum(r["seconds"] - r["first_token_seconds"] for r in records)
    return sum(max(r["tokens"] - 1, 0) for r in records) / seconds if seconds > 0 else 0.0


def _tau(records: list[dict]) -> float | None:
    """Mean accepted tokens: generated tokens per target forward pass."""
    passes = sum(r.get("target_passes") or 0 for r in records)
    return sum(r["tokens"] for r in records) / passes if passes else None


def compare(a: dict, b: dict) -> list[tuple[str, str, float, float, float]]:
    """Rows (method, group, tokens/s in A, in B, B/A) for methods and groups present in both runs."""
    rows = []
    for m, ea in a["summary"]["methods"].items():
        eb = b["summary"]["methods"].get(m)
        if eb is None:
            continue
        for g, ta in ea["tokens_per_s"].items():
            tb = eb["tokens_per_s"].get(g)
            if tb is not None and ta:
                rows.append((m, g, ta, tb, tb / ta))
    return rows


def add_quality(engine, summary: dict) -> dict:
    """Lossy methods carry their quality on held-out text (sparsity/quality.py) next to their speed."""
    from dataclasses import asdict

    from ..sparsity.quality import method_quality
    for m, entry in summary["methods"].items():
        if m in PEERS or entry.get("quality"):
            continue
        from .. import methods as registry
        if all(spec.lossless for spec in registry.parse(m)):
            continue
        q = method_quality(engine, m)
        entry["quality"] = asdict(q) if q is not None else None
        entry["lossless"] = False
    return summary
