"""Dense weights → GGUF block bytes, for `--quantize` on Hugging Face checkpoints.

gguf-py's reference quantizers (the ones llama.cpp's converter uses) serve F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1 and
Q8_0. gguf-py has no K-quant quantizer, so Q4_K is hasten's own: per 32-weight sub-block, the range [min(w, 0),
max(w)] in 15 steps; the 8 scales and mins of a super-block quantized to 6 bits against the largest (llama.cpp's
make_qkx2_quants searches for better ones: its error is somewhat lower, its layout the same).
"""
from __future__ import annotations

import numpy as np

from .formats import block_format

QUANTIZE_TYPES = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K")


def quantize(weight: np.ndarray, qtype: str) -> np.ndarray:
    """[N, K] float → [N, row bytes] u8 in `qtype`."""
    fmt = block_format(qtype)
    if qtype not in QUANTIZE_TYPES:
        raise ValueError(f"--quantize {qtype.lower()} is not available; use one of {', '.join(t.lower() for t in QUANTIZE_TYPES)}")
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.shape[1] % fmt.block_weights:
        raise ValueError(f"{w.shape[1]} inputs are not a whole number of {qtype} blocks ({fmt.block_weights})")
    if qtype == "Q4_K":
        return _quantize_q4_k(w)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    out = gguf_quantize(w, GGMLQuantizationType[qtype])
    return np.ascontiguousarray(out).view(np.uint8).reshape(w.shape[0], fmt.row_bytes(w.shape[1]))


def _quantize_q4_k(w: np.ndarray) -> np.ndarray:
    n, k = w.shape
    x = w.reshape(-1, 8, 32)  # [super-blocks, sub-blocks, 32]
    lo = np.minimum(x.min(-1), 0.0)
    scale, mins = (x.max(-1) - lo) / 15, -lo  # [B, 8], both ≥ 0
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (mins.max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dminf > 0, np.rint(mins / dminf), 0).clip(0, 63).astype(np.uint8)
        eff_scale, eff_min = df * sc, dminf * m  # what dequantization will use
        q = np.where(eff_scale[..., None] > 0, np.rint((x + eff_min[..., None]) / eff_scale[..., None]), 0)
    q = q.clip(0, 15).astype(np.uint8)
    scales = np.empty((x.shape[0], 12), np.uint8)  # the 6-bit packing gguf-py's Q4_K.get_scale_min reads
    scales[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # sub-blocks 2i, 2i+1 share 32 bytes
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), scales, qs], axis=1)
    return blocks.reshape(n, k // 256 * 144)
