"""The KV-policy quality tool: the full cache against itself is perfect, a window as long as the stream equals it,
a short window costs KL and saves memory; and the command runs end to end on a corpus file."""
import torch

from hasten.bench.kv_quality import measure, policies_for
from tests.conftest import tiny_model


def test_measure_ranks_policies_against_the_full_cache():
    model = tiny_model(0, vocab_size=64, scale=1.0)
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 64, (301,), generator=g).tolist()
    results = measure(model, ["full", "window:400,sinks:0", "window:8,sinks:2", "hybrid:global=every2,window=8,sinks=2",
                              "full + f16"], [stream], decode_tokens=2)
    full, wide, short, hybrid, half = results
    assert full.top1_agreement == 1.0 and full.mean_kl == 0.0 and not full.lossy and full.tokens == 300
    # a window longer than the stream: the same attention (another kernel, kernels/attention_window.h: rounding)
    assert abs(wide.perplexity - full.perplexity) < 1e-5 * full.perplexity and abs(wide.mean_kl) < 1e-6
    assert short.lossy and short.mean_kl > 1e-3 and short.top1_agreement < 1.0
    assert short.kv_bytes < hybrid.kv_bytes < full.kv_bytes
    assert all(r.decode_ms > 0 for r in results)
    # the full cache in fp16: lossy, half the bytes, a tiny KL
    assert half.lossy and half.kv_bytes * 2 == full.kv_bytes and 0 < half.mean_kl < 1e-3
    assert policies_for([16, 32], 4) == ["full", "full + f16", "window:16,sinks:4", "hybrid:global=every3,window=16,sinks=4",
                                          "window:32,sinks:4", "hybrid:global=every3,window=32,sinks=4"]
