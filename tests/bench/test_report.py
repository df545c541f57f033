from hasten.bench import report
from hasten.bench.runner import summarize


def result():
    recs = []
    for rnd in range(2):
        for method, seconds, sources, steps in [
                ("baseline", 1.0, ["target"] * 4, [0, 0, 0, 0]),
                ("prompt-lookup", 0.5, ["target", "prompt-lookup", "prompt-lookup", "target"], [0, 2])]:
            recs.append({"method": method, "question_id": "q1", "category": "rag", "round": rnd, "tokens": 4,
                         "seconds": seconds, "token_ids": [5, 6, 7, 8], "target_passes": 4 if method == "baseline" else 2,
                         "sources": sources, "accepted_per_step": steps, "pieces": ["Hel", "lo", " <wor", "ld>"]})
    return {"summary": summarize(recs, "baseline"), "records": recs,
            "context": {"model": "tiny", "date": "2026-11-22", "cpu": "cpu", "threads": 2}}



def test_write_all_makes_markdown_plot_and_token_marks(tmp_path):
    paths = report.write_all(result(), tmp_path)
    assert [p.name for p in paths] == ["report.md", "speedup.png", "tokens.html"]
    assert all(p.stat().st_size > 200 for p in paths)
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths[2].read_text()
    assert page.count('class="tok src-prompt-lookup"') == 3  # 2 tokens + the legend
    assert "&lt;wor" in page  # token text is escaped
    assert "| prompt-lookup |" in paths[0].read_text() and "2.00x" in paths[0].read_text()


def test_lossy_methods_get_a_quality_table_and_a_speed_vs_quality_plot(tmp_path):
    res = result()
    for rec in [dict(r, method="teal:0.5", seconds=0.8, token_ids=[5, 6, 9, 9]) for r in res["records"]
                if r["method"] == "baseline"]:
        res["records"].append(rec)
    res["summary"] = summarize(res["records"], "baseline")
    res["summary"]["methods"]["teal:0.5"]["quality"] = {
        "perplexity": 24.0, "dense_perplexity": 20.0, "top1_agreement": 0.7, "mean_kl": 0.3, "tokens": 1024,
        "corpus": "debian:python3.11-doc"}
    paths = report.write_all(res, tmp_path)
    assert [p.name for p in paths][-1] == "speed_vs_quality.png"
    assert paths[-1].stat().st_size > 1000 and paths[-1].read_bytes()[:4] == b"\x89PNG"
    md = paths[0].read_text()
    assert "quality of lossy methods" in md and "| teal:0.5 | 5.0 | 1.25x | 24.00 (20.00) | 70.0% | 0.3000 |" in md
    assert "lossy (0/1)" in md  # a lossy method is not counted as failing identity
    assert "quality of lossy methods" in report.terminal(res)


def test_a_fallback_method_keeps_the_markdown_columns():
    r = result()
    for rec in r["records"]:
        if rec["method"] == "prompt-lookup":
            rec["method"] = "prompt-lookup|recycling"
    r["summary"] = summarize(r["records"], "baseline")
    rows = [l for l in report.markdown(r).splitlines() if l.startswith("| prompt-lookup")]
    assert rows and all(l.replace("\\|", "").count("|") == len(report.HEADER) + 1 for l in rows)
    assert "prompt-lookup\\|recycling" in rows[0]
