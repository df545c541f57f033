import torch

from tests.conftest import tiny_model


def test_cache_after_keep_equals_cache_built_from_accepted_tokens():
    """Score a tree, keep one path: the cache equals one built from scratch on the accepted tokens."""
    model = tiny_model(5)
    prompt = torch.randint(0, 97, (1, 12))
    accepted = [11, 42, 17]
    with torch.inference_mode():
        cache = model.new_cache(64)
        model(prompt, cache=cache)
        start = cache.length
        # root 11 with children 3 (rejected) and 42 (kept), then 42 → 17 (kept) and 42 → 9 (rejected)
        tokens = torch.tensor([[11, 3, 42, 17, 9]])
        parents = [-1, 0, 0, 2, 2]
        mask = torch.zeros(5, start + 5, dtype=torch.bool)
        mask[:, :start] = True
        for i in range(5):
            j = i
            while j >= 0:
                mask[i, start + j] = True
                j = parents[j]
        model(tokens, torch.tensor([0, 1, 1, 2, 2]) + start, cache, mask)
        cache.keep(start, torch.tensor([0, 2, 3]))
        fresh = model.new_cache(64)
        model(torch.cat([prompt, torch.tensor([accepted])], 1), cache=fresh)
    assert cache.length == fresh.length == 15
    assert torch.allclose(cache.k[:, :, :, :15], fresh.k[:, :, :, :15], atol=1e-5)
    assert torch.allclose(cache.v[:, :, :, :15], fresh.v[:, :, :, :15], atol=1e-5)


def test_rollback_then_rewrite_equals_fresh():
    model = tiny_model(6)
    ids = torch.randint(0, 97, (1, 20))
    with torch.inference_mode():
        cache = model.new_cache(32)
        model(ids, cache=cache)
        cache.rollback(5)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        fresh = model.new_cache(32)
        model(torch.cat([ids[:, :15], torch.tensor([[1, 2, 3]])], 1), cache=fresh)
    assert cache.length == 18
    assert torch.allclose(cache.k[:, :, :, :18], fresh.k[:, :, :, :18], atol=1e-5)
