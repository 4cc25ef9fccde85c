"""The copy guard: a row never emits an n-gram (n tokens) that copies one of its own in-context
examples, decided on the device inside the decode step.

    generate(lm, prompts, ..., copy_guard=CopyGuard(n=8, sources=[[ex1, ex2], [ex3], ...]))
    divgen synth TASK --copy-guard 8          # task files: copy_guard: 8

At admission each row gets a table of the token n-grams of its sources (``ngram_table``), padded
to one width T per run: [S, T, n] int64 per slot, padding −1. The decode state also keeps each
row's last n − 1 tokens (``hist`` [S, n − 1], starting with the prompt's tail; padding −2). At
every step, before sampling, ``ban_copies`` compares ``hist`` with every table row's first n − 1
tokens and sets the logit of each matching row's n-th token to −inf. Fixed shapes, no host
sync: the step stays compilable and capturable. After sampling, ``push`` appends the new token.

A −inf in the own row removes the token from the row's candidates (the α cut keeps finite
logits only). In a contrasting row it goes through the mask rule (``divgen.kernels.reference``):
the term of that row is dropped for that token, so a banned token never attracts another row.

Which token sequences count as a copy: each source text tokenized as it stands and after a
space (a copy in mid-text starts with " word"). A copy that the model spells with other token
boundaries (non-canonical tokenization) is not caught; ``divgen metrics``' word-level copy rate
measures what is left.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from divgen.engine import limits
from divgen.engine.errors import DivgenError

PAD_TABLE = -1      # table padding: never equals a token (hist never holds -1)
PAD_HIST = -2       # history padding (prompt shorter than n - 1): never equals a table entry


@dataclass(frozen=True)
class CopyGuard:
    """What ``generate`` guards: n-grams of n tokens, and for each prompt row the texts (or
    token-id lists) it must not copy (an empty list: nothing to guard in that row)."""

    n: int
    sources: Sequence[Sequence]

    def check(self, rows: int) -> None:
        if limits.copy_guard(self.n, "copy_guard.n") < 2:
            raise DivgenError("copy_guard.n must be at least 2 tokens (pass copy_guard=None for no guard)")
        if len(self.sources) != rows:
            raise DivgenError(f"copy_guard has sources for {len(self.sources)} rows but {rows} prompts were "
                              "given: give one list of texts per prompt")


def source_tokens(lm, source) -> list[list[int]]:
    """The token sequences a source counts as: a token-id list as given; a text tokenized as it
    stands and after a space (no special tokens)."""
    if not isinstance(source, str):
        return [[int(t) for t in source]]
    text = source.strip()
    if not text:
        return []
    enc = lambda s: list(lm.tokenizer(s, add_special_tokens=False)["input_ids"])   # noqa: E731
    return [enc(text), enc(" " + text)]


def ngram_table(lm, sources: Sequence, n: int) -> list[tuple[int, ...]]:
    """The distinct n-grams of a row's sources, in first-seen order."""
    seen: dict[tuple[int, ...], None] = {}
    for source in sources:
        for ids in source_tokens(lm, source):
            for i in range(len(ids) - n + 1):
                seen.setdefault(tuple(ids[i:i + n]), None)
    return list(seen)


def ban_copies(logits: torch.Tensor, table: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """logits [R, V] with −inf at every token that would complete an n-gram of the row's table
    after its last n − 1 tokens, in place. table [R, T, n] int64 (padding −1), hist [R, n − 1]
    int64. Fixed shapes, no host sync, no [R, V] temporary (capturable)."""
    match = (table[:, :, :-1] == hist[:, None, :]).all(dim=-1)                # [R, T]
    idx = torch.where(match, table[:, :, -1], 0)                              # [R, T] (0: no match)
    ban = torch.where(match, float("-inf"), float("inf")).to(logits.dtype)    # +inf: leave as is
    # in place, as a min: order-free, and no copy of the [R, V] logits
    return logits.scatter_reduce_(1, idx, ban, reduce="amin", include_self=True)


def push(hist: torch.Tensor, new: torch.Tensor, active: torch.Tensor) -> None:
    """Append each active row's new token to its history, in place."""
    shifted = torch.cat([hist[:, 1:], new[:, None]], dim=1)
    hist.copy_(torch.where(active[:, None], shifted, hist))


class GuardState(nn.Module):
    """The guard's per-slot device state (buffers; see the module docstring). Built per run: T
    is the run's widest table, rounded up to a power of two (fewer shapes to compile)."""

    def __init__(self, slots: int, n: int, width: int, device):
        super().__init__()
        width = 1 << max(0, int(width) - 1).bit_length()
        self.n = n
        self.register_buffer("table", torch.full((slots, width, n), PAD_TABLE, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("hist", torch.full((slots, n - 1), PAD_HIST, dtype=torch.int64, device=device),
                             persistent=False)

    def admit(self, slots: list[int], tables: list[list[tuple[int, ...]]], prompts: list[list[int]]) -> None:
        """Fill the admitted slots: their n-gram tables and the tails of their prompts."""
        n, width = self.n, self.table.shape[1]
        table = torch.full((len(slots), width, n), PAD_TABLE, dtype=torch.int64)
        hist = torch.full((len(slots), n - 1), PAD_HIST, dtype=torch.int64)
        for i, (grams, prompt) in enumerate(zip(tables, prompts)):
            if grams:
                table[i, : len(grams)] = torch.tensor(grams, dtype=torch.int64)
            tail = prompt[-(n - 1):]
            hist[i, n - 1 - len(tail):] = torch.tensor(tail, dtype=torch.int64)
        from divgen.kernels.plan import stage     # one packed copy (pinned, non-blocking on CUDA)

        idx, table_d, hist_d = stage([slots, table, hist], torch.int64, self.table.device)
        self.table[idx] = table_d.view(table.shape)
        self.hist[idx] = hist_d.view(hist.shape)

    def view(self, rows: int) -> "GuardView":
        return GuardView(self.table[:rows], self.hist[:rows])


@dataclass
class GuardView:
    """The first rows of a GuardState (views: in-place updates land in the state)."""

    table: torch.Tensor
    hist: torch.Tensor


def build_tables(lm, guard: CopyGuard, rows: Sequence[int]) -> dict[int, list[tuple[int, ...]]]:
    """Each listed row's n-gram table (host side, once per run)."""
    return {r: ngram_table(lm, guard.sources[r], guard.n) for r in rows}
