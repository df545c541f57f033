"""`hasten bench --suite long`: long prompts (2k, 4k and 8k tokens by default, `--lengths`) built from held-out
documents of the installed corpus (sparsity/corpus.py, Debian's Python docs), three tasks per length:

- `summarize`: "Summarize the following document" over documents filling the length (chat template);
- `question`: a question whose answer sits in the document — which sentence follows a phrase quoted from its
  middle — over the same kind of document (chat template);
- `continue`: the document itself as a raw completion prompt, to be continued.

Each length uses other documents than the lengths before it. The methods and peers run interleaved with a
rotating turn order and a warm-up, as runner.py does; every record carries the time to the first token (the
prefill, which is what a long prompt costs) apart from the decode speed after it: tokens after the first over the
seconds after the first. A prompt longer than the model's context less the answer is cut to fit (the report
prints the real token counts).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from tqdm import tqdm

from ..decoding.drafters.compose import forget_all
from ..sparsity.corpus import CorpusError
from .peers import PEERS, HFPeer
from .runner import decode_rate

LENGTHS = (2048, 4096, 8192)
TASKS = ("summarize", "question", "continue")


@dataclass(frozen=True)
class LongPrompt:
    prompt_id: str  # e.g. "4096/question"
    length: int  # the length asked for (the group); len(ids) is what it became
    task: str
    ids: list[int]


def _document_tokens(engine, texts: list[str], start: int, n: int) -> tuple[list[int], int]:
    """n tokens of held-out documents from texts[start:] joined by blank lines; → (tokens, next unused index)."""
    out: list[int] = []
    i = start
    while len(out) < n:
        if i >= len(texts) + start:
            raise CorpusError(f"the corpus' held-out documents hold fewer than {n} tokens; pass a larger --corpus")
        out += engine.tokenizer(texts[i % len(texts)] + "\n\n", add_special_tokens=False).input_ids
        i += 1
    return out[:n], i


def _question(doc: str) -> str:
    """A question answered by the document: the sentence after a phrase quoted from a sentence near its middle."""
    sentences = [s.strip() for s in doc.replace("\n", " ").split(". ") if len(s.split()) >= 8]
    if len(sentences) < 3:
        return "What is the document about?"
    phrase = " ".join(sentences[len(sentences) // 2].split()[:8])
    return f"In the document above, which sentence comes right after the one that begins \"{phrase}\"? Quote it."


def build_prompts(engine, lengths=LENGTHS, max_new_tokens: int = 128, corpus=None) -> list[LongPrompt]:
    """The suite's prompts: for each length, one per task, from held-out documents not used by shorter lengths."""
    from ..sparsity.corpus import load as load_corpus
    texts = load_corpus(corpus).texts("heldout")
    limit = engine.model.config.max_position_embeddings - max_new_tokens - 8
    chat = engine.has_chat_template
    prompts, cursor = [], 0
    for length in lengths:
        n = min(length, limit)
        for task in TASKS:
            if task == "continue" or not chat:
                ids, cursor = _document_tokens(engine, texts, cursor, n)
                prompts.append(LongPrompt(f"{length}/{task}", length, task, ids))
                continue
            instruction = ("Summarize the following document in a few sentences.\n\n" if task == "summarize" else
                           "Read the following document, then answer the question after it.\n\n")
            start, doc_n = cursor, n - len(engine.encode(instruction, chat=True)) - 48  # 48: room for the question
            best: list[int] = []
            for _ in range(6):  # the template and the question take what the document leaves: fit, then refit
                doc_ids, end = _document_tokens(engine, texts, start, max(doc_n, 16))
                doc = engine.tokenizer.decode(doc_ids)
                tail = "\n\n" + _question(doc) if task == "question" else ""
                ids = engine.encode(instruction + doc + tail, chat=True)
                if len(ids) <= n and len(ids) > len(best):
                    best, cursor = ids, end
                if n - 16 <= len(ids) <= n:
                    break
                doc_n += n - len(ids)
            ids = best or ids[len(ids) - n:]
            prompts.append(LongPrompt(f"{length}/{task}", length, task, ids))
    return prompts


def run(engine, prompts: list[LongPrompt], methods: tuple[str, ...], rounds: int = 3, max_new_tokens: int = 128,
        progress: bool = True) -> list[dict]:
    """→ one record per (round, prompt, method): tokens, seconds, first_token_seconds, token_ids, passes."""
    peers = {m: HFPeer(engine, m) for m in methods if m in PEERS}
    methods = tuple(m for m in methods if not getattr(peers.get(m), "skipped", None))

    def once(method: str, ids: list[int]) -> dict:
        if method in peers:
            return peers[method].run(ids, max_new_tokens)
        r = engine.generate(ids, max_new_tokens, method)
        return {"token_ids": r.token_ids, "seconds": r.seconds, "first_token_seconds": r.first_token_seconds,
                "target_passes": r.target_passes, "draft_seconds": r.draft_seconds}

    for method in methods:  # first calls pay for allocation, kernel builds, drafter set-up
        once(method, prompts[0].ids)
    records = []
    bar = tqdm(total=rounds * len(prompts) * len(methods), desc="bench long", unit="run", disable=not progress,
               leave=False)
    for rnd in range(rounds):
        forget_all(engine.drafter(m) for m in methods if m not in peers)
        turn = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
        for p in prompts:
            for method in turn:
                rec = once(method, p.ids)
                records.append({"method": method, "question_id": p.prompt_id, "category": str(p.length),
                                "task": p.task, "round": rnd, "prompt_tokens": len(p.ids),
                                "tokens": len(rec["token_ids"]), **rec})
                bar.update()
    bar.close()
    return records


def end_to_end_rate(records: list[dict]) -> float:
    """Σ tokens / Σ seconds, prefill included."""
    seconds = sum(r["seconds"] for r in records)
    return sum(r["tokens"] for r in records) / seconds if seconds > 0 else 0.0


def summarize(records: list[dict], reference: str) -> dict:
    """Per length and method: median time to first token, decode tokens/s after it (Σ tokens after the first /
    Σ seconds after the first), end-to-end tokens/s, decode and end-to-end speedups vs the reference (per round;
    medians), and how many outputs equal the reference's."""
    lengths = sorted({r["category"] for r in records}, key=int)
    methods = list(dict.fromkeys(r["method"] for r in records))
    by = defaultdict(list)
    for r in records:
        by[(r["method"], r["category"], r["round"])].append(r)
    rounds = sorted({r["round"] for r in records})

    first = {(r["method"], r["question_id"]): r["token_ids"] for r in records if r["round"] == rounds[0]}
    out = {"reference": reference, "lengths": lengths, "rounds": len(rounds), "methods": {}}
    for m in methods:
        entry = {}
        for g in lengths:
            rs = [r for rnd in rounds for r in by[(m, g, rnd)]]
            ratios = [decode_rate(by[(m, g, rnd)]) / decode_rate(by[(reference, g, rnd)]) for rnd in rounds
                      if by[(reference, g, rnd)] and decode_rate(by[(reference, g, rnd)]) > 0]
            e2e = [end_to_end_rate(by[(m, g, rnd)]) / end_to_end_rate(by[(reference, g, rnd)]) for rnd in rounds
                   if by[(reference, g, rnd)] and end_to_end_rate(by[(reference, g, rnd)]) > 0]
            qids = sorted({r["question_id"] for r in rs})
            entry[g] = {
                "prompt_tokens": statistics.median(r["prompt_tokens"] for r in rs),
                "first_token_seconds": statistics.median(r["first_token_seconds"] for r in rs),
                "decode_tokens_per_s": decode_rate(rs),
                "tokens_per_s": end_to_end_rate(rs),
                "decode_speedup": statistics.median(ratios) if ratios else None,
                "end_to_end_speedup": statistics.median(e2e) if e2e else None,
                "identical": [sum(first.get((m, q)) == first.get((reference, q)) for q in qids), len(qids)],
            }
        out["methods"][m] = entry
    return out


def terminal(summary: dict) -> str:
    """The table: one row per (length, method)."""
    ref = summary["reference"]
    lines = [f"long-context suite · {summary['rounds']} rounds · decode speedup vs {ref}",
             f"{'length':>6}  {'method':24} {'prompt':>7} {'TTFT s':>8} {'decode tok/s':>12} {'e2e tok/s':>9} "
             f"{'decode x':>8} {'e2e x':>6} {'same':>5}"]
    for g in summary["lengths"]:
        for m, entry in summary["methods"].items():
            e = entry[g]
            speed = f"{e['decode_speedup']:.2f}x" if e["decode_speedup"] is not None else "—"
            e2e = f"{e['end_to_end_speedup']:.2f}x" if e.get("end_to_end_speedup") is not None else "—"
            lines.append(f"{g:>6}  {m:24} {e['prompt_tokens']:7.0f} {e['first_token_seconds']:8.2f} "
                         f"{e['decode_tokens_per_s']:12.1f} {e['tokens_per_s']:9.1f} {speed:>8} {e2e:>6} "
                         f"{e['identical'][0]}/{e['identical'][1]:<3}")
    return "\n".join(lines)
