"""Benchmark reports: terminal and Markdown tables per task group and overall; `write_all` adds plots and HTML."""
from __future__ import annotations

from pathlib import Path


def _rows(summary: dict, group: str, precision: dict[str, str], skipped: dict[str, str]):
    ref = summary["reference"]
    for m, e in summary["methods"].items():
        if m in skipped:  # a peer that could not run here: it produced no tokens to measure
            yield [m] + ["—"] * (len(HEADER) - 2) + [f"skipped: {skipped[m]}"]
            continue
        s = e["speedup"].get(group)
        speed = f"{s['median']:.2f}x ({s['min']:.2f}–{s['max']:.2f})" if s else "n/a"
        t = e["mean_accepted"] if group == "overall" else e["mean_accepted_groups"].get(group)
        tau = f"{t:.2f}" if t else "n/a"
        share = f"{100 * e['draft_share']:.1f}%" if e.get("draft_share") is not None else "—"
        same, total = (e["identical"], e["prompts"]) if group == "overall" else e["identical_groups"][group]
        ident = "n/a (sampling)" if summary.get("sampling") else f"{same}/{total}" + (" (ref)" if m == ref else "")
        if e.get("quality"):
            ident = f"lossy ({same}/{total})"
        decode, dspeed = "—", "—"
        if group in e.get("decode_tokens_per_s", {}):  # runs saved before the field existed have none
            decode = f"{e['decode_tokens_per_s'][group]:.1f}"
            dspeed = f"{e['decode_speedup'][group]:.2f}x" if e["decode_speedup"].get(group) else "n/a"
        yield [m, f"{e['tokens_per_s'].get(group, 0.0):.1f}", speed, decode, dspeed, tau, ident, share,
               precision.get(m, "—")]


# tokens/s and speedup: end to end (prefill + every token, as Spec-Bench); decode: after the first token.
HEADER = ["method", "tokens/s", "speedup (min–max)", "decode tok/s", "decode speedup", "τ", "identical",
          "draft time", "precision"]


def _precision(result: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Weights each method computed with (peers record theirs; hasten's methods use the engine's, per the
    context), and the peers that were skipped with the reason."""
    ctx = result.get("context", {})
    weights, dtype = ctx.get("weights") or "", ctx.get("dtype")
    short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    if not dtype:
        engine = "—"
    elif ctx.get("activations"):  # block kernels: weights exact from the blocks, activations as they say
        engine = f"blocks, {ctx['activations']} activations"
    elif short == "fp32" and ("Q4_1" in weights or "Q8_0" in weights):  # runs saved before the field existed
        engine = "fp32 dequantized (block kernels)"
    else:
        engine = f"{short} dequantized" if weights.startswith("gguf") else short
    precision, skipped = {}, {}
    for r in result.get("records", []):
        precision.setdefault(r["method"], r.get("precision") or engine)
        if r.get("skipped"):
            skipped[r["method"]] = r["skipped"]
    return precision, skipped


QUALITY_HEADER = ["method", "tokens/s", "speedup", "perplexity (dense)", "top-1 agreement", "mean KL", "held-out tokens"]


def _quality_rows(summary: dict):
    """Lossy methods: speed next to quality on held-out text (sparsity/quality.py)."""
    for m, e in summary["methods"].items():
        q = e.get("quality")
        if not q:
            continue
        s = e["speedup"].get("overall")
        yield [m, f"{e['tokens_per_s']['overall']:.1f}", f"{s['median']:.2f}x" if s else "n/a",
               f"{q['perplexity']:.2f} ({q['dense_perplexity']:.2f})", f"{100 * q['top1_agreement']:.1f}%",
               f"{q['mean_kl']:.4f}", f"{q['tokens']} ({q['corpus']})"]


def _context_line(ctx: dict) -> str:
    return (f"{ctx['date']} · {ctx['cpu']} ({ctx['cores']} cores{', ' + ctx['gpu'] if ctx.get('gpu') else ''}) · "
            f"torch {ctx['torch']} · transformers {ctx['transformers']} · {ctx['dtype']} · {ctx['threads']} threads · "
            f"{ctx['model']} [{ctx['model_hash']}] {ctx['weights']} · {ctx['suite']} ({ctx['prompts']} prompts) · "
            f"max_new_tokens {ctx['max_new_tokens']} · {ctx['rounds']} rounds · commit {ctx['git_commit']}"
            + _kv_line(ctx))


def _kv_line(ctx: dict) -> str:
    """The KV policy when it is not the model's own; a lossy one marks every hasten method lossy (vs full
    attention; the peers keep the full cache)."""
    policy = ctx.get("kv_policy")
    if not policy or (policy == "native" and not ctx.get("kv_lossy")):
        return ""
    return f" · KV {policy}" + (" (LOSSY: every hasten method, vs the full f32 cache)" if ctx.get("kv_lossy") else "")


def terminal(result: dict) -> str:
    summary, lines = result["summary"], []
    if "command" in result.get("context", {}):
        lines.append(_context_line(result["context"]))
    for group in ["overall"] + summary["groups"]:
        rows = [HEADER] + list(_rows(summary, group, *_precision(result)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
        lines.append(f"\n{group} (speedup vs {summary['reference']}, median over rounds)")
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
    quality = list(_quality_rows(summary))
    if quality:
        rows = [QUALITY_HEADER] + quality
        widths = [max(len(r[i]) for r in rows) for i in range(len(QUALITY_HEADER))]
        lines.append("\nquality of lossy methods (vs the dense model, held-out text)")
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _md_row(cells) -> str:
    """A table row; a `|` inside a cell (the fallback method `a|b`) is escaped so the columns stay put."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def markdown(result: dict) -> str:
    summary = result["summary"]
    out = []
    if "command" in result.get("context", {}):
        out += [f"Context: {_context_line(result['context'])}", "", f"Command: `{result['context']['command']}`", ""]
    for group in ["overall"] + summary["groups"]:
        out += [f"**{group}** (speedup vs `{summary['reference']}`)", "", "| " + " | ".join(HEADER) + " |",
                "|" + "|".join(["---"] * len(HEADER)) + "|"]
        out += [_md_row(r) for r in _rows(summary, group, *_precision(result))]
        out.append("")
    quality = list(_quality_rows(summary))
    if quality:
        out += ["**quality of lossy methods** (vs the dense model, held-out text)", "",
                "| " + " | ".join(QUALITY_HEADER) + " |", "|" + "|".join(["---"] * len(QUALITY_HEADER)) + "|"]
        out += [_md_row(r) for r in quality]
        out.append("")
    return "\n".join(out)


def write_all(result: dict, out: str | Path) -> list[Path]:
    """Markdown table, PNG speedup plot and the HTML acceptance view into directory `out`."""
    from .html import acceptance_view
    from .plots import speed_vs_quality, speedup_bars
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown(result))
    paths = [out / "report.md", speedup_bars(result, out / "speedup.png"), acceptance_view(result, out / "tokens.html")]
    quality_plot = speed_vs_quality(result, out / "speed_vs_quality.png")
    return paths + ([quality_plot] if quality_plot else [])
