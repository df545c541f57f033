"""hasten's CPU kernels (a small C++ extension): Y = X @ W^T straight from a GGUF tensor's bytes in any of the
block formats of `formats.py`, RMSNorm, RoPE, streamed attention over the KV cache for any number of new tokens
(attention.h: decode, draft trees and prompt chunks alike), and a whole decoder block in one call.

Why: decoding reads every weight once per token, and this machine streams only ~16-22 GB/s. The dequantized
fp32 weights of the default model are 540 MB (≤ 30 tokens/s); its Q4_1 blocks are 0.5625 bytes per weight. Each
weight is rebuilt in registers exactly as gguf-py's `dequantize` does (formats/common.h), so results equal a
dense fp32 matmul over the dequantized weights up to summation order, and that order does not depend on how
many tokens are scored at once (cpu.cpp): decode, draft trees, prefill chunks and batches agree bit for bit.

The q8 path (activations="q8", the default for the eight formats of formats.Q8_FORMATS; formats/q8.h)
quantizes each token's activations to int8 per 32 values once per call and takes integer dot products with the
weights' codes (VNNI vpdpbusd): 1.2-4x faster per call than the fp32 path here, at ~3e-3 nats of KL (BENCHMARKS.md,
"Quantized activations"). Its integer sums are exact and its fp32 combination fixed, so it keeps the same
token-count invariance and gives the same bits in every build; `activations="f32"` is the exact path.

Three builds of the same source, one per instruction set: `avx512` (intrinsics, most servers), `avx2` (AVX2 +
FMA + F16C: most laptops and desktops) and `portable` (plain C++, any CPU the compiler targets). `extension()`
loads the best one this CPU runs; each is compiled once per machine, torch version and source hash, with
torch's own extension builder (cached under hasten's cache dir), and shares torch's thread pool
(at::parallel_for). Where no compiler works, `extension()` is None and the torch paths run (slower, same
function up to summation order).

Why C++ and not numba (measured 2026-11-22 on a 2-core Xeon, ffn_up 1536x576, one token): numba would not
vectorise the nibble decode (≥ 1.4 ms per call in four loop shapes, vs torch fp32's ~0.15 ms), and its OpenMP
pool fought torch's for the two cores.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

QK = 32  # weights per group: every kernel walks a row 32 weights at a time
ISAS = ("avx512", "avx2", "portable")  # best first
_HERE = Path(__file__).resolve().parent
_SOURCES = [_HERE / "cpu.cpp", _HERE.parent / "sparsity" / "kernels" / "sparse_cpu.cpp"]
_X86 = platform.machine() in ("x86_64", "AMD64")


def cpu_flags() -> set[str]:
    """The instruction-set flags the kernel builds care about ('avx512f', 'avx2', 'fma', 'f16c', …)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    cap = torch.backends.cpu.get_cpu_capability().lower()  # macOS, Windows: torch's own detection
    return {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"} if "avx512" in cap else \
        {"avx2", "fma", "f16c"} if "avx2" in cap else set()


def supported_isas() -> list[str]:
    """The builds this CPU can run, best first."""
    flags = cpu_flags()
    out = []
    if _X86 and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c", "fma"} <= flags:
        out.append("avx512")
    if _X86 and {"avx2", "fma", "f16c"} <= flags:
        out.append("avx2")
    return out + ["portable"]


def _flags(isa: str) -> list[str]:
    if isa == "avx512":
        # Tuned for this CPU where it has AVX-512; explicit flags elsewhere (a build that tests can compile).
        return ["-march=native"] if "avx512f" in cpu_flags() else \
            ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi2"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-mbmi2"]
    return ["-mcpu=native"] if not _X86 else []  # x86-64 baseline: SSE2, no intrinsics used


@lru_cache(maxsize=None)
def extension(isa: str | None = None):
    """The compiled kernels for `isa` (default: the best this CPU supports), built once per machine and cached;
    None with a warning where no compiler works (torch paths run then)."""
    isa = isa or supported_isas()[0]
    if isa not in ISAS:
        raise ValueError(f"unknown kernel build {isa!r}; one of {', '.join(ISAS)}")
    return build_extension(f"hasten_cpu_{isa}", _SOURCES, f"CPU kernels ({isa})",
                           extra_cflags=_flags(isa), include_dirs=[_HERE])


def build_extension(name: str, sources: list[Path], what: str, extra_cflags: list[str] | None = None,
                    include_dirs: list[Path] | None = None):
    """A C++ extension built once per machine, torch version, flags and source contents with torch's own
    builder (cached under hasten's cache dir), or None with a warning where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        from ..models.loading import cache_dir
        cflags = ["-O3", "-ffp-contract=off", "-fopenmp", *(extra_cflags or [])]
        digest = hashlib.sha256(" ".join(cflags).encode())
        for src in sorted({*sources, *(p for d in include_dirs or [] for p in Path(d).rglob("*.h"))}):
            digest.update(src.read_bytes())
        build = cache_dir() / "kernels" / f"torch-{torch.__version__}" / f"{name}-{digest.hexdigest()[:12]}"
        built = build / f"{name}.so"
        if built.exists() and not (build / "lock").exists():  # keyed by the sources' hash, and not mid-build
            # (torch's builder holds `lock` while another process compiles): import it without asking ninja
            return _import(name, built)
        build.mkdir(parents=True, exist_ok=True)
        print(f"hasten: compiling {what} once (about a minute)…", file=sys.stderr)
        return load(name=name, sources=[str(s) for s in sources], build_directory=str(build),
                    extra_cflags=cflags, extra_include_paths=[str(d) for d in include_dirs or []], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform
        import warnings
        warnings.warn(f"hasten: {what} unavailable ({type(e).__name__}: {str(e)[:200]}); using torch ops")
        return None


def _import(name: str, path: Path):
    """Import a built extension module (what torch's `load` does once ninja finds nothing to rebuild, which
    takes seconds; this takes milliseconds)."""
    import importlib.util
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module


def kernel_description() -> str:
    """What `hasten models` prints: which build runs here and which this CPU could run."""
    ext = extension()
    best = supported_isas()
    return f"{ext.isa() if ext is not None else 'none (torch ops)'} (this CPU supports: {', '.join(best)})"
