"""Synth outputs -> a ``datasets`` dataset with a dataset card: ``divgen export``.

``export(paths, fmt, dest)`` reads one or more synth outputs (several methods may go together:
their records share one schema, engine/synth/schema.py), and writes to ``dest``:

* ``fmt="parquet"``: ``train.parquet`` and ``validation.parquet`` (the features, ``label`` as a
  ``ClassLabel``, ride in the Parquet metadata), loadable with
  ``datasets.load_dataset("parquet", data_dir=dest)`` or ``load_dataset(dest)``;
* ``fmt="hf"``: a ``DatasetDict.save_to_disk`` folder, loadable with ``datasets.load_from_disk``;
* ``README.md``: the dataset card (task, model, method and parameters, counts per label and
  split, the diversity metrics of engine/metrics.py, how to load it).

The split is stratified and deterministic: within each label, records are ordered by a hash of
(seed, method, group, slot) and the first ``round(validation · n)`` go to validation (at least
one for a label with two or more records when validation > 0; an empty split is not written). The folder
is written next to ``dest`` and swapped into place (engine/files.py), so a failed or killed export
leaves the old folder or the new one, whole. ``DIR/.divgen-export.json`` lists what the export
wrote: ``--overwrite`` replaces only such a folder (never one holding other files, the working
folder, or a link). Two inputs with the same records are refused; a record that repeats one of an
earlier input is exported once, with a note.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.files import replaced_dir

FORMATS = ("parquet", "hf")
SPLITS = ("train", "validation")


@dataclass
class Source:
    path: Path
    records: list[dict]
    sidecar: dict | None              # the synth task sidecar, when present
    torn_bytes: int = 0               # an unfinished last line that was left out


@dataclass
class ExportReport:
    dest: Path
    label_names: list[str]
    counts: dict = field(default_factory=dict)    # split -> label -> count
    notes: list[str] = field(default_factory=list)


MANIFEST = ".divgen-export.json"     # what an export wrote: --overwrite replaces only such a folder
# The files of exports written before the manifest existed (recognised by their card).
_LEGACY_NAMES = {"README.md", "train.parquet", "validation.parquet", "dataset_dict.json", "train", "validation"}


def is_export_dir(dest: Path) -> bool:
    """Does ``dest`` hold only what ``divgen export`` wrote (its manifest lists every entry)?"""
    from divgen.engine.inputs import read_json_object

    dest = Path(dest)
    entries = {p.name for p in dest.iterdir()}
    if (dest / MANIFEST).is_file():
        try:
            data = read_json_object(dest / MANIFEST, "export manifest", "remove it")
        except DivgenError:
            return False
        files = data.get("files")
        return data.get("written_by") == "divgen export" and isinstance(files, list) and \
            entries <= set(files) | {MANIFEST}
    card = dest / "README.md"
    try:
        legacy_card = card.is_file() and "made with divgen" in card.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return legacy_card and entries <= _LEGACY_NAMES


def check_export_args(paths, fmt: str, dest, validation: float, overwrite: bool, seed: int = 0) -> None:
    """User errors, before anything is read in full or written (engine/files.py's output rules)."""
    from divgen.engine import limits
    from divgen.engine.files import check_output_dir

    if fmt not in FORMATS:
        raise DivgenError(f"--to {fmt!r}: choose one of {', '.join(FORMATS)} (e.g. --to parquet DIR)")
    limits.fraction(validation, "--validation", high_open=True)
    limits.seed(seed, "--seed")
    seen: dict[str, Path] = {}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise DivgenError(f"{p} is not a file: pass a synth output (JSONL) written by divgen synth")
        key = str(p.resolve())
        if key in seen:
            raise DivgenError(f"{p} is given twice: give each synth output once (its rows would be in both splits)")
        seen[key] = p
    check_output_dir(dest, "--to", inputs=paths, ours=is_export_dir, what="divgen export", overwrite=overwrite)
    if importlib.util.find_spec("datasets") is None:
        raise DivgenError("divgen export needs the datasets package: pip install 'divgen[datasets]' (or datasets)")


def drop_repeats(sources: list[Source]) -> list[str]:
    """Refuse two inputs with the same bytes; leave out a record already seen in an earlier input
    (a filtered copy exported with its original). Returns the notes saying what was left out."""
    notes: list[str] = []
    digests: dict[str, Path] = {}
    for src in sources:
        digest = hashlib.sha256(json.dumps(src.records, sort_keys=True).encode()).hexdigest()
        if digest in digests:
            raise DivgenError(f"{src.path} holds the same records as {digests[digest]}: give each synth output once "
                              "(its rows would be in both splits)")
        digests[digest] = src.path
    seen: set[str] = set()
    for src in sources:
        kept = []
        for rec in src.records:
            key = json.dumps(rec, sort_keys=True)
            if key not in seen:
                seen.add(key)
                kept.append(rec)
        if len(kept) < len(src.records):
            notes.append(f"{src.path}: left out {len(src.records) - len(kept)} record(s) identical to ones of an "
                         "earlier input (each record is exported once)")
            if not kept:
                raise DivgenError(f"{src.path} holds only records of an earlier input: leave it out")
        src.records = kept
    return notes


def read_source(path: Path) -> Source:
    """A synth output's complete records (an unfinished last line is left out, with a note)."""
    from divgen.engine.jsonl import read_jsonl
    from divgen.engine.synth.output import read_sidecar

    contents = read_jsonl(path, "synth output", tail="torn")
    records = []
    for n, rec in contents.records:
        if not (isinstance(rec.get("text"), str) and isinstance(rec.get("label"), str)):
            raise DivgenError(f"{path} line {n} has no text and label: pass a synth output written by divgen synth")
        records.append(rec)
    if not records:
        raise DivgenError(f"{path} holds no complete record: nothing to export")
    return Source(path, records, read_sidecar(path), contents.size - contents.complete_bytes)


def label_order(sources: list[Source]) -> list[str]:
    """ClassLabel names: the task's label order (sidecar), then any other label in order of appearance."""
    names: list[str] = []
    for src in sources:
        for lab in _sidecar_content(src).get("labels") or []:
            if isinstance(lab, dict) and isinstance(lab.get("name"), str) and lab["name"] not in names:
                names.append(lab["name"])
    for src in sources:
        for rec in src.records:
            if rec["label"] not in names:
                names.append(rec["label"])
    return names


def _sidecar_content(src: Source) -> dict:
    """The sidecar's ``content`` (task labels, prompt, seed) when it has the expected types, else {}."""
    content = src.sidecar.get("content") if isinstance(src.sidecar, dict) else None
    if not isinstance(content, dict):
        return {}
    if not isinstance(content.get("labels"), list):
        content = {k: v for k, v in content.items() if k != "labels"}
    return content


def split_of(records: list[dict], validation: float, seed: int) -> list[str]:
    """'train' or 'validation' for each record (stratified by label, deterministic; module doc)."""
    def key(i):
        r = records[i]
        ident = f"{seed}/{r.get('method')}/{r.get('task')}/{r.get('group', i)}/{r.get('slot')}"
        return hashlib.sha256(ident.encode()).digest()

    out = ["train"] * len(records)
    by_label: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_label.setdefault(r["label"], []).append(i)
    for idx in by_label.values():
        # at least one validation example per label that has two or more (never all of them)
        n_val = min(max(round(validation * len(idx)), 1 if validation > 0 else 0), len(idx) - 1)
        for i in sorted(idx, key=key)[:n_val]:
            out[i] = "validation"
    return out


def typed_examples(record: dict) -> dict:
    """A record's ``examples`` (few-shot file rows as int, inline examples as str, both possible in
    one prompt) as two typed columns: ``example_rows`` (list of int) and ``example_texts`` (list of
    str). One untyped list cannot be an Arrow column once outputs with file rows and outputs with
    inline examples (or a prompt with both) are exported together."""
    if "examples" not in record:
        return record
    out = {k: v for k, v in record.items() if k != "examples"}
    shown = record["examples"] or []
    out["example_rows"] = [e for e in shown if isinstance(e, int) and not isinstance(e, bool)]
    out["example_texts"] = [e for e in shown if isinstance(e, str)]
    return out


def build_dataset(records: list[dict], names: list[str], splits: list[str]):
    """A DatasetDict (train, validation) with ``label`` as a ClassLabel of ``names``."""
    import datasets

    rows = [typed_examples({**r, "label": names.index(r["label"])}) for r in records]
    table = datasets.Dataset.from_list(rows)
    features = table.features.copy()
    features["label"] = datasets.ClassLabel(names=names)
    table = table.cast(features)
    out = {}
    for split in SPLITS:
        idx = [i for i, s in enumerate(splits) if s == split]
        if idx:                                   # an empty split is left out (datasets cannot load one)
            out[split] = table.select(idx)
    return datasets.DatasetDict(out)


def export(paths, fmt: str, dest, *, validation: float = 0.1, seed: int = 0, metrics: bool = True,
           embeddings: bool = True, overwrite: bool = False, log=None) -> ExportReport:
    """Write the dataset and its card (module docstring)."""
    log = log or (lambda msg: None)
    paths = [Path(p) for p in paths]
    dest = Path(dest)
    check_export_args(paths, fmt, dest, validation, overwrite, seed)
    sources = [read_source(p) for p in paths]
    repeat_notes = drop_repeats(sources)
    report = ExportReport(dest=dest, label_names=label_order(sources))
    report.notes += repeat_notes
    for src in sources:
        if src.torn_bytes:
            report.notes.append(f"{src.path}: left out an unfinished last line ({src.torn_bytes} bytes)")
    records = [r for src in sources for r in src.records]
    splits = split_of(records, validation, seed)
    for split in SPLITS:
        report.counts[split] = {name: 0 for name in report.label_names}
    for r, s in zip(records, splits):
        report.counts[s][r["label"]] += 1

    import datasets

    datasets.disable_progress_bars()
    ds = build_dataset(records, report.label_names, splits)
    metric_rows = compute_card_metrics(sources, embeddings) if metrics else None
    card = dataset_card(sources, report, fmt, validation, seed, metric_rows)

    with replaced_dir(dest, ".export") as tmp:
        if fmt == "parquet":
            for split, part in ds.items():
                part.to_parquet(str(tmp / f"{split}.parquet"))
        else:
            ds.save_to_disk(str(tmp / "data"))
            for item in (tmp / "data").iterdir():
                os.replace(item, tmp / item.name)
            (tmp / "data").rmdir()
        (tmp / "README.md").write_text(card, encoding="utf-8")
        written = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"written_by": "divgen export", "files": written}) + "\n",
                                    encoding="utf-8")
    return report


# ----------------------------------------------------------------------------------------------
# Dataset card
# ----------------------------------------------------------------------------------------------
def compute_card_metrics(sources: list[Source], embeddings: bool) -> list[tuple[str, dict]]:
    """Diversity metrics of each source (engine/metrics.py), named by file stem."""
    from divgen.engine.metrics import compute_metrics

    out = []
    for src in sources:
        texts = [r["text"] for r in src.records]
        labels = [r["label"] for r in src.records]
        out.append((src.path.stem, compute_metrics(texts, labels, embeddings=embeddings)))
    return out


def _size_category(n: int) -> str:
    if n < 1000:
        return "n<1K"
    if n < 10000:
        return "1K<n<10K"
    if n < 100000:
        return "10K<n<100K"
    return "100K<n<1M"


def dataset_card(sources: list[Source], report: ExportReport, fmt: str, validation: float, seed: int,
                 metric_rows) -> str:
    """The README.md of an export: metadata header, then task, model, methods, counts, metrics."""
    from divgen.engine.metrics import format_comparison

    first = sources[0]
    content = _sidecar_content(first)
    task_name = (first.sidecar or {}).get("task_name") if isinstance(first.sidecar, dict) else None
    task_name = task_name if isinstance(task_name, str) and task_name else first.path.stem
    total = sum(len(s.records) for s in sources)
    models = sorted({str(r.get("model", "unknown")) for s in sources for r in s.records})
    versions = sorted({str(r.get("divgen_version", "unknown")) for s in sources for r in s.records})
    lines = [
        "---",
        f"pretty_name: {json.dumps(f'{task_name} (synthetic, divgen)')}",
        "task_categories:",
        "- text-classification",
        "tags:",
        "- synthetic",
        "- divgen",
        "size_categories:",
        f"- {_size_category(total)}",
        "---",
        "",
        f"# {task_name}: synthetic text classification data made with divgen",
        "",
        f"{total} examples over {len(report.label_names)} labels, generated by "
        f"`divgen synth` (divgen {', '.join(versions)}) with {', '.join(f'`{m}`' for m in models)}.",
        "",
        "## Task",
        "",
    ]
    if content.get("prompt"):
        lines += ["Prompt template:", "", "```", str(content["prompt"]).strip(), "```", ""]
    lines += ["| label | verbalization |", "|---|---|"]
    verbal = {lab.get("name"): lab.get("verbalization") for lab in content.get("labels") or [] if isinstance(lab, dict)}
    for i, name in enumerate(report.label_names):
        lines.append(f"| {name} (id {i}) | {verbal.get(name) or ''} |")
    lines += ["", "## Methods and parameters", "",
              "| file | method | records | parameters | seed | task fingerprint |", "|---|---|---:|---|---:|---|"]
    for src in sources:
        r0 = src.records[0]
        methods = sorted({str(r.get("method")) for r in src.records})
        params = r0.get("params") or {}
        ptxt = ", ".join(f"{k}={v}" for k, v in params.items()) if isinstance(params, dict) else str(params)
        seed_txt = _sidecar_content(src).get("seed", "")
        lines.append(f"| {src.path.name} | {', '.join(methods)} | {len(src.records)} | {ptxt} | {seed_txt} | "
                     f"{r0.get('task', '')} |")
    lines += ["", "## Splits", "",
              f"Stratified by label; {validation:.0%} to validation, chosen by a hash of (seed {seed}, method, "
              "group, slot).", "",
              "| label | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    for name in report.label_names:
        lines.append(f"| {name} | " + " | ".join(str(report.counts[s][name]) for s in SPLITS) + " |")
    lines.append("| **total** | " + " | ".join(str(sum(report.counts[s].values())) for s in SPLITS) + " |")
    if metric_rows:
        lines += ["", "## Diversity metrics", "",
                  "Over all texts of each file; '(label)' columns are means over labels. Lower Self-BLEU, cosine "
                  "and dup (exact-duplicate rate) and higher distinct-n mean more diverse (divgen's "
                  "engine/metrics.py).", "", format_comparison(metric_rows, markdown=True)]
    lines += ["", "## Columns", "",
              "The synth record fields (divgen's engine/synth/schema.py), with `label` as a ClassLabel and the "
              "prompt's few-shot examples as `example_rows` (row indices in the task's few-shot file; only "
              "pool rows are ever shown) and `example_texts` (the task's inline examples).",
              "", "## Load it", "", "```python"]
    if fmt == "parquet":
        lines += ["from datasets import load_dataset", "", 'ds = load_dataset("parquet", data_dir="PATH/TO/THIS/FOLDER")']
    else:
        lines += ["from datasets import load_from_disk", "", 'ds = load_from_disk("PATH/TO/THIS/FOLDER")']
    lines += ['print(ds["train"].features["label"].names)', "```", ""]
    return "\n".join(lines)
