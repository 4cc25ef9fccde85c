"""The prompt cache (divgen.engine.prefix_cache) on its own: longest-prefix lookup against a brute
force over every entry, LRU eviction within the budget, invalidation by the weights' fingerprint,
and the budget's one-line error."""
import random

import pytest
import torch

from divgen.engine.errors import DivgenError
from divgen.engine.prefix_cache import PrefixCache, budget_bytes, weights_fingerprint


def _kv(n, fill=0.0):
    return torch.full((2, 1, n, 4), fill), torch.full((2, 1, n, 4), -fill)


def _lcp(a, b):
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return i


@pytest.mark.parametrize("seed", range(25))
def test_match_finds_the_longest_shared_prefix_of_any_entry(seed):
    rng = random.Random(seed)
    cache = PrefixCache(1 << 30)
    stored = []
    for _ in range(rng.randrange(0, 12)):
        t = [rng.randrange(3) for _ in range(rng.randrange(1, 9))]
        cache.store(t, *_kv(len(t)))
        stored.append(tuple(t))
    for _ in range(20):
        q = [rng.randrange(3) for _ in range(rng.randrange(0, 10))]
        key, m = cache.match(q)
        best = max((_lcp(s, q) for s in stored), default=0)
        assert m == best
        assert (key is None) == (best == 0)
        if key is not None:
            assert _lcp(key, q) == m


def test_load_copies_the_positions_asked_and_counts_them():
    cache = PrefixCache(1 << 20)
    k = torch.arange(2 * 1 * 6 * 4, dtype=torch.float32).view(2, 1, 6, 4)
    cache.store([5, 6, 7, 8, 9, 1], k, -k)
    kc, vc = torch.zeros(2, 3, 1, 10, 4), torch.zeros(2, 3, 1, 10, 4)
    key, m = cache.match([5, 6, 7, 2])
    assert m == 3
    cache.load(key, m, kc, vc, slot=1, begin=1)
    assert torch.equal(kc[:, 1, :, 1:3], k[:, :, 1:3]) and torch.equal(vc[:, 1, :, 1:3], -k[:, :, 1:3])
    assert kc[:, 1, :, 0].abs().sum() == 0 and kc[:, 1, :, 3:].abs().sum() == 0 and kc[:, [0, 2]].abs().sum() == 0
    assert cache.reused_tokens == 2


def test_least_recently_used_entries_go_first_and_the_budget_holds():
    one = 2 * 2 * 1 * 5 * 4 * 4                    # bytes of a 5-token entry (k and v)
    cache = PrefixCache(3 * one)
    for i in range(3):
        assert cache.store([i] * 5, *_kv(5))
    kc = torch.zeros(2, 1, 1, 8, 4)
    cache.load(*cache.match([0] * 5), kc, kc.clone(), slot=0)                  # entry 0 used last
    assert cache.store([7] * 5, *_kv(5))            # evicts entry 1, the least recently used
    assert set(cache.entries) == {(0,) * 5, (2,) * 5, (7,) * 5} and cache.used == 3 * one
    assert cache.keys == sorted(cache.entries)
    assert not cache.store([9] * 20, *_kv(20))      # larger than the whole budget: not kept
    assert not cache.store([2] * 5, *_kv(5))        # already there
    assert cache.used <= cache.budget


def test_a_change_of_the_weights_empties_it():
    lin = torch.nn.Linear(3, 3)
    cache = PrefixCache(1 << 20)
    cache.validate(weights_fingerprint(lin))
    cache.store([1, 2], *_kv(2))
    cache.validate(weights_fingerprint(lin))
    assert cache.match([1, 2])[1] == 2
    with torch.no_grad():
        lin.weight.mul_(2)                          # in place: the version counter moves
    cache.validate(weights_fingerprint(lin))
    assert cache.match([1, 2]) == (None, 0) and cache.used == 0


def test_the_budget_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("DIVGEN_PREFIX_CACHE_MB", raising=False)
    assert budget_bytes() == 128 << 20
    monkeypatch.setenv("DIVGEN_PREFIX_CACHE_MB", "0.5")
    assert budget_bytes() == 1 << 19
    monkeypatch.setenv("DIVGEN_PREFIX_CACHE_MB", "lots")
    with pytest.raises(DivgenError, match="DIVGEN_PREFIX_CACHE_MB='lots' is not a size in MiB"):
        budget_bytes()
