"""Peers: what users run today, on the very same weights and token ids.

`hf` is transformers' `generate` (greedy); `hf-pld` is the same with its prompt lookup drafter
(`prompt_lookup_num_tokens=10`). Both share the native model's dense fp32 weights (no copy).
"""
from __future__ import annotations

import time

import torch

PEERS = ("hf", "hf-pld")


class HFPeer:
    def __init__(self, engine, name: str):
        from ..models.hf import to_transformers
        self.name = name
        self.engine = engine
        self.model = _shared_hf_model(engine, to_transformers)
        self.passes = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.passes += 1

    def run(self, ids: list[int], max_new_tokens: int) -> dict:
        """→ token_ids, seconds, target_passes (prefill included)."""
        kwargs = {"prompt_lookup_num_tokens": 10} if self.name == "hf-pld" else {}
        eos = sorted(self.engine.eos_ids)
        self.passes = 0
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                      pad_token_id=eos[0], **kwargs)
            seconds = time.perf_counter() - t0
        return {"token_ids": out[0, len(ids):].tolist(), "seconds": seconds, "target_passes": self.passes}


def _shared_hf_model(engine, build):
    model = getattr(engine, "_hf_peer_model", None)
    if model is None:
        model = engine._hf_peer_model = build(engine.model, engine.loaded.hf_config)
        model.generation_config.temperature = model.generation_config.top_p = model.generation_config.top_k = None
    return model
