"""The sparse CPU kernels equal dense matmul on the kept channels (random shapes, sparsities, token counts).

Formats: transposed Q4_1 (the GGUF weights, values unchanged) and transposed fp32; row subsets from Q4_1 blocks
and fp32 rows. The sparse layers built on them equal their dense reference function.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from hasten.models.quantized import QuantLinear
from hasten.sparsity.kernels import cpu as sk
from hasten.sparsity.modules import GatedMLP, GatedRowsLinear, SparseLinear

ext = sk.extension()
pytestmark = pytest.mark.skipif(ext is None, reason="no C++ compiler for the kernels")


def q4_1_linear(n: int, k: int, seed: int) -> QuantLinear:
    """A Q4_1 layer with random codes and random (finite, GGUF-like) fp16 scales and minimums."""
    rng = np.random.default_rng(seed)
    nb = k // 32
    blocks = np.zeros((n, nb, 20), np.uint8)
    blocks[:, :, 0:2] = (rng.uniform(0.001, 0.02, (n, nb)).astype(np.float16)).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 2:4] = (rng.uniform(-0.15, 0.0, (n, nb)).astype(np.float16)).view(np.uint8).reshape(n, nb, 2)
    blocks[:, :, 4:] = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
    raw = blocks.reshape(n, nb * 20)
    linear = QuantLinear("Q4_1", torch.from_numpy(raw), k)
    assert torch.equal(linear.weight, torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1).reshape(n, k)))
    return linear


def masked_reference(x, thr, weight):
    return (x * (x.abs() > thr)).double() @ weight.double().T


SHAPES = [(64, 128), (576, 192), (96, 1536), (1536, 576), (320, 64)]


@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("tokens", [1, 3, 4, 8, 9])
def test_q4t_sparse_input_equals_dense_on_kept_channels(k, n, tokens):
    lin = q4_1_linear(n, k, seed=k + n + tokens)
    layout = sk.TransposedQ4.from_q4_1(*lin.packed)
    assert torch.equal(layout.dequantize(), lin.weight)  # the transposed codes are the same weights
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, k, generator=gen)
    for sparsity in (0.0, 0.25, 0.5, 0.8, 1.0):
        thr = float(x.abs().quantile(sparsity)) if sparsity > 0 else 0.0
        got = sk.sparse_in(x, thr, layout)
        ref = masked_reference(x, thr, lin.weight)
        assert torch.allclose(got.double(), ref, atol=1e-4 * max(1.0, float(ref.abs().max()))), (sparsity, tokens)


@pytest.mark.parametrize("k,n", [(64, 96), (100, 70), (576, 192)])
def test_f32t_sparse_input_equals_dense_any_shape(k, n):
    gen = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=gen)
    layout = sk.TransposedF32.from_weight(w)
    for tokens in (1, 2, 5):
        x = torch.randn(tokens, k, generator=gen)
        for sparsity in (0.0, 0.4, 0.65):
            thr = float(x.abs().quantile(sparsity)) if sparsity else 0.0
            assert torch.allclose(sk.sparse_in(x, thr, layout).double(), masked_reference(x, thr, w), atol=1e-4)


def test_weights_of_dropped_channels_are_never_read():
    """NaN in the weights of inputs that every token drops cannot reach the output if those rows are skipped."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=gen)
    x = torch.randn(2, 96, generator=gen)
    x[:, ::2] = 0.01  # even channels below the threshold for both tokens
    poisoned = w.clone()
    poisoned[:, ::2] = float("nan")
    got = sk.sparse_in(x, 0.05, sk.TransposedF32.from_weight(poisoned))
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), masked_reference(x, 0.05, w), atol=1e-4)


def test_each_token_keeps_only_its_own_inputs():
    """A channel active for one token is read for all, but the others' sub-threshold values still count as 0."""
    w = torch.randn(32, 64)
    x = torch.full((2, 64), 0.01)
    x[0, 5] = 3.0
    got = sk.sparse_in(x, 0.1, sk.TransposedF32.from_weight(w))
    assert torch.allclose(got[0], 3.0 * w[:, 5], atol=1e-5)
    assert torch.equal(got[1], torch.zeros(32))


def test_row_kernels_compute_only_the_chosen_rows():
    lin = q4_1_linear(96, 64, seed=7)
    x = torch.randn(3, 64)
    rows = torch.tensor([0, 5, 95, 40], dtype=torch.int32)
    dense = x @ lin.weight.T
    for got in (ext.q4_1_rows(x, rows, *lin.packed), ext.f32_rows(x, rows, lin.weight)):
        assert torch.allclose(got[:, rows.long()], dense[:, rows.long()], atol=1e-5)
        others = torch.ones(96, dtype=torch.bool)
        others[rows.long()] = False
        assert torch.equal(got[:, others], torch.zeros(3, int(others.sum())))


def test_gated_rows_equal_gate_times_dense_where_the_gate_passes():
    lin = q4_1_linear(96, 64, seed=8)
    x, gate = torch.randn(4, 64), torch.randn(4, 96)
    thr = 0.7
    ref = torch.where(gate.abs() > thr, gate * (x @ lin.weight.T), torch.zeros(()))
    assert torch.allclose(ext.q4_1_rows_gated(x, gate, thr, *lin.packed), ref, atol=1e-5)
    assert torch.allclose(ext.f32_rows_gated(x, gate, thr, lin.weight), ref, atol=1e-5)
    layer = GatedRowsLinear(lin, thr)
    assert torch.allclose(layer(x, gate), ref, atol=1e-5)
    with torch.inference_mode():  # the torch fallback (many rows) computes the same function
        big = torch.randn(80, 64)
        big_gate = torch.randn(80, 96)
        ref_big = torch.where(big_gate.abs() > thr, big_gate * (big @ lin.weight.T), torch.zeros(()))
        assert torch.allclose(layer(big, big_gate), ref_big, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_equals_dense_on_masked_input_kernel_and_fallback(dtype):
    lin = q4_1_linear(192, 576, seed=9)
    layer = SparseLinear(lin, threshold=0.6, sparsity=0.5)
    assert layer.use_kernel
    for tokens in (1, 4, 70):  # 70 > MAX_KERNEL_ROWS: the torch path
        x = torch.randn(1, tokens, 576).to(dtype)
        ref = F.linear((x * (x.abs() > 0.6)).float(), lin.weight)
        got = layer(x).float()
        tol = 1e-4 if dtype == torch.float32 else 0.05 * float(ref.abs().max())
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=tol)


def test_gated_mlp_equals_the_cats_formula():
    from hasten.models.transformer import MLP
    from tests.conftest import tiny_model
    mlp: MLP = tiny_model(1).layers[0].mlp
    x = torch.randn(1, 3, 64)
    thr = 0.05
    gate = F.silu(mlp.gate_proj(x))
    ref = mlp.down_proj(torch.where(gate.abs() > thr, gate * mlp.up_proj(x), torch.zeros(())))
    assert torch.allclose(GatedMLP(mlp, thr, 0.5)(x), ref, atol=1e-5)
