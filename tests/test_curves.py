"""experiments/curves.py's bookkeeping: which rows a learning-curve point trains on, and the order
the sets grow in. The reference for the rows is synth's own plan (which label each (group, slot)
carries), not the script's docstring."""
from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import pytest

from divgen.engine.synth.plan import plan
from divgen.engine.synth.task import load_task

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def curves(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    return importlib.import_module("curves")


def write_set(path: Path, method: str, rows_per_group: int | None, per_label: int, order_seed: int) -> list[dict]:
    """A finished synth output as synth writes it: one record per kept slot of the plan, in a
    shuffled order (batches finish out of order)."""
    overrides = {"method": method, "per_label": per_label}
    if rows_per_group:
        overrides["rows_per_group"] = rows_per_group
    task = load_task("ag_news").with_overrides(**overrides)
    records = [{"group": sl.group, "slot": sl.slot, "label": task.labels[sl.label].name, "text": f"{sl.group}/{sl.slot}"}
               for slots in plan(task) for sl in slots if sl.keep]
    random.Random(order_seed).shuffle(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


@pytest.mark.parametrize("method,rows", [("fewgen", None), ("m-corrsynth", None), ("m-corrsynth", 16),
                                          ("corrsynth", 6)])
def test_a_point_is_the_first_n_rows_with_n_over_4_of_each_label(curves, tmp_path, method, rows):
    records = write_set(tmp_path / "v_s0.jsonl", method, rows, per_label=100, order_seed=1)
    width = 1 + max(r["slot"] for r in records)
    ordered = sorted(records, key=lambda r: r["group"] * width + r["slot"])
    for n in (4, 100, 200, 400):
        path = curves.prefix(tmp_path, "v", 0, n)
        got = curves.read_complete(path)
        assert got == ordered[:n]
        counts = {}
        for r in got:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
        assert sorted(counts.values()) == [n // 4] * 4, (n, counts)
    assert curves.prefix(tmp_path, "v", 0, 404) is None                  # more rows than the set holds


def test_a_group_still_in_flight_ends_the_prefix(curves, tmp_path):
    records = write_set(tmp_path / "v_s0.jsonl", "m-corrsynth", None, per_label=100, order_seed=2)
    missing = next(r for r in records if (r["group"], r["slot"]) == (3, 5))
    kept = [r for r in records if r is not missing]
    (tmp_path / "v_s0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"group": 9, "sl',
                                         encoding="utf-8")                 # and a line still being written
    assert curves.prefix(tmp_path, "v", 0, 24) is not None                # groups 0-2: whole
    assert curves.prefix(tmp_path, "v", 0, 32) is None                    # needs group 3's slot 5


def test_a_point_on_a_prefix_is_rewritten_only_when_its_rows_change(curves, tmp_path):
    write_set(tmp_path / "v_s0.jsonl", "fewgen", None, per_label=25, order_seed=3)
    path = curves.prefix(tmp_path, "v", 0, 40)
    stamp = path.stat().st_mtime_ns
    assert curves.prefix(tmp_path, "v", 0, 40).stat().st_mtime_ns == stamp
    path.write_text("stale\n", encoding="utf-8")
    assert curves.read_complete(curves.prefix(tmp_path, "v", 0, 40))[0]["text"] == "0/0"


def test_schedule_answers_the_first_seed_at_the_largest_n_first(curves):
    main, low = "fewgen", "m-corrsynth-intra"
    assert main in curves.MAIN and low not in curves.MAIN
    got = curves.schedule([low, main], [0, 1, 2], [100, 400, 1600], "breadth")
    assert got == [(main, 0, 1600), (main, 1, 400), (main, 2, 400), (main, 1, 1600), (main, 2, 1600),
                   (low, 0, 1600), (low, 1, 400), (low, 2, 400), (low, 1, 1600), (low, 2, 1600)]
    assert curves.schedule([low, main], [0, 1], [100, 400], "depth") == [(main, 0, 400), (main, 1, 400),
                                                                        (low, 0, 400), (low, 1, 400)]


def test_every_variant_is_a_valid_synth_command_line(curves):
    from divgen.bindings.cli import build_parser

    parser = build_parser()
    for name, flags in curves.VARIANTS.items():
        args = parser.parse_args(["synth", "ag_news", "--out", "x.jsonl", *flags])
        assert args.method in ("fewgen", "corrsynth", "m-corrsynth", "cfg"), name
        assert name in curves.COLORS, f"{name} has no plot colour"


def test_mean_std_over_seeds(curves):
    import statistics

    got = curves.mean_std([0.7, 0.8, 0.75])
    assert got["mean"] == pytest.approx(0.75) and got["std"] == pytest.approx(statistics.stdev([0.7, 0.8, 0.75]))
    assert curves.mean_std([0.5])["std"] is None


def test_the_real_fine_tune_runs_once_per_n_and_each_sets_own_fine_tune_is_cached(curves, tmp_path, monkeypatch):
    """The per-set fine-tune asks `divgen eval` for the real pool rows' fine-tune only until one is
    cached for that N; the summary reports each N's sets over seeds and that N's real row."""
    calls = []

    def fake_run(cmd, capture=False):
        calls.append(cmd)
        path = Path(cmd[cmd.index("eval") + 1])
        n = len(curves.read_complete(path))
        rows = [{"students": {"finetune": {"accuracy": {"mean": 0.5 + n / 1e4}, "macro_f1": {"mean": 0.5}}}}]
        if "--no-real" not in cmd:
            rows.append({"real": True, "asked": n, "n": min(n, 760),
                         "students": {"finetune": {"accuracy": {"mean": 0.9, "std": 0.0, "values": [0.9]}}}})
        return json.dumps({"rows": rows, "settings": {"finetune_test_rows": 1000, "wall_time_s": 1.0}})

    monkeypatch.setattr(curves, "run", fake_run)
    for seed in (0, 1):
        for n in (400, 1600):
            p = tmp_path / f"fewgen_s{seed}.n{n}.jsonl"
            p.write_text("".join(json.dumps({"text": str(i), "label": "world"}) + "\n" for i in range(n)))
            curves.finetune_file(p, tmp_path, tmp_path, n)
    assert len(calls) == 4
    assert [("--no-real" in c) for c in calls] == [False, False, True, True]      # n400 s0, n1600 s0, then s1s
    curves.finetune_file(tmp_path / "fewgen_s0.n400.jsonl", tmp_path, tmp_path, 400)
    assert len(calls) == 4                                                        # cached
    summary = curves.summarise(tmp_path, ["fewgen"], [0, 1], [400, 1600], [400, 1600])
    assert summary["finetune"]["fewgen"]["1600"]["seeds"] == [0, 1]
    assert summary["finetune"]["fewgen"]["1600"]["accuracy"]["mean"] == pytest.approx(0.66)
    assert summary["finetune_real"]["1600"]["n_used"] == 760
    table = curves.table(summary)
    assert "| fewgen | 1600 | 2 | 66.0 ± 0.0 | 90.0 ± 0.0 (760 rows) |" in table
    assert "| fewgen | 400 | 2 | 54.0 ± 0.0 | 90.0 ± 0.0 |" in table


@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_restore_then_summarise_gives_back_the_committed_summary(curves, tmp_path, model):
    """A fresh checkout has no runs folder: ``--restore`` seeds it from the committed summary, and
    the summary of the restored folder is that summary again (points, per-seed scores, real rows,
    fine-tunes, sets); a second restore overwrites nothing, and a result computed here wins."""
    committed = json.loads((ROOT / "experiments" / "results" / f"curves_{model}.json").read_text())
    variants, sizes = list(committed["variants"]), committed["sizes"]
    seeds = sorted({int(k.rsplit("_s", 1)[1]) for k in committed["sets"]})
    assert curves.restore(tmp_path, ROOT / "experiments" / "results" / f"curves_{model}.json") > 0
    got = curves.summarise(tmp_path, variants, seeds, sizes, sizes)
    for key in ("points", "per_seed", "real", "finetune", "finetune_real", "sets"):
        assert got[key] == committed[key], key
    first = next(iter(committed["per_seed"]))
    n, s = next(iter(committed["per_seed"][first].items()))
    seed = next(iter(s))
    cache = tmp_path / f"{first}_s{seed}.n{n}.score.json"
    mine = {**json.loads(cache.read_text()), "probe_accuracy": 0.123}
    cache.write_text(json.dumps(mine))
    assert curves.restore(tmp_path, ROOT / "experiments" / "results" / f"curves_{model}.json") == 0
    assert json.loads(cache.read_text())["probe_accuracy"] == 0.123


def test_a_set_regenerated_smaller_here_keeps_the_restored_sets_record(curves, tmp_path):
    """Regenerating a restored set's first rows (to fine-tune a small point) must not make the
    summary describe the 4,000-row set by those rows; once the set here holds as many rows as the
    restored one, its own size and time are reported."""
    committed = {"sets": {"fewgen_s0": {"rows": 400, "generate_minutes": 6.0, "examples_per_s": 1.111}}}
    (tmp_path / "committed.json").write_text(json.dumps(committed))
    curves.restore(tmp_path, tmp_path / "committed.json")
    timing = tmp_path / "fewgen_s0.time.json"

    def grown(per_label: int, segments: list[tuple[int, int, float]]) -> dict:
        write_set(tmp_path / "fewgen_s0.jsonl", "fewgen", None, per_label=per_label, order_seed=3)
        timing.write_text(json.dumps({"segments": [{"rows_before": a, "rows_after": b, "seconds": t, "target": b,
                                                    "complete": True} for a, b, t in segments]}))
        return curves.summarise(tmp_path, ["fewgen"], [0], [100])["sets"]["fewgen_s0"]

    assert grown(25, [(0, 100, 90.0)]) == committed["sets"]["fewgen_s0"]
    assert grown(100, [(0, 100, 90.0), (100, 400, 300.0)]) == {"rows": 400, "generate_minutes": 6.5,
                                                               "examples_per_s": round(400 / 390.0, 3)}
