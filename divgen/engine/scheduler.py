"""Continuous batching of guidance groups over the engine's KV slots (host side).

A *unit* is what enters and leaves the batch together: a CorrSynth / M-CorrSynth / explicit
group (all rows of one guidance group id), a CFG leader with its shadow rows, or one FewGen row.
Units are admitted first come first served as soon as enough slots are free (lowest free slots
first); a row retires when it finishes (a CFG leader takes its shadows along), freeing its slot
for the next unit. Everything the decode step needs from the batch composition is derived here,
once per change: the prompt row of every slot (``slot_row``: the engine passes it to
``Guidance.weight_blocks``, which recomputes γ over the members left, in slot ids) and the leader
slot of every slot.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from divgen.engine.guidance import Guidance


@dataclass
class Unit:
    rows: list[int]               # prompt rows, leaders before their shadows


class Scheduler:
    def __init__(self, n_rows: int, guidance: Guidance | None, slots: int):
        self.guidance, self.n_slots = guidance, slots
        order: dict = {}
        for r in range(n_rows):
            if guidance is None:
                key = r
            elif guidance.method == "cfg":
                key = (guidance.groups[r], guidance.leader(r))
            else:
                key = guidance.groups[r]
            order.setdefault(key, []).append(r)
        units = []
        for rows in order.values():
            if guidance is not None and guidance.method == "cfg":
                rows = sorted(rows, key=lambda r: guidance.is_shadow(r))
            units.append(Unit(rows))
        self.groups = units
        self.pending = deque(units)
        self.slot_row: list[int | None] = [None] * slots       # prompt row in each slot
        self.slot_from: list[int] = [0] * slots                # first step whose output is the row's
        self.row_slot: dict[int, int] = {}
        self.retired: set[int] = set()

    # ---- admission / retirement ----
    def free_slots(self) -> list[int]:
        return [s for s, r in enumerate(self.slot_row) if r is None]

    def next_admissible(self) -> Unit | None:
        """The first waiting unit if enough slots are free for all its rows, else None."""
        if self.pending and len(self.pending[0].rows) <= len(self.free_slots()):
            return self.pending[0]
        return None

    def admit(self, unit: Unit, first_step: int) -> list[int]:
        """Give the unit's rows the lowest free slots; their outputs count from ``first_step``."""
        assert self.pending and self.pending[0] is unit
        self.pending.popleft()
        slots = self.free_slots()[: len(unit.rows)]
        for s, r in zip(slots, unit.rows):
            self.slot_row[s], self.slot_from[s], self.row_slot[r] = r, first_step, s
        return slots

    def retire(self, row: int) -> list[int]:
        """The row leaves (with its CFG shadows); returns the slots freed."""
        rows = [row]
        g = self.guidance
        if g is not None and g.shadow_of is not None and not g.is_shadow(row):
            rows += [r for r, s in self.row_slot.items() if g.shadow_of[r] == row and r not in self.retired]
        freed = []
        for r in rows:
            self.retired.add(r)
            s = self.row_slot.pop(r)
            self.slot_row[s] = None
            freed.append(s)
        return freed

    # ---- views of the batch ----
    def live_slots(self, step: int, n: int):
        """(slot, row) of rows live on the host whose output of ``step`` is theirs."""
        for s in range(n):
            r = self.slot_row[s]
            if r is not None and self.slot_from[s] <= step and r not in self.retired:
                yield s, r

    def any_live(self) -> bool:
        return any(r is not None for r in self.slot_row) or bool(self.pending)

    def highest_used_slot(self) -> int:
        used = [s for s, r in enumerate(self.slot_row) if r is not None]
        return max(used) if used else 0

    def slot_rows(self, n: int) -> list[int]:
        return [-1 if r is None else r for r in self.slot_row[:n]]

    def leader_slots(self, n: int) -> list[int]:
        g = self.guidance
        out = list(range(n))
        if g is not None and g.shadow_of is not None:
            for s in range(n):
                r = self.slot_row[s]
                if r is not None and g.is_shadow(r):
                    out[s] = self.row_slot[g.leader(r)]
        return out

