"""PNG plots of a benchmark result (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path


def speedup_bars(result: dict, path: Path) -> Path:
    """Median speedup per task group and method, with min–max over rounds as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    ref = summary["reference"]
    groups = ["overall"] + summary["groups"]
    methods = [m for m in summary["methods"] if m != ref]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups)), 4.2), dpi=120)
    for i, m in enumerate(methods):
        sp = summary["methods"][m]["speedup"]
        med = [sp.get(g, {}).get("median", 0.0) for g in groups]
        lo = [max(0.0, v - sp.get(g, {}).get("min", v)) for g, v in zip(groups, med)]
        hi = [max(0.0, sp.get(g, {}).get("max", v) - v) for g, v in zip(groups, med)]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel(f"speedup vs {ref} (median, min–max)")
    ctx = result.get("context", {})
    ax.set_title(f"{ctx.get('model', '')} · {ctx.get('cpu', '')[:40]} · {ctx.get('threads', '?')} threads", fontsize=9)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
