"""The block formats hasten computes from directly: one GGUF tensor type each, as laid out in the file.

Each format is a C++ header in formats/ (its layout, an exact scalar dequantizer and an AVX-512 one); this table
is the Python side: the id the kernels dispatch on and the block geometry. The reference dequantizer the tests
hold the kernels to is gguf-py's `gguf.quants.dequantize`. Q2_K, Q3_K and the IQ types have no kernel: loading
such a tensor is a one-line error that names the fix (requantize with llama-quantize).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockFormat:
    name: str  # the GGUF type name, e.g. "Q4_K"
    id: int  # cpu.cpp's `Format`
    block_weights: int
    block_bytes: int

    def row_bytes(self, k: int) -> int:
        return k // self.block_weights * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block_weights


FORMATS = {f.name: f for f in (
    BlockFormat("F32", 0, 32, 128), BlockFormat("F16", 1, 32, 64), BlockFormat("BF16", 2, 32, 64),
    BlockFormat("Q4_0", 3, 32, 18), BlockFormat("Q4_1", 4, 32, 20), BlockFormat("Q5_0", 5, 32, 22),
    BlockFormat("Q5_1", 6, 32, 24), BlockFormat("Q8_0", 7, 32, 34), BlockFormat("Q4_K", 8, 256, 144),
    BlockFormat("Q5_K", 9, 256, 176), BlockFormat("Q6_K", 10, 256, 210),
)}


# The q8 path (kernels/formats/q8.h): block_matmul(x, w, fmt.id | Q8_ACTIVATIONS) quantizes each token's
# activations to int8 per 32 values and takes integer dot products with the codes of these formats; the others
# (F32, F16, BF16) ignore the bit and run the fp32 path.
Q8_ACTIVATIONS = 256
Q8_FORMATS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


class UnsupportedFormatError(ValueError):
    """A tensor type with no kernel; the message names the fix."""


def block_format(name: str) -> BlockFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UnsupportedFormatError(
            f"tensor type {name} has no hasten kernel (supported: {', '.join(FORMATS)}); requantize the file, e.g. "
            f"`llama-quantize --allow-requantize IN.gguf OUT.gguf Q4_K_M`") from None


# Where each format keeps its fp16 scales (byte offsets in a block), and how large a random one should be so that
# random codes give weights of about the size of a trained model's (std ~0.02).
_SCALES = {"Q4_0": ((0, 5e-3),), "Q4_1": ((0, 5e-3), (2, -4e-2)), "Q5_0": ((0, 2.5e-3),),
           "Q5_1": ((0, 2.5e-3), (2, -4e-2)), "Q8_0": ((0, 3e-4),), "Q4_K": ((0, 1e-4), (2, 1e-4)),
           "Q5_K": ((0, 5e-5), (2, 1e-4)), "Q6_K": ((208, 2e-5),)}


def random_blocks(name: str, rows: int, k: int, rng) -> "np.ndarray":
    """A random tensor [rows, row bytes] u8 in format `name`: random codes with finite, model-sized scales (random
    weights for speed and memory measurements at real shapes; `rng` is a numpy Generator)."""
    import numpy as np

    fmt = block_format(name)
    if name in ("F32", "F16", "BF16"):
        w = (rng.standard_normal((rows, k), dtype=np.float32) * 0.02)
        if name == "F32":
            return w.view(np.uint8)
        if name == "F16":
            return w.astype(np.float16).view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # truncation: any bf16 is fine here
    blocks = rng.integers(0, 256, size=(rows, k // fmt.block_weights, fmt.block_bytes), dtype=np.uint8)
    for offset, size in _SCALES[name]:
        scale = (np.abs(rng.standard_normal(blocks.shape[:2])) * abs(size) + abs(size) * 0.1) * np.sign(size)
        blocks[:, :, offset:offset + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return blocks.reshape(rows, fmt.row_bytes(k))
