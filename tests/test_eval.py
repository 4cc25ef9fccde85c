"""`divgen eval` against independent computations on a small constructed fixture.

The fixture is made here from templates (two topics, sports and business): a real labelled CSV
and synthetic JSONL sets. The probe is checked against plain gradient descent in numpy on the
same embeddings; fidelity against a set whose labels are swapped; bad input against one clear
error before any model loads.
"""
from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest
import torch

from divgen.bindings.cli import main as cli_main
from divgen.engine.errors import DivgenError
from divgen.engine.eval.data import read_real, split, thin
from divgen.engine.eval.evaluate import accuracy_and_macro_f1, real_subset
from divgen.engine.eval.probe import DEFAULT_L2, train_probe
from divgen.engine.metrics import embed
from divgen.engine.synth.task import load_task
from conftest import single_thread

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread)


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Embedding caches of the fixture texts go to a temporary folder, not the user's cache."""
    monkeypatch.setenv("DIVGEN_CACHE", str(tmp_path_factory.getbasetemp() / "divgen-cache"))


TEAMS = ["Lakers", "Yankees", "Arsenal", "Red Sox", "Celtics", "Chelsea", "Packers", "Cubs"]
FIRMS = ["Oracle", "Exxon", "Walmart", "Boeing", "Pfizer", "Intel", "Ford", "Citigroup"]
SPORT = ["The {a} beat the {b} {x}-{y} on Sunday to reach the playoffs.",
         "{a} striker scored twice as the {a} won the league match against {b}.",
         "The {a} coach praised the defence after a {x}-{y} victory over the {b}.",
         "Injured quarterback misses the game as the {a} lose to the {b}."]
MIXED = ["The {a} owner bought {x} percent of {f} shares after the {b} game.",
         "{f} pays the {a} {x} million dollars to rename the stadium of the {b}.",
         "Fans of the {a} and investors in {f} cheered a {x}-{y} result on Sunday."]
BUSINESS = ["Shares of {f} rose {x} percent after quarterly profit beat forecasts.",
            "{f} agreed to buy {g} for {x} billion dollars in cash and stock.",
            "{f} cut its earnings outlook and its stock fell {x} percent on Wall Street.",
            "Investors sold {f} bonds as the company reported a loss of {x} million dollars."]


def topic_texts(kind: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{kind}/{seed}")
    out = []
    for _ in range(n):
        a, b = rng.sample(TEAMS, 2)
        f, g = rng.sample(FIRMS, 2)
        tpl = rng.choice({"sports": SPORT, "business": BUSINESS, "mixed": MIXED}[kind])
        out.append(tpl.format(a=a, b=b, f=f, g=g, x=rng.randint(1, 9), y=rng.randint(0, 9)))
    return out


TASK_YAML = """name: fixture
labels:
  - {name: sports, verbalization: sports, source_label: 2}
  - {name: business, verbalization: business, source_label: 3}
prompt: "Write a news article about {verbalization}."
"""


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalfix")
    sports, business = topic_texts("sports", 40, 0), topic_texts("business", 40, 0)
    rows = []
    for i, (s, b, m) in enumerate(zip(sports, business, topic_texts("mixed", 40, 0))):
        rows += [("2", s), ("3", b)] + ([("2" if i % 8 else "3", m)] if i % 4 == 1 else [])
    with (d / "real.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        w.writerows(rows)
    (d / "task.yaml").write_text(TASK_YAML)
    syn = [{"text": t, "label": "sports"} for t in topic_texts("sports", 6, 1)]
    syn += [{"text": t, "label": "business"} for t in topic_texts("business", 6, 1)]
    # two hard cases so that the accuracy is not trivially 100 %
    syn += [{"text": "The Yankees owner sold shares of the team for 2 billion dollars.", "label": "sports"},
            {"text": "Boeing sponsors the stadium where the Packers won on Sunday.", "label": "business"}]
    (d / "syn.jsonl").write_text("".join(json.dumps(r) + "\n" for r in syn))
    swapped = [{**r, "label": "business" if r["label"] == "sports" else "sports"} for r in syn]
    (d / "swapped.jsonl").write_text("".join(json.dumps(r) + "\n" for r in swapped))
    return d


# ---- an independent probe: Newton's method on the same objective, in numpy --------------------
def numpy_probe(x: np.ndarray, y: np.ndarray, k: int, l2: float, iters: int = 30):
    """Minimise mean cross-entropy + l2/2 |W|^2 (bias free) by Newton steps; returns W, b."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])                     # the bias as a last feature
    pen = np.r_[np.full(d, l2), 0.0]
    theta = np.zeros((k, d + 1))
    onehot = np.eye(k)[y]
    shift = np.zeros((k, d + 1))
    shift[:, d] = 1 / np.sqrt(k)                               # adding a constant to every bias
    for _ in range(iters):
        z = xa @ theta.T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot).T @ xa / n + pen * theta            # [k, d+1]
        if np.abs(grad).max() < 1e-12:
            break
        hess = np.zeros((k, d + 1, k, d + 1))
        for a in range(k):
            for b in range(k):
                s = p[:, a] * ((a == b) - p[:, b])               # d p_a / d z_b per row
                hess[a, :, b, :] = (xa.T * s) @ xa / n
            hess[a, :, a, :] += np.diag(pen)
        # the softmax is unchanged by a shift shared by all biases (the gradient is orthogonal to
        # it): give that one direction some curvature so the Newton system is regular
        h = hess.reshape(k * (d + 1), -1) + np.outer(shift.ravel(), shift.ravel())
        step = np.linalg.solve(h, grad.ravel())
        theta -= step.reshape(k, d + 1)
    assert np.abs(grad).max() < 1e-9
    return theta[:, :d], theta[:, d]


def test_probe_reaches_the_same_minimum_as_numpy_gradient_descent():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 12))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (x[:, 0] + 0.3 * rng.normal(size=60) > 0).astype(int) + (x[:, 1] > 0.5)
    w_ref, b_ref = numpy_probe(x, y, 3, DEFAULT_L2)
    for seed in (None, 0, 1):
        probe = train_probe(torch.tensor(x), torch.tensor(y), 3, seed=seed)
        # softmax weights are defined up to a shift shared by all classes: compare centred values
        w = probe.weight.numpy() - probe.weight.numpy().mean(0)
        b = probe.bias.numpy() - probe.bias.numpy().mean()
        assert np.allclose(w, w_ref - w_ref.mean(0), atol=1e-5)
        assert np.allclose(b, b_ref - b_ref.mean(), atol=1e-5)


def test_accuracy_and_macro_f1_by_hand():
    pred, gold = [0, 0, 1, 2, 2, 1], [0, 1, 1, 2, 0, 1]
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 0 fn 1 -> 0.8; class 2: tp 1 fp 1 fn 0 -> 2/3
    acc, f1 = accuracy_and_macro_f1(pred, gold, 4)      # class 3 absent everywhere: F1 0
    assert acc == pytest.approx(4 / 6)
    assert f1 == pytest.approx((0.5 + 0.8 + 2 / 3 + 0.0) / 4)


def test_split_is_by_data_row_index_and_thinning_is_even(fixture):
    task = load_task(fixture / "task.yaml")
    data = read_real(fixture / "real.csv", task)
    pool, test = split(data, 10)
    assert pool.rows == list(range(0, 90, 10)) and len(test) == 81
    assert not set(pool.rows) & set(test.rows)
    assert [data.label_names[i] for i in data.labels[:2]] == ["sports", "business"]
    assert thin(test, 9).rows == [test.rows[i * 81 // 9] for i in range(9)]


def test_cli_eval_matches_a_probe_trained_by_hand(fixture, capsys):
    assert cli_main(["eval", str(fixture / "syn.jsonl"), "--real", str(fixture / "real.csv"),
                     "--task", str(fixture / "task.yaml"), "--json", "--seeds", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    syn_row, real_row = out["rows"]
    # by hand: the same embeddings, numpy gradient descent, our own accuracy / macro-F1
    task = load_task(fixture / "task.yaml")
    pool, test = split(read_real(fixture / "real.csv", task), 10)
    records = [json.loads(l) for l in (fixture / "syn.jsonl").read_text().splitlines()]
    y = np.array([0 if r["label"] == "sports" else 1 for r in records])
    syn_texts = [r["text"] for r in records]
    every_x = embed(syn_texts + test.texts + pool.texts).double().numpy()       # one call: fewer batches
    syn_x, test_x = every_x[:len(syn_texts)], every_x[len(syn_texts):len(syn_texts) + len(test)]
    pool_x = dict(zip(pool.rows, every_x[len(syn_texts) + len(test):]))
    w, b = numpy_probe(syn_x, y, 2, DEFAULT_L2)
    pred = (test_x @ w.T + b).argmax(1)
    gold = np.array(test.labels)
    acc = float((pred == gold).mean())
    f1s = [2 * ((pred == c) & (gold == c)).sum() / ((pred == c).sum() + (gold == c).sum()) for c in (0, 1)]
    probe = syn_row["students"]["probe"]
    assert probe["accuracy"]["values"] == pytest.approx([acc] * 3, abs=1e-12)
    assert probe["macro_f1"]["mean"] == pytest.approx(float(np.mean(f1s)), abs=1e-12)
    assert probe["accuracy"]["std"] == pytest.approx(0.0, abs=1e-12)      # a convex probe: seeds agree
    assert 0.5 < acc < 1.0
    # the real row: per seed, the documented draw of pool rows, and the same hand-made probe
    counts = {0: 7, 1: 7}
    accs = []
    for seed in (0, 1, 2):
        sub = real_subset(pool, counts, seed)
        rng = random.Random(f"divgen-eval-real/{seed}")
        expect = []
        for label in (0, 1):
            mine = [i for i, l in enumerate(pool.labels) if l == label]
            expect += sorted(rng.sample(mine, min(7, len(mine))))      # fewer than 7 in the pool: all
        assert sub.rows == [pool.rows[i] for i in sorted(expect)]
        w, b = numpy_probe(np.stack([pool_x[r] for r in sub.rows]), np.array(sub.labels), 2, DEFAULT_L2)
        accs.append(float(((test_x @ w.T + b).argmax(1) == gold).mean()))
    # as many as asked, except where a label's pool is smaller: then all of it, and the row says so
    have = [sum(1 for l in pool.labels if l == c) for c in (0, 1)]
    assert real_row["real"] and real_row["fidelity"] is None and real_row["asked"] == 14
    assert real_row["n"] == sum(min(7, h) for h in have) == len(real_subset(pool, counts, 0))
    assert real_row["short_labels"] == {name: [h, 7] for name, h in zip(("sports", "business"), have) if h < 7}
    assert real_row["students"]["probe"]["accuracy"]["values"] == pytest.approx(accs, abs=1e-12)


def test_fidelity_of_a_set_with_swapped_labels(fixture, capsys):
    assert cli_main(["eval", str(fixture / "syn.jsonl"), str(fixture / "swapped.jsonl"), "--real",
                     str(fixture / "real.csv"), "--task", str(fixture / "task.yaml"), "--json", "--seeds", "1",
                     "--no-real"]) == 0
    right, swapped = json.loads(capsys.readouterr().out)["rows"]
    assert right["fidelity"] >= 10 / 14          # a judge from 9 real rows gets most template texts right
    assert swapped["fidelity"] == pytest.approx(1 - right["fidelity"])   # two labels: every verdict flips
    # and the Python API the CLI uses gives the same numbers
    from divgen.engine.eval.judge import Judge

    judge = Judge.from_real(fixture / "real.csv", load_task(fixture / "task.yaml"))
    recs = [json.loads(l) for l in (fixture / "swapped.jsonl").read_text().splitlines()]
    assert judge.fidelity([r["text"] for r in recs], [r["label"] for r in recs]) == pytest.approx(swapped["fidelity"])
    assert judge.trained_on == 9


def test_table_output(fixture, capsys):
    assert cli_main(["eval", str(fixture / "syn.jsonl"), "--real", str(fixture / "real.csv"),
                     "--task", str(fixture / "task.yaml"), "--seeds", "1"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:3] == ["set", "n", "fidelity"]
    assert any(line.startswith("syn ") for line in table.splitlines())
    task = load_task(fixture / "task.yaml")
    pool, _ = split(read_real(fixture / "real.csv", task), 10)
    used = sum(min(7, sum(1 for l in pool.labels if l == c)) for c in (0, 1))    # 7 synthetic rows a label
    assert any(line.startswith(f"real pool ({used})") for line in table.splitlines())
    if used < 14:
        assert f"this row trains on {used} real rows, not 14" in table


@pytest.mark.parametrize("case, message", [
    ("no_label_column", "no label column 'label'"),
    ("no_text_column", "no text column 'body'"),
    ("unknown_real_label", "label value(s) '7'"),
    ("unknown_synthetic_label", "label(s) 'weather'"),
    ("empty_real", "is empty"),
    ("empty_synthetic", "holds no examples"),
    ("no_task", "pass --task"),
])
def test_bad_input_one_clear_error(fixture, tmp_path, capsys, monkeypatch, case, message):
    import divgen.engine.metrics as metrics

    monkeypatch.setattr(metrics, "load_embedding_model", lambda: pytest.fail("the model loaded before the error"))
    real, syn, extra = fixture / "real.csv", fixture / "syn.jsonl", []
    task = ["--task", str(fixture / "task.yaml")]
    if case == "no_label_column":
        real = tmp_path / "r.csv"
        real.write_text("category,text\n2,a game\n")
    elif case == "no_text_column":
        extra = ["--text-column", "body"]
    elif case == "unknown_real_label":
        real = tmp_path / "r.csv"
        real.write_text("label,text\n2,a game\n7,the weather\n")
    elif case == "unknown_synthetic_label":
        syn = tmp_path / "s.jsonl"
        syn.write_text('{"text": "rain", "label": "weather"}\n')
    elif case == "empty_real":
        real = tmp_path / "r.csv"
        real.write_text("")
    elif case == "empty_synthetic":
        syn = tmp_path / "s.jsonl"
        syn.write_text("\n")
    elif case == "no_task":
        task = []
    code = cli_main(["eval", str(syn), "--real", str(real), *task, *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_finetuned_student_takes_a_couple_of_steps_deterministically():
    from divgen.engine.eval.finetune import FinetuneConfig, predict_finetuned, train_finetuned
    from divgen.engine.metrics import load_embedding_model

    texts = topic_texts("sports", 3, 2) + topic_texts("business", 3, 2)
    labels = [0, 0, 0, 1, 1, 1]
    base = {k: v.clone() for k, v in load_embedding_model()[1].state_dict().items()}
    cfg = FinetuneConfig(batch_size=4, max_steps=2)
    a, steps = train_finetuned(texts, labels, 2, seed=0, config=cfg)
    b, _ = train_finetuned(texts, labels, 2, seed=0, config=cfg)
    c, _ = train_finetuned(texts, labels, 2, seed=1, config=FinetuneConfig(batch_size=4, max_steps=1))
    assert steps == 2
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)                           # same seed, same student
    assert not torch.equal(sa["head.weight"], sc["head.weight"])                # another seed differs
    enc = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(sa[enc], base[enc.removeprefix("encoder.")])          # the encoder was trained
    after = load_embedding_model()[1].state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)                      # the shared model was not
    pred = predict_finetuned(a, texts)
    logits = a(**load_embedding_model()[0](texts, padding=True, truncation=True, max_length=128,
                                            return_tensors="pt")).argmax(1)
    assert pred.tolist() == logits.tolist()


def test_cli_eval_with_the_finetuned_student(fixture, capsys, monkeypatch):
    import divgen.engine.eval.finetune as ft

    real_cfg = ft.FinetuneConfig
    monkeypatch.setattr(ft, "FinetuneConfig", lambda epochs=3: real_cfg(epochs=epochs, max_steps=1))
    assert cli_main(["eval", str(fixture / "syn.jsonl"), "--real", str(fixture / "real.csv"), "--task",
                     str(fixture / "task.yaml"), "--student", "both", "--seeds", "2", "--json", "--no-real",
                     "--finetune-test-limit", "10"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    fine = row["students"]["finetune"]
    assert fine["steps"] == 1 and fine["test_rows"] == 10 and len(fine["accuracy"]["values"]) == 2
    assert all(0 <= v <= 1 for v in fine["accuracy"]["values"])
