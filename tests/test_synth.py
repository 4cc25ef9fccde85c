"""`divgen synth`: plans, forward-row counts per method, clean JSONL, resume after SIGKILL and
after a torn line, refusal of a changed task, bad input that leaves the output intact.

Model runs use the embedded SmolLM2 through one session-scoped fixture and a few tokens each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from divgen.bindings.cli import main as cli_main
from divgen.engine.errors import DivgenError
from divgen.engine.synth.clean import clean_text
from divgen.engine.synth.job import run_synth
from divgen.engine.synth.output import read_output, sidecar_path
from divgen.engine.synth.plan import make_guidance, plan, rows_for_groups
from divgen.engine.synth.prompts import PromptCache
from divgen.engine.synth.task import load_task, task_from_dict

REPO = Path(__file__).resolve().parents[1]

TOPICS = {
    "labels": [{"name": "world", "verbalization": "world news"}, {"name": "sports"},
               {"name": "business"}, {"name": "science", "verbalization": "science and technology"}],
    "prompt": "Write one sentence of news about {verbalization}.",
    "max_new_tokens": 4,
    "per_label": 1,
    "seed": 11,
}


def topics(**fields):
    return task_from_dict({**TOPICS, **fields})


@pytest.fixture(scope="session")
def lm():
    from divgen.engine.model import load_model

    return load_model(None)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("k,rows,per_label", [(4, 4, 3), (4, 8, 5), (4, 2, 3), (2, 2, 7), (3, 5, 4), (1, 2, 3)])
def test_plan_keeps_exactly_the_requested_count_per_label(k, rows, per_label):
    labels = [f"l{i}" for i in range(k)]
    task = task_from_dict({"labels": labels, "prompt": "{label}", "rows_per_group": rows, "per_label": per_label})
    groups = plan(task)
    kept = Counter(s.label for g in groups for s in g if s.keep)
    assert kept == Counter({i: per_label for i in range(k)})
    assert all(len(g) == rows for g in groups)
    # every group but the last adds something for some label; labels go round-robin
    assert all(any(s.keep for s in g) for g in groups)
    flat = [s.label for g in groups for s in g]
    assert flat == [i % k for i in range(len(flat))]


def test_plan_with_per_label_mapping():
    task = task_from_dict({"labels": ["a", "b"], "prompt": "{label}", "per_label": {"a": 3, "b": 0}})
    kept = Counter(s.label for g in plan(task) for s in g if s.keep)
    assert kept == Counter({0: 3})


def _eager_plan(task):
    """The plan by direct counting (an independent reference for the lazy ``Plan``)."""
    k, r, target = len(task.labels), task.group_rows, list(task.per_label)
    counts, groups = [0] * k, []
    while any(c < t for c, t in zip(counts, target)):
        g, slots = len(groups), []
        for s in range(r):
            label = (g * r + s) % k
            keep = counts[label] < target[label]
            counts[label] += keep
            slots.append((g, s, label, keep))
        groups.append(slots)
    return groups


@pytest.mark.parametrize("k,rows,per_label", [(4, 4, {"l0": 3, "l2": 0}), (3, 7, {"l1": 9}), (5, 2, {"l4": 1}),
                                              (2, 3, {"l0": 0, "l1": 0}), (4, 8, {"l0": 1, "l3": 6})])
def test_lazy_plan_matches_direct_counting(k, rows, per_label):
    labels = [f"l{i}" for i in range(k)]
    counts = {name: per_label.get(name, 2) for name in labels}
    task = task_from_dict({"labels": labels, "prompt": "{label}", "rows_per_group": rows, "per_label": counts})
    lazy = plan(task)
    assert [[(s.group, s.slot, s.label, s.keep) for s in g] for g in lazy] == _eager_plan(task)
    assert lazy.kept_total == sum(counts.values())
    kept = {(g, s) for grp in _eager_plan(task) for g, s, _, keep in grp if keep}
    assert {(g, s) for g in range(len(lazy) + 1) for s in range(rows + 1) if lazy.is_kept(g, s)} == kept


def test_plan_of_a_huge_count_is_lazy():
    task = task_from_dict({"labels": ["a", "b"], "prompt": "{label}", "per_label": 10 ** 6})
    groups = plan(task)                         # O(1): nothing is built up front
    assert len(groups) == 10 ** 6 and groups.kept_total == 2 * 10 ** 6
    assert [(s.label, s.keep) for s in groups[-1]] == [(0, True), (1, True)]


# ---- rows per step (issue 4, item 1) ---------------------------------------------------------
@pytest.mark.parametrize("method,rows_per_step", [("fewgen", 4), ("corrsynth", 4), ("cfg", 16)])
def test_rows_forwarded_per_step_k_labels_one_example_each(lm, tmp_path, method, rows_per_step):
    """K = 4 labels, one example per label: FewGen and CorrSynth forward K rows per decode step,
    CFG with the other labels as negative prompts K + K(K − 1) = K² rows."""
    task = topics(method=method, ignore_eos=True, max_new_tokens=4)
    report = run_synth(task, tmp_path / "out.jsonl", lm=lm, progress=False, log=lambda m: None)
    assert report.rows_forwarded_per_step == [rows_per_step] * 4    # 4 tokens = 4 decode steps (the engine forwards the last prompt token in step 1)
    assert report.written == 4
    assert sorted(r["label"] for r in lines_of(tmp_path / "out.jsonl")) == sorted(task.label_names)


def test_cfg_rows_are_leader_plus_other_labels_prompts(lm):
    task = topics(method="cfg")
    groups = plan(task)
    missing = {(s.group, s.slot) for g in groups for s in g}
    prompt = PromptCache(task, lm, {n: [] for n in task.label_names})
    b = rows_for_groups(task, groups, missing, prompt)
    assert len(b.prompts) == 16
    guidance = make_guidance(task, b)
    for leader in [i for i, s in enumerate(b.shadow_of) if s is None]:
        shadows = [i for i, s in enumerate(b.shadow_of) if s == leader]
        assert sorted(b.labels[i] for i in shadows) == sorted(set(range(4)) - {b.labels[leader]})
        assert all(b.prompts[i] == prompt(0, b.slots[leader].slot, b.labels[i]) for i in shadows)
    gam = guidance.gamma_matrix(list(range(16)))
    assert float(gam[0].sum()) == pytest.approx(task.params["g"] - 1)
    # FewGen and CorrSynth see the same prompts, group by group
    few = rows_for_groups(topics(method="fewgen"), groups, missing, prompt)
    cs = rows_for_groups(topics(method="corrsynth"), groups, missing, prompt)
    assert few.prompts == cs.prompts and few.seeds == cs.seeds


# ---- output ------------------------------------------------------------------------------------
def test_synth_writes_clean_records(lm, tmp_path):
    task = load_task("sentiment").with_overrides(per_label=2, max_new_tokens=12, method="m-corrsynth",
                                                 rows_per_group=4)
    out = tmp_path / "senti.jsonl"
    report = run_synth(task, out, lm=lm, progress=False, log=lambda m: None)
    recs = lines_of(out)
    assert Counter(r["label"] for r in recs) == {"positive": 2, "negative": 2} == report.counts
    for r in recs:
        assert set(r) >= {"text", "label", "method", "params", "seed", "group", "slot", "finish_reason"}
        assert r["method"] == "m-corrsynth" and r["params"]["gamma"] == 1.0 and r["params"]["delta"] == 0.5
        assert r["finish_reason"] in ("eos", "stop", "length")
        assert "<|" not in r["text"] and "\n" not in r["text"] and r["text"] == r["text"].strip()
        assert not r["text"].lower().startswith(("here are", "- ", "assistant"))
    assert len({(r["group"], r["slot"]) for r in recs}) == 4
    assert json.loads(sidecar_path(out).read_text())["fingerprint"] == recs[0]["task"]
    # run again: already complete, nothing appended
    before = out.read_bytes()
    again = run_synth(task, out, lm=lm, progress=False, log=lambda m: None)
    assert again.written == 0 and out.read_bytes() == before


def test_clean_text_strips_markup_scaffolding_and_stop(lm):
    ids = lm.tokenizer("Here is a news article:\n- \"Markets rose today.\"\n\nEND more", add_special_tokens=False)["input_ids"]
    assert clean_text(lm, ids, ("END",), []) == "Markets rose today."
    im_start = lm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids2 = lm.tokenizer("Examples of sports: Goal!", add_special_tokens=False)["input_ids"] + [im_start] + \
        lm.tokenizer("user\nagain", add_special_tokens=False)["input_ids"]
    assert clean_text(lm, ids2, (), ["examples of sports:"]) == "Goal!"


def test_resume_after_torn_line_and_lost_lines_gives_the_same_records(lm, tmp_path):
    task = topics(method="corrsynth", per_label=3, max_new_tokens=5)
    full = tmp_path / "full.jsonl"
    run_synth(task, full, lm=lm, batch_rows=4, progress=False, log=lambda m: None)
    reference = {(r["group"], r["slot"]): r for r in lines_of(full)}
    assert len(reference) == 12
    # keep the first 5 complete lines, then half of the 6th (a write cut by a kill)
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    sidecar_path(part).write_text(sidecar_path(full).read_text())
    notes = []
    report = run_synth(task, part, lm=lm, batch_rows=4, progress=False, log=notes.append)
    assert report.resumed_from == 5 and report.written == 7
    assert any("torn" in n for n in notes)
    resumed = lines_of(part)                                 # every line parses: nothing torn
    assert Counter(r["label"] for r in resumed) == {n: 3 for n in task.label_names}
    assert len({(r["group"], r["slot"]) for r in resumed}) == 12
    assert {(r["group"], r["slot"]): r for r in resumed} == reference


def test_changed_task_is_refused_and_file_untouched(lm, tmp_path):
    out = tmp_path / "o.jsonl"
    run_synth(topics(method="fewgen"), out, lm=lm, progress=False, log=lambda m: None)
    before, side = out.read_bytes(), sidecar_path(out).read_bytes()
    for changed in (topics(method="corrsynth"), topics(method="fewgen", seed=12),
                    topics(method="fewgen", prompt="Write news on {verbalization}.")):
        with pytest.raises(DivgenError, match="different task") as err:
            run_synth(changed, out, lm=lm, progress=False, log=lambda m: None)
        assert "new --out" in str(err.value)
    assert out.read_bytes() == before and sidecar_path(out).read_bytes() == side
    # without the sidecar the fingerprint on the lines still refuses
    sidecar_path(out).unlink()
    with pytest.raises(DivgenError, match="different task"):
        run_synth(topics(method="fewgen", seed=99), out, lm=lm, progress=False, log=lambda m: None)
    # a larger count is the same task: the file is extended
    report = run_synth(topics(method="fewgen", per_label=2), out, lm=lm, progress=False, log=lambda m: None)
    assert report.written == 4 and out.read_bytes().startswith(before)


# ---- the command line --------------------------------------------------------------------------
def _task_file(tmp_path: Path, **fields) -> Path:
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump({**TOPICS, **fields}))
    return path


@pytest.mark.parametrize("args,needle", [
    (["--method", "beam"], "--method"),
    (["--g", "0.5"], "--g"),
    (["--min-p", "1.5"], "--min-p"),
    (["--alpha", "1"], "--alpha"),
    (["--method", "m-corrsynth", "--gamma", "-1"], "--gamma"),
    (["--method", "m-corrsynth", "--delta", "-1"], "--delta"),
    (["--rows-per-group", "1"], "--rows-per-group"),
    (["--few-shot", "/nonexistent.csv"], "--few-shot"),
    (["--model", "/nonexistent/model"], "does not exist"),
])
def test_cli_bad_input_exits_2_and_keeps_output(tmp_path, capsys, args, needle):
    out = tmp_path / "keep.jsonl"
    out.write_text('{"text": "x", "label": "world", "group": 0, "slot": 0}\n')
    before = out.read_bytes()
    assert cli_main(["synth", str(_task_file(tmp_path)), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert out.read_bytes() == before


NOT_SYNTH_OUTPUTS = {
    "json-config-no-newline": b'{"config": {"lr": 0.001}}',
    "json-config": b'{"config": {"lr": 0.001}}\n',
    "plain-text-no-newline": b"my notes",
    "plain-text": b"my notes\n",
    "record-then-text": b'{"text": "x", "label": "world", "group": 0, "slot": 0}\nnot json\n',
    "blank-lines": b"\n\n",
    "record-then-foreign-tail": b'{"text": "x", "label": "world", "group": 0, "slot": 0}\nname,value',
    "torn-record-without-sidecar": b'{"text": "half a rec',
}


@pytest.mark.parametrize("name", sorted(NOT_SYNTH_OUTPUTS))
def test_existing_file_that_is_not_a_synth_output_is_refused_untouched(tmp_path, capsys, name):
    out = tmp_path / "existing.jsonl"
    out.write_bytes(NOT_SYNTH_OUTPUTS[name])
    assert cli_main(["synth", str(_task_file(tmp_path)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "new --out" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == NOT_SYNTH_OUTPUTS[name]
    assert not sidecar_path(out).exists()


def test_cli_unwritable_output_and_unknown_label(tmp_path, capsys):
    task = _task_file(tmp_path)
    assert cli_main(["synth", str(task), "--out", str(tmp_path / "no_dir" / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["synth", str(task), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    bad = _task_file(tmp_path, per_label={"world": 1, "weather": 2})
    assert cli_main(["synth", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "unknown label" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_sigkill_mid_run_then_resume(lm, tmp_path):
    """A real `divgen synth` process killed with SIGKILL after its first write, run again with the
    same arguments: exactly the requested count per label, every line whole, no duplicate, and
    the same records an uninterrupted in-process run writes."""
    task_path = _task_file(tmp_path, labels=["positive", "negative"],
                           prompt="Write a {verbalization} review of a phone.", per_label=4, max_new_tokens=6)
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "divgen.bindings.cli", "synth", str(task_path), "--out", str(out),
           "--batch-rows", "2", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = out.read_bytes()
    assert 0 < first.count(b"\n") < 8                       # killed in the middle
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-1000:]
    recs = lines_of(out)
    assert Counter(r["label"] for r in recs) == {"positive": 4, "negative": 4}
    assert len({(r["group"], r["slot"]) for r in recs}) == 8
    reference = tmp_path / "reference.jsonl"
    run_synth(load_task(task_path), reference, lm=lm, batch_rows=2, progress=False, log=lambda m: None)
    key = lambda r: (r["group"], r["slot"])  # noqa: E731
    assert sorted(recs, key=key) == sorted(lines_of(reference), key=key)
    assert read_output(out).good_bytes == out.stat().st_size
