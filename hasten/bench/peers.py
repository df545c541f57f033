"""Peers: what users run today, on the very same weights and token ids.

`hf` is transformers' `generate` (greedy); `hf-pld` is the same with its prompt lookup drafter
(`prompt_lookup_num_tokens=10`). Both share the native model's dense fp32 weights (no copy).

`llama-cpp` is llama.cpp through llama-cpp-python (the optional extra `hasten[llama-cpp]`) on the GGUF file the
engine loaded, greedy, fed the same token ids; `llama-cpp-pld` adds llama-cpp-python's prompt lookup drafter
(`LlamaPromptLookupDecoding`, 10 draft tokens like `hf-pld`). llama.cpp computes from the quantized blocks with
its own kernels, so its tokens can drift from hasten's over a long answer: every result carries `precision`.
A llama.cpp peer that cannot run here (llama-cpp-python missing, a model not loaded from a GGUF file) is
skipped with one line on stderr.
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch

PEERS = ("hf", "hf-pld", "llama-cpp", "llama-cpp-pld")
LLAMA_CPP_PEERS = ("llama-cpp", "llama-cpp-pld")
DRAFT_TOKENS = 10  # prompt lookup draft length of hf-pld and llama-cpp-pld alike
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class HFPeer:
    def __new__(cls, engine, name: str):
        # runner.py builds every name in PEERS as HFPeer(engine, name): the llama.cpp ones get their own peer.
        if name in LLAMA_CPP_PEERS:
            return llama_cpp_peer(engine, name)
        return super().__new__(cls)

    def __init__(self, engine, name: str):
        from ..models.hf import shared_transformers
        self.name = name
        self.engine = engine
        self.model = shared_transformers(engine)
        self.precision = _DTYPES.get(self.model.dtype, str(self.model.dtype).removeprefix("torch."))
        self.passes = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.passes += 1

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        """→ token_ids, seconds, target_passes (prefill included), first_token_seconds, precision."""
        kwargs = {"prompt_lookup_num_tokens": DRAFT_TOKENS} if self.name == "hf-pld" else {}
        eos = sorted(self.engine.eos_ids)
        self.passes = 0
        first = _FirstToken()
        with torch.inference_mode():
            t0 = first.t0 = time.perf_counter()
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                      pad_token_id=eos[0], streamer=first, **kwargs)
            seconds = time.perf_counter() - t0
        return {"token_ids": out[0, len(ids):].tolist(), "seconds": seconds, "target_passes": self.passes,
                "first_token_seconds": first.seconds or seconds, "precision": self.precision}


class _FirstToken:
    """A transformers streamer that only notes when the first generated token arrives (its first `put` is the
    prompt)."""

    def __init__(self):
        self.t0, self.puts, self.seconds = 0.0, 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.seconds = time.perf_counter() - self.t0

    def end(self):
        pass


# ---- llama.cpp ------------------------------------------------------------------------------------------

def llama_cpp_peer(engine, name: str):
    """A LlamaCppPeer, or a SkippedPeer (after one line on stderr) where llama.cpp cannot run this model."""
    reason = llama_cpp_unavailable(engine)
    if reason is None:
        return LlamaCppPeer(engine, name)
    notes = engine.__dict__.setdefault("_peer_notes", set())
    if reason not in notes:  # one line for llama-cpp and llama-cpp-pld together
        notes.add(reason)
        print(f"hasten: skipping llama-cpp ({reason})", file=sys.stderr)
    return SkippedPeer(name, reason)


def llama_cpp_unavailable(engine) -> str | None:
    """Why the llama.cpp peers cannot run with `engine` here, or None."""
    try:
        import llama_cpp  # noqa: F401
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # noqa: F401
    except ImportError:
        return "pip install 'hasten[llama-cpp]' to compare against llama.cpp"
    if gguf_path(engine) is None:
        return f"{engine.name} was not loaded from a GGUF file; pass --model FILE.gguf to compare against llama.cpp"
    return None


def gguf_path(engine) -> Path | None:
    """The GGUF file the engine's weights came from (the default model's is `default_gguf_path()`), or None."""
    path = Path(engine.loaded.source)
    return path if path.suffix == ".gguf" and path.is_file() else None


def gguf_precision(path: Path) -> str:
    """The GGUF's weight types, e.g. "Q4_1/Q8_0 GGUF" (F32 norms and biases left out)."""
    from ..models.gguf_file import read_index  # the tensor index only: GGUFReader would parse the tokenizer too
    types = {t.tensor_type.name for t in read_index(path, "r").tensors}
    return "/".join(sorted(types - {"F32"}) or ["F32"]) + " GGUF"


class LlamaCppPeer:
    def __init__(self, engine, name: str):
        self.name = name
        self.engine = engine
        self.path = gguf_path(engine)
        self.precision = gguf_precision(self.path)
        self.llama = None
        self.n_ctx = 0

    def _load(self, needed: int):
        """(Re)load with a context of at least `needed` tokens; -pld keeps logits of every position, n_ctx x vocab."""
        if self.llama is not None and needed <= self.n_ctx:
            return
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        pld = self.name == "llama-cpp-pld"
        self.n_ctx = -(-needed // 1024) * 1024
        threads = torch.get_num_threads()
        self.llama = _counting_llama()(
            model_path=str(self.path), n_ctx=self.n_ctx, n_batch=self.n_ctx, n_threads=threads,
            n_threads_batch=threads, seed=0, verbose=False, logits_all=pld,
            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=DRAFT_TOKENS) if pld else None)

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        """→ token_ids (EOS included, as hasten's), seconds, target_passes (prefill included), first_token_seconds,
        precision."""
        self._load(len(ids) + max_new_tokens + DRAFT_TOKENS + 1)
        llama, eos, out = self.llama, self.engine.eos_ids, []
        llama.reset()  # no KV reuse of a previous run's prompt prefix: every method prefills the whole prompt
        llama.passes = 0
        t0 = time.perf_counter()
        first = None
        steps = llama.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
        for token in steps:
            first = time.perf_counter() - t0 if first is None else first
            out.append(int(token))
            if token in eos or len(out) >= max_new_tokens:
                break
        steps.close()
        seconds = time.perf_counter() - t0
        return {"token_ids": out, "seconds": seconds, "target_passes": llama.passes,
                "first_token_seconds": first or seconds, "precision": self.precision}


@functools.cache
def _counting_llama():
    """llama_cpp.Llama counting its forward passes (one `eval` per prompt or per token + drafts: n_batch = n_ctx)."""
    from llama_cpp import Llama

    class CountingLlama(Llama):
        passes = 0

        def eval(self, tokens):
            self.passes += 1
            super().eval(tokens)

    return CountingLlama


class SkippedPeer:
    """Stands in for a peer that cannot run here: no tokens, marked `skipped` so reports show why."""

    def __init__(self, name: str, reason: str):
        self.name, self.skipped = name, reason

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        return {"token_ids": [], "seconds": 0.0, "target_passes": 0, "first_token_seconds": 0.0, "precision": "—",
                "skipped": self.skipped}
