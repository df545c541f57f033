"""The q8 path (kernels/formats/q8.h): activations quantized to int8 per 32 values, integer dot products.

- Its own reference: numpy quantizes the activations as the kernel does (d = max|x| / 127 in fp32, q = rint(x/d),
  half to even) and multiplies the dequantized activations by gguf-py's dequantized weights in float64; the
  kernel must agree to fp32 summation rounding (its integer sums are exact, so only the fp32 combination of
  the group scales rounds). A wrong code, scale, min or offset anywhere is off by ~1e-2, far outside that.
- The one kernel contract (DESIGN.md): a token's result is bit-identical whatever T and tile (1, 2, 5, 13, 64
  tokens; prefill chunks of 48 and their remainders; row counts that leave remainders).
- Every build (avx512, avx2, portable) computes the very same operations: bit-identical results.
- The f32 path is untouched (test_block_formats.py holds it to gguf-py), and a layer's `activations` switch
  reaches both QuantLinear.forward and the fused decode_block.
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from hasten.kernels import cpu
from hasten.kernels.formats import Q8_ACTIVATIONS, Q8_FORMATS, block_format, random_blocks

BUILDS = [isa for isa in cpu.supported_isas() if cpu.extension(isa) is not None]


@pytest.fixture(scope="module", params=BUILDS)
def ext(request):
    return cpu.extension(request.param)


def quantized_activations(x: np.ndarray) -> np.ndarray:
    """What the kernel multiplies by: each 32-value group as d * rint(x / d), float64 [T, K]."""
    t, k = x.shape
    g = x.reshape(t, k // 32, 32).astype(np.float32)
    d = (np.abs(g).max(-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(g * inv)
    assert np.abs(q).max() <= 127
    return (q * d.astype(np.float64)).reshape(t, k)


def make(name, n, k, seed):
    blocks = random_blocks(name, n, k, np.random.default_rng(seed))
    w = np.asarray(dequantize(blocks, GGMLQuantizationType[name]), np.float64).reshape(-1, k)
    return torch.from_numpy(blocks), w


def q8(ext, x, blocks, name):
    return ext.block_matmul(x, blocks, block_format(name).id | Q8_ACTIVATIONS)


def sizes(name):  # an odd number of 32-value groups (the last pair half empty) where the format allows it
    return (256, 512) if block_format(name).block_weights == 256 else (224, 512)


@pytest.mark.parametrize("name", Q8_FORMATS)
def test_q8_equals_its_reference(ext, name):
    for k in sizes(name):
        blocks, w = make(name, 37, k, seed=k)
        x = torch.randn(9, k, generator=torch.Generator().manual_seed(k)) * 3
        x[2, :40] = 0  # an all-zero group: d = 0
        y = q8(ext, x, blocks, name).double().numpy()
        ref = quantized_activations(x.numpy()) @ w.T
        scale = np.abs(quantized_activations(x.numpy())) @ np.abs(w).T  # the size of the sum's terms
        assert np.all(np.abs(y - ref) <= 2e-6 * scale + 1e-30), f"{name} K={k}: {np.abs(y - ref).max():.3g}"
        f32 = ext.block_matmul(x, blocks, block_format(name).id).double().numpy()
        assert not np.array_equal(f32, y)  # the flag did switch paths


@pytest.mark.parametrize("name", Q8_FORMATS)
def test_q8_results_do_not_depend_on_how_many_tokens_are_scored(ext, name):
    k = 256
    blocks, _ = make(name, 45, k, seed=1)
    x = torch.randn(130, k, generator=torch.Generator().manual_seed(2))
    full = q8(ext, x, blocks, name)  # chunks of 48 tokens: 48, 48, 34
    for t, start in ((1, 0), (1, 129), (2, 7), (5, 30), (13, 50), (64, 0), (64, 66), (100, 3)):
        part = q8(ext, x[start:start + t].contiguous(), blocks, name)
        assert torch.equal(part, full[start:start + t]), f"{name}: {t} tokens from {start} differ from the full batch"
    rows = q8(ext, x[:5].contiguous(), blocks[7:30].contiguous(), name)  # rows in other tiles
    assert torch.equal(rows, full[:5, 7:30])


@pytest.mark.parametrize("name", Q8_FORMATS)
def test_every_build_computes_the_same_bits(name):
    if len(BUILDS) < 2:
        pytest.skip("only one kernel build runs on this CPU")
    for k in sizes(name):
        blocks, _ = make(name, 21, k, seed=3)
        x = torch.randn(7, k, generator=torch.Generator().manual_seed(4)) * 2
        ys = {isa: q8(cpu.extension(isa), x, blocks, name) for isa in BUILDS}
        for isa, y in ys.items():
            assert torch.equal(y, ys[BUILDS[0]]), f"{name} K={k}: {isa} differs from {BUILDS[0]}"


def test_formats_without_a_q8_path_ignore_the_flag(ext):
    for name in ("F32", "F16", "BF16"):
        blocks, _ = make(name, 9, 64, seed=5)
        x = torch.randn(3, 64)
        assert torch.equal(q8(ext, x, blocks, name), ext.block_matmul(x, blocks, block_format(name).id))


def test_the_activations_switch_reaches_forward_and_the_fused_block():
    from hasten.models.quantized import QuantLinear, activation_summary, set_activations
    ext = cpu.extension()
    blocks, _ = make("Q4_K", 64, 256, seed=6)
    layer = QuantLinear("Q4_K", blocks, 256)
    x = torch.randn(1, 3, 256)
    assert layer.activations == "f32" and torch.equal(layer(x), ext.block_matmul(x, blocks, block_format("Q4_K").id))
    model = torch.nn.Sequential(layer, QuantLinear("BF16", make("BF16", 8, 64, seed=7)[0], 64))
    assert set_activations(model, "q8") == "q8 (Q4_K) + f32 (BF16)"  # BF16 has no q8 path
    assert torch.equal(layer(x), q8(ext, x, blocks, "Q4_K"))
    assert layer.fused_spec()[3] == block_format("Q4_K").id | Q8_ACTIVATIONS  # decode_block's format id
    assert layer.rows(torch.arange(5)).activations == "q8"
    assert set_activations(model, "f32") == "f32 (BF16, Q4_K)" and activation_summary(model) == "f32 (BF16, Q4_K)"
    with pytest.raises(ValueError, match="activations must be one of"):
        layer.activations = "int8"


@pytest.mark.integration
def test_q8_fused_decode_block_is_bit_identical_to_the_modules(default_engine, monkeypatch):
    """Under activations="q8" the fused decode_block and the module path still agree bit for bit (a prompt,
    single tokens, a draft chain), and they are not the f32 logits."""
    from hasten.models import transformer
    from hasten.models.quantized import QuantLinear, set_activations

    model = default_engine.model
    saved = {m: m.activations for m in model.modules() if isinstance(m, QuantLinear)}
    prompt = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    steps = [torch.randint(0, 1000, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 1, 6, 1)]

    def run():
        cache = model.new_cache(300)
        with torch.inference_mode():
            return [model(prompt, cache=cache)] + [model(s, cache=cache) for s in steps]

    try:
        set_activations(model, "f32")
        f32 = run()
        set_activations(model, "q8")
        fused = run()
        assert model.layers[0]._fused() is not None  # the fused path was taken
        with monkeypatch.context() as m:
            m.setattr(transformer.Block, "_fused", lambda self: None)
            plain = run()
    finally:
        for m, mode in saved.items():
            m.activations = mode
        for m in model.modules():
            m.__dict__.pop("_fused_cache", None)
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))
    assert not any(torch.equal(a, b) for a, b in zip(fused, f32))
    assert all(float((a - b).abs().max()) < 2.0 for a, b in zip(fused, f32))  # close: a quantization, not a bug


@pytest.mark.integration
def test_load_and_the_cli_take_the_activation_path():
    from click.testing import CliRunner

    from hasten.cli import main
    from hasten.models import loading
    from hasten.models.quantized import DEFAULT_Q8, activation_summary
    with pytest.raises(loading.ModelLoadError, match="--activations int4"):
        loading.load(activations="int4")
    assert activation_summary(loading.load(activations="q8").model) == "q8 (Q4_1, Q8_0)"
    assert activation_summary(loading.load(activations="f32").model) == "f32 (Q4_1, Q8_0)"
    default = activation_summary(loading.load().model)
    for t in ("Q4_1", "Q8_0"):
        part = next(p for p in default.split(" + ") if t in p)
        assert part.startswith("q8" if t in DEFAULT_Q8 else "f32"), default
    out = CliRunner().invoke(main, ["models"]).output
    assert "activations (--activations q8|f32)" in out
    assert "--activations" in CliRunner().invoke(main, ["speed", "--help"]).output
