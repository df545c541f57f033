"""hasten's command line: generate | bench | models (and more as the project grows).

Bad input ends with one line on stderr naming the problem and the fix, and exit code 2 — never a traceback.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import click

from .bench.suite import QuestionsFileError
from .engine import GenerationError
from .methods import UnknownMethodError
from .models.kv import KVPolicyError
from .models.kv_cache import ContextOverflowError
from .models.loading import ModelLoadError
from .models.transformer import UnsupportedModelError
from .sparsity.corpus import CorpusError

USER_ERRORS = (ModelLoadError, UnsupportedModelError, GenerationError, UnknownMethodError, ContextOverflowError,
               QuestionsFileError, CorpusError, KVPolicyError)


class UsageError(ValueError):
    """Bad command-line input found by a command itself."""


def user_errors(fn):
    """Turn the library's user-facing errors into one line + exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS + (UsageError,) as e:
            click.echo(f"hasten: error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("hasten: interrupted", err=True)
            sys.exit(130)
    return wrapper


class _OneLineUsageError(click.ClickException):
    """click's own validation (a bad option value, a missing argument) shown as hasten's one line."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"hasten: error: {self.message}", err=True)


class _Group(click.Group):
    def resolve_command(self, ctx, args):
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["hasten.command"] = name
        return name, command, rest

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # raised while a command parses its arguments, before it runs
            command = ctx.meta.get("hasten.command")
            see = f"hasten {command} --help" if command else "hasten --help"
            raise _OneLineUsageError(f"{e.format_message()} (see `{see}`)") from None


def _kv_policy(ctx, _, value):
    from .models.kv import KVPolicyError, parse
    try:
        parse(value)
    except KVPolicyError as e:
        raise click.BadParameter(str(e)) from None
    ctx.meta["hasten.kv_policy"] = value
    return value


def model_option(fn):
    fn = click.option("--kv-policy", default=None, metavar="POLICY", expose_value=False, callback=_kv_policy,
                      help="which positions each layer's KV cache keeps: native (the model's own: Gemma 3's sliding "
                           "layers keep only their window), full, window:W,sinks:S, hybrid:global=every3,window=W,"
                           "sinks=S (LongGen); a window on full-attention layers is lossy [default: native]")(fn)
    fn = click.option("--kv-dtype", type=click.Choice(["f32", "f16"]), default=None, expose_value=False,
                      callback=lambda ctx, _, value: ctx.meta.__setitem__("hasten.kv_dtype", value),
                      help="the KV cache's dtype: f16 halves what a decode step at depth reads (llama.cpp's default "
                           "cache type; lossy: keys and values rounded once) [default: f32, exact]")(fn)
    fn = click.option("--activations", type=click.Choice(["q8", "f32"]), default=None, expose_value=False,
                      callback=lambda ctx, _, value: ctx.meta.__setitem__("hasten.activations", value),
                      help="block kernels' activations: q8 (int8 per 32 values, integer dot products) or f32 "
                           "[default: per format, see `hasten models`]")(fn)
    fn = click.option("--quantize", default=None, metavar="TYPE", expose_value=False,
                      callback=lambda ctx, _, value: ctx.meta.__setitem__("hasten.quantize", value),
                      help="a Hugging Face checkpoint's linear layers in this GGUF block format (q8_0, q4_0, q4_1, "
                           "q5_0, q5_1, q4_k, bf16, …), quantized once on load and cached [default: its own dtype]")(fn)
    return click.option("--model", "-m", default=None, metavar="PATH|HUB_ID",
                        help="GGUF file, Hugging Face checkpoint directory or hub id "
                             "[default: the embedded SmolLM2-135M-Instruct]")(fn)


def load_engine(model):
    """The engine for --model (and --quantize) of the running command."""
    from .engine import load
    meta = click.get_current_context().meta
    return load(model, quantize=meta.get("hasten.quantize"), activations=meta.get("hasten.activations"),
                kv_policy=meta.get("hasten.kv_policy"), kv_dtype=meta.get("hasten.kv_dtype"))


def threads_option(fn):
    return click.option("--threads", type=click.IntRange(min=1), default=None,
                        help="torch/numba threads [default: all cores]")(fn)


def corpus_option(fn):
    return click.option("--corpus", type=click.Path(), default=None,
                        help="calibration text for sparse methods (teal, cats, …): a file or a folder of "
                             ".txt/.md/.rst [default: Debian's Python docs]")(fn)


def check_corpus(corpus: str | None) -> None:
    if corpus is not None:
        from .sparsity.corpus import load as load_corpus
        load_corpus(corpus)


def use_corpus(engine, corpus: str | None) -> None:
    """Sparse methods built by this engine calibrate on `corpus` (cached per corpus like the default)."""
    if corpus is not None:
        from .sparsity.calibrate import DEFAULT_TOKENS
        engine.sparsity_calibration = (corpus, DEFAULT_TOKENS)


def set_threads(threads: int | None) -> int:
    import torch
    if threads:
        torch.set_num_threads(threads)
        try:
            import numba
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        except ImportError:
            pass
    return torch.get_num_threads()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="hasten")
def main():
    """hasten: faster LLM generation on your own hardware, every speedup measured.

    \b
    hasten generate "Write a haiku about CPUs" --chat      stream an answer
    hasten bench --methods baseline,prompt-lookup,hf        measure methods side by side
    hasten models                                           what is installed and cached
    """


@main.command()
@click.argument("prompt", required=False)
@model_option
@click.option("--method", default="baseline", show_default=True,
              help="decoding method, e.g. baseline, prompt-lookup, prompt-lookup:k=8+recycling (merge trees), 'prompt-lookup|recycling' (the first that drafts; quote the |) (see `hasten models`)")
@click.option("--chat/--no-chat", default=False, help="wrap PROMPT in the model's chat template as a user message")
@click.option("--max-new-tokens", "-n", type=int, default=256, show_default=True)
@click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 = greedy")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="1 = off")
@click.option("--seed", type=int, default=None, help="sampling seed (reproducible output)")
@click.option("--stop", multiple=True, help="stop string (repeatable)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object (text + statistics) instead of streaming")
@click.option("--json-schema", default=None, metavar="FILE|JSON",
              help="structured output: every token keeps the output valid for this JSON schema (a file or inline "
                   "JSON; '{}' = any JSON object)")
@click.option("--regex", default=None, help="structured output: the output matches this regular expression")
@corpus_option
@threads_option
@user_errors
def generate(prompt, model, method, chat, max_new_tokens, temperature, top_k, top_p, seed, stop, as_json, json_schema,
             regex, corpus, threads):
    """Generate a continuation of PROMPT (or stdin), streaming text to stdout and statistics to stderr."""
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("no prompt given; pass PROMPT as an argument or pipe it on stdin")
        prompt = sys.stdin.read()
    from . import methods
    from .engine import validate_options
    methods.parse(method)  # fail on a typo before spending seconds on loading
    validate_options(max_new_tokens, temperature, top_k, top_p)
    response_format = _response_format(json_schema, regex)
    set_threads(threads)
    check_corpus(corpus)  # a bad path fails before seconds of loading
    engine = load_engine(model)
    use_corpus(engine, corpus)
    run = engine.run(prompt, max_new_tokens=max_new_tokens, method=method, temperature=temperature, top_k=top_k,
                     top_p=top_p, seed=seed, stop=list(stop), chat=chat, response_format=response_format)
    for chunk in run:
        if chunk.text and not as_json:
            click.echo(chunk.text, nl=False)
    result = run.result
    if as_json:
        click.echo(json.dumps({"text": result.text, "token_ids": result.token_ids, **result.stats()}))
        return
    click.echo()
    s = result.stats()
    click.echo(f"[{s['method']}] {s['tokens']} tokens in {s['seconds']:.2f} s = {s['tokens_per_s']:.1f} tokens/s · "
               f"{s['target_passes']} target passes · mean accepted {s['mean_accepted']:.2f} · "
               f"draft {100 * s['draft_share']:.1f}% · {s['finish_reason']}"
               f"{_kv_note(s['kv_policy'], s['kv_lossy'])}", err=True)


def _kv_note(policy: str, lossy: bool) -> str:
    if policy == "native" and not lossy:
        return ""
    return f" · KV {policy}" + (" (lossy: vs the full f32 cache)" if lossy else "")


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
    from .bench import report, runner
    from .bench.context import collect
    from .bench.peers import PEERS
    from .bench.suite import load_questions
    from . import methods as registry
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
    from .engine import validate_options
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
    from .bench import long_suite
    from .bench.context import collect
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
    from .bench import report
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


def _response_format(json_schema: str | None, regex: str | None) -> dict | None:
    """--json-schema / --regex → an OpenAI-style response_format, checked before the model loads."""
    if json_schema is not None and regex is not None:
        raise UsageError("--json-schema and --regex both constrain the output; pass one of them")
    if json_schema is None and regex is None:
        return None
    if regex is not None:
        fmt = {"type": "regex", "regex": regex}
    else:
        text = Path(json_schema).read_text() if os.path.isfile(json_schema) else json_schema
        try:
            schema = json.loads(text)
        except ValueError:
            raise UsageError(f"--json-schema: {json_schema[:60]!r} is neither a file nor valid JSON") from None
        fmt = {"type": "json_object"} if schema == {} else {"type": "json_schema", "json_schema": {"schema": schema}}
    from .decoding.grammar import GrammarError, compile_grammar
    try:
        compile_grammar(fmt)
    except GrammarError as e:
        raise UsageError(f"--{'regex' if regex is not None else 'json-schema'}: {str(e).split(': ', 1)[-1]}") from None
    return fmt


@main.command()
@model_option
@click.option("--method", default="baseline", show_default=True, help="default decoding method (requests may override)")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--queue-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="requests waiting or running at once; more get 503 with Retry-After")
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="requests decoded together, one packed pass per step (the rest wait in the queue)")
@click.option("--step-tokens", type=click.IntRange(min=16), default=256, show_default=True,
              help="tokens scored per step at most, about: long prompts are prefilled in chunks within it so "
                   "running streams keep flowing; drafts shrink as the batch fills it")
@click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=None,
              help="MiB of KV kept for reuse by prompts sharing a prefix (a system prompt, an earlier turn); 0: off "
                   "[default: an eighth of this machine's memory, at most 4096]")
@click.option("--stream-interval", "stream_interval_ms", type=click.FloatRange(min=0), default=50, show_default=True,
              help="milliseconds a streamed event may wait to carry the next steps' tokens with it: fewer events "
                   "cost the client and the server less CPU; 0: one event per step (per token when not speculating)")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="above 1: that many replicas behind Ray Serve's router on a local Ray instance (the `ray` extra), "
                   "each with --threads threads [default 1 there]")
@corpus_option
@threads_option
@user_errors
def serve(model, method, host, port, queue_size, max_batch, step_tokens, prefix_cache_mb, stream_interval_ms, replicas,
          corpus, threads):
    """Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /."""
    import uvicorn

    from . import methods as registry
    from .serve.app import create_app
    registry.parse(method)
    check_corpus(corpus)  # a bad path fails before seconds of loading
    if prefix_cache_mb is None:
        from .decoding.prefix_cache import default_mb
        prefix_cache_mb = default_mb()
    if replicas > 1:
        from .serve import ray_serve
        meta = click.get_current_context().meta
        options = ray_serve.ReplicaOptions(model, method, queue_size, max_batch, step_tokens, prefix_cache_mb,
                                           threads or 1, corpus, meta.get("hasten.quantize"),
                                           meta.get("hasten.activations"), stream_interval_ms / 1000)
        try:
            ray_serve.require_ray()
        except RuntimeError as e:
            raise UsageError(str(e)) from None
        ray_serve.run(options, replicas, host, port, ready=lambda: click.echo(
            f"hasten: serving with {method} on {replicas} Ray Serve replicas at http://{host}:{port}", err=True))
        return
    set_threads(threads)
    engine = load_engine(model)
    use_corpus(engine, corpus)
    engine.drafter(method)  # build (and calibrate) the default method before taking requests
    click.echo(f"hasten: serving {engine.name} with {method} on http://{host}:{port}", err=True)
    app = create_app(engine, method, queue_size, max_batch, step_tokens, prefix_cache_mb, warm_up=True,
                     stream_interval=stream_interval_ms / 1000)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)


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
    from .bench import tune as tuner
    from .bench.suite import load_questions
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
    from .decoding.drafters.eagle import head_path
    from .decoding.drafters.head_training import train
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
    from .decoding.drafters.fast_draft import DraftTrainingError, draft_path, draft_shape, train
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
    from .bench.kv_quality import run
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

    from . import methods as registry
    from .sparsity.calibrate import SEQ_LEN, activation_stats, measured_sparsity
    from .sparsity.corpus import load as load_corpus
    from .sparsity.quality import method_quality
    names = registry.split_list(methods)
    from .sparsity.methods.base import check_sparsity
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
@user_errors
def models():
    """List the default model, the kernels this CPU runs, cached model metadata and available methods."""
    from . import methods
    from .kernels.cpu import kernel_description
    from .kernels.formats import FORMATS
    from .models.loading import DEFAULT_MODEL, cache_dir, default_gguf_path
    try:
        click.echo(f"default model: {DEFAULT_MODEL} ({default_gguf_path()})")
    except ModelLoadError as e:
        click.echo(f"default model: not installed — {e}")
    click.echo(f"kernels: {kernel_description()}; block formats: {', '.join(FORMATS)}")
    from .models.quantized import DEFAULT_Q8
    click.echo(f"activations (--activations q8|f32): q8 by default for {', '.join(sorted(DEFAULT_Q8)) or 'no format'}, "
               f"f32 for the rest")
    root = cache_dir() / "models"
    cached = sorted(p for p in root.glob("*") if (p / "done").exists()) if root.exists() else []
    click.echo(f"cached model metadata in {root} (config and tokenizer; weights stay in their files):" if cached
               else f"no cached model metadata in {root}")
    for p in cached:
        meta = json.loads((p / "meta.json").read_text())
        size = sum(f.stat().st_size for f in p.iterdir()) / 1e6
        click.echo(f"  {p.name}  {size:.1f} MB  from {meta['source']}")
    heads = sorted((cache_dir() / "eagle").glob("*.json"))
    for path in heads:  # trained draft heads (`hasten train-head`), by model hash
        summary = json.loads(path.read_text())
        click.echo(f"  eagle head {path.stem} for {summary.get('model')}: top-1 agreement "
                   f"{summary.get('heldout_top1', 'n/a')} on held-out chats")
    click.echo("methods:")
    for name, text in methods.available().items():
        click.echo(f"  {name:22s} {text}")


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

    from .bench import speed as speed_bench
    from .bench.context import collect
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
    from .models.quantized import activation_summary
    click.echo(f"{engine.name} ({engine.loaded.weight_format}, activations {activation_summary(engine.model)}), "
               f"{threads} threads, {result['context']['cpu']}")
    click.echo(speed_bench.format_table(result, size))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))


@main.command("make-model")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option("--shape", type=click.Choice(["llama3-1b", "llama3-3b", "llama3-8b"]), default="llama3-1b",
              show_default=True, help="Llama 3.2 1B / 3B or Llama 3.1 8B dimensions")
@click.option("--type", "qtype", default="Q4_K_M", show_default=True,
              help="Q4_K_M, Q5_K_M (llama.cpp's mixes) or one block format: F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K")
@click.option("--seed", type=int, default=0, show_default=True)
@user_errors
def make_model(out, shape, qtype, seed):
    """Write a random-weight GGUF of a real model shape to OUT, to measure speed and memory at that size.

    Speed and memory depend on shapes, not weights; acceptance rates and quality need real weights. The file
    loads in hasten and in llama.cpp alike (the default model's tokenizer, padded to the shape's vocabulary).
    """
    from .models.synthetic import TYPES, write_random_gguf
    if qtype not in TYPES:
        raise UsageError(f"--type {qtype} is not one of {', '.join(TYPES)}")
    path = write_random_gguf(out, shape, qtype, seed=seed)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, random {shape} in {qtype})", err=True)


if __name__ == "__main__":
    main()
