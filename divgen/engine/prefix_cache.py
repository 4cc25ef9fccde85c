"""The K/V of prompt prefixes, kept across admissions and ``generate`` calls (the engine's prompt
cache; vLLM calls its version automatic prefix caching).

A prompt's keys and values at positions [0, m) depend only on its first m tokens (causal
attention), so a later prompt that starts with the same m tokens can take a copy of them instead of
computing them again: the few-shot header every group of a synth job shares, a chat template's
system turn, or the same prompts asked again (n samples per prompt, a benchmark's repeats).

    cache = PrefixCache(budget_bytes)
    cache.validate(fingerprint)        # a change of the weights empties it
    key, m = cache.match(tokens)       # the longest cached prefix of tokens: m positions
    cache.load(key, m, k, v, slot, begin)   # copy positions [begin, m) into a cache slot
    cache.store(tokens, k_slot, v_slot)     # keep a copy of a computed prompt's K/V

Entries are whole computed sequences (a prompt body, or the common prefix of an admission),
sorted by their tokens, so the entry sharing the longest prefix with a query is one of the two
next to the query's place in that order (``bisect``). Least recently used entries are dropped to
stay within the budget (``DIVGEN_PREFIX_CACHE_MB``, default 128; 0 turns the cache off).
"""
from __future__ import annotations

import bisect
import os

import torch

DEFAULT_MB = 128


def budget_bytes() -> int:
    """The cache's budget from ``DIVGEN_PREFIX_CACHE_MB`` (MiB, default 128; 0: no cache)."""
    value = os.environ.get("DIVGEN_PREFIX_CACHE_MB", "")
    if not value:
        return DEFAULT_MB << 20
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if mb < 0:
        from divgen.engine.errors import DivgenError

        raise DivgenError(f"DIVGEN_PREFIX_CACHE_MB={value!r} is not a size in MiB: use a number >= 0 (0 turns "
                          "the prompt cache off), or unset it")
    return int(mb * (1 << 20))


def weights_fingerprint(module: torch.nn.Module) -> tuple:
    """Where a module's weights live and how often they were changed in place (inference tensors
    keep no version counter and cannot be changed outside inference mode)."""
    return tuple((p.data_ptr(), -1 if p.is_inference() else p._version) for p in module.parameters())


def _common(a: tuple, b: tuple) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Copies of computed prompts' K/V ([layers, KVH, T, hd] each), looked up by longest prefix."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.keys: list[tuple] = []               # sorted
        self.entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last_use: dict[tuple, int] = {}
        self.used = 0
        self.clock = 0
        self.fingerprint = None
        self.reused_tokens = 0                    # positions copied instead of computed, since created

    def __deepcopy__(self, memo):
        return PrefixCache(self.budget)

    def clear(self) -> None:
        self.keys.clear()
        self.entries.clear()
        self.last_use.clear()
        self.used = 0

    def validate(self, fingerprint) -> None:
        """Empty the cache when the weights it was computed with changed."""
        if fingerprint != self.fingerprint:
            self.clear()
            self.fingerprint = fingerprint

    def match(self, tokens) -> tuple[tuple | None, int]:
        """(the entry sharing the longest prefix with ``tokens``, that prefix's length); (None, 0)
        when no entry shares a token."""
        t = tuple(tokens)
        i = bisect.bisect_left(self.keys, t)
        best, m = None, 0
        for j in (i - 1, i):
            if 0 <= j < len(self.keys):
                n = _common(self.keys[j], t)
                if n > m:
                    best, m = self.keys[j], n
        return best, m

    def load(self, key: tuple, m: int, k: torch.Tensor, v: torch.Tensor, slot: int, begin: int = 0) -> None:
        """Copy positions [begin, m) of entry ``key`` into ``slot`` of the engine's caches k, v
        [layers, S, KVH, L, hd]."""
        ek, ev = self.entries[key]
        k[:, slot, :, begin:m] = ek[:, :, begin:m]
        v[:, slot, :, begin:m] = ev[:, :, begin:m]
        self.clock += 1
        self.last_use[key] = self.clock
        self.reused_tokens += m - begin

    def store(self, tokens, k_slot: torch.Tensor, v_slot: torch.Tensor) -> bool:
        """Keep a copy of the K/V [layers, KVH, len(tokens), hd] computed for ``tokens``; False when
        it is larger than the budget (or already there: then it counts as used)."""
        t = tuple(tokens)
        self.clock += 1
        if t in self.entries:
            self.last_use[t] = self.clock
            return False
        size = 2 * k_slot.numel() * k_slot.element_size()
        if not t or size > self.budget:
            return False
        while self.used + size > self.budget:
            oldest = min(self.last_use, key=self.last_use.get)
            ek, ev = self.entries.pop(oldest)
            del self.last_use[oldest]
            self.keys.pop(bisect.bisect_left(self.keys, oldest))
            self.used -= ek.numel() * ek.element_size() + ev.numel() * ev.element_size()
        self.entries[t] = (k_slot.clone(), v_slot.clone())
        self.last_use[t] = self.clock
        bisect.insort(self.keys, t)
        self.used += size
        return True
