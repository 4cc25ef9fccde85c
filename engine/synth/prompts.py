"""Prompt rendering: which few-shot examples a row shows, and the user message it gets.

Few-shot examples for slot s (label y) of group g are drawn from y's pool by a generator seeded
with (seed, g, s, y), so a row always sees the same prompt and a resumed run rebuilds it exactly;
two rows of one label in a group see different examples.
"""
from __future__ import annotations

import random

from divgen.engine.synth.task import Label, Task


def pick_examples(task: Task, pool: dict[str, list[str]], group: int, slot: int, label: str) -> list[str]:
    """The few-shot examples of `label` shown in row `slot` of `group`: a sample without
    replacement from the label's pool, by a generator seeded with (seed, group, slot, label)."""
    items = pool.get(label, [])
    k = min(task.few_shot.per_prompt, len(items))
    if k == 0:
        return []
    rng = random.Random(f"divgen-few-shot/{task.seed}/{group}/{slot}/{label}")
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


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
