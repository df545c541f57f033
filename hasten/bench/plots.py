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
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(groups)) + (2.5 if len(methods) > 6 else 0), 4.2), dpi=120)
    colours = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    for i, m in enumerate(methods):
        sp = summary["methods"][m]["speedup"]
        med = [sp.get(g, {}).get("median", 0.0) for g in groups]
        lo = [max(0.0, v - sp.get(g, {}).get("min", v)) for g, v in zip(groups, med)]
        hi = [max(0.0, sp.get(g, {}).get("max", v) - v) for g, v in zip(groups, med)]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=m, color=colours(i % colours.N))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel(f"speedup vs {ref} (median, min–max)")
    ctx = result.get("context", {})
    ax.set_title(f"{ctx.get('model', '')} · {ctx.get('cpu', '')[:40]} · {ctx.get('threads', '?')} threads", fontsize=9)
    if len(methods) > 6:  # many methods: the legend goes beside the bars, not over them
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(methods) <= 16 else 2)
    else:
        ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def speed_vs_quality(result: dict, path: Path) -> Path | None:
    """Lossy methods: overall speedup (median over rounds) against quality on held-out text — top-1 agreement
    with the dense model and perplexity — one point per method, families in one colour; lossless methods sit at
    100% agreement. None when the run has no lossy method."""
    summary = result["summary"]
    points = {m: e for m, e in summary["methods"].items() if e.get("quality")}
    if not points:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = summary["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    families = sorted({m.partition(":")[0] for m in points})
    colours = {f: plt.get_cmap("tab10")(i) for i, f in enumerate(families)}
    lossless = [(m, e) for m, e in summary["methods"].items() if not e.get("quality") and "overall" in e["speedup"]]
    for ax, key, label in ((axes[0], "top1_agreement", "top-1 agreement with the dense model"),
                           (axes[1], "perplexity", "perplexity on held-out text (lower is better)")):
        for m, e in points.items():
            fam = m.partition(":")[0]
            x = e["quality"][key] * (100 if key == "top1_agreement" else 1)
            y = e["speedup"]["overall"]["median"]
            ax.scatter(x, y, color=colours[fam], s=28, label=fam)
            ax.annotate(m.partition(":")[2] or m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        dense_x = 100.0 if key == "top1_agreement" else next(iter(points.values()))["quality"]["dense_perplexity"]
        for m, e in lossless:
            ax.scatter(dense_x, e["speedup"]["overall"]["median"], marker="s", color="black", s=22)
            ax.annotate(m, (dense_x, e["speedup"]["overall"]["median"]), fontsize=7, xytext=(3, -9),
                        textcoords="offset points")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        if key == "perplexity":
            ax.set_xscale("log")  # a lossy method's perplexity can be 10x the dense model's
        ax.set_xlabel(label)
        ax.set_ylabel(f"speedup vs {ref} (median)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=8)
    if points:
        axes[0].invert_xaxis()  # better quality to the left on both panels
    ctx = result.get("context", {})
    fig.suptitle(f"speed vs quality · {ctx.get('model', '')} · {ctx.get('cpu', '')[:40]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
