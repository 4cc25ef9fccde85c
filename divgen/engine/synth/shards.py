"""A synth job split into shards of whole groups, and the merge of their outputs (no Ray here).

Shard i of N owns the plan's groups g with g mod N = i (round-robin: the early groups, whose
slots are all kept, and the late, partly kept ones spread evenly). A shard is an ordinary synth
job restricted to its groups (``run_synth(..., shard=(i, N))``): it appends to its own file with
the same crash-proof protocol (one append + fsync per batch, torn tail cut on resume, sidecar
fingerprint) and resumes on its own.

Every record's text depends only on (task, group, slot) — row seeds hash (seed, group, slot) and
the noise is a function of (seed, step, token) — so the shards' records, ordered by (group, slot),
are byte for byte the lines a single process writes (it writes batches in plan order, each batch
sorted by (group, slot)). ``merge_shards`` writes that file atomically.

Layout: the shards of ``OUT`` live in the hidden folder ``.OUT.shards/`` (``datasets`` skips it)
as ``shard-I-of-N.jsonl``, removed once ``OUT`` holds the merged records.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from divgen.engine.errors import DivgenError
from divgen.engine.synth.plan import Plan

_SHARD_NAME = re.compile(r"^shard-(\d+)-of-(\d+)\.jsonl$")


class ShardPlan(Sequence):
    """The groups of ``base`` that shard ``index`` of ``count`` owns; the interface of ``Plan``."""

    def __init__(self, base: Plan, index: int, count: int):
        if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
            raise DivgenError(f"shard {index} of {count}: need 0 <= index < count")
        self.base, self.index, self.count = base, index, count
        self.labels, self.rows = base.labels, base.rows
        self.groups = len(range(index, base.groups, count))
        self.kept_total = sum(s.keep for j in range(self.groups) for s in self[j])

    def __len__(self) -> int:
        return self.groups

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self.groups))]
        if j < 0:
            j += self.groups
        if not 0 <= j < self.groups:
            raise IndexError(f"group {j} is outside shard {self.index}'s {self.groups} groups")
        return self.base[self.index + j * self.count]

    def owns(self, group: int) -> bool:
        return group % self.count == self.index

    def is_kept(self, group: int, slot: int) -> bool:
        return self.owns(group) and self.base.is_kept(group, slot)


def shard_dir(out: Path) -> Path:
    return out.with_name("." + out.name + ".shards")


def shard_path(out: Path, index: int, count: int) -> Path:
    return shard_dir(out) / f"shard-{index}-of-{count}.jsonl"


def existing_shard_count(out: Path) -> int | None:
    """N of the shard files already in ``.OUT.shards/`` (None when there are none); shard files of
    two different N are refused."""
    folder = shard_dir(out)
    if not folder.is_dir():
        return None
    counts = {int(m.group(2)) for p in folder.iterdir() if (m := _SHARD_NAME.match(p.name))}
    if len(counts) > 1:
        raise DivgenError(f"{folder} holds shards of {sorted(counts)} workers: remove it (or the files of one "
                          "worker count) and run again")
    return counts.pop() if counts else None


def merge_shards(out: Path, count: int, fingerprint: str) -> int:
    """Write every shard's records, ordered by (group, slot), to ``out`` (atomically, fsynced);
    returns the number of records. Refuses a record found in two shards or in the wrong shard."""
    from divgen.engine.synth.output import read_output

    lines: list[tuple[int, int, bytes]] = []
    seen: set = set()
    for i in range(count):
        path = shard_path(out, i, count)
        if not path.exists():
            continue
        read_output(path)                                   # validates: synth records, no repeats
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]               # a torn tail is not a record
        for raw in data.splitlines():
            rec = json.loads(raw)
            key = (rec["group"], rec["slot"])
            if rec.get("task") != fingerprint:
                raise DivgenError(f"{path} holds a record of another task: remove {shard_dir(out)} and run again")
            if key in seen or key[0] % count != i:
                raise DivgenError(f"{path}: group {key[0]} slot {key[1]} is not this shard's or is in two shards; "
                                  f"remove {shard_dir(out)} and run again")
            seen.add(key)
            lines.append((key[0], key[1], raw))
    lines.sort(key=lambda x: (x[0], x[1]))
    tmp = out.with_name("." + out.name + ".merge.tmp")
    with open(tmp, "wb") as f:
        f.write(b"".join(raw + b"\n" for _, _, raw in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(lines)


def remove_shards(out: Path) -> None:
    shutil.rmtree(shard_dir(out), ignore_errors=True)
