"""What hasten trains per model: `tune` (the method search), `train-head`, `train-draft`."""
from __future__ import annotations

import click

from .common import (
    UsageError, user_errors, main, model_option, load_engine, threads_option, check_corpus, set_threads)


@main.command()
@model_option
@click.option("--questions", type=click.Path(dir_okay=False), default=None,
              help="a sample of your prompts, Spec-Bench JSONL [default: hasten's suite]")
@click.option("--per-category", type=int, default=2, show_default=True,
              help="prompts per category of the sample (the first of each screens every configuration; finalists "
                   "run on all)")
@click.option("--budget", type=click.IntRange(min=10), default=600, show_default=True, help="seconds for the search")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=64, show_default=True)
@threads_option
@user_errors
def tune(model, questions, per_category, budget, max_new_tokens, threads):
    """Search methods × parameters by wall clock on a sample; save the fastest lossless one for --method auto."""
    from ..bench import tune as tuner
    from ..bench.suite import load_questions
    qs = load_questions(questions, per_category)
    set_threads(threads)
    engine = load_engine(model)
    profile = tuner.tune(engine, qs, budget, max_new_tokens)
    for r in profile["ranking"]:
        status = "identical" if r["identical"] else "DIFFERS (excluded)"
        click.echo(f"  {r['method']:40s} {r['speedup']:.2f}x  {status}  ({r['passes']} pass{'es' * (r['passes'] > 1)})")
    if profile["skipped_for_budget"]:
        click.echo(f"  not tried within the budget: {', '.join(profile['skipped_for_budget'])}")
    if profile.get("note"):
        click.echo(f"  {profile['note']}")
    click.echo(f"best: {profile['best']} → saved {tuner.save(engine, profile)} (use --method auto)")


@main.command("train-head")
@model_option
@click.option("--corpus", type=click.Path(), default=None,
              help="text whose target predictions the head learns: a file or a folder of .txt/.md/.rst "
                   "[default: Debian's Python docs]")
@click.option("--tokens", type=click.IntRange(min=256), default=65_536, show_default=True,
              help="corpus tokens to learn from")
@click.option("--chat-samples", type=click.IntRange(min=0), default=2048, show_default=True,
              help="self-distilled chat answers to learn from (the target writes a question, then answers it; "
                   "kept in the cache for the next train-head)")
@click.option("--hidden", type=click.IntRange(min=16), default=1024, show_default=True, help="the head's MLP width")
@click.option("--vocab", type=click.IntRange(min=16), default=4096, show_default=True,
              help="how many of the most frequent output tokens the head can draft")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="HASS context alignment: train this many draft steps in a row on the head's own features "
                   "(1 = EAGLE's training)")
@click.option("--top-k", type=click.IntRange(min=0), default=10, show_default=True,
              help="HASS objective distillation: also learn the target's distribution over its top-K tokens (0: off)")
@click.option("--heads", type=click.IntRange(min=0), default=3, show_default=True,
              help="blockwise heads to train on the same data (`--method blockwise`: k tokens drafted at once; 0: none)")
@threads_option
@user_errors
def train_head(model, corpus, tokens, chat_samples, hidden, vocab, epochs, steps, top_k, heads, threads):
    """Train the draft head behind `--method eagle` once for a model (cached).

    EAGLE-style: a small MLP learns to predict the target's next final-layer feature from its current one and the
    next token, and so the token after next. It learns from the target's own predictions over corpus text and over
    answers the target writes to questions it writes itself, so nothing is downloaded. Takes ~30 minutes for the
    default model on a 2-core CPU, most of it writing the chats (cached: a second run with other --hidden or
    --epochs takes minutes); prints the held-out top-1 agreement with the target, per draft depth, at the end.
    Trained the HASS way by default (--steps 3 --top-k 10); --steps 1 --top-k 0 is EAGLE's original training.
    """
    from ..decoding.drafters.eagle import head_path
    from ..decoding.drafters.head_training import train
    check_corpus(corpus)
    set_threads(threads)
    engine = load_engine(model)
    summary = train(engine, tokens, chat_samples, hidden, vocab, epochs, corpus=corpus, steps=steps, top_k=top_k,
                    heads=heads)
    for key, value in summary.items():
        click.echo(f"  {key:20s} {value}")
    click.echo(f"saved {head_path(engine)} (use --method eagle, or 'prompt-lookup|eagle')"
               + (", and blockwise heads (--method blockwise)" if heads else ""))


@main.command("train-draft")
@model_option
@click.option("--corpus", type=click.Path(), default=None,
              help="text for stage 1 (next-token pre-training): a file or a folder of .txt/.md/.rst "
                   "[default: Debian's Python docs]")
@click.option("--tokens", type=click.IntRange(min=256), default=131_072, show_default=True,
              help="corpus tokens to pre-train on")
@click.option("--chat-samples", type=click.IntRange(min=0), default=512, show_default=True,
              help="self-written chats for stage 2 (the target writes a question, then answers it; the draft "
                   "learns its top-K there; cached and shared with train-head; 0: stage 1 only)")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="optimizer steps in all [default: 1000 unless --minutes is given]")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="wall-clock budget for the whole run; training stops when it is spent (or at --steps)")
@click.option("--hidden", type=click.IntRange(min=32), default=256, show_default=True,
              help="the draft's width (a multiple of 32)")
@click.option("--layers", type=click.IntRange(min=1), default=4, show_default=True, help="the draft's layers")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="stage 2 learns the target's distribution over its K most likely tokens")
@click.option("--type", "qtype", type=click.Choice(["Q8_0", "F16", "F32"]), default="Q8_0", show_default=True,
              help="the draft file's weight type")
@click.option("--seed", type=int, default=0, show_default=True, help="same seed and --steps: the same file, bit for bit")
@threads_option
@user_errors
def train_draft(model, corpus, tokens, chat_samples, steps, minutes, hidden, layers, top_k, qtype, seed, threads):
    """Train a small draft model for a target once (FastDraft; cached), for `--method fastdraft`.

    A Llama of --hidden width and --layers layers with the target's tokenizer, its embedding started from the
    target's (PCA), learns in two stages: next-token prediction on corpus text, then the target's own top-K
    distributions on chats the target writes itself (so nothing is downloaded). Interrupted, it resumes from its
    last checkpoint (every 50 steps) when run again with the same options. Prints the held-out top-1 agreement
    with the target and τ (tokens per target pass) of a 4-token chain; the file is
    $XDG_CACHE_HOME/hasten/fastdraft/<target hash>.gguf, usable as `--method fastdraft` or `draft-model:FILE`.
    """
    import time
    started = time.perf_counter()
    from ..decoding.drafters.fast_draft import DraftTrainingError, draft_path, draft_shape, train
    check_corpus(corpus)
    set_threads(threads)
    engine = load_engine(model)
    try:
        draft_shape(engine.model.config, hidden, layers)
        if minutes is not None:  # loading counts against the budget the user gave
            minutes = max(minutes - (time.perf_counter() - started) / 60, 1e-3)
        summary = train(engine, corpus, tokens, chat_samples, hidden, layers, steps, minutes, top_k, seed, qtype)
    except DraftTrainingError as e:
        raise UsageError(str(e)) from None
    for key, value in summary.items():
        click.echo(f"  {key:22s} {value}")
    click.echo(f"saved {draft_path(engine)} (use --method fastdraft, or draft-model:{draft_path(engine)})")
