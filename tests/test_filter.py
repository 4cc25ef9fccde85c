"""`divgen filter` on constructed duplicates, copies, degenerate texts and judge verdicts."""
from __future__ import annotations

import json

import pytest

from divgen.bindings.cli import main as cli_main
from divgen.engine.filter import FilterConfig, filter_rows, shingles

BASE = "the central bank raised interest rates by half a point on thursday to slow rising prices"
EXAMPLE = "Oil prices jumped to a record high of fifty dollars a barrel on Monday as supply fears grew."


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def rows():
    """(text, label, examples shown, expected reason or None) — each case built by hand."""
    return [
        (BASE, "business", [EXAMPLE], None),
        ("The Central Bank raised interest rates by half a point on Thursday to slow rising prices",
         "business", [EXAMPLE], "duplicate"),                      # case + whitespace only
        ("  the central bank raised  interest rates by half a point on thursday to slow rising prices ",
         "business", [EXAMPLE], "duplicate"),
        (BASE.replace("thursday", "friday"), "business", [EXAMPLE], "near_duplicate"),   # 1 word changed
        ("World news:", "world", [EXAMPLE], "degenerate"),          # only the label phrase
        ("Business.", "business", [EXAMPLE], "degenerate"),
        ("Sci tech news", "sci_tech", [EXAMPLE], "degenerate"),
        ("Rain again.", "world", [EXAMPLE], "degenerate"),           # under 5 words
        ("Analysts said oil prices jumped to a record high of fifty dollars in early trading.",
         "business", [EXAMPLE], "copy"),                             # 8 words of its own example
        ("Analysts said oil prices jumped to a record high of fifty dollars in late trading today.",
         "business", ["Something else entirely was shown in this prompt, nothing about oil."], None),
        ("The home team won the final after extra time in front of a full stadium.", "sports", None, None),
        ("Rebels and the army agreed to a ceasefire in the north of the country.", "world", [EXAMPLE], "judge"),
    ]


PHRASES = {"world": ["world", "world news"], "business": ["business", "business"],
           "sci_tech": ["sci_tech", "science and technology"], "sports": ["sports", "sports"]}


def test_each_row_removed_for_its_own_reason():
    data = rows()
    texts, labels, examples = [r[0] for r in data], [r[1] for r in data], [r[2] for r in data]
    agrees = [r[3] != "judge" for r in data]
    assert jaccard(data[0][0], data[3][0]) >= 0.6               # the constructed near duplicate
    # row 9 repeats row 8's copied run, but its own prompt showed other examples: kept (row 8 is
    # removed as a copy, so it is no kept row that 9 could near-duplicate)
    report = filter_rows(texts, labels, examples=examples, label_phrases=PHRASES, judge_agrees=agrees)
    got = {i: reason for i, reason, _ in report.removed}
    expect = {i: r[3] for i, r in enumerate(data) if r[3]}
    assert got == expect
    assert report.kept == [i for i, r in enumerate(data) if r[3] is None]
    details = {i: d for i, _, d in report.removed}
    assert details[1] == 0 and details[2] == 0 and details[3] == 0        # which kept row they repeat
    assert report.copy_unchecked == 1                                     # the row with examples=None
    assert report.counts() == {"degenerate": 4, "copy": 1, "duplicate": 2, "near_duplicate": 1, "judge": 1}


def test_switches_and_thresholds():
    data = rows()
    texts, labels = [r[0] for r in data], [r[1] for r in data]
    none = FilterConfig(degenerate=False, copies=False, duplicates=False, near_duplicates=False)
    assert filter_rows(texts, labels, config=none).kept == list(range(len(data)))
    # a near-duplicate threshold above the pair's Jaccard keeps it; exact duplicates still go
    high = FilterConfig(near_threshold=min(1.0, jaccard(data[0][0], data[3][0]) + 0.01))
    got = {i: r for i, r, _ in filter_rows(texts, labels, config=high, label_phrases=PHRASES).removed}
    assert 3 not in got and got[1] == "duplicate"
    # a longer copy n-gram than the shared run (13 words) keeps the copy
    shared = "oil prices jumped to a record high of fifty dollars".split()
    cfg = FilterConfig(copy_n=len(shared) + 1)
    got = {i: r for i, r, _ in filter_rows(texts, labels, config=cfg, examples=[r[2] for r in data]).removed}
    assert 8 not in got
    cfg = FilterConfig(copy_n=len(shared))
    got = {i: r for i, r, _ in filter_rows(texts, labels, config=cfg, examples=[r[2] for r in data]).removed}
    assert got[8] == "copy"


def test_cli_filter_writes_kept_and_removed_rows(tmp_path, capsys):
    data = rows()[:-1]                       # no judge here (it needs real data)
    src = tmp_path / "in.jsonl"
    body = "".join(json.dumps({"text": t, "label": l, "group": i, "examples": ex})
                   + "\n" for i, (t, l, ex, _) in enumerate(data) if ex is not None)
    src.write_text(body)
    side = tmp_path / "in.jsonl.task.json"
    side.write_text(json.dumps({"content": {"labels": [{"name": k, "verbalization": v[1]} for k, v in PHRASES.items()]}}))
    out, removed = tmp_path / "out.jsonl", tmp_path / "removed.jsonl"
    assert cli_main(["filter", str(src), "--out", str(out), "--removed", str(removed), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    gone = [json.loads(l) for l in removed.read_text().splitlines()]
    expect_kept = [r[0] for r in data if r[2] is not None and r[3] is None]
    assert [r["text"] for r in kept] == expect_kept
    assert sorted(r["filter_reason"] for r in gone) == sorted(r[3] for r in data if r[2] is not None and r[3])
    assert report["removed"]["degenerate"] == 4 and report["kept"] == len(expect_kept)
    assert src.read_text() == body                                      # the input is untouched
    assert json.loads(out.read_text().splitlines()[0]) == json.loads(body.splitlines()[0])   # rows unchanged
    # the plain report names every reason
    assert cli_main(["filter", str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "removed" in err and "near-duplicate 1" in err and "copy 1" in err


def test_cli_filter_bad_input(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a b c d e f", "label": "x"}\n')
    assert cli_main(["filter", str(src), "--out", str(src)]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert cli_main(["filter", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert cli_main(["filter", str(src), "--out", str(tmp_path / "o.jsonl"), "--near-threshold", "0"]) == 2
    assert "--near-threshold" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli_main(["filter", str(empty), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "holds no examples" in capsys.readouterr().err
