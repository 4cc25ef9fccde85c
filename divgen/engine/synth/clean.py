"""Text cleaning: generated token ids -> one clean line of text for the dataset."""
from __future__ import annotations

import re

from divgen.engine.synth.task import Task

_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d{1,2}[.)])\s+")
_QUOTES = {'"': '"', "“": "”", "'": "'"}


def scaffolding_prefixes(task: Task) -> list[str]:
    """Literal prompt text a model tends to echo at the start of its answer (lower-cased)."""
    out = []
    fs = task.few_shot
    for lab in task.labels:
        names = {"verbalization": lab.verbalization, "label": lab.name}
        out.append(fs.header.format(**names).strip())
        out.append(fs.template.split("{text}")[0].format(index=1, **names).strip())
    return sorted({p.lower() for p in out if p}, key=len, reverse=True)


def clean_text(lm, token_ids: list[int], stop: tuple[str, ...], prefixes: list[str]) -> str:
    """Generated ids -> one clean line of text.

    Cut at the first special token (chat markup such as a new ``<|im_start|>`` turn) and at the
    first stop string; drop a short preamble line ending in ':' ("Here is an article:"), echoed
    prompt scaffolding (the few-shot header / item prefix), a list marker and wrapping quotes;
    collapse whitespace (newlines included) to single spaces.
    """
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    ids = list(token_ids)
    for i, t in enumerate(ids):
        if t in special:
            ids = ids[:i]
            break
    text = lm.decode(ids)
    for s in stop:
        if s and s in text:
            text = text[: text.find(s)]
    lines = [ln.strip() for ln in text.strip().split("\n") if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":") and len(lines[0].split()) <= 15:
        lines = lines[1:]
    text = " ".join(" ".join(lines).split())
    changed = True
    while changed and text:
        changed = False
        low = text.lower()
        for p in prefixes:
            if low.startswith(p):
                text, changed = text[len(p):].lstrip(), True
                break
        m = _LIST_MARKER.match(text)
        if m:
            text, changed = text[m.end():], True
    if len(text) >= 2 and text[0] in _QUOTES and text[-1] == _QUOTES[text[0]]:
        inner = text[1:-1]
        if text[0] not in inner and text[-1] not in inner:   # one quoted passage, not two
            text = inner.strip()
    return text


