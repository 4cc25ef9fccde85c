"""Prompt rendering: which few-shot examples a row shows, and the user message it gets.

Few-shot examples for slot s (label y) of group g are drawn from y's pool by a generator seeded
with (seed, g, s, y), so a row always sees the same prompt and a resumed run rebuilds it exactly;
two rows of one label in a group see different examples.
"""
from __future__ import annotations

import random

from divgen.engine.synth.task import Label, Task


def pick_example_positions(task: Task, pool: dict[str, list], group: int, slot: int, label: str) -> list[int]:
    """Positions in the label's pool of the few-shot examples row `slot` of `group` shows: a
    sample without replacement, by a generator seeded with (seed, group, slot, label)."""
    n = len(pool.get(label, []))
    k = min(task.few_shot.per_prompt, n)
    if k == 0:
        return []
    rng = random.Random(f"divgen-few-shot/{task.seed}/{group}/{slot}/{label}")
    return sorted(rng.sample(range(n), k))


def pick_examples(task: Task, pool: dict[str, list[str]], group: int, slot: int, label: str) -> list[str]:
    """The few-shot examples of `label` shown in row `slot` of `group` (``pick_example_positions``)."""
    return [pool[label][i] for i in pick_example_positions(task, pool, group, slot, label)]


def render_prompt(task: Task, label: Label, examples: list[str]) -> str:
    """The user message for one row (before the chat template)."""
    names = {"verbalization": label.verbalization, "label": label.name}
    block = ""
    if examples:
        fs = task.few_shot
        block = fs.header.format(**names)
        block += "".join(fs.template.format(text=e, index=i + 1, **names) for i, e in enumerate(examples))
        block += fs.footer.format(**names)
    return task.prompt.format(examples=block, **names)


class PromptCache:
    """Formatted prompt (chat template applied) of (group, slot, label), built once."""

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
