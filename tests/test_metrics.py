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
