"""``divgen eval``: train students on synthetic sets, test them on held-out real rows.

For each synthetic JSONL set (and, as the ceiling, for real pool rows in the same number and
label proportions):

1. Students, each trained once per seed and tested on the real *test* rows (``data.split``):
   * ``probe`` — the linear probe (``probe.py``) on frozen all-MiniLM-L6-v2 embeddings (default);
   * ``finetune`` — MiniLM + a classification head trained end to end (``finetune.py``).
   Reported: accuracy and macro-F1 (the mean over labels of 2·TP / (2·TP + FP + FN)), mean and
   sample standard deviation over the seeds.
2. Label fidelity: the share of the set's texts that the judge (``judge.py``, trained on the pool
   rows) assigns to their intended label. Not reported for the real row (the judge was trained on
   the pool).

The real-data row draws, per seed, as many pool rows of each label as the synthetic set has
(``random.Random(f"divgen-eval-real/{seed}")``, without replacement; all of a label's pool rows
when it has fewer — then a warning is logged, the row's ``n`` is the rows it really used, ``asked``
what the synthetic set had, ``short_labels`` each short label's [used, asked], and the table says
so under itself). Every row's ``n`` is the number of training rows it used. A real file whose
pool lacks a label is refused: the judge and the real-data row could never predict that label.
The judge's own accuracy on the test rows is reported with the settings.
"""
from __future__ import annotations

import math
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from divgen.engine.errors import DivgenError
from divgen.engine.eval.data import LabelledSet, read_real, read_synthetic, require_every_label, split, thin

STUDENTS = ("probe", "finetune")


def accuracy_and_macro_f1(pred: list[int], gold: list[int], num_classes: int) -> tuple[float, float]:
    """Accuracy and the mean over all classes of F1 = 2·TP / (2·TP + FP + FN) (0 when undefined)."""
    if len(pred) != len(gold) or not gold:
        raise ValueError("predictions and gold labels must be non-empty and of equal length")
    tp, fp, fn = Counter(), Counter(), Counter()
    for p, g in zip(pred, gold):
        if p == g:
            tp[g] += 1
        else:
            fp[p] += 1
            fn[g] += 1
    f1 = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) if (tp[c] + fp[c] + fn[c]) else 0.0 for c in range(num_classes)]
    return sum(tp.values()) / len(gold), sum(f1) / num_classes


def mean_std(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "values": values}


def real_subset(pool: LabelledSet, counts: dict[int, int], seed: int) -> LabelledSet:
    """Per label, ``counts[label]`` pool rows drawn without replacement (module docstring)."""
    rng = random.Random(f"divgen-eval-real/{seed}")
    chosen = []
    for label in sorted(counts):
        rows = [i for i, l in enumerate(pool.labels) if l == label]
        chosen += sorted(rng.sample(rows, min(counts[label], len(rows))))
    return pool.take(sorted(chosen))


class _Students:
    """Trains and tests the chosen students on one training set, over the seeds."""

    def __init__(self, students, seeds, test: LabelledSet, test_x, finetune_config, finetune_test: LabelledSet,
                 log):
        self.students, self.seeds, self.test, self.test_x = students, seeds, test, test_x
        self.finetune_config, self.finetune_test, self.log = finetune_config, finetune_test, log
        self.k = len(test.label_names)

    def run(self, train_for_seed: Callable[[int], tuple[LabelledSet, object]]) -> dict:
        import torch

        from divgen.engine.eval.probe import train_probe

        out = {}
        for student in self.students:
            accs, f1s, steps = [], [], None
            for seed in self.seeds:
                train, train_x = train_for_seed(seed)
                if student == "probe":
                    probe = train_probe(train_x, torch.tensor(train.labels), self.k, seed=seed)
                    pred, gold = probe.predict(self.test_x).tolist(), self.test.labels
                else:
                    from divgen.engine.eval.finetune import predict_finetuned, train_finetuned

                    t0 = time.perf_counter()
                    model, steps = train_finetuned(train.texts, train.labels, self.k, seed, self.finetune_config)
                    pred = predict_finetuned(model, self.finetune_test.texts,
                                             max_length=self.finetune_config.max_length).tolist()
                    gold = self.finetune_test.labels
                    self.log(f"  finetune seed {seed}: {steps} steps, {time.perf_counter() - t0:.0f}s")
                acc, f1 = accuracy_and_macro_f1(pred, gold, self.k)
                accs.append(acc)
                f1s.append(f1)
            out[student] = {"accuracy": mean_std(accs), "macro_f1": mean_std(f1s),
                            "test_rows": len(self.test if student == "probe" else self.finetune_test)}
            if steps is not None:
                out[student]["steps"] = steps
        return out


def evaluate(synthetic: list[str | Path], real: str | Path, task, *, students=("probe",), seeds=(0, 1, 2),
             text_column: str | None = None, label_column: str = "label", test_limit: int | None = None,
             finetune_test_limit: int | None = 1000, finetune_config=None, finetune_epochs: int | None = None, real_ceiling: bool = True,
             names: list[str] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """The ``divgen eval`` result (module docstring) as a JSON-ready dict."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    bad = [s for s in students if s not in STUDENTS]
    if bad or not students:
        raise DivgenError(f"unknown student(s) {bad or '(none)'}: use {', '.join(STUDENTS)}")
    seeds = list(seeds)
    if not seeds:
        raise DivgenError("give at least one seed (--seeds N, N >= 1)")
    if not synthetic and not real_ceiling:
        raise DivgenError("nothing to evaluate: give a synthetic JSONL file (or keep the real-data row)")
    # Every input is read and checked before torch or a model loads.
    sets = [read_synthetic(p, task) for p in synthetic]
    every = task.few_shot.every
    pool, test = split(read_real(real, task, text_column, label_column), every)
    require_every_label(pool)
    test = thin(test, test_limit)
    ft_test = thin(test, finetune_test_limit)
    names = names or [Path(p).stem for p in synthetic]

    from divgen.engine.eval.features import embed_cached
    from divgen.engine.eval.finetune import FinetuneConfig
    from divgen.engine.eval.judge import Judge

    t0 = time.perf_counter()
    log(f"embedding {len(test)} real test rows and {len(pool)} pool rows (cached after the first run)")
    test_x = embed_cached(test.texts)
    pool_x = embed_cached(pool.texts)
    judge = Judge.train(pool.texts, [pool.label_names[i] for i in pool.labels], pool.label_names, features=pool_x)
    judge_acc, judge_f1 = accuracy_and_macro_f1(judge.predict_indices(test.texts, test_x).tolist(), test.labels,
                                                len(task.labels))
    if finetune_config is None:
        finetune_config = FinetuneConfig() if finetune_epochs is None else FinetuneConfig(epochs=finetune_epochs)
    runner = _Students(list(students), seeds, test, test_x, finetune_config, ft_test, log)
    rows = []
    profiles = []
    for name, path, (data, _) in zip(names, synthetic, sets):
        log(f"{name}: {len(data)} examples")
        x = embed_cached(data.texts)
        fid = judge.agrees(data.texts, [data.label_names[i] for i in data.labels], features=x)
        per_label = {}
        for k, lab in enumerate(data.label_names):
            mine = [a for a, l in zip(fid, data.labels) if l == k]
            per_label[lab] = sum(mine) / len(mine) if mine else None
        row = {"set": name, "file": str(path), "real": False, "n": len(data),
               "label_counts": {data.label_names[k]: c for k, c in sorted(Counter(data.labels).items())},
               "fidelity": sum(fid) / len(fid), "fidelity_per_label": per_label,
               "students": runner.run(lambda seed, d=data, x=x: (d, x))}
        rows.append(row)
        profile = dict(Counter(data.labels))
        if profile not in profiles:
            profiles.append(profile)
    if real_ceiling:
        if not profiles:          # no synthetic set: as many rows per label as the smallest label's pool
            per = min(Counter(pool.labels).values())
            profiles = [{k: per for k in range(len(task.labels))}]
        index = {i: r for r, i in enumerate(pool.rows)}
        have = Counter(pool.labels)
        for profile in profiles:
            used = {k: min(c, have.get(k, 0)) for k, c in sorted(profile.items())}
            n, asked = sum(used.values()), sum(profile.values())
            short = {task.labels[k].name: [used[k], c] for k, c in sorted(profile.items()) if used[k] < c}
            if short:
                log("warning: the real pool is smaller than asked for " + ", ".join(
                    f"{name} ({u} of {c})" for name, (u, c) in short.items())
                    + f": the real-data row trains on {n} rows, not {asked}")
            log(f"real pool rows: {n} per seed")

            def train_for_seed(seed, profile=profile):
                sub = real_subset(pool, profile, seed)
                return sub, pool_x[[index[r] for r in sub.rows]]

            rows.append({"set": f"real pool ({n})", "file": str(real), "real": True, "n": n, "asked": asked,
                         "short_labels": short,
                         "label_counts": {task.labels[k].name: c for k, c in used.items()},
                         "fidelity": None, "fidelity_per_label": None, "students": runner.run(train_for_seed)})
    return {
        "settings": {
            "task": task.name, "real_file": str(real), "every": every, "pool_rows": len(pool),
            "test_rows": len(test), "finetune_test_rows": len(ft_test) if "finetune" in students else None,
            "seeds": seeds, "students": list(students),
            "judge": {"model": "linear probe on all-MiniLM-L6-v2 embeddings, trained on the pool rows",
                      "test_accuracy": judge_acc, "test_macro_f1": judge_f1},
            "wall_time_s": time.perf_counter() - t0,
        },
        "rows": rows,
    }


def _pm(stat: dict | None) -> str:
    if stat is None:
        return "-"
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def format_eval(result: dict, markdown: bool = False) -> str:
    """One row per training set: n, fidelity, each student's accuracy and macro-F1 (in %)."""
    students = result["settings"]["students"]
    head = ["set", "n", "fidelity %"]
    for s in students:
        head += [f"{s} acc %", f"{s} F1 %"]
    rows = []
    for r in result["rows"]:
        cells = [r["set"], str(r["n"]), "-" if r["fidelity"] is None else f"{100 * r['fidelity']:.1f}"]
        for s in students:
            st = r["students"].get(s)
            cells += [_pm(st and st["accuracy"]), _pm(st and st["macro_f1"])]
        rows.append(cells)
    s = result["settings"]
    note = (f"n: the training rows each row used. Students tested on {s['test_rows']} real test rows"
            + (f" ({s['finetune_test_rows']} for finetune)" if s.get("finetune_test_rows") else "")
            + f"; mean ± std over seeds {s['seeds']}. Fidelity: a probe trained on the {s['pool_rows']} real "
            f"pool rows (its own test accuracy {100 * s['judge']['test_accuracy']:.1f} %) agrees with the label.")
    for r in result["rows"]:
        if r.get("short_labels"):
            note += (f"\n{r['set']}: the real pool has fewer rows than the synthetic set for "
                     + ", ".join(f"{name} ({u} of {c})" for name, (u, c) in r["short_labels"].items())
                     + f"; this row trains on {r['n']} real rows, not {r['asked']}.")
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n\n" + note
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n" + note
