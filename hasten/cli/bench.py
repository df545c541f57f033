"""`hasten bench` (methods and peers side by side) and `hasten report` (its tables and plots from a saved run)."""
from __future__ import annotations

import json

import click

from .common import (
    UsageError, user_errors, main, model_option, load_engine, threads_option, corpus_option, check_corpus,
    use_corpus, set_threads)


@main.command()
@model_option
@click.option("--methods", default="baseline,hf,hf-pld", show_default=True,
              help="comma-separated: hasten methods (compositions: a+b merges trees, 'a|b' scores the one expected to be accepted furthest) and peers hf, hf-pld")
@click.option("--reference", default="baseline", show_default=True, help="speedups are relative to this method")
@click.option("--questions", type=click.Path(dir_okay=False), default=None,
              help="Spec-Bench-format JSONL (question_id, category, turns) [default: hasten's suite]")
@click.option("--per-category", type=int, default=None, help="use only the first N prompts of each category")
@click.option("--suite", type=click.Choice(["default", "long"]), default="default", show_default=True,
              help="long: 2k/4k/8k-token prompts from held-out corpus documents (summarize, question, continue); "
                   "reports time to first token and decode tokens/s apart")
@click.option("--lengths", default="2048,4096,8192", show_default=True,
              help="--suite long: prompt lengths in tokens, comma-separated")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True,
              help="> 0 benchmarks sampling (peers are greedy-only and are then skipped)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="write raw per-prompt records, the summary and the context here")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="write the tables as Markdown here")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="also write report.md, speedup.png and tokens.html (where tokens came from) into this directory")
@click.option("--compare", nargs=2, type=click.Path(exists=True, dir_okay=False), default=None,
              metavar="A.json B.json", help="instead of running, print the ratio table B/A of two saved runs")
@corpus_option
@threads_option
@user_errors
def bench(model, methods, reference, questions, per_category, suite, lengths, rounds, max_new_tokens, temperature,
          json_path, markdown_path, report_dir, compare, corpus, threads):
    """Measure methods and peers side by side on the same weights and prompts (interleaved rounds, warm-up)."""
    from ..bench import report, runner
    from ..bench.context import collect
    from ..bench.peers import PEERS
    from ..bench.suite import load_questions
    from .. import methods as registry
    if compare:
        a, b = (_read_result(p) for p in compare)
        click.echo(f"tokens/s: {compare[0]} → {compare[1]}")
        for m, g, ta, tb, ratio in runner.compare(a, b):
            click.echo(f"  {m:28s} {g:16s} {ta:8.1f} → {tb:8.1f}  {ratio:.2f}x")
        return
    names = list(dict.fromkeys(registry.split_list(methods)))  # a method named twice runs once
    if temperature > 0:
        names = [m for m in names if m not in PEERS]
    for m in names:
        if m not in PEERS:
            registry.parse(m)
    if reference not in names:
        raise UsageError(f"--reference {reference!r} is not among --methods ({', '.join(names)}); add it")
    if suite == "long":
        sizes = _lengths(lengths)
        if questions or per_category or report_dir or temperature > 0:
            raise UsageError("--suite long builds its own prompts and runs greedy: drop --questions, "
                             "--per-category, --report and --temperature")
    qs = load_questions(questions, per_category) if suite == "default" else []
    from ..engine import validate_options
    validate_options(max_new_tokens, temperature, 0, 1.0)
    n_threads = set_threads(threads)
    check_corpus(corpus)  # a bad path fails before seconds of loading
    engine = load_engine(model)
    use_corpus(engine, corpus)
    if suite == "long":
        return _bench_long(engine, tuple(names), reference, sizes, rounds, max_new_tokens, corpus, n_threads,
                           json_path, markdown_path)
    config = runner.BenchConfig(tuple(names), reference, rounds, max_new_tokens, temperature)
    records = runner.run(engine, qs, config)
    result = {"context": collect(engine, n_threads, questions or "hasten default suite", len(qs), max_new_tokens, rounds),
              "summary": runner.add_quality(engine, runner.summarize(records, reference, temperature > 0)),
              "records": records}
    click.echo(report.terminal(result))
    _write_result(result, json_path, markdown_path, lambda: report.markdown(result))
    if report_dir:
        for path in report.write_all(result, report_dir):
            click.echo(f"wrote {path}")


def _write_result(result: dict, json_path: str | None, markdown_path: str | None, markdown) -> None:
    """--json (the raw result) and --markdown (markdown(), made only when asked) of a bench run."""
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f)
        click.echo(f"\nwrote {json_path}")
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(markdown())


def _lengths(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 16:
        raise UsageError(f"--lengths {text!r}: give prompt lengths in tokens (each ≥ 16), e.g. 2048,4096,8192")
    return sizes


def _bench_long(engine, names, reference, lengths, rounds, max_new_tokens, corpus, n_threads, json_path,
                markdown_path):
    """`hasten bench --suite long`: bench/long_suite.py's prompts, every method and peer, one table."""
    from ..bench import long_suite
    from ..bench.context import collect
    prompts = long_suite.build_prompts(engine, lengths, max_new_tokens, corpus)
    records = long_suite.run(engine, prompts, names, rounds, max_new_tokens)
    summary = long_suite.summarize(records, reference)
    result = {"context": collect(engine, n_threads, "hasten long-context suite " + ",".join(map(str, lengths)),
                                 len(prompts), max_new_tokens, rounds), "summary": summary, "records": records}
    table = long_suite.terminal(summary)
    click.echo(table)
    _write_result(result, json_path, markdown_path, lambda: "```\n" + table + "\n```\n")


@main.command("report")
@click.argument("result_json", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="hasten-report", show_default=True)
@user_errors
def report_command(result_json, out_dir):
    """Tables, a speedup plot and an HTML view of where tokens came from, from a `hasten bench --json` file."""
    from ..bench import report
    result = _read_result(result_json)
    click.echo(report.terminal(result))
    for path in report.write_all(result, out_dir):
        click.echo(f"wrote {path}")


def _read_result(path: str) -> dict:
    try:
        with open(path) as f:
            result = json.load(f)
        result["summary"]["methods"]
        return result
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a `hasten bench --json` result; pass files written by --json") from None
