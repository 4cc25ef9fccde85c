"""Planning: which (group, slot) rows a task needs, and the decode rows of a batch of groups.

Group g has R = ``task.group_rows`` sample slots; slot s carries label (g·R + s) mod K
(round-robin, so every label recurs). A slot is *kept* (its text is written) while its label
still needs examples: the slot at position p = g·R + s is label p mod K's (p div K)-th
occurrence, kept iff that is below the label's count. Groups run until the last kept slot, so
``Plan`` is computed per group on demand: O(1) memory, O(R) per group, whatever the counts.

The rows of a batch for each method:

* fewgen      — the missing slots only, independent rows (no guidance);
* corrsynth   — every slot of the group (rows are contrasted even when their text is not kept),
                ``Guidance.corrsynth(g)``;
* m-corrsynth — as corrsynth with ``Guidance.m_corrsynth(γ, δ)`` over the slots' labels;
* cfg         — each missing slot is a leader row plus one shadow row per *other* label, whose
                prompt (that label's prompt in the same group) is the negative prompt.

Row seeds are a hash of (seed, group, slot), and the engine's noise depends only on (seed, step,
token), so a group decodes to the same text whatever batch it lands in.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from divgen.engine.errors import DivgenError
from divgen.engine.synth.prompts import PromptCache
from divgen.engine.synth.task import Task


@dataclass(frozen=True)
class Slot:
    group: int
    slot: int
    label: int            # index into task.labels
    keep: bool            # its text is written (else it only takes part in the contrast)


class Plan(Sequence):
    """The groups of a task, each a list of R ``Slot``s, built on demand (module docstring)."""

    def __init__(self, task: Task):
        self.labels = len(task.labels)                 # K
        self.rows = task.group_rows                    # R
        self.target = tuple(task.per_label)            # count per label
        last = [lab + (t - 1) * self.labels for lab, t in enumerate(self.target) if t > 0]
        self.groups = max(last) // self.rows + 1 if last else 0
        self.kept_total = sum(self.target)             # kept slots over all groups

    def __len__(self) -> int:
        return self.groups

    def __getitem__(self, g):
        if isinstance(g, slice):
            return [self[i] for i in range(*g.indices(self.groups))]
        if g < 0:
            g += self.groups
        if not 0 <= g < self.groups:
            raise IndexError(f"group {g} is outside the plan's {self.groups} groups")
        return [Slot(g, s, *self._label_keep(g * self.rows + s)) for s in range(self.rows)]

    def _label_keep(self, position: int) -> tuple[int, bool]:
        label = position % self.labels
        return label, position // self.labels < self.target[label]

    def is_kept(self, group: int, slot: int) -> bool:
        """Whether (group, slot) is a kept slot of this plan."""
        if not (0 <= group < self.groups and 0 <= slot < self.rows):
            return False
        return self._label_keep(group * self.rows + slot)[1]


def plan(task: Task) -> Plan:
    """Groups of slots, deterministic in the task (see the module docstring)."""
    return Plan(task)


def row_seed(seed: int, group: int, slot: int) -> int:
    """A 62-bit seed per (task seed, group, slot): independent streams, stable across runs."""
    digest = hashlib.sha256(f"divgen-synth/{seed}/{group}/{slot}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


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
        return Guidance.corrsynth(groups=b.groups, g=p["g"])
    if task.method == "m-corrsynth":
        return Guidance.m_corrsynth(groups=b.groups, labels=b.labels, gamma=p["gamma"], delta=p["delta"])
    if task.method == "cfg":
        return Guidance.cfg(groups=b.groups, shadow_of=b.shadow_of, g=p["g"])
    raise DivgenError(f"unknown method {task.method!r}")
