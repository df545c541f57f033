"""The C++ kernels beside the matmuls (rms_norm, rope_, attend), in every build this CPU runs: each equals a
reference — bitwise where the kernel's arithmetic is elementwise, to float rounding where it sums — and gives a
token the same bits however many tokens are scored with it, the property that makes tree verification lossless."""
import numpy as np
import pytest
import torch

from hasten.kernels import cpu

BUILDS = [isa for isa in cpu.supported_isas() if cpu.extension(isa) is not None]


@pytest.fixture(params=BUILDS)
def ext(request):
    return cpu.extension(request.param)


def test_rms_norm_is_the_sequential_float32_formula_row_by_row(ext):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 48, generator=g), torch.randn(48, generator=g)
    y = ext.rms_norm(x, w, 1e-5)
    xs, ws = x.numpy(), w.numpy()
    for t in range(7):  # the kernel's order: ss += x*x left to right, in float32, then w * (x * r)
        ss = np.float32(0)
        for v in xs[t]:
            ss = np.float32(ss + np.float32(v * v))
        r = np.float32(1) / np.sqrt(np.float32(ss / np.float32(48) + np.float32(1e-5)))
        assert np.array_equal(y[t].numpy(), ws * (xs[t] * r))
        assert torch.equal(ext.rms_norm(x[t:t + 1].contiguous(), w, 1e-5)[0], y[t])  # alone = in a batch of 7


def test_rope_rotates_each_pair_exactly(ext):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, generator=g)
    angles = torch.randn(5, 8, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)  # [T, d]
    y = x.clone()
    ext.rope_(y, cos, sin)
    a, b = x[..., :8], x[..., 8:]
    c, s = cos[:, None], sin[:, None]
    expected = torch.cat([a * c[..., :8] - b * s[..., :8], b * c[..., 8:] + a * s[..., 8:]], -1)
    assert torch.equal(y, expected)
    one = x[2:3].clone()
    ext.rope_(one, cos[2:3], sin[2:3])
    assert torch.equal(one[0], y[2])


def cache(g, hkv=2, length=40, d=32):
    return torch.randn(hkv, length, d, generator=g), torch.randn(hkv, length, d, generator=g)


@pytest.mark.parametrize("d", [32, 24])  # 24: the kernel's scalar branch (no 16-wide vectors)
def test_attention_matches_sdpa_and_a_token_does_not_depend_on_its_neighbours(ext, d):
    g = torch.Generator().manual_seed(2)
    k, v = cache(g, d=d)
    S, T, H = 30, 6, 4
    q = torch.randn(T, H, d, generator=g)
    out = ext.attend(q, k, v, S, None, d ** -0.5)  # causal: token t sees keys 0 .. S-T+t
    causal = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k[:, :S].repeat_interleave(2, 0), v[:, :S].repeat_interleave(2, 0), attn_mask=causal)
    assert torch.allclose(out.view(T, H, d), ref.transpose(0, 1), atol=1e-5)
    for t in range(T):  # scored alone over the keys it may see: the same bits
        alone = ext.attend(q[t:t + 1].contiguous(), k, v, S - T + t + 1, None, d ** -0.5)
        assert torch.equal(alone[0], out[t])
    # a tree mask: each token's row decides what it sees; reordering the other rows changes nothing for it
    mask = torch.rand(T, S, generator=g) < 0.6
    mask[:, 0] = True
    tree = ext.attend(q, k, v, S, mask, d ** -0.5)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = ext.attend(q[order].contiguous(), k, v, S, mask[order], d ** -0.5)
    assert torch.equal(shuffled, tree[order])
    single = ext.attend(q[4:5].contiguous(), k, v, S, mask[4:5], d ** -0.5)
    assert torch.equal(single[0], tree[4])
