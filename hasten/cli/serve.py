"""`hasten serve`: the OpenAI-compatible server."""
from __future__ import annotations

import click

from .common import (
    UsageError, user_errors, main, model_option, load_engine, threads_option, corpus_option, check_corpus,
    use_corpus, set_threads)


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

    from .. import methods as registry
    from ..serve.app import create_app
    registry.parse(method)
    check_corpus(corpus)  # a bad path fails before seconds of loading
    if prefix_cache_mb is None:
        from ..decoding.prefix_cache import default_mb
        prefix_cache_mb = default_mb()
    if replicas > 1:
        from ..serve import ray_serve
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
