"""What a lossy method costs in quality, measured on held-out text of the calibration corpus.

Teacher-forced over windows of the held-out split (never the calibration split), the sparse model and the
dense model score the same tokens:
- perplexity of the sparse model (and of the dense one, for reference),
- top-1 agreement: the share of positions where both predict the same next token,
- mean KL(dense ‖ sparse) of the next-token distributions, in nats.
Results are cached per model hash, method and corpus (the bench reports them next to the speed).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from . import corpus as corpus_mod
from .calibrate import SEQ_LEN

QUALITY_TOKENS = 4096


@dataclass(frozen=True)
class Quality:
    perplexity: float
    dense_perplexity: float
    top1_agreement: float
    mean_kl: float
    tokens: int
    corpus: str


def compare(dense, sparse, chunks: list[list[int]], corpus: str = "") -> Quality:
    nll = dense_nll = agree = kl = 0.0
    n = 0
    with torch.inference_mode():
        for ids in chunks:
            x = torch.tensor([ids])
            p_logits, q_logits = dense(x)[0, :-1].float(), sparse(x)[0, :-1].float()
            target = x[0, 1:]
            log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
            nll += float(F.nll_loss(log_q, target, reduction="sum"))
            dense_nll += float(F.nll_loss(log_p, target, reduction="sum"))
            agree += float((p_logits.argmax(-1) == q_logits.argmax(-1)).sum())
            kl += float((log_p.exp() * (log_p - log_q)).sum())
            n += target.numel()
    return Quality(math.exp(nll / n), math.exp(dense_nll / n), agree / n, kl / n, n, corpus)


def method_quality(engine, method: str, tokens: int = QUALITY_TOKENS) -> Quality | None:
    """Quality of a lossy method's model against the engine's dense model (None for lossless methods), on the
    held-out split of the corpus the method was calibrated on."""
    drafter = engine.drafter(method)
    sparse = getattr(drafter, "target", None)
    if sparse is None:
        return None
    from ..models.loading import cache_dir
    from .methods.base import calibration_source
    corpus, calibration_tokens = calibration_source(engine)
    source = corpus_mod.load(corpus)
    safe = "".join(c if c.isalnum() else "-" for c in f"{drafter.name}-{source.name}-{calibration_tokens}-{tokens}")
    path = cache_dir() / "quality" / f"{engine.model_hash}-{safe}.json"
    if path.exists():
        return Quality(**json.loads(path.read_text()))
    chunks = source.token_chunks(engine.tokenizer, "heldout", tokens, SEQ_LEN)
    result = compare(engine.model, sparse, chunks, source.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(result)))
    return result
