"""`generate -n N --diverse G`: the N rows of one prompt form one CorrSynth group.

Reference: a plain step-by-step loop that recomputes every row's full sequence with the HF model
(no KV cache) and samples with ``kernels.reference.guided_sample`` and a mix written by hand."""
import json

import pytest
import torch

from divgen.bindings import cli
from divgen.engine import diverse
from divgen.engine.diverse import check_diverse, diverse_guidance, generate_diverse
from divgen.engine.errors import DivgenError
from divgen.engine.guidance import MAX_WEIGHT
from divgen.kernels import reference


def corrsynth_mix(k, g):
    w = (g - 1) / (k - 1)
    return torch.full((k, k), -w) + torch.eye(k) * (1 + w * k)


@torch.inference_mode()
def _reference_loop(lm, prompt, n, g, seed, steps, temperature):
    ids = [lm.encode(prompt) for _ in range(n)]
    for step in range(steps):
        logits = torch.stack([lm.model(input_ids=torch.tensor([row])).logits[0, -1] for row in ids])   # [n, V]
        tokens = reference.guided_sample(logits, corrsynth_mix(n, g), seeds=torch.arange(seed, seed + n),
                                         step=step, temperature=temperature)
        for row, t in zip(ids, tokens.tolist()):
            row.append(t)
    return [row[-steps:] for row in ids]


def test_diverse_rows_equal_a_plain_reference_loop(embedded_lm):
    lm = embedded_lm
    prompt = lm.format_prompt("Write one sentence about the sea.")
    results, stats = generate_diverse(lm, prompt, n=3, diverse=4.0, max_new_tokens=5, temperature=1.0,
                                      seeds=40, ignore_eos=True)
    want = _reference_loop(lm, prompt, 3, 4.0, 40, 5, 1.0)
    assert [r.token_ids for r in results] == want
    assert stats.rows_forwarded_per_step == [3] * len(stats.rows_forwarded_per_step)   # no extra rows
    plain, _ = generate_diverse(lm, prompt, n=3, diverse=None, max_new_tokens=5, temperature=1.0, seeds=40,
                                ignore_eos=True)
    assert [r.token_ids for r in plain] != want     # the guidance changed the samples


def test_diverse_checks_and_defaults():
    assert diverse.MAX_SCALE == MAX_WEIGHT
    assert diverse_guidance(8, None) is None and diverse_guidance(8, 1.0) is None
    g = diverse_guidance(4, 2.5)
    assert g.method == "corrsynth" and g.groups == (0, 0, 0, 0) and g.g == 2.5
    for n, value, message in ((1, 2.0, "-n 2 or more"), (4, 0.5, r"\[1, 100\]"), (4, float("nan"), r"\[1, 100\]"),
                              (4, 101.0, r"\[1, 100\]")):
        with pytest.raises(DivgenError, match=message):
            check_diverse(n, value)


def test_cli_refuses_bad_diverse_before_loading_the_model(monkeypatch, capsys):
    import divgen.engine.model as model

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(model, "load_model", no_load)
    assert cli.main(["generate", "hi", "-n", "1", "--diverse", "2"]) == 2
    assert "give -n 2 or more" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "-n", "4", "--diverse", "0.5"]) == 2
    assert "--diverse G must be in [1, 100]" in capsys.readouterr().err


def test_cli_diverse_prints_the_python_equivalents_samples(embedded_lm, monkeypatch, capsys):
    import divgen.engine.model as model

    monkeypatch.setattr(model, "load_model", lambda *a, **k: embedded_lm)
    assert cli.main(["generate", "Name a colour.", "-n", "3", "--diverse", "3", "--max-new-tokens", "6",
                     "--seed", "9", "--temperature", "0.8", "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want, _ = generate_diverse(embedded_lm, embedded_lm.format_prompt("Name a colour."), n=3, diverse=3.0,
                               max_new_tokens=6, temperature=0.8, seeds=9)
    assert [p["tokens"] for p in printed] == [r.token_ids for r in want]
