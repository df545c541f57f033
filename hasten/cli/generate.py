"""`hasten generate`: one prompt, its answer streamed to stdout."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .common import (
    UsageError, user_errors, main, model_option, load_engine, threads_option, corpus_option, check_corpus,
    use_corpus, set_threads)


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
    from .. import methods
    from ..engine import validate_options
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
    from ..decoding.grammar import GrammarError, compile_grammar
    try:
        compile_grammar(fmt)
    except GrammarError as e:
        raise UsageError(f"--{'regex' if regex is not None else 'json-schema'}: {str(e).split(': ', 1)[-1]}") from None
    return fmt
