"""A self-contained HTML view of how each method produced its tokens, for a few prompts.

Every token is marked by where it came from — accepted from a drafter (one colour per drafter) or the target's
own bonus token — and a strip of bars shows the accepted draft length of every step: a user sees at a glance
where a method drafts well (long green runs) and where it only pays for drafts (all bonus tokens).
"""
from __future__ import annotations

import html
from pathlib import Path

PALETTE = ["#b7e4c7", "#a9d6f5", "#f9d49b", "#e3b7f0", "#f5b7b1", "#c7d2fe"]


def acceptance_view(result: dict, path: Path, prompts: int = 3) -> Path:
    records = [r for r in result["records"] if r["round"] == 0 and r.get("pieces") is not None]
    qids = list(dict.fromkeys(r["question_id"] for r in records))[:prompts]
    drafters = sorted({s for r in records for s in r.get("sources") or [] if s != "target"})
    colour = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(drafters)}
    css = "".join(f".src-{_cls(d)}{{background:{c}}}" for d, c in colour.items())
    legend = " ".join(f'<span class="tok src-{_cls(d)}">{html.escape(d)}</span>' for d in drafters)
    body = []
    for qid in qids:
        body.append(f"<h2>{html.escape(str(qid))}</h2>")
        for r in (r for r in records if r["question_id"] == qid):
            tau = r["tokens"] / r["target_passes"] if r.get("target_passes") else 1.0
            toks = "".join(f'<span class="tok src-{_cls(s)}" title="{html.escape(s)}">{html.escape(p)}</span>'
                           for p, s in zip(r["pieces"], r.get("sources") or ["target"] * len(r["pieces"])))
            steps = r.get("accepted_per_step") or []
            top = max(steps + [1])
            bars = "".join(f'<i style="height:{2 + 28 * a / top:.0f}px" title="step {i}: {a} accepted"></i>'
                           for i, a in enumerate(steps))
            body.append(f'<section class="run"><h3>{html.escape(r["method"])} · {r["tokens"]} tokens · '
                        f'{r["tokens"] / r["seconds"]:.1f} tokens/s · τ = {tau:.2f}</h3>'
                        f'<div class="steps">{bars}</div><div class="text">{toks}</div></section>')
    ctx = result.get("context", {})
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>hasten: where tokens came from</title>
<style>body{{font:14px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em}}
.text{{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:13px}}.tok{{border-radius:2px}}
.src-target{{background:transparent}}{css}.steps{{display:flex;align-items:flex-end;gap:1px;height:32px;margin:.3em 0}}
.steps i{{display:block;width:4px;background:#2d6a4f}}h3{{font-size:14px;margin:.8em 0 .2em}}</style></head><body>
<h1>Where each token came from</h1><p>{html.escape(ctx.get('model', ''))} · {html.escape(ctx.get('date', ''))} ·
coloured = accepted from a draft ({legend}); plain = the target's own token. Bars: draft tokens accepted per step.</p>
{''.join(body)}</body></html>"""
    Path(path).write_text(page)
    return Path(path)


def _cls(source: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in source)
