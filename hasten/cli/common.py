"""What every hasten command shares: the `main` group, one-line errors (exit 2), and the --model/--threads/--corpus
options with the helpers that act on them."""
from __future__ import annotations

import functools
import sys

import click

from ..bench.suite import QuestionsFileError
from ..engine import GenerationError
from ..methods import UnknownMethodError
from ..models.kv import KVPolicyError
from ..models.kv_cache import ContextOverflowError
from ..models.loading import ModelLoadError
from ..models.transformer import UnsupportedModelError
from ..sparsity.corpus import CorpusError

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
    from ..models.kv import KVPolicyError, parse
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
    from ..engine import load
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
        from ..sparsity.corpus import load as load_corpus
        load_corpus(corpus)


def use_corpus(engine, corpus: str | None) -> None:
    """Sparse methods built by this engine calibrate on `corpus` (cached per corpus like the default)."""
    if corpus is not None:
        from ..sparsity.calibrate import DEFAULT_TOKENS
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
