"""Engine: one loaded model + tokenizer; generate(), stream() and run() for every method."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from . import methods
from .decoding.detokenize import Detokenizer
from .decoding.drafters.base import fork
from .decoding.loop import Sequence as Seq
from .decoding.sampling import SamplingConfig
from .decoding.scheduler import Scheduler
from .models.loading import LoadedModel, load as load_model

Messages = Sequence[dict]


class GenerationError(ValueError):
    """Bad generation arguments; the message names the problem and the fix."""


@dataclass
class TokenLogprob:
    """A token's log-probability under the target's own (unwarped) logits, and the k most likely tokens there."""
    token: int
    logprob: float
    top: list[tuple[int, float]]  # [(token id, logprob)], most likely first


@dataclass
class Chunk:
    text: str  # text delta (may be empty while a multi-byte character or a possible stop string is held back)
    tokens: list[int]  # token ids emitted by this step
    sources: list[str]  # per token: the drafter that proposed it, or "target" (the bonus token)
    logprobs: list[TokenLogprob] | None = None  # per token, when run(logprobs=k) asked for them


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    method: str
    seconds: float
    target_passes: int
    draft_seconds: float
    accepted_per_step: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    kv_policy: str = "native"  # the KV policy it was generated under (models/kv), "+ f16" for an fp16 cache
    kv_lossy: bool = False  # that policy windows layers the model trained with full attention, or the cache is fp16
    first_token_seconds: float | None = None  # from the call to the first emitted token (prefill + one step)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0

    @property
    def draft_share(self) -> float:
        return self.draft_seconds / self.seconds if self.seconds > 0 else 0.0

    def stats(self) -> dict:
        return {"method": self.method, "tokens": self.tokens, "prompt_tokens": self.prompt_tokens,
                "seconds": round(self.seconds, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "target_passes": self.target_passes, "mean_accepted": round(self.mean_accepted, 3),
                "draft_share": round(self.draft_share, 4), "finish_reason": self.finish_reason,
                "kv_policy": self.kv_policy, "kv_lossy": self.kv_lossy}


IDLE = Chunk("", [], [])  # what a generation in a shared scheduler yields while it waits for the next step


class Generation:
    """An iterator of Chunks; `.result` is set once it is exhausted. `close()` stops decoding at once."""

    def __init__(self, chunks: Iterator[Chunk]):
        self._chunks = chunks
        self.result: GenerationResult | None = None

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        try:
            return next(self._chunks)
        except StopIteration as stop:
            self.result = stop.value
            raise

    def close(self):
        self._chunks.close()


class Engine:
    def __init__(self, loaded: LoadedModel, kv_policy=None, kv_dtype: str | None = None):
        """kv_policy: the KV policy every generation's cache follows (models/kv: "native" by default — the
        model's own pattern; "full", "window:W,sinks:S", "hybrid:global=everyK,window=W,sinks=S"); kv_dtype:
        "f16" keeps the cache in fp16 (half the bytes a decode step at depth reads; lossy: each key and value
        rounded once), "f32" or None the model's own dtype."""
        import copy

        from .models.kv import parse
        if kv_dtype not in (None, "f32", "f16"):
            raise GenerationError(f"unknown KV cache dtype {kv_dtype!r}; use f16 or f32")
        self.loaded = loaded
        self.kv_policy = parse(kv_policy)
        self.kv_dtype = kv_dtype or "f32"
        self.model = loaded.model
        if self.kv_policy.name != "native" or self.kv_dtype == "f16":
            # Caches are made by the model (new_cache), drafters' included, so the policy is the model's: on a
            # shallow copy sharing every weight, so that other engines over the same loaded model keep theirs.
            self.model = copy.copy(loaded.model)
            self.model.kv_policy = self.kv_policy
            self.model.kv_dtype = torch.float16 if self.kv_dtype == "f16" else None
        self.tokenizer = loaded.tokenizer
        self.name = loaded.name
        self.model_hash = loaded.model_hash
        self.eos_ids = _eos_ids(loaded)
        self._drafters: dict[str, object] = {}
        self._cache = None

    # ---- inputs ------------------------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer has a chat template (instruct models); base models take raw prompts."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str | Messages, chat: bool | None = None) -> list[int]:
        """A string is a raw completion prompt unless chat=True; a list of messages always uses the chat template."""
        if isinstance(prompt, str) and not chat:
            return self.tokenizer(prompt).input_ids
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if not self.has_chat_template:
            raise GenerationError(f"{self.name} has no chat template; pass a plain prompt instead of messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def grammar(self, response_format: dict | None):
        """A fresh grammar state for one generation (None for no constraint / {"type": "text"}); the grammar
        library's view of the tokenizer is built once per engine. Bad formats raise GenerationError."""
        if response_format is None or (isinstance(response_format, dict) and response_format.get("type") == "text"):
            return None
        from .decoding.grammar import Grammar, GrammarError, compile_grammar
        try:
            import llguidance.hf
        except ImportError:
            raise GenerationError("structured output needs llguidance: pip install llguidance") from None
        try:
            text = compile_grammar(response_format)
            if getattr(self, "_grammar_tokenizer", None) is None:
                self._grammar_tokenizer = llguidance.hf.from_tokenizer(
                    self.tokenizer, n_vocab=self.model.config.vocab_size, eos_token=sorted(self.eos_ids))
            return Grammar(self._grammar_tokenizer, text, self.model.config.vocab_size)
        except GrammarError as e:
            raise GenerationError(str(e)) from None

    @property
    def kv_lossy(self) -> bool:
        """True when the KV policy lets some layer see less than the model was trained to (a window on a
        full-attention layer), or the cache rounds keys and values to fp16: every method's output may then
        differ from the full f32 cache's."""
        return self.kv_policy.lossy(self.model.config) or self.kv_dtype == "f16"

    @property
    def kv_label(self) -> str:
        """The KV policy's name, with " + f16" for an fp16 cache."""
        return self.kv_policy.name + (" + f16" if self.kv_dtype == "f16" else "")

    def drafter(self, method: str):
        if method not in self._drafters:
            self._drafters[method] = methods.build(method, self)
        return self._drafters[method]

    # ---- generation --------------------------------------------------------------------------------------
    def scheduler(self, max_batch: int = 8, step_tokens: int | None = 256, prefix_cache_mb: float = 0,
                  block: int = 16) -> Scheduler:
        """A scheduler for generations running at once (`run(..., batch=...)`): up to max_batch sequences, about
        step_tokens tokens scored per step, and a prefix cache of prefix_cache_mb MiB (0: none) in blocks of
        `block` tokens."""
        from .decoding.controller import step_cost
        from .decoding.prefix_cache import PrefixCache
        cache = PrefixCache(int(prefix_cache_mb * 2 ** 20), block) if prefix_cache_mb > 0 else None
        return Scheduler(max_batch, step_tokens, cache, lambda: step_cost(self))

    def run(self, prompt: str | Messages | list[int], max_new_tokens: int = 256, method: str = "baseline",
            temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
            stop: Sequence[str] | None = None, chat: bool | None = None, logprobs: int | None = None,
            batch: Scheduler | None = None, response_format: dict | None = None) -> Generation:
        """Validate everything up front (errors raise here, before any token), then decode lazily.

        logprobs=k attaches to every token its log-probability and the k most likely tokens, from the logits the
        target scored it with (raw, before temperature/top-k/top-p), so they do not depend on the method.
        batch: a scheduler (`Engine.scheduler`) that steps this generation together with others; whoever runs
        `batch.step()` drives them, and the generation yields IDLE while its sequence waits. Without it the
        generation is a scheduler of one, stepped as it is iterated.
        response_format: structured output, as OpenAI's ({"type": "json_object"}, {"type": "json_schema",
        "json_schema": {"schema": ...}}; also {"type": "regex", "regex": ...}, {"type": "lark", "lark": ...}):
        every token is chosen among those the grammar allows (decoding/grammar.py); {"type": "text"}: none."""
        validate_options(max_new_tokens, temperature, top_k, top_p)
        if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
            raise GenerationError(f"logprobs must be an integer ≥ 0 or None (got {logprobs!r})")
        ids = list(prompt) if _is_token_list(prompt) else self.encode(prompt, chat)
        if not ids:
            raise GenerationError("the prompt is empty; pass some text")
        context = self.model.config.max_position_embeddings
        if len(ids) >= context:
            raise GenerationError(f"the prompt has {len(ids)} tokens but {self.name}'s context is {context}; "
                                  "shorten the prompt")
        grammar = self.grammar(response_format)
        drafter = fork(self.drafter(method))  # this sequence's own draft state; learned tables stay shared
        sampling = SamplingConfig(float(temperature), int(top_k), float(top_p), seed)
        stops = [s for s in (stop or []) if s]
        target = getattr(drafter, "target", None) or self.model  # lossy methods decode a sparse model
        needed = min(len(ids) + max_new_tokens + 64, context + 64)
        if batch is None:  # one generation at a time reuses one cache; batched ones each own theirs
            if self._cache is None or self._cache.max_len < needed:
                self._cache = self.model.new_cache(needed)
            cache = self._cache
        else:
            cache = batch.cache(target, needed)
        seq = Seq(target, ids, drafter, sampling, max_new_tokens, self.eos_ids, cache, grammar=grammar)
        steps = (batch or Scheduler()).steps(seq, pump=batch is None)
        return Generation(self._chunks(seq, steps, method, stops, logprobs))

    def _chunks(self, seq: Seq, steps, method, stops, top_k=None) -> Iterator[Chunk]:
        stats = seq.stats
        detok = Detokenizer(self.tokenizer)
        out_ids, sources, text, sent = [], [], "", 0
        all_lp = [] if top_k is not None else None
        last = None  # the step whose text held a stop string: its tokens go with the final chunk
        hold = max((len(s) for s in stops), default=1) - 1  # a stop string may still be completing
        t0 = time.perf_counter()
        first = None  # seconds to the first token
        stopped = False
        try:
            for step in steps:
                if step is None:
                    yield IDLE
                    continue
                # Token by token, so that a stop string completed inside a multi-token step ends the output at
                # the token that completed it, as plain decoding would: later tokens of the step are dropped.
                cut, n = None, 0
                while cut is None and n < len(step.tokens):
                    text += detok.push(step.tokens[n:n + 1])
                    n += 1
                    cut = _find_stop(text, stops, sent)
                tokens, step_sources = step.tokens[:n], step.sources[:n]
                out_ids += tokens
                sources += step_sources
                if first is None and tokens:
                    first = time.perf_counter() - t0
                lp = token_logprobs(step.logits[:n], tokens, top_k) if top_k is not None else None
                if lp is not None:
                    all_lp += lp
                if cut is not None:
                    text, stopped = text[:cut], True
                    stats.finish_reason = "stop"
                    last = Chunk("", tokens, step_sources, lp)
                    break
                safe = len(text) - hold
                if safe > sent:
                    yield Chunk(text[sent:safe], tokens, step_sources, lp)
                    sent = safe
                else:
                    yield Chunk("", tokens, step_sources, lp)
        finally:
            steps.close()
        seconds = time.perf_counter() - t0
        if not stopped:
            text += detok.flush()
            cut = _find_stop(text, stops, sent)
            if cut is not None:
                text, stats.finish_reason = text[:cut], "stop"
        if last is not None or len(text) > sent:
            last = last or Chunk("", [], [], [] if top_k is not None else None)
            last.text = text[sent:]
            yield last
        return GenerationResult(text, out_ids, len(seq.prompt), stats.finish_reason, method, seconds,
                                stats.target_passes, stats.draft_seconds, stats.accepted_per_step, sources, all_lp,
                                self.kv_label, self.kv_lossy, first if first is not None else seconds)

    def generate(self, prompt, max_new_tokens: int = 256, method: str = "baseline", **kw) -> GenerationResult:
        gen = self.run(prompt, max_new_tokens, method, **kw)
        for _ in gen:
            pass
        return gen.result

    def stream(self, prompt, max_new_tokens: int = 256, method: str = "baseline", **kw) -> Iterator[str]:
        for chunk in self.run(prompt, max_new_tokens, method, **kw):
            if chunk.text:
                yield chunk.text

    def prompt_logprobs(self, ids: list[int], top_k: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's logprob given the tokens before it (None for the first), from one target pass."""
        with torch.inference_mode():
            logits = self.model(torch.tensor([ids], device=self.model.device))[0]  # [T, V]
        return [None] + token_logprobs(logits[:-1], ids[1:], top_k)

    def logits(self, input_ids: torch.Tensor | list) -> torch.Tensor:
        """The model's logits [batch, seq, vocab] for token ids [batch, seq] (or [seq])."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.model.device)
        if ids.dim() == 1:
            ids = ids[None]
        with torch.inference_mode():
            return self.model(ids)


def token_logprobs(logits: torch.Tensor, tokens: list[int], top_k: int) -> list[TokenLogprob]:
    """logits [n, V] row i → token i's log-softmax value and the top_k entries of that row."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, V]
    rows = torch.arange(len(tokens), device=logp.device)
    chosen = logp[rows, torch.tensor(tokens, device=logp.device)].tolist()
    if top_k:
        values, indices = logp.topk(min(top_k, logp.shape[-1]), dim=-1)  # [n, k]
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return [TokenLogprob(t, c, top) for t, c, top in zip(tokens, chosen, tops)]


def validate_options(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be an integer ≥ 1 (got {max_new_tokens!r})")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be ≥ 0 (got {temperature}); use 0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (got {top_p})")
    if top_k < 0:
        raise GenerationError(f"top_k must be ≥ 0 (got {top_k}); 0 turns it off")


def load(model: str | None = None, dtype=None, device=None, quantize: str | None = None,
         activations: str | None = None, kv_policy: str | None = None, kv_dtype: str | None = None) -> Engine:
    """Load a model (default: the embedded SmolLM2-135M-Instruct) and return an Engine; `quantize` turns a Hugging
    Face checkpoint's linear layers into a GGUF block format (cached); `activations` "q8" / "f32" picks the
    block kernels' activation path (None: each format's default; see models/quantized.py); `kv_policy` the KV
    cache's policy (models/kv; None: "native", the model's own); `kv_dtype` "f16" an fp16 KV cache (lossy)."""
    from .models.kv import parse
    policy = parse(kv_policy)  # a typo fails before seconds of loading
    if kv_dtype not in (None, "f32", "f16"):
        raise GenerationError(f"unknown KV cache dtype {kv_dtype!r}; use f16 or f32")
    return Engine(load_model(model, dtype=dtype, device=device, quantize=quantize, activations=activations), policy,
                  kv_dtype)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    for value in (getattr(loaded.hf_config, "eos_token_id", None), loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids


def _is_token_list(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(t, int) for t in prompt)


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Index where the earliest stop string starts, searching only text that could contain a new match."""
    found = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(found) if found else None
