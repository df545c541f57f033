"""What a lossy KV policy costs: quality next to memory and decode speed, at several windows.

`hasten kv-quality --windows 256,512,1024 --context 4096` (or `python -m hasten.bench.kv_quality …`): held-out
documents of the corpus (sparsity/corpus.py; the longest first, concatenated) make token streams of `context`
tokens. Every policy — full (the reference), the full cache in fp16 (`--kv-dtype f16`), native where it differs (Gemma 3),
window:W,sinks:S and LongGen's hybrid:global=every3,window=W,sinks=S for each W — scores the same stream teacher-forced through its own cache, in the same pieces, lockstep with the
full cache, so nothing holds more than one piece's logits. Per policy:
- perplexity on the stream, top-1 agreement with the full cache and mean KL(full ‖ policy) per token, in nats
  (p = the full cache's next-token distribution, q = the policy's);
- KV bytes of its cache at that context (buffer sizes), and decode milliseconds per token at that context
  (median of single-token forwards, policies interleaved: noisy on a shared machine — a ratio, not a claim).
Ends with one JSON line.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..models.attention import FUSED_TOKENS

# Tokens scored per forward (a piece's logits are all that is held): at most FUSED_TOKENS, so every policy runs
# the attention kernel the decode loop runs, whose result for a token depends only on the keys it sees; longer
# pieces take SDPA, whose rounding depends on the buffer's layout, and q8 activations can magnify that.
PIECE = FUSED_TOKENS


@dataclass(frozen=True)
class PolicyQuality:
    policy: str
    lossy: bool
    perplexity: float
    top1_agreement: float  # with the full cache
    mean_kl: float  # KL(full ‖ policy) per token, nats
    kv_bytes: int  # at the context measured
    decode_ms: float  # one token at the end of the context (median)
    tokens: int


F16 = " + f16"  # a policy name with this suffix: the same policy in an fp16 cache (kv_dtype="f16")


def policies_for(windows: list[int], sinks: int, every: int = 3) -> list[str]:
    """full first, the full cache in fp16, then per window its window:W,sinks:S and its
    hybrid:global=everyK,window=W,sinks=S."""
    out = ["full", "full" + F16]
    for w in windows:
        out += [f"window:{w},sinks:{sinks}", f"hybrid:global=every{every},window={w},sinks={sinks}"]
    return out


def streams(tokenizer, corpus: str | None, context: int, samples: int) -> list[list[int]]:
    """`samples` streams of context + 1 tokens from the corpus's held-out documents, longest first, each
    document followed by EOS."""
    from ..sparsity import corpus as corpus_mod
    texts = sorted(corpus_mod.load(corpus).texts("heldout"), key=len, reverse=True)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out, current = [], []
    for text in texts:
        current += tokenizer.encode(text, add_special_tokens=False) + eos
        while len(current) > context and len(out) < samples:
            out.append(current[:context + 1])
            current = current[context + 1:]
        if len(out) == samples:
            return out
    if not out:
        raise corpus_mod.CorpusError(f"the held-out documents hold fewer than {context + 1} tokens; "
                                     "pass a smaller --context or a larger --corpus")
    return out


def measure(model, policies: list[str], token_streams: list[list[int]], decode_tokens: int = 16) -> list[PolicyQuality]:
    """Score every stream under every policy (policies[0] is the reference) → one PolicyQuality per policy."""
    from ..models.kv import parse
    n = len(policies)
    nll, agree, kl = [0.0] * n, [0.0] * n, [0.0] * n
    times: list[list[float]] = [[] for _ in range(n)]
    count, kv_bytes = 0, [0] * n
    with torch.inference_mode():
        for ids in token_streams:
            x = torch.tensor([ids])  # [1, L + 1]
            L = x.shape[1] - 1
            caches = [model.new_cache(L + decode_tokens + 1, policy=p.removesuffix(F16),
                                      dtype=torch.float16 if p.endswith(F16) else None) for p in policies]
            for a in range(0, L, PIECE):
                b = min(a + PIECE, L)
                target = x[0, a + 1:b + 1]
                log_p = None
                for i, cache in enumerate(caches):
                    log_q = F.log_softmax(model(x[:, a:b], cache=cache)[0].float(), -1)  # [b - a, V]
                    if log_p is None:
                        log_p = log_q
                    nll[i] += float(F.nll_loss(log_q, target, reduction="sum"))
                    agree[i] += float((log_q.argmax(-1) == log_p.argmax(-1)).sum())
                    kl[i] += float((log_p.exp() * (log_p - log_q)).sum())
                count += b - a
            for r in range(decode_tokens + 1):  # interleaved; the first round warms up
                for i, cache in enumerate(caches):
                    t0 = time.perf_counter()
                    model(x[:, L:L + 1], cache=cache)
                    if r:
                        times[i].append(time.perf_counter() - t0)
                    cache.rollback(1)
            kv_bytes = [max(old, c.nbytes) for old, c in zip(kv_bytes, caches)]
    config = model.config
    return [PolicyQuality(p, parse(p.removesuffix(F16)).lossy(config) or p.endswith(F16), math.exp(nll[i] / count), agree[i] / count, kl[i] / count,
                          kv_bytes[i], 1000 * statistics.median(times[i]), count) for i, p in enumerate(policies)]


def table(results: list[PolicyQuality], context: int) -> str:
    head = ("policy", "lossy", "perplexity", "top-1 agree", "KL nats", "KV MiB", "decode ms/token")
    rows = [head] + [(r.policy, "yes" if r.lossy else "no", f"{r.perplexity:.3f}", f"{100 * r.top1_agreement:.1f}%",
                      f"{r.mean_kl:.4f}", f"{r.kv_bytes / 2 ** 20:.1f}", f"{r.decode_ms:.2f}") for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"KV policies at context {context} ({results[0].tokens} held-out tokens, vs the full cache)"]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(engine, windows: list[int], context: int, sinks: int = 4, samples: int = 1, corpus: str | None = None,
        every: int = 3) -> tuple[str, dict]:
    """→ (the table, the JSON record) for `engine`'s model."""
    from ..models.kv import parse
    policies = policies_for(windows, sinks, every)
    config = engine.model.config
    if parse("native").layers(config) != parse("full").layers(config):  # Gemma 3: its own rings, exact
        policies.insert(1, "native")
    results = measure(engine.model, policies, streams(engine.tokenizer, corpus, context, samples))
    record = {"model": engine.name, "model_hash": engine.model_hash, "context": context, "samples": samples,
              "threads": torch.get_num_threads(), "results": [asdict(r) for r in results]}
    return table(results, context), record


if __name__ == "__main__":
    import sys

    from ..cli import main
    main(["kv-quality", *sys.argv[1:]], prog_name="python -m hasten.bench.kv_quality")
