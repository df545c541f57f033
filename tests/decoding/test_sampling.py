import torch

from hasten.decoding.sampling import SamplingConfig, probabilities


def test_top_p_keeps_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.7))
    assert torch.allclose(p, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)


def test_top_k_and_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    p = probabilities(logits, SamplingConfig(temperature=0.5, top_k=2))
    expected = torch.softmax(torch.tensor([4.0, 2.0]), 0)
    assert torch.allclose(p[:2], expected) and p[2:].sum() == 0
