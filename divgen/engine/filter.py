"""``divgen filter``: remove the rows of a synthetic set that should not train a classifier.

Each row is tested in this order and removed for the first reason that applies:

1. ``degenerate``     — under ``min_words`` whitespace words, or only a label phrase
                        (``metrics.is_degenerate``: "World news:", "Business.");
2. ``copy``           — shares a ``copy_n``-word sequence with an in-context example its own prompt
                        showed (``metrics.is_copy``; rows whose record does not name its examples
                        are not checked, and the report says how many);
3. ``duplicate``      — the same text as an earlier kept row (case and whitespace ignored);
4. ``near_duplicate`` — Jaccard similarity ≥ ``near_threshold`` (default 0.6) between the sets of
                        word 2-grams (the word set for one-word texts) of this row and an earlier
                        kept row; one word changed in a 16-word text leaves 0.76, in a 10-word text
                        0.64;
5. ``judge``          — the judge (``eval.judge.Judge``, trained on real pool rows) assigns the
                        text to another label (only when a judge is given).

Rows keep their order; the kept ones are written unchanged.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from divgen.engine.errors import DivgenError
from divgen.engine.metrics import (
    DEFAULT_COPY_N, DEFAULT_MIN_WORDS, is_copy, is_degenerate, label_phrase_set, words,
)

REASONS = ("degenerate", "copy", "duplicate", "near_duplicate", "judge")
DEFAULT_NEAR_THRESHOLD = 0.6


@dataclass(frozen=True)
class FilterConfig:
    degenerate: bool = True
    copies: bool = True
    duplicates: bool = True
    near_duplicates: bool = True
    min_words: int = DEFAULT_MIN_WORDS
    copy_n: int = DEFAULT_COPY_N
    near_threshold: float = DEFAULT_NEAR_THRESHOLD

    def check(self) -> None:
        if self.min_words < 0:
            raise DivgenError(f"--min-words must be >= 0, got {self.min_words}")
        if self.copy_n < 1:
            raise DivgenError(f"--copy-n must be >= 1, got {self.copy_n}")
        if not 0 < self.near_threshold <= 1:
            raise DivgenError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")


@dataclass
class FilterReport:
    kept: list[int] = field(default_factory=list)                 # row positions kept, in order
    removed: list[tuple[int, str, object]] = field(default_factory=list)  # (position, reason, detail)
    copy_unchecked: int = 0                                       # rows whose examples are unknown

    def counts(self) -> dict[str, int]:
        c = Counter(reason for _, reason, _ in self.removed)
        return {r: c.get(r, 0) for r in REASONS}

    def summary(self, total: int) -> str:
        parts = ", ".join(f"{r.replace('_', '-')} {n}" for r, n in self.counts().items())
        line = f"kept {len(self.kept)} of {total}; removed {len(self.removed)}: {parts}"
        if self.copy_unchecked:
            line += f" ({self.copy_unchecked} rows not checked for copies: their records do not name their examples)"
        return line


def shingles(text: str) -> frozenset:
    w = words(text)
    if len(w) < 2:
        return frozenset((x,) for x in w)
    return frozenset(tuple(w[i:i + 2]) for i in range(len(w) - 1))


def filter_rows(texts: list[str], labels: list[str], *, config: FilterConfig = FilterConfig(),
                examples: list | None = None, label_phrases: dict | None = None,
                judge_agrees: list[bool] | None = None) -> FilterReport:
    """Decide which rows to keep (module docstring). ``examples``: per row, the texts its prompt
    showed (or None); ``judge_agrees``: per row, whether the judge assigns its label (or None)."""
    config.check()
    n = len(texts)
    if len(labels) != n or (examples is not None and len(examples) != n) or \
            (judge_agrees is not None and len(judge_agrees) != n):
        raise DivgenError("texts, labels, examples and judge verdicts must have one entry per row")
    phrase_set = label_phrase_set(label_phrases or {lab: [lab] for lab in set(labels)})
    report = FilterReport()
    seen: dict[str, int] = {}
    kept_shingles: list[frozenset] = []
    kept_pos: list[int] = []
    index: dict = defaultdict(list)          # shingle -> positions in kept_shingles
    for i, text in enumerate(texts):
        if config.degenerate and is_degenerate(text, phrase_set, config.min_words):
            report.removed.append((i, "degenerate", None))
            continue
        if config.copies:
            shown = examples[i] if examples is not None else None
            if shown is None:
                report.copy_unchecked += 1
            elif is_copy(text, shown, config.copy_n):
                report.removed.append((i, "copy", None))
                continue
        key = " ".join(text.casefold().split())
        if config.duplicates and key in seen:
            report.removed.append((i, "duplicate", seen[key]))
            continue
        sh = shingles(text)
        if config.near_duplicates and sh:
            hits = Counter(j for s in sh for j in index.get(s, ()))
            match = None
            for j, inter in hits.most_common():
                other = kept_shingles[j]
                if inter / (len(sh) + len(other) - inter) >= config.near_threshold:
                    match = kept_pos[j]
                    break
            if match is not None:
                report.removed.append((i, "near_duplicate", match))
                continue
        if judge_agrees is not None and not judge_agrees[i]:
            report.removed.append((i, "judge", None))
            continue
        report.kept.append(i)
        seen.setdefault(key, i)
        for s in sh:
            index[s].append(len(kept_shingles))
        kept_shingles.append(sh)
        kept_pos.append(i)
    return report
