"""The output and input discipline of every command (engine/files.py, engine/inputs.py), and the
honest reports of eval and export.

* Outputs: a kill at any point of a replace leaves the old output or the new one, whole — shown
  by killing a child process (os._exit, no cleanup runs) after each step of the replace, and by
  kill -9 at random moments of real ``export --overwrite`` and ``filter`` runs; temporaries of a
  killed or failed run do not survive the next run; the working folder is never replaced.
* Inputs: each reader refuses bad input with one line (BOM, long fields, bad bytes, YAML alias
  bombs, corrupt safetensors headers) and reads the good input the issue found refused.
* Reports: eval says how many real rows its real-data row used when the pool is short; export
  refuses twice-given inputs and exports a repeated record once, with a note.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from divgen.bindings.cli import main as cli_main
from divgen.engine import files, inputs, limits
from divgen.engine.errors import DivgenError

AG = ["world", "sports", "business", "sci_tech"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".divgen-tmp-" in p.name or ".divgen-old-" in p.name)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def synth_file(path: Path, n: int, tag: str = "") -> Path:
    path.write_text("".join(json.dumps({"text": f"{tag}text number {i} about {AG[i % 4]} and more words here",
                                        "label": AG[i % 4], "group": i, "slot": 0, "method": "fewgen"}) + "\n"
                            for i in range(n)))
    return path


# ---------------------------------------------------------------------------------------------
# replaced_dir: a kill after every step leaves old or new whole
# ---------------------------------------------------------------------------------------------
KILL_SCRIPT = """
import os, shutil, sys
from pathlib import Path
from divgen.engine import files

dest, step, exchange = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
calls = [0]

def hit():
    calls[0] += 1
    if calls[0] == step:
        os._exit(9)                        # like kill -9: no finally, no cleanup

if not exchange:
    files._exchange = lambda a, b: False
real_rename, real_exchange, real_rmtree = os.rename, files._exchange, shutil.rmtree

def rename(a, b):
    hit(); real_rename(a, b); hit()
def exchange(a, b):
    hit(); ok = real_exchange(a, b); hit(); return ok
def rmtree(path, ignore_errors=False):
    hit()
    entries = sorted(Path(path).iterdir())
    for p in entries[: len(entries) // 2]:          # half deleted, then the kill may come
        p.unlink()
    hit()
    real_rmtree(path, ignore_errors=ignore_errors)

os.rename, files._exchange, shutil.rmtree = rename, exchange, rmtree
with files.replaced_dir(dest) as tmp:
    for i in range(6):
        (tmp / f"new{i}.txt").write_text(f"new {i}")
print("done")
"""


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_a_kill_at_every_step_of_a_folder_replace_leaves_old_or_new_whole(tmp_path, exchange):
    old = {f"old{i}.txt": f"old {i}".encode() for i in range(6)}
    new = {f"new{i}.txt": f"new {i}".encode() for i in range(6)}
    outcomes = set()
    for step in range(1, 12):
        dest = tmp_path / f"s{step}" / "out"
        dest.mkdir(parents=True)
        for name, data in old.items():
            (dest / name).write_bytes(data)
        done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(dest), str(step), "1" if exchange else "0"],
                              capture_output=True, text=True, timeout=60)
        files.clean_stale(dest)                       # what the next run does first
        got = snapshot(dest) if dest.is_dir() else None
        assert got in (old, new), (step, done.returncode, got)
        assert temporaries(dest.parent) == [], step
        outcomes.add(("old" if got == old else "new", done.returncode))
    # the kills landed before and after the swap, and a late step let the run finish
    assert ("old", 9) in outcomes and ("new", 9) in outcomes and ("new", 0) in outcomes


def test_clean_stale_removes_dead_runs_temporaries_and_keeps_live_ones(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    dead = dead_pid()
    stale = tmp_path / f".out.divgen-tmp-{dead}-0123abcd"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x" * 10)
    live = tmp_path / f".out.divgen-tmp-{os.getpid()}-0123abcd"
    live.mkdir()
    legacy_old = tmp_path / ".out.export-abcd"
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    legacy_new = tmp_path / ".out.export-efgh"
    legacy_new.mkdir()
    removed = files.clean_stale(dest, [".out.export-*"])
    assert sorted(p.name for p in removed) == sorted([stale.name, legacy_old.name])
    assert live.exists() and legacy_new.exists() and dest.exists()


def test_an_aside_whose_target_is_gone_is_put_back(tmp_path):
    """The rename-aside fallback killed between its two renames: the next run restores the old folder."""
    dest = tmp_path / "out"
    aside = tmp_path / f".out.divgen-old-{dead_pid()}-0123abcd"
    aside.mkdir()
    (aside / "README.md").write_text("old card")
    files.clean_stale(dest)
    assert snapshot(dest) == {"README.md": b"old card"} and not aside.exists()


def test_the_conversion_cache_loses_a_killed_conversions_folder(tmp_path):
    from divgen.engine.model import clean_stale_conversions

    models = tmp_path / "models"
    models.mkdir()
    (models / "SmolLM2-abc").mkdir()                                 # a finished conversion: kept
    killed = models / f".SmolLM2-def.divgen-tmp-{dead_pid()}-0123abcd"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    legacy = models / ".convert-k2j3h4"
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    clean_stale_conversions(models)
    assert sorted(p.name for p in models.iterdir()) == ["SmolLM2-abc"]


# ---------------------------------------------------------------------------------------------
# kill -9 during real runs
# ---------------------------------------------------------------------------------------------
def _cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "divgen.bindings.cli", *argv]


def _kill_at_random(argv, seconds: float, rng: random.Random) -> int:
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0, seconds))
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    return child.wait(timeout=120)


@pytest.mark.slow
def test_kill_9_during_export_overwrite_leaves_the_old_or_the_new_export(tmp_path):
    pytest.importorskip("datasets")
    a, b = synth_file(tmp_path / "a.jsonl", 2000, "a "), synth_file(tmp_path / "b.jsonl", 2400, "b ")
    ds, ref = tmp_path / "ds", tmp_path / "ref"

    def export(src: Path, dest: Path, *extra: str) -> list[str]:
        return _cli("export", str(src), "--to", "hf", str(dest), "--no-metrics", *extra)

    assert subprocess.run(export(a, ds), timeout=300).returncode == 0
    assert subprocess.run(export(b, ref), timeout=300).returncode == 0
    old, new = snapshot(ds), snapshot(ref)
    t0 = time.perf_counter()
    assert subprocess.run(export(b, tmp_path / "timing"), timeout=300).returncode == 0
    full = time.perf_counter() - t0
    rng = random.Random(22)
    for _ in range(6):
        if snapshot(ds) == new:                                      # start each try from the old export
            assert subprocess.run(export(a, ds, "--overwrite"), timeout=300).returncode == 0
        _kill_at_random(export(b, ds, "--overwrite"), full, rng)
        files.clean_stale(ds)                                        # what the next run does first
        assert snapshot(ds) in (old, new)
    # the next run leaves no temporary of the killed ones
    assert subprocess.run(export(b, ds, "--overwrite"), timeout=300).returncode == 0
    assert snapshot(ds) == new and temporaries(tmp_path) == []


@pytest.mark.slow
def test_kill_9_during_filter_leaves_the_old_or_the_new_output(tmp_path):
    from divgen.engine.filter import is_filter_output

    a, b = synth_file(tmp_path / "a.jsonl", 3000, "a "), synth_file(tmp_path / "b.jsonl", 3000, "b ")
    out = tmp_path / "kept.jsonl"
    assert subprocess.run(_cli("filter", str(a), "--out", str(out)), timeout=300).returncode == 0
    old = out.read_bytes()
    ref = tmp_path / "ref.jsonl"
    t0 = time.perf_counter()
    assert subprocess.run(_cli("filter", str(b), "--out", str(ref)), timeout=300).returncode == 0
    full = time.perf_counter() - t0
    new = ref.read_bytes()
    assert old != new
    rng = random.Random(7)
    for _ in range(6):
        _kill_at_random(_cli("filter", str(b), "--out", str(out)), full, rng)
        assert out.read_bytes() in (old, new)
        assert is_filter_output(out)                 # the marker follows the bytes: a rerun may replace it
    assert subprocess.run(_cli("filter", str(b), "--out", str(out)), timeout=300).returncode == 0
    assert out.read_bytes() == new
    assert temporaries(tmp_path) == []


@pytest.mark.slow
def test_kill_9_during_spa_partition_leaves_the_old_or_the_new_partitions(tmp_path):
    """``spa partition`` replaces its two files one after the other, each atomically; partitions.json
    (what ``spa adapt`` reads) is written last and names the scores file it was written with, so a
    kill leaves an old or new record whole, and a scores file from another run is recognisable."""
    import hashlib

    def pairs(path: Path, n: int, tag: str) -> Path:
        path.write_text("".join(json.dumps({"prompt": f"{tag} question {i} about {AG[i % 4]}",
                                            "response": f"{tag} answer {i} on {AG[(i * 7) % 4]} matters"}) + "\n"
                                for i in range(n)))
        return path

    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps({"prompt": f"what about {t}?"}) + "\n" for t in AG))
    a, b = pairs(tmp_path / "a.jsonl", 3000, "a"), pairs(tmp_path / "b.jsonl", 3000, "b")
    out, ref = tmp_path / "parts", tmp_path / "ref"

    def partition(data: Path, dest: Path) -> list[str]:
        return _cli("spa", "partition", "--data", str(data), "--queries", str(queries), "--method", "lexical",
                    "--out", str(dest))

    assert subprocess.run(partition(a, out), timeout=300).returncode == 0
    old = snapshot(out)
    t0 = time.perf_counter()
    assert subprocess.run(partition(b, ref), timeout=300).returncode == 0
    full = time.perf_counter() - t0
    new = snapshot(ref)
    assert old["partitions.json"] != new["partitions.json"]

    def record_names_its_scores(snap) -> bool:
        named = json.loads(snap["partitions.json"])["scores_sha256"]
        return hashlib.sha256(snap["scores.jsonl"]).hexdigest() == named

    rng = random.Random(11)
    for _ in range(3):
        _kill_at_random(partition(b, out), full, rng)
        now = snapshot(out)
        assert now["partitions.json"] in (old["partitions.json"], new["partitions.json"])
        assert now["scores.jsonl"] in (old["scores.jsonl"], new["scores.jsonl"])
        # a kill between the two renames: new scores beside the old record, which says so
        assert record_names_its_scores(now) or now["partitions.json"] == old["partitions.json"]
        if now != old and now != new:
            assert not record_names_its_scores(now)
        assert subprocess.run(partition(a, out), timeout=300).returncode == 0    # back to the old output
        assert snapshot(out) == old
    assert subprocess.run(partition(b, out), timeout=300).returncode == 0
    assert snapshot(out) == new and temporaries(out) == []


# ---------------------------------------------------------------------------------------------
# outputs: own earlier outputs are replaced, nothing else; the working folder never
# ---------------------------------------------------------------------------------------------
def test_filter_reruns_over_its_own_output_but_refuses_an_edited_one(tmp_path, capsys):
    src = synth_file(tmp_path / "in.jsonl", 8)
    out = tmp_path / "kept.jsonl"
    assert cli_main(["filter", str(src), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert cli_main(["filter", str(src), "--out", str(out), "--min-words", "1"]) == 0     # its own: replaced
    assert out.read_bytes() == first
    out.write_bytes(first + b'{"text": "added by hand", "label": "world"}\n')              # now the user's
    capsys.readouterr()
    assert cli_main(["filter", str(src), "--out", str(out)]) == 2
    assert "is not an output of divgen filter" in capsys.readouterr().err
    assert out.read_bytes().endswith(b"added by hand\", \"label\": \"world\"}\n")
    assert temporaries(tmp_path) == []


@pytest.mark.parametrize("where", [".", "..", "{cwd}"])
def test_export_never_replaces_the_working_folder(tmp_path, monkeypatch, capsys, where):
    """The issue's case: `cd somedir && divgen export ../syn.jsonl --to parquet . --overwrite`."""
    synth_file(tmp_path / "syn.jsonl", 8)
    work = tmp_path / "somedir"
    work.mkdir()
    (work / "mine.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    target = where.replace("{cwd}", str(work))
    assert cli_main(["export", "../syn.jsonl", "--to", "parquet", target, "--overwrite", "--no-metrics"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the working folder or holds it" in err
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_its_own_export_and_lists_what_it_wrote(tmp_path, capsys):
    pytest.importorskip("datasets")
    a, b = synth_file(tmp_path / "a.jsonl", 12, "a "), synth_file(tmp_path / "b.jsonl", 16, "b ")
    ds = tmp_path / "ds"
    assert cli_main(["export", str(a), "--to", "parquet", str(ds), "--no-metrics"]) == 0
    manifest = json.loads((ds / ".divgen-export.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in ds.iterdir() if p.name != ".divgen-export.json")
    assert cli_main(["export", str(b), "--to", "parquet", str(ds), "--no-metrics"]) == 2    # needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["export", str(b), "--to", "parquet", str(ds), "--no-metrics", "--overwrite"]) == 0
    assert "16 examples" in (ds / "README.md").read_text()
    (ds / "notes.txt").write_text("the user's")                                             # now not only ours
    capsys.readouterr()
    assert cli_main(["export", str(a), "--to", "parquet", str(ds), "--no-metrics", "--overwrite"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (ds / "notes.txt").read_text() == "the user's" and temporaries(tmp_path) == []


def test_export_write_failure_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A folder the process may not write in (root ignores permissions, so the refusal is simulated)."""
    pytest.importorskip("datasets")
    import datasets

    src = synth_file(tmp_path / "syn.jsonl", 12)

    def refuse(self, path, *a, **k):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(datasets.Dataset, "to_parquet", refuse)
    assert cli_main(["export", str(src), "--to", "parquet", str(tmp_path / "ds"), "--no-metrics"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["syn.jsonl"]


def test_export_exports_a_repeated_record_once_and_says_so(tmp_path, capsys):
    pytest.importorskip("datasets")
    a = synth_file(tmp_path / "a.jsonl", 12)
    part = tmp_path / "part.jsonl"                         # a filtered copy: 4 of a's records, 2 new ones
    lines = a.read_text().splitlines()[:4]
    lines += [json.dumps({"text": f"new text {i} with enough words", "label": "world", "group": 100 + i,
                          "slot": 0, "method": "fewgen"}) for i in range(2)]
    part.write_text("\n".join(lines) + "\n")
    assert cli_main(["export", str(a), str(part), "--to", "parquet", str(tmp_path / "ds"), "--no-metrics"]) == 0
    err = capsys.readouterr().err
    assert "left out 4 record(s) identical to ones of an earlier input" in err
    import pyarrow.parquet as pq

    rows = sum(pq.read_table(p).num_rows for p in (tmp_path / "ds").glob("*.parquet"))
    assert rows == 14                                     # 12 + 2, each record once


def test_bench_writes_its_json_atomically_and_replaces_only_its_own(tmp_path):
    from divgen.bindings.cli_bench import is_bench_json, is_bench_png, stamp_png

    own = tmp_path / "r.json"
    own.write_text(json.dumps({"benchmark": "divgen bench kernel", "rows": []}))
    assert is_bench_json(own) and not is_bench_json(tmp_path / "none.json")
    png = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\0IHDR" + b"\0" * 17 + b"\0\0\0\0IEND\xaeB`\x82"
    stamped = stamp_png(png)
    (tmp_path / "p.png").write_bytes(stamped)
    assert is_bench_png(tmp_path / "p.png") and stamped.endswith(png[-12:])
    import zlib

    chunk = stamped[len(png) - 12:-12]                    # length, type, data, CRC of the added chunk
    n = int.from_bytes(chunk[:4], "big")
    assert chunk[4:8] == b"tEXt" and len(chunk) == n + 12
    assert int.from_bytes(chunk[-4:], "big") == zlib.crc32(chunk[4:-4])


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def test_csv_with_a_byte_order_mark_has_a_plain_label_column(tmp_path):
    """The issue's case: synth accepted it, filter / eval --real listed '\\ufefflabel'."""
    from divgen.engine.eval.data import read_real
    from divgen.engine.synth.task import load_task

    p = tmp_path / "bom.csv"
    p.write_bytes(b"\xef\xbb\xbflabel,text\n" + b"".join(f"{1 + i % 4},text {i}\n".encode() for i in range(8)))
    assert inputs.read_csv(p, "real data").columns == ["label", "text"]
    real = read_real(p, load_task("ag_news"))
    assert real.labels == [i % 4 for i in range(8)] and real.texts[3] == "text 3"


def test_a_300_kb_field_is_read_and_an_over_limit_field_is_one_line(tmp_path, monkeypatch):
    from divgen.engine.synth.few_shot import read_labelled_file

    long_text = "word " * 60_000                              # 300 KB: over Python's 131072 default
    p = tmp_path / "fs.csv"
    p.write_text(f"label,text\n1,{long_text}\n2,short\n")
    rows = read_labelled_file(p)
    assert rows == [("1", long_text.strip()), ("2", "short")]
    monkeypatch.setattr(limits, "MAX_CSV_FIELD", 1000)
    with pytest.raises(DivgenError, match="near line 2: a field is longer than 1,000 characters"):
        read_labelled_file(p)


def test_bad_bytes_in_a_csv_name_the_line(tmp_path):
    p = tmp_path / "x.csv"
    p.write_bytes(b"label,text\n1,ok\n2,caf\xe9\n")
    with pytest.raises(DivgenError, match="line 3 is not UTF-8"):
        inputs.read_csv(p, "real data")


def _naive_size(x) -> int:
    if isinstance(x, dict):
        return 1 + sum(_naive_size(k) + _naive_size(v) for k, v in x.items())
    if isinstance(x, list):
        return 1 + sum(_naive_size(v) for v in x)
    return 1


def test_expanded_size_counts_aliases_as_copies():
    import yaml

    doc = "a: &a [1, 2, {k: v}]\nb: [*a, *a, [*a]]\nc: *a\n"
    data = yaml.safe_load(doc)
    unshared = json.loads(json.dumps(data))                  # every alias really copied
    assert inputs.expanded_size(data, 10 ** 6) == _naive_size(unshared) == 36
    assert inputs.expanded_size(data, 10) == 11              # stops counting above the bound


def test_a_yaml_alias_bomb_is_refused_before_it_expands():
    bomb = "labels: [a, b]\nprompt: [&a [x,x,x,x,x,x,x,x,x,x], " + ", ".join(
        f"&{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(8)) + "]\n"
    t0 = time.perf_counter()
    with pytest.raises(DivgenError, match="expands to more than 1,000,000 values"):
        inputs.load_yaml(bomb, "task file t.yaml")
    assert time.perf_counter() - t0 < 2.0                    # 10^9 values were never built


def _safetensors(path: Path) -> bytes:
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(4, dtype=np.int64)}, str(path))
    return path.read_bytes()


def test_safetensors_header_matches_the_library_and_refuses_corruption(tmp_path):
    from safetensors import safe_open

    p = tmp_path / "w.safetensors"
    good = _safetensors(p)
    header, base = inputs.read_safetensors_header(p)
    with safe_open(str(p), "np") as f:
        assert sorted(k for k in header if k != "__metadata__") == sorted(f.keys())
    assert base == 8 + int.from_bytes(good[:8], "little")
    n = int.from_bytes(good[:8], "little")
    head = json.loads(good[8:8 + n])
    cases = {
        "declares a": (1 << 62).to_bytes(8, "little") + good[8:],
        "too short": good[:3],
        "is not valid JSON": (4).to_bytes(8, "little") + b"{bad" + good[8 + n:],
        "has a bad entry": good[:-4],                                           # data cut short
    }
    wrong = dict(head, a={**head["a"], "shape": [3, 3]})                           # shape and bytes disagree
    raw = json.dumps(wrong).encode()
    cases["has a bad entry "] = len(raw).to_bytes(8, "little") + raw + good[8 + n:]
    for phrase, data in cases.items():
        p.write_bytes(data)
        with pytest.raises(DivgenError, match=phrase.strip()):
            inputs.read_safetensors_header(p)


def test_json_object_reader_refuses_other_json_types(tmp_path):
    for text, phrase in (("[1]", "is a JSON list"), ("3", "is a JSON int"), ("{", "is not valid JSON"),
                         ("[" * 100_000 + "]" * 100_000, "nested too deeply")):
        (tmp_path / "s.json").write_text(text)
        with pytest.raises(DivgenError, match=phrase):
            inputs.read_json_object(tmp_path / "s.json", "task sidecar", "move it away")


# ---------------------------------------------------------------------------------------------
# eval: a short real pool is said, not hidden
# ---------------------------------------------------------------------------------------------
EVAL_TASK = """name: fixture
labels:
  - {name: sports, source_label: 2}
  - {name: business, source_label: 3}
prompt: "Write a news article about {verbalization}."
"""


@pytest.mark.slow
def test_eval_says_how_many_real_rows_its_real_row_used(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIVGEN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "task.yaml").write_text(EVAL_TASK)
    # 60 data rows; the pool is rows 0, 10, ..., 50: sports at 0 and 20, business at the other four
    labels = ["2" if i in (0, 20) else ("3" if i % 10 == 0 else ("2" if i % 2 else "3")) for i in range(60)]
    words = {"2": "the team won the match", "3": "shares rose after profits"}
    (tmp_path / "real.csv").write_text("label,text\n" + "".join(f"{l},{words[l]} number {i}\n"
                                                                 for i, l in enumerate(labels)))
    pool = [l for i, l in enumerate(labels) if i % 10 == 0]
    have = {"sports": pool.count("2"), "business": pool.count("3")}                  # 2 and 4
    syn = [{"text": f"{words['2']} story {i}", "label": "sports"} for i in range(3)]
    syn += [{"text": f"{words['3']} story {i}", "label": "business"} for i in range(3)]
    (tmp_path / "syn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in syn))
    assert cli_main(["eval", str(tmp_path / "syn.jsonl"), "--real", str(tmp_path / "real.csv"), "--task",
                     str(tmp_path / "task.yaml"), "--seeds", "1", "--json"]) == 0
    captured = capsys.readouterr()
    real_row = json.loads(captured.out)["rows"][1]
    used = {k: min(3, have[k]) for k in have}
    assert real_row["n"] == sum(used.values()) == 5 and real_row["asked"] == 6
    assert real_row["label_counts"] == used and real_row["short_labels"] == {"sports": [2, 3]}
    assert real_row["set"] == "real pool (5)"
    assert "warning: the real pool is smaller than asked for sports (2 of 3)" in captured.err
    from divgen.engine.eval.evaluate import format_eval

    table = format_eval(json.loads(captured.out))
    assert "real pool (5): the real pool has fewer rows than the synthetic set for sports (2 of 3)" in table


def test_the_judge_refuses_a_label_without_training_rows():
    from divgen.engine.eval.judge import Judge

    with pytest.raises(DivgenError, match="no training text of label"):
        Judge.train(["a text", "another"], ["sports", "sports"], ["sports", "business"])


def test_generate_prompt_with_bytes_that_are_not_utf8_is_one_line(capsys):
    prompt = os.fsdecode(b"caf\xe9 au lait")                   # what argv holds for such bytes
    assert cli_main(["generate", prompt]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8 text" in err


def test_the_cli_turns_an_unforeseen_os_error_into_one_line(capsys, monkeypatch):
    from divgen.bindings import cli_show

    def boom(args):
        raise OSError(28, "No space left on device", "/data/out.jsonl")

    monkeypatch.setattr(cli_show, "run_show_command", boom)
    assert cli_main(["show", "x.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device (/data/out.jsonl)" in err
