"""`hasten serve` scaled out on Ray Serve: replicas of the same OpenAI-compatible app behind Ray's HTTP proxy and
router (the optional extra: `pip install 'hasten[ray]'`).

Each replica is one process with its own engine, scheduler and prefix cache (serve/app.py, built on the replica by
Ray's ingress builder); Ray's proxy routes each request to a replica, streaming included. Nothing here balances
load by itself. Two ways to run it:

    hasten serve --replicas 2 --threads 1                 # a local Ray instance, on --host/--port
    serve run hasten.serve.ray_serve:build_app model=F replicas=2 threads=1   # Ray's own CLI, on a cluster

Because hasten's answers do not depend on what else is running (the scheduler's batch invariance), every replica
gives a request the same answer: a client cannot tell which one served it.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class ReplicaOptions:
    """What every replica is built with: `hasten serve`'s options."""
    model: str | None = None  # a GGUF / Hugging Face path; None: the embedded default model
    method: str = "baseline"
    queue_size: int = 16
    max_batch: int = 8
    step_tokens: int = 256
    prefix_cache_mb: float = 256
    threads: int = 1  # torch threads per replica, and the CPUs Ray reserves for it
    corpus: str | None = None  # sparse methods calibrate on it
    quantize: str | None = None  # a Hugging Face checkpoint's block format (hasten --quantize)
    activations: str | None = None  # "q8" | "f32" (hasten --activations)
    stream_interval: float = 0.05  # seconds a streamed event may wait for later steps (hasten serve --stream-interval)


def require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise RuntimeError("--replicas needs Ray Serve: pip install 'hasten[ray]' (or `pip install \"ray[serve]\"`)") from None
    return serve


def application(options: ReplicaOptions, replicas: int = 2):
    """A Ray Serve application: `replicas` copies of hasten's app, each loading the model on its own replica."""
    if replicas < 1:
        raise ValueError(f"replicas must be ≥ 1 (got {replicas})")
    serve = require_ray()
    values = asdict(options)

    def build():  # runs on each replica, in its own process
        import torch

        from ..engine import load
        from .app import create_app
        opts = ReplicaOptions(**values)
        torch.set_num_threads(opts.threads)
        engine = load(opts.model, quantize=opts.quantize, activations=opts.activations)
        if opts.corpus:
            from ..sparsity.calibrate import DEFAULT_TOKENS
            engine.sparsity_calibration = (opts.corpus, DEFAULT_TOKENS)
        engine.drafter(opts.method)  # build (and calibrate) the default method before taking requests
        return create_app(engine, opts.method, opts.queue_size, opts.max_batch, opts.step_tokens,
                          opts.prefix_cache_mb, warm_up=True, stream_interval=opts.stream_interval)

    replica = serve.deployment(serve.ingress(build)(), name="hasten", num_replicas=replicas,
                               ray_actor_options={"num_cpus": options.threads},
                               max_ongoing_requests=options.queue_size + options.max_batch)
    return replica.bind()


def build_app(args: dict):
    """For Ray's CLI: `serve run hasten.serve.ray_serve:build_app model=F replicas=2 threads=1 ...`; keys are
    ReplicaOptions' fields plus `replicas`."""
    args = dict(args)
    replicas = int(args.pop("replicas", 2))
    known = {f.name: f.type for f in fields(ReplicaOptions)}
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; use {', '.join(['replicas', *known])}")
    casts = {"queue_size": int, "max_batch": int, "step_tokens": int, "threads": int, "prefix_cache_mb": float,
             "stream_interval": float}
    return application(ReplicaOptions(**{k: casts.get(k, str)(v) for k, v in args.items()}), replicas)


def run(options: ReplicaOptions, replicas: int, host: str, port: int, ready=None) -> None:
    """Start a local Ray instance (CPUs: replicas × threads), deploy the replicas on host:port and serve until
    interrupted. `ready()` is called once every replica answers."""
    serve = require_ray()
    import signal

    import ray

    def stop(signum, frame):  # SIGTERM ends like Ctrl-C: the replicas and the local Ray instance are shut down
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)
    ray.init(num_cpus=replicas * options.threads, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True, runtime_env={"env_vars": _forwarded_env()})
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(options, replicas), name="hasten", route_prefix="/")
        if ready is not None:
            ready()
        import time
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _forwarded_env() -> dict:
    """The environment replicas need to find what this process found (the model cache, the kernels' build)."""
    return {k: v for k, v in os.environ.items() if k in ("XDG_CACHE_HOME", "HF_HOME", "OMP_NUM_THREADS")}
