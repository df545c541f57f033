"""A GGUF file's tensor index, read without its metadata: each tensor's name, type, shape and bytes in the mapped file.

gguf's GGUFReader parses every metadata value into numpy arrays on open; a tokenizer of 262k tokens and 515k
merges (gemma-3) becomes over a million small arrays, ~700 MB of heap for a 253 MB file. The loader takes the
config and tokenizer from transformers' own conversion (cached once), so it needs only the tensors: this reader
walks over the metadata (one length per string) and keeps nothing of it but the data alignment.
Layout (llama.cpp's gguf.c / ggml docs/gguf.md): magic "GGUF", version u32 (2 or 3), tensor count u64,
metadata count u64, the metadata key/values, the tensor infos (name, n_dims u32, dims u64 × n_dims, type u32,
offset u64), padding to the alignment, then the tensor data.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Metadata value types (gguf.GGUFValueType) → byte size of a fixed-size value; 8 = string, 9 = array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands; the message says what is wrong."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (values per row)
    data: np.ndarray  # u8 [nbytes], a view into the mapped file
    data_offset: int  # absolute offset of the first byte in the file


@dataclass
class GGUFIndex:
    tensors: list[GGUFTensor]
    data: np.memmap  # the whole file, u8; every tensor's data is a view of it


def read_index(path: str | Path, mode: str = "c") -> GGUFIndex:
    """The tensors of the GGUF file at `path`, memory-mapped with numpy mode `mode` ("c": copy-on-write pages,
    shared with the page cache and never written back; "r": read-only)."""
    data = np.memmap(path, dtype=np.uint8, mode=mode)
    buf = memoryview(data)
    if bytes(buf[:4]) != b"GGUF":
        raise GGUFFormatError("it does not start with the GGUF magic bytes")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise GGUFFormatError(f"GGUF version {version} is not supported (2 and 3 are)")
    off = 24
    alignment = 32

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, at)
        return bytes(buf[at + 8:at + 8 + n]).decode("utf-8", errors="replace"), at + 8 + n

    try:
        for _ in range(n_kv):
            key, off = string(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            if key == "general.alignment" and vtype == 4:
                (alignment,) = struct.unpack_from("<I", buf, off)
            off = _skip_value(buf, off, vtype)
        tensors = []
        for _ in range(n_tensors):
            name, off = string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            shape = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            qtype, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            tensors.append((name, GGMLQuantizationType(qtype), tuple(int(d) for d in shape), rel))
    except (struct.error, ValueError) as e:
        raise GGUFFormatError(f"its header is damaged or truncated ({e})") from None
    start = -(-off // alignment) * alignment
    out = []
    for name, qtype, shape, rel in tensors:
        block, size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(shape)) if shape else 1
        nbytes = count // block * size
        begin = start + rel
        if begin + nbytes > len(data):
            raise GGUFFormatError(f"tensor {name} runs past the end of the file (truncated download?)")
        out.append(GGUFTensor(name, qtype, shape, data[begin:begin + nbytes], begin))
    return GGUFIndex(out, data)


def _skip_value(buf: memoryview, off: int, vtype: int) -> int:
    """The offset just past one metadata value of type `vtype` starting at `off`."""
    if vtype in _FIXED:
        return off + _FIXED[vtype]
    if vtype == _STRING:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    if vtype != _ARRAY:
        raise GGUFFormatError(f"unknown metadata value type {vtype}")
    etype, count = struct.unpack_from("<IQ", buf, off)
    off += 12
    if etype in _FIXED:
        return off + _FIXED[etype] * count
    if etype == _STRING:  # one length per string: the only walk a tokenizer's vocabulary costs
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            off += 8 + unpack(buf, off)[0]
        return off
    for _ in range(count):
        off = _skip_value(buf, off, etype)
    return off
