"""Every block kernel against gguf-py's reference, in every build this CPU runs (avx512, avx2, portable).

- Exact weights: a one-hot input reads each weight, so kernel(I) must equal gguf's dequantize bit for bit.
- The one kernel contract (DESIGN.md): a token's result does not depend on how many tokens are scored with it or
  where in the batch it sits, bit for bit (1, 2, 5, 64 tokens; row counts that leave remainders).
- Close to float64 arithmetic over the dequantized weights (summation order only).
"""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from hasten.kernels import cpu
from hasten.kernels.formats import FORMATS, UnsupportedFormatError, block_format, random_blocks

BUILDS = [isa for isa in cpu.supported_isas() if cpu.extension(isa) is not None]


def reference(name, blocks, k):
    return torch.from_numpy(np.asarray(dequantize(blocks, GGMLQuantizationType[name]), np.float32).reshape(-1, k))


@pytest.fixture(scope="module", params=BUILDS)
def ext(request):
    return cpu.extension(request.param)


def make(name, n=37, k=512, seed=0):
    blocks = random_blocks(name, n, k, np.random.default_rng(seed))
    return torch.from_numpy(blocks), reference(name, blocks, k)


@pytest.mark.parametrize("name", list(FORMATS))
def test_one_hot_input_reads_the_exact_dequantized_weights(ext, name):
    k = 512
    blocks, w = make(name, k=k)
    fmt = block_format(name)
    y = ext.block_matmul(torch.eye(k), blocks, fmt.id)  # [K, N]: row j holds input j's weights
    assert torch.equal(y.T, w), f"{name}: {(y.T != w).sum()} weights differ"
    assert torch.equal(ext.dequantize_rows(blocks, torch.tensor([3, 0, 36]), k, fmt.id), w[[3, 0, 36]])


@pytest.mark.parametrize("name", list(FORMATS))
def test_results_do_not_depend_on_how_many_tokens_are_scored(ext, name):
    k = 256
    blocks, w = make(name, n=45, k=k, seed=1)
    fmt = block_format(name)
    x = torch.randn(64, k, generator=torch.Generator().manual_seed(2))
    full = ext.block_matmul(x, blocks, fmt.id)
    for t, start in ((1, 0), (1, 63), (2, 7), (5, 30), (13, 50), (64, 0)):
        part = ext.block_matmul(x[start:start + t].contiguous(), blocks, fmt.id)
        assert torch.equal(part, full[start:start + t]), f"{name}: {t} tokens from {start} differ from the full batch"
    ref = (x.double() @ w.double().T)
    assert torch.allclose(full.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_builds_agree_up_to_summation_order():
    if len(BUILDS) < 2:
        pytest.skip("only one kernel build runs on this CPU")
    blocks, w = make("Q4_K", k=512)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3))
    ys = [cpu.extension(isa).block_matmul(x, blocks, block_format("Q4_K").id) for isa in BUILDS]
    for y in ys[1:]:
        assert torch.allclose(y, ys[0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_types_are_refused(ext):
    blocks, _ = make("Q8_0", k=256)
    with pytest.raises(RuntimeError, match="bytes per row"):
        ext.block_matmul(torch.randn(2, 512), blocks, block_format("Q8_0").id)
    with pytest.raises(UnsupportedFormatError, match="Q3_K has no hasten kernel.*llama-quantize"):
        block_format("Q3_K")


def test_the_best_build_this_cpu_supports_is_the_default():
    ext = cpu.extension()
    assert ext is not None and ext.isa() == cpu.supported_isas()[0]
    assert ext.isa() in cpu.kernel_description()
