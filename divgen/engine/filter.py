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

Rows keep their order; the kept ones are written unchanged. Each file filter writes gets a hidden
marker ``.OUT.filter.json``: a rerun replaces its own earlier output, never any other file.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.metrics import (
    DEFAULT_COPY_N, DEFAULT_MIN_WORDS, is_copy, is_degenerate, label_phrase_set, words,
)

REASONS = ("degenerate", "copy", "duplicate", "near_duplicate", "judge")
DEFAULT_NEAR_THRESHOLD = 0.6
MAX_WORDS = 100_000                 # --min-words / --copy-n


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
        from divgen.engine import limits

        limits.count(self.min_words, "--min-words", low=0, high=MAX_WORDS)
        limits.count(self.copy_n, "--copy-n", low=1, high=MAX_WORDS)
        limits.fraction(self.near_threshold, "--near-threshold", low_open=True)


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


# ----------------------------------------------------------------------------------------------
# Output files: a filter output is replaced only by filter (engine/files.py's discipline)
# ----------------------------------------------------------------------------------------------
MARKER_SUFFIX = ".filter.json"      # .OUT.filter.json beside every file filter writes


def marker_path(out: Path) -> Path:
    """The hidden marker that says ``out`` was written by ``divgen filter`` (and with what bytes)."""
    out = Path(out)
    return out.with_name(f".{out.name}{MARKER_SUFFIX}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_filter_output(out: Path) -> bool:
    """Does ``out`` hold bytes that ``divgen filter`` wrote (its marker lists their hash)?"""
    from divgen.engine.inputs import read_json_object

    out, marker = Path(out), marker_path(out)
    if not (out.is_file() and marker.is_file()):
        return False
    try:
        data = read_json_object(marker, "filter marker", "remove it")
        hashes = data.get("sha256")
        return data.get("written_by") == "divgen filter" and isinstance(hashes, list) and \
            _sha256(out.read_bytes()) in hashes
    except (DivgenError, OSError):
        return False


def write_output(out: Path, lines: list[str], flag: str = "--out") -> None:
    """Replace ``out`` with ``lines`` atomically. The marker lists the new hash (and the old one,
    when the old file was ours) before the swap and only the new one after it, so a kill at any
    point leaves a file that is recognised as filter's own: old or new, whole."""
    from divgen.engine.files import write_file_atomic

    out = Path(out)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    new = _sha256(data)
    hashes = [new] + ([_sha256(out.read_bytes())] if is_filter_output(out) else [])
    stamp = lambda hs: json.dumps({"written_by": "divgen filter", "file": out.name, "sha256": hs}) + "\n"  # noqa: E731
    write_file_atomic(marker_path(out), stamp(hashes), flag)
    write_file_atomic(out, data, flag, legacy=[f".{out.name}.{'[a-z0-9_]' * 8}"])   # older versions' mkstemp names
    write_file_atomic(marker_path(out), stamp([new]), flag)
