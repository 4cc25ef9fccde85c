"""`divgen metrics` against straightforward independent computations on the same data."""
from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter

import pytest

from divgen.bindings.cli import main as cli_main
from divgen.engine.errors import DivgenError
from divgen.engine.metrics import compute_metrics, embed, read_examples, self_bleu, subset, tokenize

WORDS = "the a cat dog sat ran on under mat rug quickly slowly big small red".split()


def toks(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


# ---- an independent, deliberately plain sentence-BLEU (the definition, loop by loop) ----------
def plain_ngrams(t, n):
    return Counter(tuple(t[i:i + n]) for i in range(len(t) - n + 1))


def plain_sentence_bleu(refs: list[list[str]], hyp: list[str], max_n: int) -> float:
    nums, dens = [], []
    for n in range(1, max_n + 1):
        h = plain_ngrams(hyp, n)
        num = 0
        for g, c in h.items():
            best = 0
            for r in refs:
                best = max(best, plain_ngrams(r, n)[g])
            num += min(c, best)
        nums.append(num)
        dens.append(max(1, sum(h.values())))
    if nums[0] == 0:
        return 0.0
    c = len(hyp)
    r = sorted((abs(len(x) - c), len(x)) for x in refs)[0][1]
    bp = 1.0 if c > r else (0.0 if c == 0 else math.exp(1 - r / c))
    ps = [(num if num else 0.1) / den for num, den in zip(nums, dens)]
    return bp * math.exp(sum(math.log(p) / max_n for p in ps))


def plain_self_bleu(token_lists, max_n):
    scores = [plain_sentence_bleu(token_lists[:i] + token_lists[i + 1:], h, max_n) for i, h in enumerate(token_lists)]
    return sum(scores) / len(scores)


def random_texts(n, seed, lo=1, hi=14):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + rng.choice(["", ".", "!"])
            for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_self_bleu_matches_plain_definition(seed):
    texts = random_texts(23, seed)
    token_lists = [toks(t) for t in texts]
    got = self_bleu(token_lists)
    for n in (1, 2, 3, 4):
        assert got[n] == pytest.approx(plain_self_bleu(token_lists, n), rel=1e-12, abs=1e-12)


def test_self_bleu_extremes():
    same = [toks("the cat sat on the mat")] * 3
    assert all(v == pytest.approx(1.0) for v in self_bleu(same).values())
    disjoint = [toks("alpha beta gamma"), toks("delta epsilon zeta")]
    assert all(v == 0.0 for v in self_bleu(disjoint).values())
    assert self_bleu([toks("one text")]) is None


def test_distinct_duplicates_lengths_and_counts_by_hand(tmp_path):
    rows = [("the cat sat", "a"), ("the cat sat", "a"), ("the dog ran", "a"), ("big red dog", "b"), ("", "b")]
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in rows))
    texts, labels = read_examples(path)
    m = compute_metrics(texts, labels, self_bleu_sample=0, embeddings=False)
    a, b, overall = m["labels"]["a"], m["labels"]["b"], m["overall"]
    # label a: unigrams the,cat,sat,the,cat,sat,the,dog,ran -> 5 distinct / 9
    assert a["distinct"]["1"] == pytest.approx(5 / 9)
    assert a["distinct"]["2"] == pytest.approx(4 / 6)        # (the cat) x2, (cat sat) x2, (the dog), (dog ran)
    assert a["distinct"]["3"] == pytest.approx(2 / 3)
    assert a["distinct"]["4"] is None
    assert a["duplicate_rate"] == pytest.approx(1 / 3)
    assert b["empty"] == 1 and b["self_bleu"] is None           # one non-empty text: no Self-BLEU
    assert overall["label_counts"] == {"a": 3, "b": 2}
    assert overall["duplicate_rate"] == pytest.approx(1 - 4 / 5)
    assert overall["mean_words"] == pytest.approx((3 + 3 + 3 + 3 + 0) / 5)
    assert overall["distinct"]["1"] == pytest.approx(len({"the", "cat", "sat", "dog", "ran", "big", "red"}) / 12)


def test_self_bleu_subset_is_the_documented_sample():
    texts = random_texts(30, 7)
    labels = ["x"] * 30
    m = compute_metrics(texts, labels, self_bleu_sample=8, sample_seed=3, embeddings=False)
    chosen = random.Random(3).sample(list(range(30)), 8)
    assert subset(list(range(30)), 8, 3) == chosen
    expected = plain_self_bleu([toks(texts[i]) for i in chosen], 4)
    assert m["overall"]["self_bleu"]["4"] == pytest.approx(expected, rel=1e-12)
    assert m["overall"]["self_bleu_texts"] == 8


def test_embeddings_and_mean_pairwise_cosine():
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today.",
             "The cat sits on the mat."]
    e = embed(texts)
    assert e.shape == (4, 384)
    assert e.norm(dim=1).tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert float(e[0] @ e[3]) == pytest.approx(1.0, abs=1e-5)
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.3       # paraphrase much closer than unrelated
    m = compute_metrics(texts, ["a", "a", "b", "b"], self_bleu_sample=0)
    pairs = lambda idx: [float(e[i] @ e[j]) for i, j in itertools.combinations(idx, 2)]  # noqa: E731
    assert m["overall"]["cosine"] == pytest.approx(sum(pairs(range(4))) / 6, abs=1e-5)
    assert m["labels"]["b"]["cosine"] == pytest.approx(float(e[2] @ e[3]), abs=1e-5)


def test_cli_metrics_json_matches_independent_computation(tmp_path, capsys):
    texts = random_texts(12, 5, lo=3)
    labels = ["p", "n"] * 6
    path = tmp_path / "gen.jsonl"
    body = "".join(json.dumps({"text": t, "label": l, "group": i}) + "\n" for i, (t, l) in enumerate(zip(texts, labels)))
    path.write_text(body + '{"text": "torn li')                    # a torn last line is ignored
    assert cli_main(["metrics", str(path), "--json", "--no-embeddings"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"]["count"] == 12
    for lab in ("p", "n"):
        mine = [toks(t) for t, l in zip(texts, labels) if l == lab]
        assert out["labels"][lab]["self_bleu"]["2"] == pytest.approx(plain_self_bleu(mine, 2), rel=1e-12)
        grams = [g for t in mine for g in plain_ngrams(t, 2).elements()]
        assert out["labels"][lab]["distinct"]["2"] == pytest.approx(len(set(grams)) / len(grams))
    # the plain-text table names every label and the overall row
    assert cli_main(["metrics", str(path), "--no-embeddings"]) == 0
    table = capsys.readouterr().out
    assert all(re.search(rf"^{name}\s+{n}\s", table, re.M) for name, n in (("p", 6), ("n", 6), ("ALL", 12)))


def test_bad_metrics_input(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\nnot json\n{"text": "ok2", "label": "a"}\n')
    with pytest.raises(DivgenError, match="line 2"):
        read_examples(bad)
    assert cli_main(["metrics", str(tmp_path / "missing.jsonl")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert tokenize("Hello, World!") == ["hello", ",", "world", "!"]


# ---- copy and degenerate rates ------------------------------------------------------------------
def plain_shares_ngram(text: str, source: str, n: int) -> bool:
    a, b = re.findall(r"\w+", text.lower()), re.findall(r"\w+", source.lower())
    grams = {tuple(b[i:i + n]) for i in range(len(b) - n + 1)}
    return any(tuple(a[i:i + n]) in grams for i in range(len(a) - n + 1))


def test_copy_and_degenerate_rates_by_hand(tmp_path, capsys):
    few = tmp_path / "few.csv"
    shown = ["Stocks rose on Monday after the central bank kept its rates on hold.",
             "The striker scored twice in the second half to win the cup for his club.",
             "Scientists found water ice under the surface of the planet Mars last year.",
             "Rebels attacked a convoy near the capital, officials said on Sunday."]
    few.write_text("label,text\n" + "".join(f"{l},\"{t}\"\n" for l, t in zip("1212", shown)))
    recs = [
        {"text": "Analysts said stocks rose on Monday after the bank kept rates steady.", "label": "a",
         "examples": [0, 1]},                                             # a 6-word run: no 8-gram
        {"text": "Fans cheered: the striker scored twice in the second half to win the cup.", "label": "b",
         "examples": [1, 2]},                                             # a copied run of 13 words
        {"text": "The striker scored twice in the second half to win the cup.", "label": "b",
         "examples": [2, 3]},                                             # same text, other examples: no copy
        {"text": "World news:", "label": "a", "examples": ["an inline example text"]},
        {"text": "Rain, then sun.", "label": "a"},                        # no examples named: not counted
    ]
    path = tmp_path / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "gen.jsonl.task.json").write_text(json.dumps(
        {"few_shot_file": str(few), "content": {"labels": [{"name": "a", "verbalization": "world"},
                                                           {"name": "b", "verbalization": "sports"}]}}))
    from divgen.engine.metrics import read_records, set_context

    records = read_records(path)
    ctx = set_context(path, records)
    assert ctx["examples"][:3] == [[shown[0], shown[1]], [shown[1], shown[2]], [shown[2], shown[3]]]
    assert ctx["examples"][3] == ["an inline example text"] and ctx["examples"][4] is None
    m = compute_metrics([r["text"] for r in recs], [r["label"] for r in recs], embeddings=False, **ctx)
    copies = [any(plain_shares_ngram(r["text"], s, 8) for s in ex) for r, ex in zip(recs[:4], ctx["examples"])]
    assert copies == [False, True, False, False]
    assert m["overall"]["copy_rate"] == pytest.approx(1 / 4)            # over the 4 records naming examples
    assert m["labels"]["b"]["copy_rate"] == pytest.approx(1 / 2)
    # degenerate: "World news:" is label a's phrase; "Rain, then sun." is under 5 words
    assert m["overall"]["degenerate_rate"] == pytest.approx(2 / 5)
    assert m["labels"]["a"]["degenerate_rate"] == pytest.approx(2 / 3)
    m6 = compute_metrics([r["text"] for r in recs], [r["label"] for r in recs], embeddings=False, copy_n=6,
                         min_words=0, **ctx)
    assert m6["overall"]["copy_rate"] == pytest.approx(2 / 4)           # "stocks rose on monday after the"
    assert m6["overall"]["degenerate_rate"] == pytest.approx(1 / 5)     # only the label phrase is left
    # the CLI finds the sidecar on its own and shows both columns
    assert cli_main(["metrics", str(path), "--json", "--no-embeddings"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["overall"]["copy_rate"] == pytest.approx(1 / 4)
    assert out["overall"]["degenerate_rate"] == pytest.approx(2 / 5)
    assert cli_main(["metrics", str(path), str(path), "--no-embeddings", "--markdown"]) == 0
    table = capsys.readouterr().out
    assert "| copy | degen |" in table and "| 0.250 | 0.400 |" in table
    # a record naming a row the file does not have: one clear error
    path.write_text(json.dumps({"text": "some text here ok", "label": "a", "examples": [9]}) + "\n")
    assert cli_main(["metrics", str(path), "--no-embeddings"]) == 2
    assert "names few-shot row 9" in capsys.readouterr().err


def test_copy_rate_is_none_without_examples():
    m = compute_metrics(["one two three four five six seven eight"], ["a"], embeddings=False)
    assert m["overall"]["copy_rate"] is None and m["overall"]["degenerate_rate"] == 0.0
