"""The C++ decode path of the decoder blocks (kernels/cpu.cpp): a block's weights converted once into a
`BlockWeights`, one block run by `decode_block`, and every block of a model run by one `DecodeStack` call. Each
runs the very kernels and ATen ops the Python modules run, in the same order, so a token gets the same bits
either way (tests/models/test_transformer.py, test_gemma3.py); the modules stay the reference and the path for
everything else (long prompts, autograd, other dtypes and devices, hooks, swapped-in modules)."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels import cpu as cpu_kernels
from .attention import FUSED_TOKENS, cpu_kernels_for, kernel_segments


def fused_forward(block: nn.Module, x, cos, sin, layer: int, segments):
    """`block`'s output from one C++ decode_block call (kernels/cpu.cpp: the same kernels and ATen ops its modules
    run, in the same order, so the same bits; tests/models/test_transformer.py) when this forward is one it can
    run — a few packed tokens over caches, fp32 on the CPU — and `block._fused()` describes it; else None."""
    if segments is None or x.shape[1] > FUSED_TOKENS or cos.dim() != 2:
        return None
    kernels = cpu_kernels_for(x)
    weights = block._fused() if kernels is not None else None
    if weights is None:
        return None
    return kernels.decode_block(weights, x.contiguous(), cos, sin, *kernel_segments(layer, segments))


def block_weights(norms, attn, mlp, *, post_attn=None, post_ffw=None, q_norm=None, k_norm=None, gelu=False):
    """kernels.BlockWeights for a block whose parts decode_block can run: `norms` (ln1, ln2) and the optional
    norms given as (module, weight the kernel multiplies by), fp32 with one eps; linears that describe themselves
    with `fused_spec()` (QuantLinear, TEAL's sparse-input ones); an MLP with `gated_up_threshold` (-1: act(gate)
    * up; CATS' GatedMLP: its threshold). Else None."""
    kernels = cpu_kernels.extension()
    lins = [attn._modules.get(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    lins += [mlp._modules.get(n) for n in ("gate_proj", "up_proj", "down_proj")]
    specs = [getattr(m, "fused_spec", lambda: None)() for m in lins]
    gated_up = getattr(mlp, "gated_up_threshold", None)
    extra = [n for n in (post_attn, post_ffw, q_norm, k_norm) if n is not None]
    if kernels is None or gated_up is None or None in specs or (gelu and gated_up >= 0):
        return None
    if any(w.dtype != torch.float32 or m.eps != norms[0][0].eps for m, w in (*norms, *extra)):
        return None
    none = torch.empty(0)
    weight = lambda n: none if n is None else n[1]  # noqa: E731
    return kernels.BlockWeights(
        ln1=norms[0][1], ln2=norms[1][1], eps=norms[0][0].eps, lin=[s[0] for s in specs], thr=[s[1] for s in specs],
        max_t=[s[2] for s in specs], fmt=[s[3] for s in specs], gated_up_thr=float(gated_up), scale=attn.scale,
        H=attn.num_heads, Hkv=attn.num_kv_heads, q_norm=weight(q_norm), k_norm=weight(k_norm),
        post_attn=weight(post_attn), post_ffw=weight(post_ffw), gelu=gelu)


def decode_stack(model: nn.Module, block_type: type, x, cos, segments, per_layer):
    """The C++ DecodeStack of all of `model`'s blocks when this forward is one each block would run in
    decode_block — a few packed tokens over caches without windowed layers, every block exactly `block_type`
    with no hooks and a `_fused()` description — else None. Built once and kept while every block's `_fused()`
    returns the same object (it checks its modules by identity: sparse methods swap them)."""
    if (segments is None or per_layer[0] is not segments or x.shape[1] > FUSED_TOKENS or cos.dim() != 2
            or model.config.layer_types is not None or _global_hooks()):
        return None
    kernels = cpu_kernels_for(x)
    if kernels is None:
        return None
    args = []
    for block in model.layers:
        if type(block) is not block_type or block._forward_hooks or block._forward_pre_hooks:
            return None
        fused = block._fused()
        if fused is None:
            return None
        args.append(fused)
    cached = model.__dict__.get("_stack_cache")
    if cached is not None and len(cached[0]) == len(args) and all(a is b for a, b in zip(cached[0], args)):
        return cached[1]
    stack = kernels.DecodeStack(args)
    model.__dict__["_stack_cache"] = (args, stack)
    return stack


def _global_hooks() -> bool:
    """Whether any module-wide forward hook is registered (torch.nn.modules.module.register_module_forward_*)."""
    from torch.nn.modules import module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)
