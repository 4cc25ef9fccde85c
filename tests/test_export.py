"""Dataset outputs: one record schema for every method, model and version on every record, the
hidden sidecar (and the old name still read), `divgen export` to parquet / save_to_disk with a
ClassLabel and a train/validation split, the dataset card. Every output is loaded with `datasets`."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from divgen.engine import limits
from divgen.bindings.cli import main
from divgen.engine.export import split_of
from divgen.engine.synth import load_task, run_synth
from divgen.engine.synth.output import legacy_sidecar_path, sidecar_path
from divgen.engine.synth.schema import NEUTRAL_PARAMS, PARAM_KEYS, record_params

datasets = pytest.importorskip("datasets")
METHODS = limits.METHODS
RECORD_KEYS = ["text", "label", "method", "params", "seed", "group", "slot", "finish_reason", "tokens", "task",
               "model", "divgen_version", "examples"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    datasets.disable_progress_bars()


def tiny(method: str, **kw):
    return load_task("sentiment").with_overrides(method=method, per_label=kw.pop("per_label", 2),
                                                 max_new_tokens=kw.pop("max_new_tokens", 3), **kw)


@pytest.mark.parametrize("method", METHODS)
def test_params_have_the_same_keys_and_types_for_every_method(method):
    p = record_params(tiny(method))
    assert list(p) == list(PARAM_KEYS)
    assert all(type(p[k]) is t for k, t in PARAM_KEYS.items())
    task = tiny(method)
    for knob, neutral in NEUTRAL_PARAMS.items():   # the method's own knobs keep their values
        assert p[knob] == float(task.params.get(knob, neutral))


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, embedded_lm):
    """One tiny output per method in one folder, as `divgen synth` writes them."""
    folder = tmp_path_factory.mktemp("outputs")
    for m in METHODS:
        run_synth(tiny(m), folder / f"{m}.jsonl", lm=embedded_lm, progress=False, log=lambda msg: None)
    return folder


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_records_share_one_schema_with_model_and_version(outputs):
    import divgen

    for m in METHODS:
        recs = _lines(outputs / f"{m}.jsonl")
        assert len(recs) == 4
        for r in recs:
            assert list(r) == RECORD_KEYS
            assert list(r["params"]) == list(PARAM_KEYS)
            assert r["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf" or r["model"].endswith(".gguf")
            assert r["divgen_version"] == divgen.__version__
        assert sidecar_path(outputs / f"{m}.jsonl").name == f".{m}.jsonl.task.json"
        assert sidecar_path(outputs / f"{m}.jsonl").is_file() and not legacy_sidecar_path(outputs / f"{m}.jsonl").exists()


@pytest.mark.slow
def test_datasets_loads_all_methods_together_from_files_and_from_the_folder(outputs):
    files = sorted(str(p) for p in outputs.glob("*.jsonl"))
    by_files = datasets.load_dataset("json", data_files=files, split="train")
    by_dir = datasets.load_dataset("json", data_dir=str(outputs), split="train")   # sidecars sit in it
    assert by_files.num_rows == by_dir.num_rows == 4 * len(METHODS)
    assert sorted(by_dir["method"]) == sorted(m for m in METHODS for _ in range(4))
    assert set(by_dir.features["params"]) == set(PARAM_KEYS)
    texts = sorted(r["text"] for f in files for r in _lines(Path(f)))
    assert sorted(by_dir["text"]) == texts


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_export_round_trip_with_classlabel_split_and_card(outputs, tmp_path, fmt, capsys):
    files = [str(outputs / f"{m}.jsonl") for m in METHODS]
    dest = tmp_path / "ds"
    argv = ["export", *files, "--to", fmt, str(dest), "--validation", "0.25", "--no-embeddings"]
    assert main(argv) == 0
    ds = (datasets.load_dataset("parquet", data_dir=str(dest)) if fmt == "parquet"
          else datasets.load_from_disk(str(dest)))
    assert set(ds) == {"train", "validation"}
    label = ds["train"].features["label"]
    assert isinstance(label, datasets.ClassLabel) and label.names == ["positive", "negative"]
    # every record exactly once, with its label name intact
    src = {(r["method"], r["group"], r["slot"]): (r["text"], r["label"]) for f in files for r in _lines(Path(f))}
    got = {}
    for split in ds:
        for r in ds[split]:
            got[(r["method"], r["group"], r["slot"])] = (r["text"], label.int2str(r["label"]))
    assert got == src
    # stratified: each label has 4 records per method x 4 methods / 2 labels = 8; 25 % -> 2 in validation
    val = [label.int2str(x) for x in ds["validation"]["label"]]
    assert sorted(val) == ["negative"] * 2 + ["positive"] * 2
    card = (dest / "README.md").read_text()
    assert card.startswith("---\n") and "text-classification" in card
    for needle in ("| positive | 6 | 2 |", "| negative | 6 | 2 |", "## Diversity metrics", "SmolLM2-135M-Instruct",
                   "| cfg.jsonl | cfg | 4 |", "g=2.0", "gamma=1.0, delta=0.5"):
        assert needle in card, needle
    assert "dist-1" in card and "| fewgen | 4 |" in card
    # `datasets` also loads the parquet folder without naming the builder, card included
    if fmt == "parquet":
        assert datasets.load_dataset(str(dest))["train"].num_rows == 12


@pytest.mark.slow
def test_old_sidecar_name_is_read_for_resume_then_replaced(tmp_path, embedded_lm):
    task = tiny("corrsynth")
    full = tmp_path / "full.jsonl"
    run_synth(task, full, lm=embedded_lm, progress=False, log=lambda m: None)
    part = tmp_path / "part.jsonl"
    lines = full.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:2]))
    legacy_sidecar_path(part).write_bytes(sidecar_path(full).read_bytes())     # an output of before
    # a different task is refused on the strength of the old sidecar alone
    other = task.with_overrides(g=3.0)
    with pytest.raises(Exception, match="different task"):
        run_synth(other, part, lm=embedded_lm, progress=False, log=lambda m: None)
    assert part.read_bytes() == b"".join(lines[:2])
    run_synth(task, part, lm=embedded_lm, progress=False, log=lambda m: None)
    assert part.read_bytes() == full.read_bytes()
    assert sidecar_path(part).is_file() and not legacy_sidecar_path(part).exists()


@pytest.mark.slow
def test_export_leaves_out_a_torn_last_line(outputs, tmp_path, capsys):
    src = tmp_path / "torn.jsonl"
    src.write_bytes((outputs / "fewgen.jsonl").read_bytes() + b'{"text": "half a rec')
    assert main(["export", str(src), "--to", "parquet", str(tmp_path / "d"), "--no-metrics"]) == 0
    assert "unfinished last line" in capsys.readouterr().err
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "d"))
    assert sum(ds[s].num_rows for s in ds) == 4


def test_split_is_stratified_deterministic_and_order_free():
    recs = [{"label": lab, "method": "fewgen", "task": "t", "group": g, "slot": s}
            for g in range(30) for s, lab in enumerate(("a", "b", "c"))]
    splits = split_of(recs, 0.2, seed=1)
    for lab in "abc":
        assert sum(1 for r, s in zip(recs, splits) if r["label"] == lab and s == "validation") == 6
    shuffled = recs[:]
    random.Random(0).shuffle(shuffled)
    again = dict(zip([(r["group"], r["slot"]) for r in shuffled], split_of(shuffled, 0.2, seed=1)))
    assert again == dict(zip([(r["group"], r["slot"]) for r in recs], splits))
    assert split_of(recs, 0.2, seed=2) != splits                 # the seed chooses
    assert split_of(recs[:2], 0.1, seed=0).count("validation") == 0   # one record per label: all train


@pytest.mark.parametrize("extra,needle", [
    (["--to", "csv", "D"], "--to 'csv': choose one of parquet, hf"),
    (["--to", "parquet", "D", "--validation", "1.5"], "--validation must be in [0, 1)"),
])
def test_export_bad_arguments(tmp_path, capsys, extra, needle):
    src = tmp_path / "x.jsonl"
    src.write_text('{"text": "t", "label": "a"}\n')
    extra = [str(tmp_path / e) if e == "D" else e for e in extra]
    assert main(["export", str(src), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_export_refuses_a_non_empty_folder_and_a_missing_file(tmp_path, capsys):
    src = tmp_path / "x.jsonl"
    src.write_text('{"text": "t", "label": "a"}\n')
    dest = tmp_path / "d"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert main(["export", str(src), "--to", "parquet", str(dest)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dest / "keep.txt").read_text() == "mine"
    assert main(["export", str(tmp_path / "nope.jsonl"), "--to", "hf", str(tmp_path / "e")]) == 2
    assert "is not a file" in capsys.readouterr().err


def test_export_without_datasets_names_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    src = tmp_path / "x.jsonl"
    src.write_text('{"text": "t", "label": "a"}\n')
    assert main(["export", str(src), "--to", "parquet", str(tmp_path / "d")]) == 2
    assert "divgen[datasets]" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_no_half_folder_when_export_fails(tmp_path, monkeypatch):
    from divgen.engine import export as ex

    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"text": f"t{i}", "label": "ab"[i % 2], "group": i, "slot": 0}) + "\n"
                           for i in range(6)))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "dataset_card", boom)
    with pytest.raises(RuntimeError):
        ex.export([src], "parquet", tmp_path / "d", metrics=False)
    assert not (tmp_path / "d").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".d.export-")] == []


def test_examples_from_a_file_and_inline_examples_export_together(outputs, tmp_path):
    """Few-shot file rows (int) and inline examples (str), in different outputs and mixed in one
    record, become two typed columns instead of an untyped list that Arrow cannot hold."""
    src = _lines(outputs / "fewgen.jsonl")
    files = []
    for name, shown in (("rows", [3, 10]), ("inline", ["a fine film", "dull"]), ("mixed", ["great", 20])):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**r, "examples": shown, "seed": r["seed"] + len(files)}) + "\n"
                                for r in src))
        files.append(str(path))
    dest = tmp_path / "ds"
    assert main(["export", *files, "--to", "parquet", str(dest), "--validation", "0", "--no-metrics"]) == 0
    ds = datasets.load_dataset("parquet", data_dir=str(dest))["train"]
    assert ds.features["example_rows"].feature.dtype == "int64"
    assert ds.features["example_texts"].feature.dtype == "string"
    got = sorted((tuple(r["example_rows"]), tuple(r["example_texts"])) for r in ds)
    want = sorted([((3, 10), ())] * len(src) + [((), ("a fine film", "dull"))] * len(src) + [((20,), ("great",))] * len(src))
    assert got == want
    assert "examples" not in ds.features
