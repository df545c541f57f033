"""The context recorded with every benchmark result (MEASURING.md: date, machine, versions, settings, commit)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def collect(engine, threads: int, suite: str, prompts: int, max_new_tokens: int, rounds: int) -> dict:
    import torch
    import transformers
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "dtype": str(engine.model.dtype).removeprefix("torch."), "threads": threads,
        "model": engine.name, "model_hash": engine.model_hash, "weights": engine.loaded.weight_format,
        "suite": suite, "prompts": prompts, "max_new_tokens": max_new_tokens, "rounds": rounds,
        "git_commit": git_commit(), "command": " ".join(["hasten"] + sys.argv[1:]),
        "kv_policy": getattr(engine, "kv_policy", None) and engine.kv_label,
        "kv_lossy": bool(getattr(engine, "kv_lossy", False)),
        "activations": _activations(engine.model),
    }


def _activations(model) -> str | None:
    """Which activation path the block-quantized layers run ("q8 (Q4_0, Q8_0)"), None for a model without them."""
    from ..models.quantized import QuantLinear, activation_summary
    return activation_summary(model) if any(isinstance(m, QuantLinear) for m in model.modules()) else None
