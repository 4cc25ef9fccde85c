"""`divgen show`: synth outputs side by side, one row per shared (group, slot), per label."""
from __future__ import annotations

import json

from divgen.bindings.cli import main
from divgen.bindings.cli_show import side_by_side


def _write(path, method, texts):
    path.write_text("".join(json.dumps({"text": t, "label": lab, "method": method, "group": g, "slot": s}) + "\n"
                            for (g, s, lab), t in texts.items()))


def test_rows_pair_the_same_group_and_slot_per_label(tmp_path, capsys):
    keys = [(0, 0, "sports"), (0, 1, "world"), (1, 0, "sports"), (1, 1, "world"), (2, 0, "sports")]
    _write(tmp_path / "a.jsonl", "fewgen", {k: f"A{k[0]}{k[1]}" for k in keys})
    _write(tmp_path / "b.jsonl", "corrsynth", {k: f"B{k[0]}{k[1]}" for k in reversed(keys[:4])})  # no (2, 0)
    assert main(["show", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--per-label", "5", "--width", "60"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("a (fewgen)") and "b (corrsynth)" in out[0]
    rows = [line.split(" | ") for line in out if " | " in line][1:]
    assert [[c.strip() for c in r] for r in rows] == [["A00", "B00"], ["A10", "B10"], ["A01", "B01"], ["A11", "B11"]]
    assert out.index("[sports]") < out.index("[world]")


def test_per_label_limit_and_wrapping():
    long = "word " * 30
    cols = [("x", {(g, 0): {"text": long, "label": "l"} for g in range(4)}),
            ("y", {(g, 0): {"text": "short", "label": "l"} for g in range(4)})]
    text = side_by_side(cols, per_label=2, width=50)
    body = [ln for ln in text.splitlines()[2:] if ln and not ln.startswith("[")]
    assert all(len(ln) <= 50 for ln in text.splitlines())
    assert sum("short" in ln for ln in body) == 2                  # 2 rows, the long text wrapped over lines
    assert len(body) > 2


def test_files_of_different_tasks_are_refused(tmp_path, capsys):
    _write(tmp_path / "a.jsonl", "fewgen", {(0, 0, "x"): "t"})
    _write(tmp_path / "b.jsonl", "fewgen", {(5, 0, "x"): "t"})
    assert main(["show", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 2
    assert "share no (group, slot)" in capsys.readouterr().err
