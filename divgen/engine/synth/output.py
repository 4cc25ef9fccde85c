"""The output protocol of ``divgen synth``: an append-only JSONL file plus a sidecar.

* Every record is one line ``{"text", "label", "method", "params", "seed", "group", "slot",
  "finish_reason", "tokens", "task"}`` (text first), written with its newline in one append +
  fsync per batch; (group, slot) identifies it, ``task`` is the task fingerprint.
* ``.FILE.task.json`` (the sidecar, replaced atomically; hidden, so ``datasets`` loading a
  folder skips it) holds the fingerprint and what it was
  computed from, so a changed task is refused with the fields that changed.
* On resume, bytes after the last newline are a torn write and are cut off, but only when the
  file is a divgen output (``read_output``); any other existing file is refused, never changed.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.jsonl import read_jsonl
from divgen.engine.synth.task import Task

SIDECAR_SUFFIX = ".task.json"     # sidecar of FILE: .FILE.task.json (before: FILE.task.json, still read)
_RECORD_START = b'{"text": '


@dataclass
class ExistingOutput:
    done: set = field(default_factory=set)         # (group, slot) of complete records
    counts: dict = field(default_factory=dict)     # label -> complete records
    good_bytes: int = 0                             # length up to the last complete line
    size: int = 0                                   # current file size (> good_bytes: torn tail)
    fingerprints: set = field(default_factory=set)  # task fingerprints found on the lines


def sidecar_path(out: Path) -> Path:
    """Where the sidecar of ``out`` is written: a hidden file, which ``datasets`` skips in a folder."""
    return out.with_name("." + out.name + SIDECAR_SUFFIX)


def legacy_sidecar_path(out: Path) -> Path:
    """The sidecar name of outputs written before: read for resume, replaced on the next write."""
    return out.with_name(out.name + SIDECAR_SUFFIX)


def existing_sidecar(out: Path) -> Path | None:
    """The sidecar file of ``out`` that exists (the current name first), or None."""
    for side in (sidecar_path(out), legacy_sidecar_path(out)):
        if side.is_file():
            return side
    return None


def read_output(out: Path) -> ExistingOutput:
    """Parse an existing output (nothing is modified); refuse a file that is not a synth output.

    Every complete line must be a synth record. Bytes after the last newline are a torn write
    (a kill during an append) only when they start like a record (``{"text": ``) and the file is
    ours (complete records before them, or the sidecar); anything else is refused, never cut."""
    info = ExistingOutput()
    if not out.exists():
        return info
    try:
        contents = read_jsonl(out, "--out", tail="torn")
    except DivgenError as exc:
        raise DivgenError(f"{exc}; --out {out} is not a divgen synth output, so it is left as it is: "
                          "write to a new --out") from exc
    info.size, info.good_bytes = contents.size, contents.complete_bytes
    for n, rec in contents.records:
        group, slot, label = rec.get("group"), rec.get("slot"), rec.get("label")
        if not (_is_int(group) and _is_int(slot) and isinstance(label, str) and isinstance(rec.get("text"), str)):
            raise DivgenError(f"--out {out} line {n} is not a divgen synth record (it needs text, label, group, "
                              "slot): the file is not a synth output or was edited, so it is left as it is; "
                              "write to a new --out")
        key = (group, slot)
        if key in info.done:
            raise DivgenError(f"--out {out} line {n} repeats group {key[0]} slot {key[1]}: the file was edited or "
                              "concatenated; write to a new --out")
        info.done.add(key)
        info.counts[label] = info.counts.get(label, 0) + 1
        if "task" in rec:
            info.fingerprints.add(rec["task"])
    tail = contents.torn_tail
    if tail:
        ours = bool(info.done) or existing_sidecar(out) is not None
        if not (tail.startswith(_RECORD_START) and ours):
            raise DivgenError(f"--out {out} ends with {len(tail)} bytes that are not a divgen synth record: it is "
                              "not a synth output, so it is left as it is; write to a new --out")
    elif info.size and not info.done:
        raise DivgenError(f"--out {out} holds no divgen synth record: it is not a synth output, so it is left as "
                          "it is; write to a new --out")
    return info


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    side = existing_sidecar(out) or sidecar_path(out)
    stored = None
    if side.exists():
        stored = read_sidecar(out)
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
    for path in (out, sidecar_path(out), legacy_sidecar_path(out)):
        if path.exists() and not os.access(path, os.W_OK):
            raise DivgenError(f"{path} is not writable: fix its permissions or choose another --out")
    if not os.access(parent, os.W_OK):
        raise DivgenError(f"cannot write in {parent}: choose another --out")


def read_sidecar(out: Path) -> dict | None:
    """The sidecar of ``out`` (None when absent); one that is not ours is refused."""
    side = existing_sidecar(out)
    if side is None:
        return None
    try:
        stored = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DivgenError(f"{side} exists but is not a divgen task sidecar ({exc.__class__.__name__}): move it "
                          "away or write to a new --out") from exc
    if not isinstance(stored, dict) or not isinstance(stored.get("fingerprint"), str):
        raise DivgenError(f"{side} exists but is not a divgen task sidecar: move it away or write to a new --out")
    return stored


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_sidecar(out: Path, fp: str, content: dict, task: Task) -> None:
    """Atomically write .FILE.task.json (fingerprint + what it was computed from); a sidecar of the
    old name (checked to match before this is called) is removed, so a folder holds one."""
    side = sidecar_path(out)
    tmp = side.with_name(side.name + ".tmp")
    body = {"fingerprint": fp, "task_name": task.name, "task_file": str(task.path) if task.path else None,
            "few_shot_file": str(task.few_shot.file) if task.few_shot.file else None, "content": content}
    try:
        tmp.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, side)
        legacy_sidecar_path(out).unlink(missing_ok=True)
    except OSError as exc:
        raise DivgenError(f"cannot write {side}: {exc}. Choose another --out") from exc




def pool_digest(pool: dict[str, list[str]]) -> str:
    """A short hash of the pool's content (part of the task fingerprint)."""
    return hashlib.sha256(json.dumps(pool, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def fingerprint(task: Task, pool: dict[str, list[str]]) -> str:
    """Hash of everything that decides the texts: a changed task gets a different fingerprint."""
    content = {**task.content(), "few_shot_pool": pool_digest(pool)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def synth_record(*, text: str, label: str, method: str, params: dict, seed: int, group: int, slot: int,
                 finish_reason: str, tokens: int, fingerprint: str, model: str, divgen_version: str,
                 examples: list | None = None) -> dict:
    """One output line (text first: ``read_output`` recognises a torn record by its start); the
    fields and their types are the same for every method of a task (``schema.py``).
    ``examples``: the few-shot examples the row's own prompt showed, as data-row indices of the
    few-shot file (inline examples: their text) — for the copy rate and ``divgen filter``."""
    record = {"text": text, "label": label, "method": method, "params": params, "seed": seed, "group": group,
              "slot": slot, "finish_reason": finish_reason, "tokens": tokens, "task": fingerprint,
              "model": model, "divgen_version": divgen_version}
    if examples is not None:
        record["examples"] = list(examples)
    return record
