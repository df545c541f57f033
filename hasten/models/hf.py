"""The same weights as a transformers model: the `hf` benchmark peers, the eagle head's batched chat writing and
the parity tests use it."""
from __future__ import annotations

import torch

from .transformer import Transformer


def to_transformers(model: Transformer, hf_config):
    """A transformers *ForCausalLM sharing `model`'s dense fp32 weights (no copy) and holding a dense fp32 copy of
    each block-quantized layer (dequantized exactly, made here on demand: the peer alone pays for it)."""
    from transformers import AutoModelForCausalLM

    from .quantized import QuantEmbedding, QuantLinear

    named = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            named[f"{name}.weight"] = module.weight
            if getattr(module, "bias", None) is not None:
                named[f"{name}.bias"] = module.bias
    state = {}
    for name, tensor in named.items():
        if name.endswith(".weight") or name.endswith(".bias"):
            key = name if name.startswith("lm_head.") else f"model.{name}"
            state[key] = tensor
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=model.dtype)
    hf.load_state_dict(state, strict=False, assign=True)
    if getattr(hf_config, "tie_word_embeddings", False):
        hf.tie_weights()
    # Non-persistent buffers (the rotary inv_freq) were made on meta: rebuild those modules on the real device.
    for name, module in list(hf.named_modules()):
        if hasattr(module, "scalar_embed_scale") and module.embed_scale.is_meta:  # Gemma's scaled embedding
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=model.device)
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent, _, attr = name.rpartition(".")
            with torch.device(model.device):
                setattr(hf.get_submodule(parent), attr, type(module)(module.config))
    missing = [n for n, p in hf.named_parameters() if p.is_meta] + [n for n, b in hf.named_buffers() if b.is_meta]
    if missing:
        raise RuntimeError(f"transformers model has unloaded tensors: {missing[:3]}")
    return hf.eval().requires_grad_(False)


def shared_transformers(engine):
    """`engine`'s model as transformers' (built once per engine, sharing its weights), for greedy or sampled
    `generate` with the generation config's own sampling defaults cleared."""
    model = getattr(engine, "_hf_model", None)
    if model is None:
        model = engine._hf_model = to_transformers(engine.model, engine.loaded.hf_config)
        model.generation_config.temperature = model.generation_config.top_p = model.generation_config.top_k = None
    return model
