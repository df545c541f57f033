"""The one registry of method names → a configured drafter (and, for lossy methods, a sparsified model).

Syntax: `name`, `name:value` (the factory's first parameter) or `name:key=value,key=value`; `a+b` merges
drafters' proposals into one tree; `a|b` scores whichever one proposal is expected to be accepted furthest (`+` binds tighter).
Adding a method = one file implementing a protocol + one `register` line.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Callable

from .decoding.drafters.base import Drafter, NoDraft


class UnknownMethodError(ValueError):
    pass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: dict
    lossless: bool


_REGISTRY: dict[str, tuple[Callable, bool, str]] = {}


def register(name: str, factory: Callable, lossless: bool = True, help: str = "") -> None:
    """factory(engine, **params) -> Drafter."""
    _REGISTRY[name] = (factory, lossless, help)


def available() -> dict[str, str]:
    _load_builtin()
    return {name: h for name, (_, _, h) in sorted(_REGISTRY.items())}


def parse(text: str) -> list[MethodSpec]:
    """'prompt-lookup:k=8+recycling' → one spec per composed drafter ('a|b' too: a's, then b's). Raises
    UnknownMethodError."""
    _load_builtin()
    specs = []
    for part in re.split(r"[+|]", text):
        name, _, arg = part.strip().partition(":")
        if name not in _REGISTRY:
            raise UnknownMethodError(f"unknown method {name!r}; choose from {', '.join(sorted(_REGISTRY))} "
                                     "(see `hasten generate --help`)")
        factory, lossless, _ = _REGISTRY[name]
        params = {}
        names = [p for p in inspect.signature(factory).parameters if p != "engine"]
        for item in filter(None, arg.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                if not names:
                    raise UnknownMethodError(f"method {name!r} takes no parameters")
                key, value = names[0], key
            if key not in names:
                raise UnknownMethodError(f"method {name!r} has no parameter {key!r}; it takes {', '.join(names) or 'none'}")
            params[key] = _number(value)
        specs.append(MethodSpec(name, params, lossless))
    if len(specs) > 1 and any(s.name == "baseline" for s in specs):
        raise UnknownMethodError("baseline proposes nothing and cannot be composed; drop it from the '+'/'|' list")
    if len(specs) > 1 and not all(s.lossless for s in specs):
        lossy = next(s.name for s in specs if not s.lossless)
        raise UnknownMethodError(f"{lossy} changes the model and cannot be composed with drafters; run it alone "
                                 "(or use its lossless self-speculative form, sparse-draft)")
    return specs


def split_list(text: str) -> list[str]:
    """A comma-separated list of methods whose own parameters may contain commas:
    'baseline,teal:0.5,alloc=greedy,prompt-lookup:n=2,k=5' → ['baseline', 'teal:0.5,alloc=greedy', 'prompt-lookup:n=2,k=5']
    (a `key=value` item without a colon continues the method before it)."""
    out: list[str] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if out and "=" in item and ":" not in item.split("=", 1)[0] and ":" in re.split(r"[+|]", out[-1])[-1]:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def build(text: str, engine) -> Drafter:
    from .decoding.drafters.compose import Composition, Fallback
    parse(text)  # the whole text is checked before anything is built
    alternatives = []
    for alternative in text.split("|"):
        drafters = [_make(s, engine) for s in parse(alternative)]
        alternatives.append(drafters[0] if len(drafters) == 1 else Composition(drafters))
    return alternatives[0] if len(alternatives) == 1 else Fallback(alternatives)


def _make(spec: MethodSpec, engine) -> Drafter:
    try:
        return _REGISTRY[spec.name][0](engine, **spec.params)
    except UnknownMethodError:
        raise
    except ValueError as e:  # a parameter out of range: one line, not a traceback
        raise UnknownMethodError(str(e) if spec.name in str(e) else f"{spec.name}: {e}") from None
    except TypeError:  # e.g. recycling:k=abc
        given = ", ".join(f"{k}={v}" for k, v in spec.params.items())
        raise UnknownMethodError(f"{spec.name}: a parameter has the wrong type ({given}); see `hasten generate "
                                 "--help` for what each method takes") from None


def machine_key() -> str:
    """CPU model and thread count: a tuning profile holds only where both match."""
    import platform

    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return "".join(c if c.isalnum() else "-" for c in f"{cpu}-{torch.get_num_threads()}t")


def profile_path(engine):
    from .models.loading import cache_dir
    return cache_dir() / "profiles" / f"{engine.model_hash}-{machine_key()}.json"


def _auto(engine):
    """The configuration `hasten tune` found fastest (and lossless) for this model on this machine."""
    import json
    import sys
    path = profile_path(engine)
    try:
        best = json.loads(path.read_text())["best"]
    except (OSError, ValueError, KeyError):
        raise UnknownMethodError(f"--method auto needs a tuning profile for {engine.name} on this machine "
                                 f"({path.name}); run `hasten tune` first") from None
    print(f"hasten: --method auto uses {best} (from {path})", file=sys.stderr)
    return build(best, engine)


def _eagle(engine, k=4, threshold=0.25, width=1, nodes=None):
    from .decoding.drafters.eagle import HeadNotTrainedError, eagle
    try:
        return eagle(engine, k, float(threshold), width, nodes)
    except HeadNotTrainedError as e:
        raise UnknownMethodError(str(e)) from None


def _blockwise(engine, k=None, width=1, threshold=0.1, nodes=16):
    from .decoding.drafters.blockwise import blockwise
    from .decoding.drafters.eagle import HeadNotTrainedError
    try:
        return blockwise(engine, k, width, float(threshold), nodes)
    except HeadNotTrainedError as e:
        raise UnknownMethodError(str(e)) from None


def _fastdraft(engine, k=4, n=1):
    from .decoding.drafters.fast_draft import DraftNotTrainedError, fastdraft
    try:
        return fastdraft(engine, k, n)
    except DraftNotTrainedError as e:
        raise UnknownMethodError(str(e)) from None


def _number(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


_loaded = False


def _load_builtin() -> None:
    """The built-in methods, one line each (imports stay lazy so `import hasten` is light)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    register("baseline", lambda engine: NoDraft(), help="plain decoding, one token per target pass")
    register("auto", _auto, help="the fastest lossless configuration `hasten tune` found here")
    from .decoding.controller import step_cost
    from .decoding.drafters.prompt_lookup import PromptLookup
    from .decoding.drafters.recycling import TokenRecycling
    register("prompt-lookup", lambda engine, n=3, k=10, adaptive=1: PromptLookup(n, k, step_cost(engine), bool(adaptive)),
             help="n-gram match over prompt + output (n=3, k=10 max draft, adaptive=1)")
    register("recycling", lambda engine, k=8, nodes=24, depth=8, adaptive=1: TokenRecycling(
        engine.model.config.vocab_size, k, nodes, depth, step_cost(engine), bool(adaptive)),
             help="token recycling: tree from the target's past top-k (k=8, nodes=24, depth=8)")
    from .decoding.drafters.jacobi import Jacobi
    register("jacobi", lambda engine, block=3, blocks=2, ngram=4, branches=2, adaptive=1: Jacobi(
        block, blocks, ngram, branches, step_cost(engine), bool(adaptive)),
             help="Jacobi iteration + n-gram pool + rejection recycling (block=3, blocks=2, ngram=4)")
    from .decoding.drafters.draft_model import draft_model
    from .decoding.drafters.layer_skip import layer_skip
    register("draft-model", lambda engine, model, k=4, n=1: draft_model(engine, model, k, n),
             help="a smaller model with the same tokenizer (model=PATH, k=4 draft length, n=1 chains; n>1: SpecTr)")
    register("fastdraft", _fastdraft,
             help="draft-model with the small draft `hasten train-draft` trained for this target (k=4, n=1)")
    register("layer-skip", lambda engine, skip=None, k=4: layer_skip(engine, skip, k),
             help="self-speculation with calibrated skipped layers (skip=10-19 to choose, k=4)")
    register("eagle", _eagle,
             help="EAGLE-style head on the target's features (needs `hasten train-head` once; k=4 depth, threshold=0.25, "
                  "width=1 nodes extended per depth (>1: an EAGLE-2 tree), nodes=k at most)")
    register("blockwise", _blockwise,
             help="blockwise parallel decoding: k heads on the target's feature draft k tokens at once (needs "
                  "`hasten train-head` once; k=all trained heads, width=1 candidates per head, threshold=0.1, nodes=16)")
    from .sparsity import registry as sparsity_methods
    sparsity_methods.register_all(register)
