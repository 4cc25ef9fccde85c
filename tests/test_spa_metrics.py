"""SPA metrics against hand counts and a plain double loop over adapter pairs."""
import math

import pytest
import torch

from divgen.engine.spa.metrics import diversity_score, mean_ignoring_nan, pairwise_kl_sum


@pytest.mark.parametrize("answers,expected", [
    (["a", "b", "c", "d"], 1.0),
    (["a", "a", "a", "a"], 0.0),
    (["a", "a", "b", "c"], 1 - 1 / 6),
    (["a", "a", "b", "b"], 1 - 2 / 6),
    (["x y", " x   y\n", "X y"], 1 - 1 / 3),      # whitespace is normalised, case is not
    (["a", "b"], 1.0),
])
def test_diversity_score_counts_duplicate_pairs(answers, expected):
    assert diversity_score(answers) == pytest.approx(expected)


def test_diversity_score_needs_two_answers():
    assert math.isnan(diversity_score(["only"]))
    assert mean_ignoring_nan([math.nan, 0.5, 1.0]) == pytest.approx(0.75)


def _kl_loop(logprobs):
    a, t, _ = logprobs.shape
    total = 0.0
    for i in range(a):
        for j in range(a):
            if i != j:
                for pos in range(t):
                    # F.kl_div(input=log q, target=log p, log_target=True) = Σ p (log p − log q) = KL(p ‖ q)
                    total += float(torch.nn.functional.kl_div(logprobs[j, pos], logprobs[i, pos], log_target=True,
                                                              reduction="sum"))
    return total, a * (a - 1) * t


@pytest.mark.parametrize("adapters,positions,vocab", [(2, 1, 5), (3, 4, 111), (5, 3, 989)])
def test_pairwise_kl_matches_double_loop(adapters, positions, vocab):
    gen = torch.Generator().manual_seed(adapters * 100 + vocab)
    logprobs = torch.log_softmax(3 * torch.randn(adapters, positions, vocab, generator=gen, dtype=torch.float64), -1)
    got, terms = pairwise_kl_sum(logprobs)
    want, want_terms = _kl_loop(logprobs)
    assert terms == want_terms
    assert got == pytest.approx(want, rel=1e-9)


def test_pairwise_kl_is_zero_for_identical_adapters_and_one_adapter():
    lp = torch.log_softmax(torch.randn(1, 6, 50, dtype=torch.float64), -1)
    assert pairwise_kl_sum(lp.expand(4, 6, 50))[0] == pytest.approx(0.0, abs=1e-12)
    assert pairwise_kl_sum(lp) == (0.0, 0)
