"""`divgen spa run` (engine/spa/pipeline.py) on a tiny random Llama with the embedded tokenizer:

* the whole pipeline (synth -> partition -> adapt -> sample -> KL -> judge -> report) runs, and a run
  stopped after each stage and restarted gives the same summary as an uninterrupted run, without
  redoing finished work;
* batched per-example gradients equal one-at-a-time autograd gradients;
* fidelity@k against a hand-computed example; the temperature matching of the targets.
"""
import json
import math
import shutil

import pytest
import torch

from conftest import single_thread
from divgen.bindings.cli import main as cli_main
from divgen.engine.errors import DivgenError
from divgen.engine.model import load_model
from divgen.engine.spa.metrics import answers_self_bleu, fidelity_at_k
from divgen.engine.spa.pipeline import STAGES, SpaRun, SpaRunConfig, interpolate

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)
LABELS = ["world", "sports", "business", "sci_tech"]


def fake_judge(texts):
    """A deterministic stand-in for the real-data judge (the pipeline only needs texts -> labels)."""
    return [LABELS[sum(map(ord, t)) % 4] for t in texts]


def config(tiny_dir, **kw):
    base = dict(task="ag_news", model=str(tiny_dir), per_label=3, synth_max_new_tokens=8, k=2, heldout_per_label=1,
                temperatures=(0.0, 1.0), max_new_tokens=6, steps=2, whole_steps=2, batch_size=2, lr=0.05,
                lissa_depth=2, grad_batch=3, max_length=96, lora_top_layers=1)
    base.update(kw)
    return SpaRunConfig(**base)


@pytest.fixture(scope="module")
def full_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = SpaRun(config(tiny_dir), out, judge=fake_judge, progress=False).run()
    return out, summary


def test_fidelity_at_k_hand_example():
    judged = [[True, False, False, False],      # 1 of 4 right
              [True, True, True, True],         # all right
              [False, False, False, False]]     # none right
    got = fidelity_at_k(judged)
    assert got["at1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert got["any"] == pytest.approx(2 / 3)
    assert got["all"] == pytest.approx(1 / 3)
    assert got["k"] == 4 and got["prompts"] == 3
    with pytest.raises(ValueError):
        fidelity_at_k([[]])


def test_answers_self_bleu_extremes():
    assert answers_self_bleu(["the cat sat on the mat today"] * 3) == pytest.approx(1.0)
    assert answers_self_bleu(["alpha beta gamma delta", "one two three four"]) == 0.0
    assert math.isnan(answers_self_bleu(["only one"]))


def test_interpolate_matches_fidelity_along_a_curve():
    pts = [(0.9, 0.2), (0.7, 0.4), (0.5, 0.8)]
    assert interpolate(pts, 0.8) == (pytest.approx(0.3), True)
    assert interpolate(pts, 0.95) == (0.2, False)         # outside: nearest end, flagged
    assert interpolate(pts, 0.5) == (0.8, True)


def test_per_example_gradients_equal_one_at_a_time(tiny_dir):
    from divgen.engine.spa.adapt import TrainConfig
    from divgen.engine.spa.data import Example
    from divgen.engine.spa.finetune import TrainableLora, encode_example
    from divgen.engine.spa.influence import example_gradient, per_example_gradients

    lm = load_model(str(tiny_dir))
    lora = TrainableLora(lm.model, TrainConfig(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]).lora_config(None))
    try:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for layer in lora.layers.values():                  # B != 0 so that A's gradient is not 0
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        lora.train(False)
        items = [encode_example(lm, Example(p, r), 96) for p, r in
                 [("Name a cat.", "Luna"), ("Write two lines about the sea and the wind.", "Waves rise and fall all day."),
                  ("Hi", "Hello there, friend of mine!")]]
        got = per_example_gradients(lm.model, lora, items, lm.pad_token_id, lm.device)
        want = torch.stack([example_gradient(lm.model, lora, it, lm.pad_token_id, lm.device) for it in items])
        assert got.shape == (3, lora.num_parameters())
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    finally:
        lora.remove()


def test_pipeline_end_to_end(full_run):
    out, summary = full_run
    rows = summary["rows"]
    groups = {(r["group"], r["temperature"]) for r in rows}
    assert groups == {(g, t) for g in ("random", "lexical", "lissa", "gradsim", "single") for t in (0.0, 1.0)}
    # one batch per temperature: every held-out prompt under every adapter (4 methods x 2) + the whole one
    greedy = [json.loads(l) for l in (out / "samples" / "t0.jsonl").read_text().splitlines()]
    heldout = [json.loads(l) for l in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 4 and len(greedy) == 4 * (4 * 2 + 1)
    sampled = [json.loads(l) for l in (out / "samples" / "t1.jsonl").read_text().splitlines()]
    assert len(sampled) == 4 * (4 * 2 + 2)
    # the report's fidelity is the judge's verdicts, recomputed here by hand for one row
    verdicts = json.loads((out / "judged.json").read_text())
    lissa0 = [[verdicts[r["text"]] == r["label"] for r in greedy if r["group"] == "lissa" and r["prompt"] == h["prompt"]]
              for h in heldout]
    row = next(r for r in rows if r["group"] == "lissa" and r["temperature"] == 0)
    assert row["fidelity_at1"] == pytest.approx(sum(sum(j) / len(j) for j in lissa0) / 4)
    single0 = next(r for r in rows if r["group"] == "single" and r["temperature"] == 0)
    assert single0["diversity_score"] == 0.0          # its one greedy answer, K times
    assert (out / "table.md").read_text().startswith("| method |")
    assert set(summary["targets"]) >= {"random", "lexical", "lissa", "gradsim", "order_by_diversity"}
    adapter_cfg = json.loads((out / "lissa" / "adapters" / "lissa-1" / "adapter_config.json").read_text())
    assert adapter_cfg["layers_to_transform"] == [1]             # --lora-top-layers 1 of 2 layers
    cost = json.loads((out / "influence" / "cost.json").read_text())
    assert cost["examples"] == summary["examples"] and cost["seconds_per_example"] > 0
    train = [json.loads(l) for l in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert {t["prompt"] for t in train} <= {"Write a short news article (two or three sentences) about "
                                            f"{v}. Reply with the article only." for v in
                                            ("world news", "sports", "business", "science and technology")}


def test_resume_after_a_stop_at_every_stage(tiny_dir, full_run, tmp_path):
    out, summary = full_run
    for stage in STAGES[:-1]:
        assert SpaRun(config(tiny_dir), tmp_path, judge=fake_judge, progress=False).run(stop_after=stage) is None
        if stage == "adapt":
            adapter = tmp_path / "lissa" / "adapters" / "lissa-0" / "adapter_model.safetensors"
            stamp = adapter.stat().st_mtime_ns
        if stage == "sample":
            t0 = tmp_path / "samples" / "t0.jsonl"
            stamp_t0 = t0.stat().st_mtime_ns
    resumed = SpaRun(config(tiny_dir), tmp_path, judge=fake_judge, progress=False).run()
    assert adapter.stat().st_mtime_ns == stamp and t0.stat().st_mtime_ns == stamp_t0      # not redone
    strip = lambda s: json.dumps(s["rows"], sort_keys=True)
    assert strip(resumed) == strip(summary)
    assert resumed["targets"] == summary["targets"]


def test_killed_sampling_and_influence_resume(tiny_dir, full_run, tmp_path):
    """A kill inside a stage: the influence state keeps finished gradient batches; a missing sample
    file (the temperature in flight) is redone and equals the uninterrupted run's."""
    out, summary = full_run
    shutil.copytree(out, tmp_path / "run")
    run_dir = tmp_path / "run"
    state = torch.load(run_dir / "influence" / ".influence_state.pt", weights_only=False)
    first = min(state["scores"])
    state["scores"] = {first: state["scores"][first]}                # only the first batch survived
    torch.save(state, run_dir / "influence" / ".influence_state.pt")
    for m in ("lissa", "gradsim"):
        (run_dir / m / "partitions.json").unlink()
    (run_dir / "samples" / "t1.jsonl").unlink()
    (run_dir / "summary.json").unlink()
    resumed = SpaRun(config(tiny_dir), run_dir, judge=fake_judge, progress=False).run()
    assert json.dumps(resumed["rows"], sort_keys=True) == json.dumps(summary["rows"], sort_keys=True)
    for m in ("lissa", "gradsim"):
        assert (run_dir / m / "scores.jsonl").read_text() == (out / m / "scores.jsonl").read_text()


def test_another_config_in_the_same_directory_is_refused(tiny_dir, full_run):
    out, _ = full_run
    with pytest.raises(DivgenError, match="other settings .*k"):
        SpaRun(config(tiny_dir, k=3), out, judge=fake_judge, progress=False).run()


@pytest.mark.parametrize("argv, message", [
    (["--k", "1"], "--k must be in [2, 4096]"),
    (["--temperatures", "0.7,1"], "must include 0"),
    (["--temperatures", "0,x"], "comma-separated numbers"),
    (["--methods", "random,bm42"], "subset of"),
    (["--real", "/nonexistent.csv"], "is not a file"),
    (["--k", "9"], "needs more queries"),
])
def test_cli_rejects_bad_input_in_one_line(argv, message, tmp_path, capsys):
    assert cli_main(["spa", "run", "ag_news", "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_existing_synth_output_replaces_generation(tiny_dir, full_run, tmp_path):
    out, _ = full_run
    run = SpaRun(config(tiny_dir, synth_file=str(out / "synth.jsonl")), tmp_path / "r", judge=fake_judge, progress=False)
    assert run.run(stop_after="synth") is None
    assert run.lm is None                                                  # no model needed to take a file
    for name in ("train.jsonl", "queries.jsonl", "heldout.jsonl"):
        assert (tmp_path / "r" / "data" / name).read_text() == (out / "data" / name).read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "Stocks rose.", "label": "finance"}) + "\n")
    with pytest.raises(DivgenError, match=r"labels \['finance'\] are not labels of task"):
        SpaRun(config(tiny_dir, synth_file=str(bad)), tmp_path / "r2", judge=fake_judge, progress=False).run()


def test_cli_resumes_a_finished_run_and_prints_the_targets(tiny_dir, full_run, capsys):
    """`divgen spa run` with the flags of config(): every stage is found finished (the judge is not
    even built), and the printed targets are the run's."""
    out, summary = full_run
    argv = ["spa", "run", "ag_news", "--out", str(out), "--model", str(tiny_dir), "--per-label", "3",
            "--synth-max-new-tokens", "8", "--k", "2", "--heldout-per-label", "1", "--temperatures", "0,1",
            "--max-new-tokens", "6", "--steps", "2", "--whole-steps", "2", "--batch-size", "2", "--lr", "0.05",
            "--lissa-depth", "2", "--grad-batch", "3", "--max-length", "96", "--lora-top-layers", "1", "--quiet"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["targets"] == json.loads(json.dumps(summary["targets"]))
