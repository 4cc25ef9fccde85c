"""Few-shot sources of a task: labelled CSV/JSONL files, AG News text repair, the pool split.

``few_shot_pool(task)`` gives each label the examples its prompts may show: the label's inline
examples, then the file's *pool* rows (data-row index i with i % few_shot.every == 0; the other
rows are never shown, keep them for evaluation).
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.inputs import read_csv
from divgen.engine.jsonl import iter_jsonl_objects
from divgen.engine.synth.task import Task

# AG News lost the '&' of its HTML entities to a space ("doesn #39;t", "Johnson  amp; Johnson").
_ENTITY_FIXES = [(re.compile(r" (#\d+|quot|amp|lt|gt);"), r"&\1;"),
                 (re.compile(r"(?<![&\w])(#\d+|quot|amp|lt|gt);"), r"&\1;")]


def clean_source_text(text: str) -> str:
    """Normalise a corpus text: AG News' damaged entities (' #39;' -> "'", ' quot;' -> '"'),
    HTML tags, backslashes, runs of whitespace."""
    for pattern, repl in _ENTITY_FIXES:
        text = pattern.sub(repl, text)
    text = html.unescape(html.unescape(text))
    text = re.sub(r"<[^>]*>", " ", text).replace("\\", " ")
    return " ".join(text.split())


def _row_text(row: dict, where: str) -> str:
    if row.get("text") is not None:
        return clean_source_text(str(row["text"]))
    if row.get("title") is not None or row.get("description") is not None:
        title = clean_source_text(str(row.get("title") or ""))
        desc = clean_source_text(str(row.get("description") or ""))
        if title and desc:
            return f"{title}{'' if title[-1] in '.!?:' else '.'} {desc}"
        return title or desc
    raise DivgenError(f"{where} has no 'text' column (or 'title'/'description'): give labelled texts")


def read_labelled_file(path: Path) -> list[tuple[str, str]]:
    """(label, text) of every data row of a CSV (header: label + text, or label,title,description)
    or a JSONL file ({"label", "text"} per line), in file order."""
    path = Path(path)
    rows: list[tuple[str, str]] = []
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            for n, obj in iter_jsonl_objects(path, "few-shot"):
                if "label" not in obj:
                    raise DivgenError(f"few-shot file {path} line {n} needs a 'label' field")
                rows.append((str(obj["label"]), _row_text(obj, f"few-shot file {path} line {n}")))
        else:
            # the checked CSV reader (engine/inputs.py): a byte-order mark is not part of the first column
            # name, long fields are read, bad bytes and bad quoting name the line
            table = read_csv(path, "few-shot file", "give a CSV with a header row: label + text (or title, description)")
            if "label" not in table.columns:
                found = ", ".join(repr(c) for c in table.columns) or "none"
                raise DivgenError(f"few-shot file {path} needs a header row with a 'label' column "
                                  f"and 'text' (or 'title','description'); its columns are {found}")
            for row in table.rows:
                rows.append((str(row["label"] or "").strip(), _row_text(row, f"few-shot file {path}")))
    except UnicodeDecodeError as exc:
        raise DivgenError(f"few-shot file {path} is not UTF-8 text ({exc.reason}): save it as UTF-8") from exc
    except OSError as exc:
        raise DivgenError(f"cannot read few-shot file {path}: {exc.strerror}") from exc
    return rows


def few_shot_pool(task: Task) -> dict[str, list[str]]:
    """The few-shot examples each label may show: inline examples, then the file's pool rows
    (data-row index i with i % every == 0). Empty lists when the task is zero-shot."""
    return pool_with_sources(task)[0]


def pool_with_sources(task: Task) -> tuple[dict[str, list[str]], dict[str, list]]:
    """``few_shot_pool(task)`` and, item for item, where each example came from: its data-row
    index in the few-shot file (int), or the text itself for an inline example (str). Records
    name the examples their prompt showed by these (``examples``; the copy rate needs them)."""
    pool = {l.name: list(l.examples) for l in task.labels}
    sources: dict[str, list] = {l.name: list(l.examples) for l in task.labels}
    fs = task.few_shot
    if fs.file is not None:
        rows = read_labelled_file(fs.file)
        by_source: dict[str, list[tuple[int, str]]] = {}
        for i, (label, text) in enumerate(rows):
            if i % fs.every == 0 and text:
                by_source.setdefault(label, []).append((i, text))
        for lab in task.labels:
            found = by_source.get(lab.source_label, [])
            if not found:
                present = ", ".join(sorted(by_source)) or "none"
                raise DivgenError(
                    f"few-shot file {fs.file} has no pool rows for label '{lab.name}' (source_label "
                    f"'{lab.source_label}'); labels in the file's pool: {present}. Fix labels[].source_label "
                    "or use a file that covers every label"
                )
            pool[lab.name].extend(text for _, text in found)
            sources[lab.name].extend(i for i, _ in found)
    if fs.per_prompt == 0:
        return {name: [] for name in pool}, {name: [] for name in pool}
    return pool, sources

