"""Synth records name the few-shot examples their own prompt showed (``examples``), which the copy
rate and ``divgen filter`` read back through the sidecar's few-shot file."""
from __future__ import annotations

import json

from divgen.engine.metrics import read_records, set_context
from divgen.engine.synth.few_shot import read_labelled_file
from divgen.engine.synth.job import run_synth
from divgen.engine.synth.output import sidecar_path
from divgen.engine.synth.prompts import PromptCache
from divgen.engine.synth.task import task_from_dict


def test_records_name_the_pool_rows_their_prompt_showed(embedded_lm, tmp_path):
    few = tmp_path / "few.csv"
    lines = ["label,text"]
    for i in range(40):
        lines.append(f"{'ab'[i % 2]},\"Example number {i} about {'apples' if i % 2 == 0 else 'boats'} today.\"")
    few.write_text("\n".join(lines) + "\n")
    task = task_from_dict({
        "labels": [{"name": "apples", "source_label": "a", "examples": ["An inline apple example."]},
                   {"name": "boats", "source_label": "b", "examples": ["An inline boat example."]}],
        "prompt": "{examples}Write about {verbalization}.",
        "few_shot": {"file": str(few), "every": 5, "per_prompt": 2},
        "max_new_tokens": 2, "per_label": 3, "seed": 3, "method": "corrsynth",
    })
    out = tmp_path / "out.jsonl"
    run_synth(task, out, lm=embedded_lm, progress=False, log=lambda m: None)
    records = read_records(out)
    rows = read_labelled_file(few)
    from divgen.engine.synth.few_shot import few_shot_pool

    prompt = PromptCache(task, embedded_lm, few_shot_pool(task))
    names = task.label_names
    seen_inline = False
    for r in records:
        assert len(r["examples"]) == 2
        text = prompt(r["group"], r["slot"], names.index(r["label"]))
        for e in r["examples"]:
            if isinstance(e, str):
                seen_inline = True
                assert e == f"An inline {r['label'][:-1]} example." and e in text
            else:
                label, shown = rows[e]
                assert e % 5 == 0 and label == ("a" if r["label"] == "apples" else "b")   # its label's pool row
                assert shown in text                                                  # really in its prompt
        others = [t for i, (_, t) in enumerate(rows) if i not in r["examples"]]
        assert not any(t in text for t in others)                                    # and nothing else
    # the metrics resolve them through the sidecar's few-shot file
    ctx = set_context(out, records)
    for r, shown in zip(records, ctx["examples"]):
        assert shown == [e if isinstance(e, str) else rows[e][1] for e in r["examples"]]
    assert json.loads(sidecar_path(out).read_text())["few_shot_file"] == str(few)
    assert seen_inline
