"""The Triton activation-sparse matmul (hasten/sparsity/kernels/triton.py), compiled for the GPU where CUDA exists
and run on CPU tensors by the Triton interpreter elsewhere: it must equal (x * (|x| > thr)) @ wt, read no weight
row of an inactive channel, and dispatch to torch's dense matmul above the active-fraction cutoff."""
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":  # the interpreter; the kernel is decorated lazily, at its first call, when triton.jit reads this
    os.environ["TRITON_INTERPRET"] = "1"

# Triton < 3.7's interpreter calls int() on 1-element arrays for `range(<scalar argument>)`, which NumPy 2.4
# (this venv's) rejects; 3.7 squeezes first. pyproject's test extra asks for triton>=3.7.
pytest.importorskip("triton", minversion="3.7")

from hasten.sparsity.kernels import triton as tk  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=1e-2),
       torch.bfloat16: dict(rtol=1.6e-2, atol=5e-2)}


def make(T, K, N, sparsity, dtype, seed=0):
    """x [T, K], wt [K, N] and a threshold dropping `sparsity` of x's entries (the quantile of |x|)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    wt = torch.randn(K, N, generator=g).to(dtype)
    thr = torch.quantile(x.abs().float().flatten(), sparsity).item() if sparsity > 0 else 0.0
    return x.to(DEVICE), thr, wt.to(DEVICE)


def reference(x, thr, wt):
    """fp64 (x * mask) @ wt, with the mask as torch computes `x.abs() > thr` in x's dtype."""
    mask = x.abs() > thr
    return (x.double() * mask) @ wt.double(), mask


def check(x, thr, wt, **kw):
    y = tk.triton_sparse_in_matmul(x, thr, wt, **kw)
    ref, mask = reference(x, thr, wt)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], wt.shape[1])
    torch.testing.assert_close(y.double(), ref, **TOL[x.dtype])
    torch.testing.assert_close(y, tk.dense_sparse_in_matmul(x, thr, wt), **TOL[x.dtype])  # torch's own path
    return y, mask


SMALL = [(64, 96), (96, 64)]  # 96: not a multiple of any block size
BIG = [(576, 1536), (1536, 576)]  # 576 = 4.5 tiles of 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("K,N", SMALL)
def test_small_shapes_match_dense(K, N, T, sparsity, dtype):
    x, thr, wt = make(T, K, N, sparsity, dtype, seed=K + N + T)
    check(x, thr, wt, block_n=64, block_k=16)
    check(x, thr, wt, block_n=32, block_k=16, split_k=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("sparsity,T,split_k", [(0.0, 1, None), (0.25, 8, 2), (0.5, 3, None), (0.8, 1, 4)])
@pytest.mark.parametrize("K,N", BIG)
def test_model_shapes_match_dense(K, N, sparsity, T, split_k, dtype):
    x, thr, wt = make(T, K, N, sparsity, dtype, seed=K + T)
    check(x, thr, wt, split_k=split_k)


def test_inactive_rows_are_never_read():
    """Rows of wt for channels no token keeps are NaN: the kernel must not touch them (the dense path would)."""
    x, thr, wt = make(3, 576, 96, 0.8, torch.float32, seed=1)
    active = (x.abs() > thr).any(0)
    assert 0 < active.sum() < 576
    poisoned = wt.clone()
    poisoned[~active] = float("nan")
    for split_k in (None, 3):
        y = tk.triton_sparse_in_matmul(x, thr, poisoned, split_k=split_k)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y.double(), reference(x, thr, wt)[0], **TOL[torch.float32])


def test_union_over_tokens_keeps_each_tokens_own_mask():
    """Channel 0 is active only for token 0, channel 1 only for token 1: each token's sum uses only its own kept
    entries, though both rows are read."""
    x = torch.tensor([[2.0, 0.3, 0.0, 0.1], [0.2, -3.0, 0.0, 0.0]], device=DEVICE)
    wt = torch.arange(1.0, 13.0, device=DEVICE).reshape(4, 3)
    y = tk.triton_sparse_in_matmul(x, 0.5, wt)
    torch.testing.assert_close(y, torch.stack([2.0 * wt[0], -3.0 * wt[1]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("T", [1, 3])
def test_all_below_threshold_gives_zeros(T, dtype):
    x, _, wt = make(T, 576, 96, 0.0, dtype, seed=2)
    thr = x.abs().max().item()  # strict comparison: even the largest entry is dropped
    y = tk.triton_sparse_in_matmul(x, thr, wt)
    assert y.dtype == dtype and torch.equal(y, torch.zeros(T, 96, dtype=dtype, device=DEVICE))
    before = tk.calls["triton"]
    assert torch.equal(tk.sparse_in_matmul(x, thr, wt), torch.zeros(T, 96, dtype=dtype, device=DEVICE))
    assert tk.calls["triton"] == before + 1 and tk.last_path == "triton"


def test_threshold_is_strict_and_rounded_like_torch():
    # an entry equal to the threshold is dropped
    x = torch.tensor([[1.0, 0.5, -0.5, 0.25]], device=DEVICE)
    wt = torch.ones(4, 16, device=DEVICE)
    assert torch.equal(tk.triton_sparse_in_matmul(x, 0.5, wt), torch.full((1, 16), 1.0, device=DEVICE))
    # fp16: torch compares against thr rounded to fp16 (1.0008 -> 1.0009765625), so this entry is dropped
    x16 = torch.tensor([[1.0009765625, 2.0]], dtype=torch.float16, device=DEVICE)
    w16 = torch.ones(2, 16, dtype=torch.float16, device=DEVICE)
    assert not (x16.abs() > 1.0008)[0, 0]
    y = tk.triton_sparse_in_matmul(x16, 1.0008, w16)
    assert torch.equal(y, tk.dense_sparse_in_matmul(x16, 1.0008, w16))
    assert torch.equal(y, torch.full((1, 16), 2.0, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError):
        tk.triton_sparse_in_matmul(x, -1.0, wt)


def test_other_layouts_and_dtypes():
    # strided x (a transposed view), more tokens than one tile (T > 16)
    x, thr, wt = make(20, 96, 64, 0.5, torch.float32, seed=3)
    check(x.t().contiguous().t(), thr, wt, block_n=32, block_k=16)
    # mixed: fp32 activations, fp16 weights -> fp32 products and output
    x, thr, wt = make(3, 96, 64, 0.5, torch.float32, seed=4)
    y = tk.triton_sparse_in_matmul(x, thr, wt.half())
    torch.testing.assert_close(y.double(), reference(x, thr, wt.half())[0], **TOL[torch.float32])
    # bf16 (the interpreter takes the fp32 dot for it; see the module)
    x, thr, wt = make(3, 96, 64, 0.5, torch.bfloat16, seed=5)
    check(x, thr, wt, block_n=32, block_k=16)


def half_active(T=3, K=192, N=64):
    """x whose active channels are exactly the even ones (fraction 0.5), with a threshold of 0.1."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(T, K, generator=g).sign() * (0.5 + torch.rand(T, K, generator=g))
    x[:, 1::2] = 0.05
    return x.to(DEVICE), 0.1, torch.randn(K, N, generator=g).to(DEVICE)


def test_dispatch_follows_the_active_fraction():
    x, thr, wt = half_active()
    ref = reference(x, thr, wt)[0]
    for dense_above, path in [(0.7, "triton"), (0.5, "triton"), (0.4, "dense")]:
        before = dict(tk.calls)
        y = tk.sparse_in_matmul(x, thr, wt, dense_above=dense_above)
        assert tk.last_path == path and tk.calls[path] == before.get(path, 0) + 1
        torch.testing.assert_close(y.double(), ref, **TOL[torch.float32])
    # threshold 0: every channel active (1.0 > 0.7) -> dense
    y = tk.sparse_in_matmul(x, 0.0, wt)
    assert tk.last_path == "dense"
    torch.testing.assert_close(y, x @ wt)


def test_dispatch_without_interpreter_or_triton(monkeypatch):
    x, thr, wt = (t.cpu() if torch.is_tensor(t) else t for t in half_active())  # CPU tensors: the dispatch rule
    ref = reference(x, thr, wt)[0]
    assert tk.available()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors outside the interpreter: torch
    y = tk.sparse_in_matmul(x, thr, wt)
    assert tk.last_path == "dense"
    torch.testing.assert_close(y.double(), ref, **TOL[torch.float32])
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(tk, "triton", None)  # triton missing
    assert not tk.available()
    y = tk.sparse_in_matmul(x, thr, wt)
    assert tk.last_path == "dense"
    torch.testing.assert_close(y.double(), ref, **TOL[torch.float32])
    with pytest.raises(RuntimeError):
        tk.triton_sparse_in_matmul(x, thr, wt)
