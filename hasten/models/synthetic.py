"""Random-weight GGUF files of real model shapes: speed and memory depend on shapes, not weights, so anyone can
measure decode, prefill and RSS at 1B–8B sizes with nothing to download (`hasten make-model`).

Tensors are streamed to disk one at a time (an 8B Q4_K_M file is ~4.9 GB; memory stays at one tensor). Block
formats get random codes with finite, model-sized scales (kernels/formats.py::random_blocks), norms are ones.
`Q4_K_M` and `Q5_K_M` follow llama.cpp's mixes (src/llama-quant.cpp): Q6_K for the output layer (the token
embedding when they are tied) and for attn_v
and ffn_down in the layers that "use more bits" (the first and last eighth and every third in between), the
base K type elsewhere. The tokenizer is the embedded default model's, padded with reserved tokens to the
shape's vocabulary, so llama.cpp and hasten both load the file as it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..kernels.formats import FORMATS, block_format, random_blocks


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int = 128256
    tied: bool = True
    rope_theta: float = 500000.0
    context: int = 8192


SHAPES = {  # Llama 3.2 1B / 3B and Llama 3.1 8B
    "llama3-1b": Shape(2048, 16, 32, 8, 8192),
    "llama3-3b": Shape(3072, 28, 24, 8, 8192),
    "llama3-8b": Shape(4096, 32, 32, 8, 14336, tied=False),
}
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}
TYPES = (*FORMATS, *MIXES)


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(name: str, layer: int | None, n_layers: int, qtype: str, tied: bool = False) -> str:
    """The type a tensor gets in a file of type `qtype` (a format name, or a K-quant mix)."""
    if qtype not in MIXES:
        return qtype
    if name == "output.weight" or (tied and name == "token_embd.weight"):  # the output layer, tied or not
        return "Q6_K"
    if name.endswith(("attn_v.weight", "ffn_down.weight")) and _more_bits(layer, n_layers):
        return "Q6_K"
    return MIXES[qtype]


def write_random_gguf(path: str | Path, shape_name: str, qtype: str, seed: int = 0, progress: bool = True) -> Path:
    """Write a random-weight Llama-3 GGUF of `shape_name` (SHAPES) in `qtype` (TYPES) to `path`."""
    import gguf
    from gguf import GGMLQuantizationType as GT
    from tqdm import tqdm

    from .loading import default_gguf_path

    if shape_name not in SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; one of {', '.join(SHAPES)}")
    if qtype not in TYPES:
        raise ValueError(f"unknown type {qtype!r}; one of {', '.join(TYPES)}")
    s = SHAPES[shape_name]
    head_dim = s.hidden // s.heads
    tensors = [("token_embd.weight", None, (s.vocab, s.hidden))]
    for i in range(s.layers):
        tensors += [(f"blk.{i}.attn_norm.weight", i, (s.hidden,)), (f"blk.{i}.ffn_norm.weight", i, (s.hidden,)),
                    (f"blk.{i}.attn_q.weight", i, (s.heads * head_dim, s.hidden)),
                    (f"blk.{i}.attn_k.weight", i, (s.kv_heads * head_dim, s.hidden)),
                    (f"blk.{i}.attn_v.weight", i, (s.kv_heads * head_dim, s.hidden)),
                    (f"blk.{i}.attn_output.weight", i, (s.hidden, s.heads * head_dim)),
                    (f"blk.{i}.ffn_gate.weight", i, (s.ffn, s.hidden)), (f"blk.{i}.ffn_up.weight", i, (s.ffn, s.hidden)),
                    (f"blk.{i}.ffn_down.weight", i, (s.hidden, s.ffn))]
    tensors.append(("output_norm.weight", None, (s.hidden,)))
    if not s.tied:
        tensors.append(("output.weight", None, (s.vocab, s.hidden)))

    path = Path(path)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random {shape_name} {qtype}")
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(s.vocab)
    copy_tokenizer(w, default_gguf_path(), s.vocab)

    types = {}
    for name, layer, dims in tensors:
        t = "F32" if len(dims) == 1 else tensor_type(name, layer, s.layers, qtype, s.tied)
        if len(dims) == 2 and dims[1] % block_format(t).block_weights:
            t = "Q8_0" if t != "F32" else t  # rows not a whole number of K-blocks (llama.cpp falls back too)
        types[name] = t
        fmt = block_format(t)
        nbytes = dims[0] * 4 if len(dims) == 1 else dims[0] * fmt.row_bytes(dims[1])
        w.add_tensor_info(name, [dims[0] * 4] if len(dims) == 1 else [dims[0], fmt.row_bytes(dims[1])], np.dtype(np.uint8),
                          nbytes, raw_dtype=GT.F32 if len(dims) == 1 else GT[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    total = sum(d[0] * (4 if len(d) == 1 else block_format(types[n]).row_bytes(d[1])) for n, _, d in tensors)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {path.name}", disable=not progress) as bar:
        for name, _, dims in tensors:
            if len(dims) == 1:
                data = np.ones(dims, np.float32).view(np.uint8)
            else:  # row chunks keep memory at a few hundred MB even for the 8B embedding
                data = np.concatenate([random_blocks(types[name], min(8192, dims[0] - r), dims[1], rng)
                                       for r in range(0, dims[0], 8192)])
            w.write_tensor_data(data)
            bar.update(data.nbytes)
    w.close()
    return path


def copy_tokenizer(w, source: Path, vocab: int) -> None:
    """The tokenizer of `source` (a GGUF file), its token list padded to `vocab` with reserved tokens."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            pad = vocab - len(value)
            value = list(value) + ([f"<|reserved_{i}|>" for i in range(pad)] if key.endswith("tokens") else
                                   [0.0] * pad if key.endswith("scores") else [1] * pad)  # 1: normal (user-defined ones cost transformers ~300 MB as added tokens)
            if key.endswith("token_type"):
                w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
                continue
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_key_value(key, value, field.types[0])
