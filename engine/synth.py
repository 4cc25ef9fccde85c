"""The dataset-synthesis job behind ``divgen synth``: task -> lockstep groups -> JSONL.

Steps of ``run_synth``:

1. Plan. Group g has ``task.group_rows`` sample slots; slot s carries label (g·R + s) mod K
   (round-robin, so every label recurs). A slot is *kept* while its label still needs examples;
   groups are added until every label reaches its count. The plan depends only on the task.
2. Resume. Complete lines of an existing output name their (group, slot); the job generates only
   the kept slots that are missing. A torn last line (the process was killed mid-write) is cut off.
   A sidecar ``FILE.task.json`` and a ``task`` field on every line hold the task fingerprint: an
   output written by a different task is refused before anything is touched.
3. Generate, a batch of whole groups at a time (at most ``batch_rows`` rows per call):
   * fewgen      — the missing slots only, independent rows (no guidance);
   * corrsynth   — every slot of the group (rows are contrasted even when their text is not kept),
                   ``Guidance.corrsynth(g)``;
   * m-corrsynth — as corrsynth with ``Guidance.m_corrsynth(γ, δ)`` over the slots' labels;
   * cfg         — each missing slot is a leader row plus one shadow row per *other* label, whose
                   prompt (that label's prompt in the same group) is the negative prompt.
   Row seeds are a hash of (seed, group, slot), and the engine's noise depends only on (seed,
   step, token), so a group decodes to the same text whatever batch it lands in.
4. Write the batch's records in one append + fsync; a kill loses at most the batch in flight.

Prompts: slot s (label y) of group g shows the few-shot examples ``pick_examples(task, pool, g, s,
y)``; FewGen and CorrSynth therefore see exactly the same prompts, slot by slot. A CFG shadow of
that slot for label y' shows ``pick_examples(task, pool, g, s, y')`` (y''s prompt for this slot).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from divgen.engine.errors import DivgenError
from divgen.engine.task import Task, few_shot_pool, fingerprint, pick_examples, render_prompt

DEFAULT_BATCH_ROWS = 64
SIDECAR_SUFFIX = ".task.json"


# ----------------------------------------------------------------------------------------------
# Plan
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    group: int
    slot: int
    label: int            # index into task.labels
    keep: bool            # its text is written (else it only takes part in the contrast)


def plan(task: Task) -> list[list[Slot]]:
    """Groups of slots, deterministic in the task (see the module docstring)."""
    k, r = len(task.labels), task.group_rows
    target = list(task.per_label)
    counts = [0] * k
    groups: list[list[Slot]] = []
    while any(c < t for c, t in zip(counts, target)):
        g = len(groups)
        slots = []
        for s in range(r):
            label = (g * r + s) % k
            keep = counts[label] < target[label]
            counts[label] += keep
            slots.append(Slot(g, s, label, keep))
        groups.append(slots)
    return groups


def row_seed(seed: int, group: int, slot: int) -> int:
    """A 62-bit seed per (task seed, group, slot): independent streams, stable across runs."""
    digest = hashlib.sha256(f"divgen-synth/{seed}/{group}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


# ----------------------------------------------------------------------------------------------
# Output file: read, check, append
# ----------------------------------------------------------------------------------------------
@dataclass
class ExistingOutput:
    done: set = field(default_factory=set)         # (group, slot) of complete records
    counts: dict = field(default_factory=dict)     # label -> complete records
    good_bytes: int = 0                             # length up to the last complete line
    size: int = 0                                   # current file size (> good_bytes: torn tail)
    fingerprints: set = field(default_factory=set)  # task fingerprints found on the lines


def sidecar_path(out: Path) -> Path:
    return out.with_name(out.name + SIDECAR_SUFFIX)


def read_output(out: Path) -> ExistingOutput:
    """Parse the complete lines of an existing output (nothing is modified)."""
    info = ExistingOutput()
    if not out.exists():
        return info
    data = out.read_bytes()
    info.size = len(data)
    end = data.rfind(b"\n") + 1                     # bytes after the last newline are a torn line
    lines = data[:end].split(b"\n")[:-1]
    for n, raw in enumerate(lines, 1):
        try:
            rec = json.loads(raw)
            key = (int(rec["group"]), int(rec["slot"]))
            label = rec["label"]
        except (ValueError, KeyError, TypeError) as exc:
            if n == len(lines) and end == len(data):
                # An unparsable final line is treated as torn too: cut it off on resume.
                end -= len(raw) + 1
                break
            raise DivgenError(
                f"{out} line {n} is not a divgen synth record ({exc.__class__.__name__}): the file was edited "
                "or is not a synth output; write to a new --out"
            ) from exc
        if key in info.done:
            raise DivgenError(f"{out} line {n} repeats group {key[0]} slot {key[1]}: the file was edited or "
                              "concatenated; write to a new --out")
        info.done.add(key)
        info.counts[label] = info.counts.get(label, 0) + 1
        if "task" in rec:
            info.fingerprints.add(rec["task"])
    info.good_bytes = end
    return info


def _diff_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _diff_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return changed


def check_same_task(out: Path, existing: ExistingOutput, fp: str, content: dict) -> None:
    """Refuse an output that another task wrote (sidecar or line fingerprints differ)."""
    if not existing.done:
        return
    side = sidecar_path(out)
    stored = None
    if side.exists():
        try:
            stored = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
    other = {f for f in existing.fingerprints if f != fp}
    if stored is not None and stored.get("fingerprint") != fp:
        other.add(stored.get("fingerprint"))
    if not other:
        return
    what = ""
    if stored is not None and isinstance(stored.get("content"), dict):
        diffs = _diff_fields(stored["content"], content)
        if diffs:
            what = " (changed: " + "; ".join(diffs[:6]) + ("; ..." if len(diffs) > 6 else "") + ")"
        elif stored.get("fingerprint") != fp:
            what = " (the few-shot examples differ)"
    raise DivgenError(
        f"{out} holds examples of a different task{what}: run with the same task and arguments to resume, "
        f"or write to a new --out (or delete {out} and {side} to start over)"
    )


def check_writable(out: Path) -> None:
    if out.is_dir():
        raise DivgenError(f"--out {out} is a directory: give a file path such as {out / 'data.jsonl'}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DivgenError(f"the folder of --out {out} does not exist: create {parent} first")
    for path in (out, sidecar_path(out)):
        if path.exists() and not os.access(path, os.W_OK):
            raise DivgenError(f"{path} is not writable: fix its permissions or choose another --out")
    if not os.access(parent, os.W_OK):
        raise DivgenError(f"cannot write in {parent}: choose another --out")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_sidecar(out: Path, fp: str, content: dict, task: Task) -> None:
    """Atomically write FILE.task.json (fingerprint + what it was computed from)."""
    side = sidecar_path(out)
    tmp = side.with_name(side.name + ".tmp")
    body = {"fingerprint": fp, "task_name": task.name, "task_file": str(task.path) if task.path else None,
            "few_shot_file": str(task.few_shot.file) if task.few_shot.file else None, "content": content}
    try:
        tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, side)
    except OSError as exc:
        raise DivgenError(f"cannot write {side}: {exc}. Choose another --out") from exc


# ----------------------------------------------------------------------------------------------
# Text cleaning
# ----------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------
# One batch of groups -> rows for generate()
# ----------------------------------------------------------------------------------------------
@dataclass
class BatchRows:
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    shadow_of: list = field(default_factory=list)
    slots: list = field(default_factory=list)       # Slot of each sample row, None for shadows
    write: list = field(default_factory=list)       # whether each sample row's text is written

    def add(self, prompt, seed, group, label, slot, write, shadow_of=None):
        self.prompts.append(prompt)
        self.seeds.append(seed)
        self.groups.append(group)
        self.labels.append(label)
        self.shadow_of.append(shadow_of)
        self.slots.append(slot)
        self.write.append(write)
        return len(self.prompts) - 1


class PromptCache:
    """Formatted prompt of (group, slot, label), built once."""

    def __init__(self, task: Task, lm, pool):
        self.task, self.lm, self.pool = task, lm, pool
        self._cache: dict = {}

    def __call__(self, group: int, slot: int, label: int) -> str:
        key = (group, slot, label)
        if key not in self._cache:
            lab = self.task.labels[label]
            text = render_prompt(self.task, lab, pick_examples(self.task, self.pool, group, slot, lab.name))
            self._cache[key] = self.lm.format_prompt(text, chat=self.task.chat, system=self.task.system)
        return self._cache[key]

    def clear(self):
        self._cache.clear()


def rows_for_groups(task: Task, groups: list[list[Slot]], missing: set, prompt: PromptCache) -> BatchRows:
    """The decode rows of a batch of groups for the task's method (module docstring, step 3)."""
    b = BatchRows()
    k = len(task.labels)
    for slots in groups:
        for sl in slots:
            todo = (sl.group, sl.slot) in missing
            seed = row_seed(task.seed, sl.group, sl.slot)
            if task.method in ("fewgen", "cfg") and not todo:
                continue                      # independent of the other rows: skip it entirely
            leader = b.add(prompt(sl.group, sl.slot, sl.label), seed, sl.group, sl.label, sl, todo)
            if task.method == "cfg":
                for other in range(k):
                    if other != sl.label:
                        b.add(prompt(sl.group, sl.slot, other), seed, sl.group, other, None, False, shadow_of=leader)
    return b


def rows_in_group(task: Task, slots: list[Slot], missing: set) -> int:
    todo = sum((s.group, s.slot) in missing for s in slots)
    if task.method == "fewgen":
        return todo
    if task.method == "cfg":
        return todo * len(task.labels)
    return len(slots)


def make_guidance(task: Task, b: BatchRows):
    from divgen.engine.guidance import Guidance

    p = task.params
    if task.method == "fewgen":
        return None
    if task.method == "corrsynth":
        return Guidance.corrsynth(groups=b.groups, scale=p["g"])
    if task.method == "m-corrsynth":
        return Guidance.m_corrsynth(groups=b.groups, labels=b.labels, gamma=p["gamma"], delta=p["delta"])
    if task.method == "cfg":
        return Guidance.cfg(groups=b.groups, shadow_of=b.shadow_of, scale=p["g"])
    raise DivgenError(f"unknown method {task.method!r}")


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------
@dataclass
class SynthReport:
    out: Path
    written: int = 0                      # records appended by this run
    counts: dict = field(default_factory=dict)   # label -> records in the file at the end
    wall_time_s: float = 0.0
    generate_time_s: float = 0.0          # time inside generate() only
    rows_forwarded: int = 0
    steps: int = 0
    rows_forwarded_per_step: list = field(default_factory=list)
    resumed_from: int = 0                 # complete records found at the start
    fingerprint: str = ""

    @property
    def examples_per_s(self) -> float:
        return self.written / self.wall_time_s if self.wall_time_s > 0 else 0.0


def prepare(task: Task, out: Path):
    """Everything that can fail on user input, before the model loads and before any write."""
    if task.model != "default" and not Path(task.model).expanduser().exists():
        raise DivgenError(f"model {task.model} does not exist: pass a local HF model directory or .gguf file "
                          "(--model or the task's 'model' field), or 'default' for the embedded model")
    pool = few_shot_pool(task)
    fp = fingerprint(task, pool)
    content = task.content()
    check_writable(out)
    existing = read_output(out)
    check_same_task(out, existing, fp, content)
    return pool, fp, content, existing


def run_synth(
    task: Task,
    out: str | os.PathLike,
    *,
    lm=None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
) -> SynthReport:
    """Generate the task's examples into ``out`` (append-only, resumable). See module docstring.

    lm: a loaded model (default: load ``task.model``). progress: a tqdm bar (None = when stderr
    is a terminal). log: where one-line notes go (default: stderr)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise DivgenError(f"--batch-rows must be an integer >= 1, got {batch_rows!r}")
    out = Path(out)
    start = time.perf_counter()
    pool, fp, content, existing = prepare(task, out)
    groups = plan(task)
    keep = {(s.group, s.slot) for slots in groups for s in slots if s.keep}
    missing = keep - existing.done
    report = SynthReport(out=out, resumed_from=len(existing.done), fingerprint=fp)
    target = task.target()
    over = {lab: n for lab, n in existing.counts.items() if n > target.get(lab, 0)}
    if over:
        log(f"note: {out} already holds more than asked for {', '.join(f'{k} ({v})' for k, v in over.items())}")
    if not missing:
        report.counts = dict(existing.counts)
        report.wall_time_s = time.perf_counter() - start
        if existing.size > existing.good_bytes:
            log(f"note: {out} ends with a torn line; it is cut off on the next run that writes")
        log(f"{out}: complete ({', '.join(f'{k} {v}' for k, v in report.counts.items())}); nothing to do")
        return report

    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise DivgenError(f"cannot open --out {out} for writing: {exc.strerror}. Choose another path") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise DivgenError(f"another process is writing {out}: wait for it or choose another --out") from exc
        existing = read_output(out)      # re-read under the lock
        check_same_task(out, existing, fp, content)
        missing = keep - existing.done
        report.resumed_from = len(existing.done)
        if lm is None:
            from divgen.engine.model import load_model

            lm = load_model(None if task.model == "default" else task.model)
        if existing.size > existing.good_bytes:   # a torn last line from a killed run
            os.ftruncate(fd, existing.good_bytes)
            os.fsync(fd)
            log(f"note: cut a torn last line off {out} ({existing.size - existing.good_bytes} bytes)")
        write_sidecar(out, fp, content, task)
        _generate_into(task, lm, fd, groups, missing, pool, fp, batch_rows, progress, report)
    finally:
        os.close(fd)
    final = read_output(out)
    report.counts = dict(final.counts)
    report.wall_time_s = time.perf_counter() - start
    return report


def _generate_into(task, lm, fd, groups, missing, pool, fp, batch_rows, progress, report) -> None:
    from tqdm import tqdm

    from divgen.engine.decode import generate

    todo_groups = [slots for slots in groups if any((s.group, s.slot) in missing for s in slots)]
    batches, current, rows = [], [], 0
    for slots in todo_groups:
        n = rows_in_group(task, slots, missing)
        if current and rows + n > batch_rows:
            batches.append(current)
            current, rows = [], 0
        current.append(slots)
        rows += n
    if current:
        batches.append(current)

    prompt = PromptCache(task, lm, pool)
    prefixes = scaffolding_prefixes(task)
    names = task.label_names
    params = {**task.params, **task.content()["sampling"], "max_new_tokens": task.max_new_tokens,
              "rows_per_group": task.group_rows}
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    bar = tqdm(total=len(missing), desc=f"synth {task.method}", unit="ex", file=sys.stderr,
               disable=disable, dynamic_ncols=True, smoothing=0.1, mininterval=0.5,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]")
    s = task.sampling
    try:
        for batch in batches:
            b = rows_for_groups(task, batch, missing, prompt)
            in_batch = sum(b.write)
            written_before = bar.n

            def on_progress(done: int, total: int, _base=written_before, _n=in_batch) -> None:
                # Rows finish inside a batch before they are written: show them as they finish.
                ahead = _base + (done * _n) // max(total, 1) - bar.n
                if ahead > 0:
                    bar.update(ahead)

            results, stats = generate(
                lm, b.prompts, max_new_tokens=task.max_new_tokens, temperature=s.temperature,
                top_k=s.top_k, top_p=s.top_p, alpha=s.alpha, seeds=b.seeds, stop=task.stop,
                ignore_eos=task.ignore_eos, guidance=make_guidance(task, b), progress=on_progress,
            )
            report.generate_time_s += stats.wall_time_s
            report.rows_forwarded += stats.rows_forwarded
            report.steps += stats.steps
            report.rows_forwarded_per_step.extend(stats.rows_forwarded_per_step)
            lines = []
            for r in results:
                sl = b.slots[r.row]
                if not b.write[r.row]:
                    continue
                record = {
                    "text": clean_text(lm, r.token_ids, task.stop, prefixes),
                    "label": names[sl.label],
                    "method": task.method,
                    "params": params,
                    "seed": r.seed,
                    "group": sl.group,
                    "slot": sl.slot,
                    "finish_reason": r.finish_reason,
                    "tokens": len(r.token_ids),
                    "task": fp,
                }
                lines.append((sl.group, sl.slot, json.dumps(record, ensure_ascii=False)))
            lines.sort()
            _write_all(fd, "".join(line + "\n" for _, _, line in lines).encode("utf-8"))
            os.fsync(fd)
            report.written += len(lines)
            if written_before + len(lines) > bar.n:
                bar.update(written_before + len(lines) - bar.n)
            prompt.clear()
    finally:
        bar.close()
