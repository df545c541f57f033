"""Checkpoints as users bring them: a directory saved by transformers (bf16 safetensors, Llama and Qwen2 with
q/k/v biases) computed from its own dtype or quantized on load, and GGUF files of every block format, memory-
mapped with no fp32 copy of any weight."""
import numpy as np
import pytest
import torch

from hasten.models import loading
from hasten.models.quantized import QuantEmbedding, QuantLinear
from tests.conftest import tiny_hf_config


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The default model's tokenizer (49152 tokens), saved once for the checkpoints below."""
    engine_dir = tmp_path_factory.mktemp("tok")
    loaded = loading.load()
    loaded.tokenizer.save_pretrained(engine_dir)
    return engine_dir


def save_checkpoint(tmp_path, tokenizer, model_type, dtype=torch.bfloat16, **overrides):
    import shutil
    import transformers
    config = tiny_hf_config(model_type, vocab_size=49152, hidden_size=64, intermediate_size=128, **overrides)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    if model_type == "qwen2":  # transformers initialises biases at zero: make them matter
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    hf.save_pretrained(tmp_path)
    for f in tokenizer.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return hf


def native_logits(model, ids):
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(64)
        steps = [model(ids[:, :4], cache=cache)[:, -1]] + [model(ids[:, i:i + 1], cache=cache)[:, -1] for i in range(4, ids.shape[1])]
    return full, torch.stack(steps, 1)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_bf16_directory_runs_from_its_own_dtype_with_transformers_logits(tmp_path, tokenizer, model_type):
    hf = save_checkpoint(tmp_path, tokenizer, model_type)
    loaded = loading.load(tmp_path)
    linears = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 7 + 1 and all(m.qtype == "BF16" for m in linears)
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert not any(p.dtype == torch.float32 and p.dim() == 2 for p in loaded.model.parameters()), "an fp32 weight copy"
    if model_type == "qwen2":
        assert all(loaded.model.layers[0].self_attn._modules[n].bias is not None for n in ("q_proj", "k_proj", "v_proj"))
    ids = torch.tensor([[5, 17, 300, 4000, 12, 99, 7, 1000]])
    with torch.inference_mode():
        ref = hf.float()(ids).logits
    full, steps = native_logits(loaded.model, ids)
    assert torch.allclose(full, ref, atol=2e-4, rtol=1e-4)
    assert torch.allclose(steps, ref[:, 3:], atol=2e-4, rtol=1e-4)


def test_quantize_on_load_is_cached_and_keeps_qwen2_biases(tmp_path, tokenizer):
    from hasten.models.hf import to_transformers
    save_checkpoint(tmp_path, tokenizer, "qwen2")
    loaded = loading.load(tmp_path, quantize="q8_0", activations="f32")  # the exact path: transformers parity
    assert {m.qtype for m in loaded.model.modules() if isinstance(m, QuantLinear)} == {"Q8_0"}
    cached = list((loading.cache_dir() / "models").glob(f"{loaded.model_hash}/blocks.safetensors"))
    assert len(cached) == 1
    again = loading.load(tmp_path, quantize="Q8_0", activations="f32")
    assert torch.equal(again.model.layers[1].mlp.up_proj.blocks, loaded.model.layers[1].mlp.up_proj.blocks)
    ids = torch.tensor([[5, 17, 300, 4000, 12, 99, 7, 1000]])
    with torch.inference_mode():
        ref = to_transformers(loaded.model, loaded.hf_config)(ids).logits  # the same dequantized weights, biases
    full, steps = native_logits(loaded.model, ids)
    assert torch.allclose(full, ref, atol=2e-4, rtol=1e-4)
    assert torch.allclose(steps, ref[:, 3:], atol=2e-4, rtol=1e-4)
    with pytest.raises(loading.ModelLoadError, match="--quantize q3_k is not available"):
        loading.load(tmp_path, quantize="q3_k")


def test_a_gguf_file_is_memory_mapped_with_no_weight_copied(tmp_path):
    from hasten.models.synthetic import write_random_gguf
    import hasten.models.synthetic as synthetic
    path = tmp_path / "tiny.gguf"
    synthetic.SHAPES["tiny"] = synthetic.Shape(256, 2, 4, 2, 512, vocab=49280, context=512)
    try:
        write_random_gguf(path, "tiny", "Q4_K_M", progress=False)
    finally:
        del synthetic.SHAPES["tiny"]
    loaded = loading.load(path)
    mapped = np.asarray(loaded.model.gguf_map)
    base, end = mapped.ctypes.data, mapped.ctypes.data + mapped.nbytes
    kinds = set()
    for name, m in loaded.model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            kinds.add(m.qtype)
            inside = base <= m.blocks.data_ptr() < end
            # llama's q/k rows are reordered once (a copy that replaces the original); everything else is the file
            assert inside != name.endswith(("q_proj", "k_proj")), name
    assert kinds == {"Q4_K", "Q6_K"}
    assert sum(p.numel() for p in loaded.model.parameters()) < 10_000  # norms only
    assert loaded.model.lm_head.blocks.data_ptr() == loaded.model.embed_tokens.blocks.data_ptr()  # tied
    with torch.inference_mode():
        out = loaded.model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(out).all()
