"""Shared fixtures: tiny random models built from configs (unit tests) and the real default model (integration)."""
from __future__ import annotations

import os

# The Triton kernel is tested under Triton's interpreter on machines without a GPU. Triton reads this when a
# kernel is defined, so it must be set before anything imports triton (transformers and torch may).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from hasten.models.loading import _build
from hasten.models.transformer import ModelConfig, Transformer

HF_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def tiny_hf_config(model_type: str = "llama", vocab_size: int = 97, **overrides):
    """A transformers config for a tiny model of the given family (2 layers, GQA, 16-dim heads)."""
    import transformers
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if model_type == "qwen3":
        kw["head_dim"] = 16
    kw.update(overrides)
    return getattr(transformers, HF_CONFIG_CLASSES[model_type])(**kw)


def tiny_model(seed: int = 0, model_type: str = "llama", vocab_size: int = 97, scale: float = 0.3,
               **overrides) -> Transformer:
    """A tiny native model with random weights; `scale` sets how peaked its next-token distributions are."""
    config = ModelConfig.from_hf(tiny_hf_config(model_type, vocab_size, **overrides))
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: (v.shape, k.endswith("norm.weight")) for k, v in Transformer(config).state_dict().items()}
    state = {k: (torch.ones(s) + 0.1 * torch.randn(s, generator=g)) if is_norm else scale * torch.randn(s, generator=g)
             for k, (s, is_norm) in shapes.items()}
    return _build(config, state)


@pytest.fixture(scope="session")
def default_engine():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    import hasten
    return hasten.load()
