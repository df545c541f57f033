"""Measurements of one model file: `speed` (beside llama-bench), `kv-quality`, `calibrate` (sparse methods' quality)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .common import (
    UsageError, user_errors, main, model_option, load_engine, threads_option, corpus_option, check_corpus,
    set_threads)


@main.command("kv-quality")
@model_option
@click.option("--windows", default="256,512,1024", show_default=True, help="comma-separated windows W to measure")
@click.option("--sinks", type=click.IntRange(min=0), default=4, show_default=True, help="attention sinks S")
@click.option("--context", type=click.IntRange(min=16), default=4096, show_default=True,
              help="tokens per held-out stream (documents concatenated)")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True, help="streams to score")
@corpus_option
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None)
@threads_option
@user_errors
def kv_quality(model, windows, sinks, context, samples, corpus, json_path, threads):
    """What lossy KV policies cost: perplexity, top-1 agreement and KL vs the full cache on long held-out
    documents, next to KV memory and decode speed, for window:W,sinks:S and hybrid:global=every3,window=W,sinks=S
    at each W (bench/kv_quality.py)."""
    from ..bench.kv_quality import run
    try:
        ws = [int(w) for w in windows.split(",") if w.strip()]
    except ValueError:
        ws = []
    if not ws or min(ws) < 1:
        raise UsageError(f"--windows {windows!r}: give positive integers, e.g. --windows 256,512,1024")
    set_threads(threads)
    check_corpus(corpus)
    engine = load_engine(model)
    if context >= engine.model.config.max_position_embeddings:
        raise UsageError(f"--context {context}: {engine.name} serves {engine.model.config.max_position_embeddings} "
                         "positions; pass a smaller --context")
    text, record = run(engine, ws, context, sinks, samples, corpus)
    click.echo(text)
    click.echo(json.dumps(record))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f)


@main.command()
@model_option
@click.option("--methods", default="teal:0.25,teal:0.4,teal:0.5,teal:0.65,cats:0.5,ffsplit:0.5,dejavu:0.5",
              show_default=True, help="sparse methods to calibrate and measure (comma-separated)")
@click.option("--corpus", type=click.Path(), default=None,
              help="calibration text: a file or a folder of .txt/.md/.rst [default: Debian's Python docs]")
@click.option("--tokens", type=click.IntRange(min=256), default=16384, show_default=True,
              help="calibration tokens (activation statistics)")
@click.option("--heldout-tokens", type=click.IntRange(min=256), default=4096, show_default=True,
              help="held-out tokens for the quality measurements")
@click.option("--refresh", is_flag=True, help="recompute cached statistics")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None)
@threads_option
@user_errors
def calibrate(model, methods, corpus, tokens, heldout_tokens, refresh, json_path, threads):
    """Calibrate activation sparsity for a model and report each method's quality on held-out text.

    Records activation magnitudes at every sparsified input over the calibration split of the corpus (cached per
    model), fits each method (thresholds, TEAL's greedy allocation, Deja Vu's predictors), then measures on the
    held-out split: the share of activations actually dropped, perplexity, top-1 agreement and mean KL against the
    dense model. Everything is cached per model: with the default corpus and --tokens, later `--method teal:0.5`
    etc. start from it without calibrating again.
    """
    from dataclasses import asdict

    from .. import methods as registry
    from ..sparsity.calibrate import SEQ_LEN, activation_stats, measured_sparsity
    from ..sparsity.corpus import load as load_corpus
    from ..sparsity.quality import method_quality
    names = registry.split_list(methods)
    from ..sparsity.methods.base import check_sparsity
    for m in names:
        spec = registry.parse(m)[0]
        if spec.lossless:
            raise UsageError(f"{m} is not a sparse (lossy) method; calibrate takes teal, cats, dejavu, ffsplit")
        check_sparsity(spec.params.get("sparsity", 0.5))  # before minutes of calibration, not after
    source = load_corpus(corpus)
    set_threads(threads)
    engine = load_engine(model)
    engine.sparsity_calibration = (corpus, tokens)
    stats = activation_stats(engine, corpus, tokens, refresh=refresh)
    click.echo(f"calibration: {stats.tokens} tokens of {stats.corpus}; quality on {heldout_tokens} held-out tokens")
    heldout = source.token_chunks(engine.tokenizer, "heldout", min(heldout_tokens, 2048), SEQ_LEN)
    rows = []
    click.echo(f"{'method':28s} {'dropped':>8s} {'ppl':>8s} {'dense ppl':>9s} {'top-1 agree':>11s} {'mean KL':>8s}")
    for m in names:
        q = method_quality(engine, m, heldout_tokens)
        sparse = engine.drafter(m).target
        dropped = measured_sparsity(sparse, heldout)
        share = sum(dropped.values()) / len(dropped) if dropped else 0.0
        rows.append({"method": m, "dropped": share, **asdict(q)})
        click.echo(f"{m:28s} {share:8.1%} {q.perplexity:8.2f} {q.dense_perplexity:9.2f} {q.top1_agreement:11.1%} "
                   f"{q.mean_kl:8.4f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"model": engine.name, "corpus": stats.corpus, "calibration_tokens": stats.tokens, "rows": rows}, f,
                      indent=1)
        click.echo(f"wrote {json_path}")


@main.command()
@model_option
@click.option("--prefill", "-p", type=click.IntRange(min=1), default=512, show_default=True, help="prompt tokens")
@click.option("--decode", "-n", type=click.IntRange(min=1), default=128, show_default=True, help="generated tokens")
@click.option("--depth", "-d", type=click.IntRange(min=0), default=0, show_default=True,
              help="decode after this many cached tokens of context (llama-bench -d): decode speed deep in a long "
                   "prompt")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--llama-bench", "llama_bench_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="llama.cpp's llama-bench binary: measured on the same file in the same rounds")
@click.option("--step-sizes", default="1,2,4,8", show_default=True,
              help="tokens scored in one forward for the step-cost curve (comma-separated; e.g. 1,2,4,8,16,32,64,128 "
                   "to see where batching stops paying)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None)
@threads_option
@user_errors
def speed(model, prefill, decode, depth, rounds, llama_bench_path, step_sizes, json_path, threads):
    """Prefill and decode tokens/s, step cost and peak RSS of a model file here, beside llama-bench's."""
    from pathlib import Path

    from ..bench import speed as speed_bench
    from ..bench.context import collect
    try:
        sizes = tuple(sorted({int(x) for x in step_sizes.split(",") if x.strip()} | {1}))
    except ValueError:
        raise UsageError(f"--step-sizes must be integers separated by commas, e.g. 1,2,4,8 (got {step_sizes!r})") from None
    if sizes[0] < 1:
        raise UsageError(f"--step-sizes must be ≥ 1 (got {step_sizes!r})")
    threads = set_threads(threads)
    engine = load_engine(model)
    if llama_bench_path and not engine.loaded.source.endswith(".gguf"):
        raise UsageError("--llama-bench needs a GGUF model file (--model FILE.gguf)")
    result = speed_bench.run(engine, engine.loaded.source, threads, prefill, decode, rounds, llama_bench_path,
                             progress=lambda line: click.echo(line, err=True), step_sizes=sizes, depth=depth)
    result["context"] = collect(engine, threads, "speed", 0, decode, rounds)
    size = Path(engine.loaded.source).stat().st_size / 2**20 if Path(engine.loaded.source).is_file() else None
    from ..models.quantized import activation_summary
    click.echo(f"{engine.name} ({engine.loaded.weight_format}, activations {activation_summary(engine.model)}), "
               f"{threads} threads, {result['context']['cpu']}")
    click.echo(speed_bench.format_table(result, size))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
