"""Real and synthetic labelled data for ``divgen eval``: reading, label mapping, the fixed split.

* Real data: a CSV (header row) or JSONL file. The label column (``--label-column``, default
  ``label``) holds the task's ``source_label`` values (AG News: 1..4), mapped to the task's label
  names. The text is ``--text-column`` when given; else a ``text`` column; else ``title`` and
  ``description`` joined (AG News). Texts are normalised like few-shot examples
  (``synth.few_shot.clean_source_text``).
* The split is fixed by data-row index i (0-based, header excluded): rows with
  ``i % every == 0`` (the task's ``few_shot.every``, 10 for AG News) are the *pool* — the only
  rows a prompt, the judge or the real-data ceiling may see; all other rows are the *test* rows.
* Synthetic data: JSONL records of ``divgen synth`` (``text`` + ``label``); every label must be one
  of the task's.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.inputs import read_csv
from divgen.engine.jsonl import iter_jsonl_objects
from divgen.engine.metrics import read_records
from divgen.engine.synth.few_shot import clean_source_text
from divgen.engine.synth.task import Task


@dataclass
class LabelledSet:
    """Texts with label indices into ``label_names``; ``rows``: their data-row indices in the file."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    rows: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, positions: list[int]) -> "LabelledSet":
        return LabelledSet([self.texts[i] for i in positions], [self.labels[i] for i in positions],
                           self.label_names, [self.rows[i] for i in positions])


def _field(row: dict, name: str) -> str:
    value = row.get(name)
    if value is None:
        return ""
    if isinstance(value, (dict, list)):     # a JSONL record whose text is not text
        raise DivgenError(f"'{name}' holds a JSON {type(value).__name__}, not text: fix the file or pass the "
                          "right --text-column")
    return str(value)


def _text_of(row: dict, text_column: str | None, where: str) -> str:
    try:
        if text_column is not None:
            return clean_source_text(_field(row, text_column))
        if "text" in row:
            return clean_source_text(_field(row, "text"))
        title = clean_source_text(_field(row, "title"))
        desc = clean_source_text(_field(row, "description"))
    except DivgenError as exc:
        raise DivgenError(f"{where}: {exc}") from exc
    if title and desc:
        return f"{title}{'' if title[-1] in '.!?:' else '.'} {desc}"
    return title or desc


def _check_columns(columns, text_column: str | None, label_column: str, where: str) -> None:
    columns = list(columns)
    shown = ", ".join(columns) or "none"
    if label_column not in columns:
        raise DivgenError(f"{where} has no label column '{label_column}' (columns: {shown}): "
                          "pass --label-column NAME")
    if text_column is not None:
        if text_column not in columns:
            raise DivgenError(f"{where} has no text column '{text_column}' (columns: {shown}): pass --text-column NAME")
    elif "text" not in columns and not {"title", "description"} & set(columns):
        raise DivgenError(f"{where} has no 'text' column (nor 'title'/'description'; columns: {shown}): "
                          "pass --text-column NAME")


def read_real(path: str | Path, task: Task, text_column: str | None = None,
              label_column: str = "label") -> LabelledSet:
    """Every data row of a real labelled file, labels mapped through the task's ``source_label``."""
    path = Path(path)
    if not path.is_file():
        raise DivgenError(f"real data {path} is not a file: pass a labelled CSV or JSONL file (--real)")
    where = f"real data {path}"
    raw: list[tuple[str, str]] = []          # (source label, text)
    if path.suffix.lower() in (".jsonl", ".json"):
        for n, obj in iter_jsonl_objects(path, "real data"):
            _check_columns(obj.keys(), text_column, label_column, f"{where} line {n}")
            label = obj[label_column]
            if not isinstance(label, (str, int)) or isinstance(label, bool):
                raise DivgenError(f"{where} line {n}: '{label_column}' must be a string or an integer, got "
                                  f"{type(label).__name__}: fix the file or pass the right --label-column")
            raw.append((str(label).strip(), _text_of(obj, text_column, where)))
    else:
        table = read_csv(path, "real data", "give a labelled CSV with a header row (or a JSONL file)")
        _check_columns(table.columns, text_column, label_column, where)
        for row in table.rows:
            raw.append((str(row.get(label_column) or "").strip(), _text_of(row, text_column, where)))
    if not raw:
        raise DivgenError(f"{where} holds no rows: give a labelled CSV or JSONL file")
    mapping = {lab.source_label: i for i, lab in enumerate(task.labels)}
    unknown = sorted({s for s, _ in raw if s not in mapping})
    if unknown:
        known = ", ".join(f"{lab.source_label} -> {lab.name}" for lab in task.labels)
        raise DivgenError(f"{where} has label value(s) {', '.join(map(repr, unknown[:8]))} that the task "
                          f"does not map (source_label: {known}): fix labels[].source_label in the task or "
                          "pass the right --label-column")
    return LabelledSet([t for _, t in raw], [mapping[s] for s, _ in raw], task.label_names, list(range(len(raw))))


def split(data: LabelledSet, every: int) -> tuple[LabelledSet, LabelledSet]:
    """(pool, test): data rows with index % every == 0, and the others (module docstring)."""
    pool = [i for i, r in enumerate(data.rows) if r % every == 0 and data.texts[i]]
    test = [i for i, r in enumerate(data.rows) if r % every != 0 and data.texts[i]]
    if not pool or not test:
        raise DivgenError(f"the real data has {len(data.rows)} rows: too few for a pool (index % {every} == 0) "
                          "and a test split; give a larger file")
    return data.take(pool), data.take(test)


def require_every_label(pool: LabelledSet, what: str = "the judge and the real-data row need every label") -> None:
    """Refuse a pool that lacks a label: a classifier trained on it could never predict that label."""
    have = Counter(pool.labels)
    missing = [name for k, name in enumerate(pool.label_names) if not have.get(k)]
    if missing:
        counts = ", ".join(f"{name} {have.get(k, 0)}" for k, name in enumerate(pool.label_names))
        raise DivgenError(f"the real pool has no rows of label(s) {', '.join(missing)} (pool rows per label: "
                          f"{counts}); {what}: give a real file with pool rows of every label")


def thin(data: LabelledSet, limit: int | None) -> LabelledSet:
    """At most ``limit`` rows, evenly spaced in file order (deterministic); all when None."""
    if limit is None or limit >= len(data):
        return data
    if limit < 1:
        raise DivgenError(f"--test-limit must be >= 1, got {limit}")
    return data.take([(i * len(data)) // limit for i in range(limit)])


def read_synthetic(path: str | Path, task: Task) -> tuple[LabelledSet, list[dict]]:
    """A synthetic JSONL set (texts, label indices) and its records; labels must be the task's."""
    records = read_records(path)
    names = task.label_names
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n, r in enumerate(records, 1) if "label" not in r]
    if missing:
        raise DivgenError(f"{path} line {missing[0]} has no 'label': a training set needs labelled records")
    unknown = sorted({str(r["label"]) for r in records} - set(names))
    if unknown:
        raise DivgenError(f"{path} has label(s) {', '.join(map(repr, unknown[:8]))} that are not the task's "
                          f"({', '.join(names)}): pass the task file the set was generated with")
    texts = [r["text"] for r in records]
    return LabelledSet(texts, [index[str(r["label"])] for r in records], names, list(range(len(records)))), records
