"""The label-fidelity judge: a classifier trained on *real* labelled rows only.

Label fidelity of a synthetic set = the share of its texts that the judge assigns to their
intended label. The judge is the linear probe (``probe.py``) on all-MiniLM-L6-v2 embeddings,
trained on the real file's pool rows (data-row index % every == 0) — never on test rows, never
on synthetic rows. Usage::

    from divgen.engine.eval.judge import Judge
    judge = Judge.from_real("../shared/data/ag_news_test.csv", load_task("ag_news"))
    judge.fidelity(texts, labels)      # -> float in [0, 1]
    judge.predict(texts)               # -> label names
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from divgen.engine.errors import DivgenError


@dataclass
class Judge:
    probe: object                  # probe.LinearProbe over embeddings
    label_names: list[str]
    trained_on: int = 0            # real rows it was trained on

    @classmethod
    def train(cls, texts: list[str], labels: list[str], label_names: list[str] | None = None,
              l2: float | None = None, features=None) -> "Judge":
        """A judge from real labelled texts (``features``: their embeddings, if already computed)."""
        import torch

        from divgen.engine.eval.features import embed_cached
        from divgen.engine.eval.probe import DEFAULT_L2, train_probe

        names = list(label_names) if label_names is not None else list(dict.fromkeys(labels))
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DivgenError(f"judge training labels {unknown} are not among {names}")
        if not texts:
            raise DivgenError("the judge needs at least one real labelled text")
        absent = [n for n in names if n not in set(labels)]
        if absent:
            raise DivgenError(f"the judge has no training text of label(s) {', '.join(absent)}: it could never "
                              "predict them; give real rows of every label")
        x = embed_cached(texts) if features is None else features
        y = torch.tensor([index[l] for l in labels])
        probe = train_probe(x, y, len(names), l2=DEFAULT_L2 if l2 is None else l2)
        return cls(probe, names, len(texts))

    @classmethod
    def from_real(cls, path: str | Path, task, text_column: str | None = None,
                  label_column: str = "label") -> "Judge":
        """A judge trained on the pool rows of a real labelled file (labels via the task)."""
        from divgen.engine.eval.data import read_real, require_every_label, split

        pool, _ = split(read_real(path, task, text_column, label_column), task.few_shot.every)
        require_every_label(pool, "the judge needs every label")
        return cls.train(pool.texts, [pool.label_names[i] for i in pool.labels], pool.label_names)

    def predict_indices(self, texts: list[str], features=None):
        from divgen.engine.eval.features import embed_cached

        x = embed_cached(texts) if features is None else features
        return self.probe.predict(x)

    def predict(self, texts: list[str], features=None) -> list[str]:
        return [self.label_names[int(i)] for i in self.predict_indices(texts, features)]

    def agrees(self, texts: list[str], labels: list[str], features=None) -> list[bool]:
        """Per text: does the judge assign it to ``labels[i]``?"""
        if len(texts) != len(labels):
            raise DivgenError("texts and labels must have the same length")
        return [p == l for p, l in zip(self.predict(texts, features), labels)]

    def fidelity(self, texts: list[str], labels: list[str], features=None) -> float:
        """Share of texts the judge assigns to their intended label."""
        if not texts:
            raise DivgenError("label fidelity of an empty set is undefined: give at least one text")
        agree = self.agrees(texts, labels, features)
        return sum(agree) / len(agree)
