"""`hasten models` (what is installed and cached) and `hasten make-model` (random-weight large shapes)."""
from __future__ import annotations

import json

import click

from .common import UsageError, user_errors, main


@main.command()
@user_errors
def models():
    """List the default model, the kernels this CPU runs, cached model metadata and available methods."""
    from .. import methods
    from ..kernels.cpu import kernel_description
    from ..kernels.formats import FORMATS
    from ..models.loading import DEFAULT_MODEL, cache_dir, default_gguf_path
    try:
        click.echo(f"default model: {DEFAULT_MODEL} ({default_gguf_path()})")
    except ModelLoadError as e:
        click.echo(f"default model: not installed — {e}")
    click.echo(f"kernels: {kernel_description()}; block formats: {', '.join(FORMATS)}")
    from ..models.quantized import DEFAULT_Q8
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
    from ..models.synthetic import TYPES, write_random_gguf
    if qtype not in TYPES:
        raise UsageError(f"--type {qtype} is not one of {', '.join(TYPES)}")
    path = write_random_gguf(out, shape, qtype, seed=seed)
    click.echo(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, random {shape} in {qtype})", err=True)
