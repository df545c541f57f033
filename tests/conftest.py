"""Shared fixtures: tiny random models built from configs (unit tests) and the real default model (integration)."""
from __future__ import annotations

import os

# The Triton kernel is tested under Triton's interpreter on machines without a GPU. Triton reads this when a
# kernel is defined, so it must be set before anything imports triton (transformers and torch may).
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from hasten.models.loading import _build, cache_dir
from hasten.models.transformer import ModelConfig, Transformer

# One fresh cache directory for the whole session, so every cached thing (converted weights, step costs,
# calibrations, tuning profiles, draft heads) is made by the code under test and never read from the user's
# real ~/.cache/hasten. Only the compiled C++ kernels are shared (a symlink to the user's kernel cache): they
# take minutes to build and are keyed by the torch version. Test modules build tiny models, and may call
# cache_dir(), while they are imported, so this is set before collection (pytest_configure), not in a fixture.
_SESSION_CACHE: Path | None = None
CALIBRATION_TOKENS = 2048  # sparse methods on the real model calibrate on this many corpus tokens in tests


def shared_kernels_cache(root: Path, kernels: Path) -> None:
    """Make root/hasten/kernels the persistent kernel build folder `kernels`."""
    kernels.mkdir(parents=True, exist_ok=True)
    (root / "hasten").mkdir(parents=True, exist_ok=True)
    (root / "hasten" / "kernels").symlink_to(kernels, target_is_directory=True)


def pytest_configure(config):
    global _SESSION_CACHE
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # `make test` runs the suite on one worker per core: each gets its share of the cores, since
        # torch's thread pool spin-waits for threads that another worker's process has preempted
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    if _SESSION_CACHE is None:
        kernels = cache_dir() / "kernels"  # the user's own, before XDG_CACHE_HOME moves
        _SESSION_CACHE = Path(tempfile.mkdtemp(prefix="hasten-test-cache-"))
        shared_kernels_cache(_SESSION_CACHE, kernels)
        os.environ["XDG_CACHE_HOME"] = str(_SESSION_CACHE)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)  # removes the kernels symlink, not what it points to


@pytest.fixture(scope="session", autouse=True)
def session_cache() -> Path:
    """hasten's cache directory for this session: empty at the start but for the shared kernel builds."""
    assert cache_dir() == _SESSION_CACHE / "hasten", "something moved XDG_CACHE_HOME after the session began"
    return cache_dir()

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


def block_quantized(model, qtype: str = "Q8_0"):
    """`model` with every block linear (biases kept) replaced by a QuantLinear in `qtype`, as a GGUF would load:
    its blocks then run in decode_block for forwards over caches."""
    from hasten.kernels.quantize import quantize
    from hasten.models.quantized import QuantLinear
    for block in model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    blocks = torch.from_numpy(quantize(lin.weight.detach().numpy(), qtype))
                    bias = None if lin.bias is None else lin.bias.detach()
                    setattr(parent, name, QuantLinear(qtype, blocks, lin.in_features, bias=bias))
    return model


@pytest.fixture(scope="session")
def default_engine():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session, on the exact fp32-activation
    path (parity with transformers needs it; tests of the q8 path switch it themselves). Its sparse methods
    calibrate on 2048 corpus tokens (the CLI's default is 16384): the same statistics for every test, a fraction
    of the time."""
    import hasten
    engine = hasten.load(activations="f32")
    engine.sparsity_calibration = (None, CALIBRATION_TOKENS)
    return engine


@pytest.fixture(scope="session")
def steady_engine():
    """The default model as users get it (the default activation path, q8 where a format has one) behind an
    Engine whose step cost is a fixed table (MEASURING.md's 2-core Xeon: cost(4) ≈ 1.29, cost(8) ≈ 1.81 ×
    cost(1)) rather than one measured on this shared machine, so what the adaptive drafters decide to propose,
    and so which drafts a test sees accepted, does not depend on load. The lossless tests run on it: a method
    must be token-identical to baseline on the path users run. Sparse drafters calibrate as default_engine's do."""
    import hasten
    from hasten.decoding.controller import StepCost
    engine = hasten.load()
    engine._step_cost = StepCost({1: 1.0, 2: 1.1, 4: 1.29, 8: 1.81, 12: 2.3, 16: 2.8, 24: 3.9, 32: 5.0})
    engine.sparsity_calibration = (None, CALIBRATION_TOKENS)
    return engine
