"""TEAL's sparse-input kernels on the transposed layouts of GGUF block formats: Q8_0 (q8t), BF16 and F16 (h16t),
Q4_0 (q4t with m = -8 d).

What must hold: each layout holds exactly the file's weights; the sparse kernel computes the dense block
kernel's function on the masked input (bit for bit where every partial sum is exact in fp32, else within the
rounding bound of a K-term fp32 sum); a token's result does not depend on which tokens share the call; and
`teal:0.5` on a tiny Q8_0 / BF16 GGUF runs these kernels, inside decode_block too, with the same logits as the
module path and the masked dense model's function.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hasten.kernels.formats import block_format, random_blocks
from hasten.models.quantized import QuantLinear
from hasten.sparsity.kernels import cpu as sk
from hasten.sparsity.modules import SparseLinear, transposed_layout

ext = sk.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="no C++ compiler for the kernels")

LAYOUTS = {"Q8_0": sk.TransposedQ8, "BF16": sk.TransposedH16, "F16": sk.TransposedH16, "Q4_0": sk.TransposedQ4}
SHAPES = [(64, 64), (576, 192), (256, 640), (1536, 128), (160, 4096)]  # (K, N): N a multiple of 64; spans 64-2048


def layer(qtype: str, n: int, k: int, seed: int) -> QuantLinear:
    return QuantLinear(qtype, torch.from_numpy(random_blocks(qtype, n, k, np.random.default_rng(seed))), k)


def dense_masked(lin: QuantLinear, x: torch.Tensor, thr: float) -> torch.Tensor:
    """The dense block kernel (exact fp32 path) on the masked input: the function the sparse kernel computes."""
    return ext.block_matmul((x * (x.abs() > thr)).contiguous(), lin.blocks, lin.fmt.id)


def rounding_bound(lin: QuantLinear, x: torch.Tensor, thr: float) -> torch.Tensor:
    """|fl(s) - s| for s = sum_k x_k w_k summed in any order in fp32 (FMA: one rounding per term), plus Q8_0's
    per-block scale multiply and the blocks' sum: at most (K + K/32 + 1) u sum_k |x_k w_k|, u = 2^-24. Two such
    results differ by at most twice that."""
    xm = (x * (x.abs() > thr)).double()
    k = x.shape[1]
    return 2 * (k + k // 32 + 1) * 2.0 ** -24 * (xm.abs() @ lin.weight.double().abs().T)


@pytest.mark.parametrize("qtype", list(LAYOUTS))
@pytest.mark.parametrize("k,n", SHAPES)
def test_layout_holds_the_files_weights(qtype, k, n):
    lin = layer(qtype, n, k, seed=k + n)
    layout = transposed_layout(lin)
    assert isinstance(layout, LAYOUTS[qtype])
    assert torch.equal(layout.dequantize(), lin.weight)  # bit for bit, gguf-py's values


@pytest.mark.parametrize("qtype", list(LAYOUTS))
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8])
def test_sparse_input_equals_the_dense_kernel_on_the_masked_input(qtype, k, n, tokens):
    lin = layer(qtype, n, k, seed=3 * k + n + tokens)
    layout = transposed_layout(lin)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(tokens))
    for sparsity in (0.0, 0.3, 0.5, 0.8, 1.0):
        thr = float(x.abs().quantile(sparsity)) if sparsity > 0 else 0.0
        got, ref = sk.sparse_in(x, thr, layout), dense_masked(lin, x, thr)
        assert got.shape == ref.shape
        # Only the summation order differs (the weights are the same fp32 values): the rounding bound.
        assert ((got.double() - ref.double()).abs() <= rounding_bound(lin, x, thr)).all(), (sparsity, tokens)


def exact_sum_layer(qtype: str, n: int, k: int, seed: int) -> QuantLinear:
    """Weights whose products with small-integer inputs and every partial sum are exact in fp32: the kernels must
    then agree with the dense kernel bit for bit, whatever their summation order."""
    rng = np.random.default_rng(seed)
    fmt = block_format(qtype)
    if qtype in ("BF16", "F16"):
        w = rng.integers(-64, 65, (n, k)).astype(np.float32) / 256  # 7 bits of integer: exact in both
        bits = w.astype(np.float16).view(np.uint8) if qtype == "F16" else \
            (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return QuantLinear(qtype, torch.from_numpy(bits.reshape(n, -1)), k)
    blocks = random_blocks(qtype, n, k, rng).reshape(n, k // 32, fmt.block_bytes)
    blocks[:, :, 0:2] = np.float16(2 ** -10).reshape(1).view(np.uint8)  # one power-of-two scale everywhere
    return QuantLinear(qtype, torch.from_numpy(blocks.reshape(n, -1)), k)


@pytest.mark.parametrize("qtype", list(LAYOUTS))
@pytest.mark.parametrize("tokens", [1, 3, 6])
def test_sparse_input_is_bit_identical_where_sums_are_exact(qtype, tokens):
    k, n = 576, 192
    lin = exact_sum_layer(qtype, n, k, seed=tokens)
    layout = transposed_layout(lin)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randint(-3, 4, (tokens, k), generator=g).float()  # |x| > 1.5 kept: the ±2s and ±3s
    assert torch.equal(sk.sparse_in(x, 1.5, layout), dense_masked(lin, x, 1.5))


@pytest.mark.parametrize("qtype", list(LAYOUTS))
def test_a_tokens_result_does_not_depend_on_the_others(qtype):
    """Each token alone and among 1-8 others (every chunking of 4, 2, 1): the same bits."""
    k, n = 576, 256
    lin = layer(qtype, n, k, seed=11)
    layout = transposed_layout(lin)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(5))
    thr = float(x.abs().quantile(0.5))
    alone = [sk.sparse_in(x[t:t + 1].contiguous(), thr, layout) for t in range(9)]
    for count in range(2, 10):
        together = sk.sparse_in(x[:count].contiguous(), thr, layout)
        for t in range(count):
            assert torch.equal(together[t], alone[t][0]), (count, t)
    shuffled = sk.sparse_in(x.flip(0).contiguous(), thr, layout)  # different neighbours in every chunk
    for t in range(9):
        assert torch.equal(shuffled[8 - t], alone[t][0])


@pytest.mark.parametrize("qtype", ["Q8_0", "BF16"])
def test_weights_of_dropped_inputs_are_never_read(qtype):
    """Poison (NaN) in the weights of inputs every token drops cannot reach the output if their rows are skipped."""
    k, n = 128, 64
    lin = exact_sum_layer(qtype, n, k, seed=2)
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(1)).sign() * 2
    x[:, 32:64] = 0.01  # one whole block dropped by both tokens
    clean = sk.sparse_in(x, 0.5, transposed_layout(lin))
    blocks = lin.blocks.clone()
    if qtype == "Q8_0":  # the fp16 scale of block 1 (inputs 32-63) of every row → NaN (0x7e00)
        blocks.view(n, -1, 34)[:, 1, 0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)
    else:  # the bf16 weights of inputs 32-63 → NaN (0x7fc0)
        blocks.view(n, k, 2)[:, 32:64] = torch.tensor([0xC0, 0x7F], dtype=torch.uint8)
    poisoned = QuantLinear(qtype, blocks, k)
    assert not torch.isfinite(poisoned.weight).all()
    assert torch.equal(sk.sparse_in(x, 0.5, transposed_layout(poisoned)), clean)


@pytest.mark.parametrize("qtype", ["Q8_0", "BF16"])
def test_sparse_linear_runs_the_layouts_kernel(qtype):
    lin = layer(qtype, 192, 576, seed=4)
    sl = SparseLinear(lin, threshold=0.6, sparsity=0.5)
    assert sl._kernel is (ext.q8t_sparse_in if qtype == "Q8_0" else ext.h16t_sparse_in)
    spec = sl.fused_spec()
    assert spec is not None and len(spec[0]) == (4 if qtype == "Q8_0" else 3) and spec[2] == 2
    x = torch.randn(1, 2, 576)
    lin.activations = "f32"
    ref = lin(x * (x.abs() > 0.6))
    assert torch.allclose(sl(x), ref, atol=1e-5)


# ---- end to end: teal:0.5 on tiny GGUF files --------------------------------------------------------------------

@pytest.fixture
def tiny_shape():
    import hasten.models.synthetic as synthetic
    synthetic.SHAPES["tiny-teal"] = synthetic.Shape(256, 2, 4, 2, 512, vocab=49280, context=512)
    yield "tiny-teal"
    del synthetic.SHAPES["tiny-teal"]


@pytest.mark.parametrize("qtype", ["Q8_0", "BF16"])
def test_teal_on_a_gguf_runs_the_block_layouts_in_decode_block(tmp_path, tiny_shape, qtype, monkeypatch):
    from hasten.models import transformer
    from hasten.models.loading import load
    from hasten.models.synthetic import write_random_gguf
    from hasten.sparsity.calibrate import collect
    from hasten.sparsity.methods.teal import Teal
    from hasten.sparsity.modules import sparsify

    # The exact fp32 activation path everywhere (Q8_0's default "q8" path would quantize prefill's activations,
    # which the sparse kernel does not: it computes the f32 path's function).
    model = load(write_random_gguf(tmp_path / "m.gguf", tiny_shape, qtype, progress=False), activations="f32").model
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randint(0, 49152, (64,), generator=g).tolist() for _ in range(4)]
    teal = Teal(0.5)
    teal.calibrate(SimpleNamespace(model=model), collect(model, chunks))
    sparse = sparsify(model, teal.replacements(model))
    linears = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(linears) == 14 and all(isinstance(m.layout, LAYOUTS[qtype]) for m in linears)
    assert all(b._fused() is not None for b in sparse.layers)  # decode steps take decode_block

    ids = torch.randint(0, 49152, (1, 24), generator=g)

    def run():
        cache = sparse.new_cache(64)
        with torch.inference_mode():
            outs = [sparse(ids[:, :16], cache=cache)[0]]  # prefill: the dense kernel on the masked input
            outs += [sparse(ids[:, t:t + 1], cache=cache)[0] for t in range(16, 20)]  # decode: the sparse kernel
            outs.append(sparse(ids[:, 20:22], cache=cache)[0])  # 2 tokens: still the sparse kernel
        return outs

    fused = run()
    monkeypatch.setattr(transformer.Block, "_fused", lambda self: None)
    plain = run()
    assert all(torch.equal(a, b) for a, b in zip(fused, plain))  # decode_block = the modules, bit for bit
    monkeypatch.undo()

    # The function: the masked dense model (every linear through its own exact fp32 block kernel).
    for m in linears:
        m._kernel = None
        m.dense.activations = "f32"
    with torch.inference_mode():
        ref = sparse(ids[:, :22])[0]
    got = torch.cat(fused)
    scale = float(ref.abs().max())
    assert torch.allclose(got, ref, atol=1e-4 * scale, rtol=0), float((got - ref).abs().max()) / scale


@pytest.mark.parametrize("qtype", ["Q8_0", "BF16", "F16"])
def test_every_build_computes_the_same_function(qtype):
    """The avx2 and portable builds run the scalar fallback of these kernels: it must compile and agree with the
    dense kernel of its build (bit for bit where sums are exact; the rounding bound otherwise)."""
    from hasten.kernels import cpu
    builds = [isa for isa in cpu.supported_isas() if cpu.extension(isa) is not None]
    k, n = 576, 192
    exact = exact_sum_layer(qtype, n, k, seed=3)
    lin = layer(qtype, n, k, seed=4)
    g = torch.Generator().manual_seed(2)
    xi = torch.randint(-3, 4, (3, k), generator=g).float()
    x = torch.randn(3, k, generator=g)
    thr = float(x.abs().quantile(0.5))
    for isa in builds:
        e = cpu.extension(isa)
        kernel, args = sk.kernel_args(transposed_layout(exact))
        name = kernel.__name__
        got = getattr(e, name)(xi, 1.5, *args)
        assert torch.equal(got, e.block_matmul((xi * (xi.abs() > 1.5)).contiguous(), exact.blocks, exact.fmt.id)), isa
        _, args = sk.kernel_args(transposed_layout(lin))
        got = getattr(e, name)(x, thr, *args)
        ref = e.block_matmul((x * (x.abs() > thr)).contiguous(), lin.blocks, lin.fmt.id)
        assert ((got.double() - ref.double()).abs() <= rounding_bound(lin, x, thr)).all(), isa
