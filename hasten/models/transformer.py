"""The native Llama-family decoder: Llama 2/3, Mistral, Qwen2/2.5, Qwen3 (q/k-norm), SmolLM2; Gemma 3's blocks
are in gemma3.py (the model here picks them by model type and applies its embedding scale and logit softcap).

One file, read top to bottom: config → RoPE → attention → MLP → block → model. The model scores any set of
new tokens (a chain or a flattened token tree) against a preallocated KV cache in one forward pass; the caller
passes each token's position and, for trees, the attention mask over cache + new tokens.
Module names match transformers' so checkpoints load by name and sparsifiers can swap linears by name.
Decode steps, draft trees and small batches run the blocks through fused.py's C++ path, bit-identical to the
modules here.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import NO_MASK, attend, attend_packed, cpu_kernels_for
from .fused import block_weights, decode_stack, fused_forward
from .kv_cache import ContextOverflowError, KVCache, Segment, layer_segments

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_text")


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on each head's q and k
    rope_scaling: tuple | None = None  # ("llama3", factor, low_freq_factor, high_freq_factor, original_max) or ("linear", factor)
    model_type: str = "llama"  # "gemma3" for Gemma 3 (gemma3.py's blocks)
    # Gemma 3 (defaults: the Llama family's behaviour)
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" or "full_attention"
    sliding_window: int | None = None  # a sliding layer's query at position p sees keys at positions > p - window
    rope_local_theta: float | None = None  # the sliding layers' RoPE base (they never scale)
    query_scale: float | None = None  # attention score scale; None: head_dim ** -0.5
    embed_scale: float | None = None  # embeddings times this, rounded to the model's dtype (Gemma: sqrt(hidden))
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        """From a transformers PretrainedConfig; refuses anything outside the Llama family and Gemma 3."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} is not supported; hasten runs {', '.join(SUPPORTED_ARCHITECTURES)} "
                "(Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2, Gemma 3) — pick a model of one of these families")
        if model_type in ("gemma3", "gemma3_text"):
            return cls._from_gemma3(getattr(hf, "text_config", None) or hf)
        scaling = getattr(hf, "rope_scaling", None) or getattr(hf, "rope_parameters", None) or None
        rope_theta = getattr(hf, "rope_theta", None)
        if isinstance(scaling, dict):
            rope_theta = rope_theta or scaling.get("rope_theta")
        scaling = cls._rope_scaling(scaling)
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads, head_dim=head_dim,
            rope_theta=float(rope_theta or 10000.0), rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3", rope_scaling=scaling, model_type=model_type)

    @staticmethod
    def _rope_scaling(scaling) -> tuple | None:
        """transformers' rope_scaling / rope_parameters dict → our tuple (None for plain RoPE)."""
        if not isinstance(scaling, dict):
            return None
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return None
        if kind == "llama3":
            return ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                    float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
        if kind == "linear":
            return ("linear", float(scaling["factor"]))
        raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported (default, linear, llama3 are)")

    @classmethod
    def _from_gemma3(cls, hf) -> "ModelConfig":
        """Gemma 3's text model (a multimodal config's text_config): transformers 5 keeps both RoPE bases in
        rope_parameters[layer type]; older configs name them rope_theta and rope_local_base_freq."""
        if getattr(hf, "attn_logit_softcapping", None) is not None or getattr(hf, "use_bidirectional_attention", False):
            raise UnsupportedModelError("Gemma 3 with attention logit softcapping or bidirectional attention "
                                        "is not supported")
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "gelu_pytorch_tanh")
        if act not in ("gelu_pytorch_tanh", "gelu_python_tanh"):
            raise UnsupportedModelError(f"Gemma 3 with activation {act!r} is not supported (gelu_pytorch_tanh is)")
        num_layers = hf.num_hidden_layers
        layer_types = getattr(hf, "layer_types", None)
        if layer_types is None:  # older configs: every sliding_window_pattern-th layer is global
            pattern = getattr(hf, "sliding_window_pattern", None) or getattr(hf, "_sliding_window_pattern", 6)
            layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        if len(layer_types) != num_layers or not set(layer_types) <= {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(f"Gemma 3 layer types {layer_types!r} are not supported")
        rope = getattr(hf, "rope_parameters", None) or {}
        full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
        if cls._rope_scaling(local) is not None:
            raise UnsupportedModelError("Gemma 3 with scaled RoPE on its sliding layers is not supported")
        scaling = cls._rope_scaling(full or getattr(hf, "rope_scaling", None))
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        softcap = getattr(hf, "final_logit_softcapping", None)
        return cls(
            vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
            num_layers=num_layers, num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads, head_dim=head_dim,
            rope_theta=float(full.get("rope_theta") or getattr(hf, "rope_theta", None) or 1_000_000.0),
            rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            attention_bias=bool(getattr(hf, "attention_bias", False)), qk_norm=True, rope_scaling=scaling,
            model_type="gemma3", layer_types=tuple(layer_types), sliding_window=int(hf.sliding_window),
            rope_local_theta=float(local.get("rope_theta") or getattr(hf, "rope_local_base_freq", None) or 10_000.0),
            query_scale=float(getattr(hf, "query_pre_attn_scalar", None) or head_dim) ** -0.5,
            embed_scale=float(hf.hidden_size) ** 0.5,
            final_logit_softcapping=float(softcap) if softcap else None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = cpu_kernels_for(x)
        if kernels is not None:  # one call instead of ~10 small ops
            return kernels.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.eps).view(x.shape)
        if x.dtype == torch.float32:  # bit-identical to transformers' LlamaRMSNorm in fp32
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Lower precision: transformers' order of operations (fp32 statistics), for parity.
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies [d/2], on the CPU whatever the default device (a model built on the meta device
    would otherwise run these ops through torch._refs, which imports torch._dynamo and triton)."""
    steps = torch.arange(0, config.head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv_freq = 1.0 / (config.rope_theta ** (steps / config.head_dim))
    if config.rope_scaling is None:
        return inv_freq
    if config.rope_scaling[0] == "linear":
        return inv_freq / config.rope_scaling[1]
    _, factor, low, high, original = config.rope_scaling  # Llama 3.1's frequency-dependent scaling
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d]; cos, sin [T, d] or [B, T, d]."""
    kernels = cpu_kernels_for(x)
    if kernels is not None and x.shape[0] == 1 and cos.dim() == 2 and x.is_contiguous():
        kernels.rope_(x[0], cos, sin)  # in place: x is a fresh projection output
        return x
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.scale = config.head_dim ** -0.5
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, layer: int, segments: list[Segment] | None, mask: torch.Tensor | None):
        """x [B, T, D]. With `segments` (a packed forward, B = 1) the keys/values go to each segment's cache and
        each segment attends to its own; without, the T tokens attend causally or per `mask` among themselves."""
        B, T, _ = x.shape  # [B, T, D]
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if segments is not None:
            out = attend_packed(q, k, v, layer, segments, self.scale)  # [1, T, H*d]
            return self.o_proj(out)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, d]
        out = attend(q, k, v, mask)  # [B, H, T, d]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    gated_up_threshold = -1.0  # decode_block computes silu(gate) * up (sparsity/modules.py::GatedMLP differs)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, layer, segments, mask):
        fused = fused_forward(self, x, cos, sin, layer, segments)  # decode steps, draft trees, small batches
        if fused is not None:
            return fused
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, segments, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _fused(self):
        """decode_block's kernels.BlockWeights when every part of this block can run in it (RMSNorms, q/k norms
        or none, linears that describe themselves with `fused_spec()`), else None. Cached, and checked by
        identity on every call: sparse methods swap modules in clones that share this block's attributes."""
        attn, mlp = self._modules["self_attn"], self._modules["mlp"]
        mods = (self._modules["input_layernorm"], self._modules["post_attention_layernorm"], attn, mlp,
                *(attn._modules.get(n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")),
                *(mlp._modules.get(n) for n in ("gate_proj", "up_proj", "down_proj")))
        cached = self.__dict__.get("_fused_cache")
        if cached is not None and all(a is b for a, b in zip(cached[0], mods)):
            return cached[1]
        norms = [n for n in (*mods[:2], *mods[8:10]) if n is not None]  # ln1, ln2, q_norm, k_norm
        args = None
        if type(attn) is Attention and all(type(n) is RMSNorm for n in norms):
            qk = {} if attn.q_norm is None else {"q_norm": (attn.q_norm, attn.q_norm.weight),
                                                 "k_norm": (attn.k_norm, attn.k_norm.weight)}
            args = block_weights([(n, n.weight) for n in mods[:2]], attn, mlp, **qk)
        self.__dict__["_fused_cache"] = (mods, args)
        return args


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.model_type == "gemma3":
            from .gemma3 import Gemma3Block, GemmaRMSNorm
            self.layers = nn.ModuleList(Gemma3Block(config) for _ in range(config.num_layers))
            self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        else:
            self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def _rope(self, positions: torch.Tensor, local: bool = False):
        """cos, sin [(B,) T, d] looked up in tables grown on demand (a decode step then costs two index ops);
        `local`: the sliding-window layers' tables (Gemma 3 gives them a RoPE base of their own)."""
        needed = int(positions.max()) + 1
        name = "_local_cos" if local else "_cos"
        table = getattr(self, name, None)
        if table is None or table.shape[0] < needed or table.device != self.inv_freq.device or table.dtype != self.dtype:
            size = max(needed, 2 * (0 if table is None else table.shape[0]), 4096)
            inv_freq = self.inv_freq if not local else rope_inv_freq(dataclasses.replace(
                self.config, rope_theta=self.config.rope_local_theta, rope_scaling=None)).to(self.inv_freq.device)
            angles = torch.arange(size, device=self.inv_freq.device).float()[:, None] * inv_freq  # [P, d/2]
            emb = torch.cat((angles, angles), dim=-1)
            cos, sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
            if local:
                self._local_cos, self._local_sin = cos, sin
            else:
                self._cos, self._sin = cos, sin
        if local:
            return self._local_cos[positions], self._local_sin[positions]
        return self._cos[positions], self._sin[positions]

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    kv_policy = None  # the policy new caches follow (kv/policy.py; None: "native"); hasten.load(kv_policy=...) sets it
    kv_dtype = None  # new caches' dtype (None: the model's); hasten.load(kv_dtype="f16") sets torch.float16

    def kv_layout(self, policy=None) -> tuple:
        """A LayerKV per layer under `policy` (a policy or its string; default: this model's kv_policy)."""
        from .kv import parse
        return parse(policy if policy is not None else self.kv_policy).layers(self.config)

    def new_cache(self, max_len: int, batch: int = 1, policy=None, slack: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A cache for max_len positions laid out by `policy` (default: this model's kv_policy, else native);
        slack: a ring's room for new entries per forward (default kv_cache.RING_SLACK); dtype: its buffers'
        (default: cache_dtype)."""
        from . import kv_cache
        from .kv import parse
        c, policy = self.config, parse(policy if policy is not None else self.kv_policy)
        slack = slack if slack is not None else kv_cache.RING_SLACK
        return KVCache(c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim, dtype or self.cache_dtype, self.device,
                       policy.layers(c), slack, policy.name)

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the caches new_cache makes: kv_dtype, else the model's."""
        return self.kv_dtype or self.dtype

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, cache: KVCache | None = None,
                mask: torch.Tensor | None = None, layers: tuple[int, ...] | None = None,
                last_only: bool = False, return_hidden: bool = False):
        """tokens [B, T] → logits [B, T, V] (or [B, 1, V] with last_only); with return_hidden, (logits, the
        final norm's output [B, T, D]) — the feature EAGLE-style drafters extrapolate.

        positions [T] or [B, T] (default: cache length + arange(T)); mask [T, L+T] bool, True = may attend,
        over the cached entries plus the new ones (default: causal). With a cache (B = 1) this is `packed` with
        one segment: the new keys/values are appended and the cache's length advances by T; the caller keeps or
        rolls back what verification rejects; a cache with rings (a KV policy's windows) compacts first and
        scores a chain longer than its slack in pieces. `layers` runs a subset of the layers (layer-skip
        self-speculation uses the same weights, with a cache of its own).
        """
        B, T = tokens.shape
        if cache is None:
            if positions is None:
                positions = torch.arange(T, device=tokens.device)
            return self._run(tokens, positions, None, mask, layers, [T - 1] if last_only else None, return_hidden)
        if B != 1:
            raise ValueError("a cached forward scores one sequence; pack several with Transformer.packed")
        start = cache.length
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device)
        room = cache.make_room(T)
        if room < T and cache.rings:  # a ring takes at most its slack per forward: score a long chain in pieces
            if mask is not None:
                raise ContextOverflowError(f"{T} tree tokens do not fit a ring with room for {room}; draft fewer")
            outs, a, flat = [], 0, positions.reshape(-1)
            while a < T:
                b = a + min(room, T - a)
                outs.append(self.forward(tokens[:, a:b], flat[a:b], cache, None, layers, last_only, return_hidden))
                a, room = b, cache.make_room(T - b)
                if a < T and room <= 0:
                    cache.check_room(T - a)
            if last_only:
                return outs[-1]
            if return_hidden:
                return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)
            return torch.cat(outs, 1)
        out = self.packed(tokens[0], positions.reshape(-1), [Segment(cache, start, T, mask)], layers,
                          [T - 1] if last_only else None, return_hidden)
        cache.advance(T)
        return (out[0][None], out[1][None]) if return_hidden else out[None]

    def packed(self, tokens: torch.Tensor, positions: torch.Tensor, segments: list[Segment],
               layers: tuple[int, ...] | None = None, rows: list[int] | None = None, return_hidden: bool = False):
        """One forward over the tokens of several sequences packed together: tokens, positions [N], split into
        `segments` in order (their lengths sum to N). Linear layers run over all N tokens at once (the block
        kernels give each token the same bits whatever else is packed beside it); attention runs per segment
        against that segment's cache. → logits [R, V] for the packed rows `rows` (default: all), with
        return_hidden (logits, final-norm features [R, D]). Caches' lengths are left to the caller."""
        return self._run(tokens[None], positions, segments, None, layers, rows, return_hidden, squeeze=True)

    def _decode_stack(self, x, cos, segments, per_layer):
        """decode_stack(self, …) (fused.py): the C++ DecodeStack of all blocks when this forward can use it."""
        return decode_stack(self, Block, x, cos, segments, per_layer)

    def _run(self, tokens, positions, segments, mask, layers, rows, return_hidden, squeeze=False):
        c = self.config
        cos, sin = self._rope(positions)  # [(B,) T, d]
        x = self.embed_tokens(tokens)  # [B, T, D]
        if c.embed_scale is not None:  # transformers multiplies by the scale rounded to the model's dtype
            x = x * torch.tensor(c.embed_scale, dtype=torch.float32).to(x.dtype)
        order = layers if layers is not None else range(len(self.layers))
        # With caches, each layer sees the segments as its group of the cache holds them (kv_cache.py): a window
        # (Gemma 3's sliding layers, or a KV policy's) is a mask over that group's slots.
        per_layer = layer_segments(segments, positions, len(self.layers)) if segments is not None else None
        stack = self._decode_stack(x, cos, segments, per_layer) if layers is None else None
        if stack is not None:  # every block in one C++ call: decode_block's bits (tests/models/test_transformer.py)
            x = stack.forward(x.contiguous(), cos, sin, [seg.cache.layers for seg in segments],
                              [seg.start for seg in segments], [seg.length for seg in segments],
                              [NO_MASK if seg.mask is None else seg.mask for seg in segments])
        elif c.layer_types is None:
            for i in order:
                x = self.layers[i](x, cos, sin, i, per_layer[i] if per_layer else None, mask)
        else:  # sliding-window layers: their own RoPE tables; without a cache, the mask cut to the window
            from .gemma3 import window_mask
            local_cos, local_sin = self._rope(positions, local=True) if c.rope_local_theta is not None else (cos, sin)
            local_mask = window_mask(mask, positions, 0, c.sliding_window) if segments is None else None
            for i in order:
                segs = per_layer[i] if per_layer else None
                if c.layer_types[i] == "sliding_attention":
                    x = self.layers[i](x, local_cos, local_sin, i, segs, local_mask)
                else:
                    x = self.layers[i](x, cos, sin, i, segs, mask)
        if rows is not None:
            x = x[:, rows]
        if x.shape[1]:
            h = self.norm(x)
            logits = self.lm_head(h)  # [B, R, V]
            if c.final_logit_softcapping is not None:
                logits = torch.tanh(logits / c.final_logit_softcapping) * c.final_logit_softcapping
        else:  # no row wanted (prompt chunks that do not end their prompt)
            h, logits = x, x.new_empty(x.shape[0], 0, c.vocab_size)
        if squeeze:
            logits, h = logits[0], h[0]
        return (logits, h) if return_hidden else logits
