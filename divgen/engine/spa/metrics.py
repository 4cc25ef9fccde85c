"""SPA's metrics over the K answers to one prompt.

Diversity Score (SPA paper): with M answers and D duplicate pairs among the M·(M−1)/2 pairs,

    DS = 1 − D / (M·(M−1)/2)

Two answers are duplicates when their texts are equal after stripping the ends and collapsing
runs of whitespace (case is kept). DS = 1: all different; DS = 0: all the same. M < 2 has no pairs
and is reported as NaN (excluded from averages).

Pairwise KL between adapters along the answers: teacher-force every answer a_k of the prompt
through every adapter i, giving next-token distributions p_i(· | prompt, a_k[:t]) at every position t
of every answer. Then

    KL = mean over answers k, positions t of a_k, ordered adapter pairs (i, j), i ≠ j, of
         KL(p_i ‖ p_j) = Σ_v p_i(v) (log p_i(v) − log p_j(v))

Averaging over *ordered* pairs symmetrises it: it equals the mean over unordered pairs of half the
Jeffreys divergence KL(p_i‖p_j) + KL(p_j‖p_i). Positions are pooled over the answers of a prompt
(longer answers weigh more); the prompt-level values are then averaged over prompts. With one
adapter there are no pairs and KL is 0 by definition (one model agrees with itself).
"""
from __future__ import annotations

import math
import re

import torch

_SPACE = re.compile(r"\s+")


def normalise_answer(text: str) -> str:
    return _SPACE.sub(" ", text.strip())


def diversity_score(answers: list[str]) -> float:
    """1 − duplicate pairs / all pairs among the answers (NaN for fewer than two answers)."""
    m = len(answers)
    if m < 2:
        return math.nan
    keys = [normalise_answer(a) for a in answers]
    dup = sum(1 for i in range(m) for j in range(i + 1, m) if keys[i] == keys[j])
    return 1.0 - dup / (m * (m - 1) / 2)


def pairwise_kl_sum(logprobs: torch.Tensor) -> tuple[float, int]:
    """Sum over positions and ordered pairs i ≠ j of KL(p_i ‖ p_j), and the number of terms.

    logprobs: [A, T, V] log-softmax of A adapters at the same T positions.
    """
    a, t, _ = logprobs.shape
    if a < 2 or t == 0:
        return 0.0, 0
    lp = logprobs.double()
    p = lp.exp()
    # Σ_{i,j} Σ_v p_i (lp_i − lp_j) = A·Σ_i Σ_v p_i lp_i − Σ_v (Σ_i p_i)(Σ_j lp_j); the i = j terms are 0.
    neg_entropy = (p * lp).sum(-1)                               # [A, T]
    cross = (p.sum(0) * lp.sum(0)).sum(-1)                       # [T]
    total = a * neg_entropy.sum(0) - cross                       # [T]
    return float(total.sum()), a * (a - 1) * t


def mean_ignoring_nan(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def fidelity_at_k(judged: list[list[bool]]) -> dict:
    """Label fidelity of k answers per prompt, the pass@k analogue (``judged[p][i]``: is answer i of
    prompt p judged to be the prompt's intended label?):

    * ``at1``  — mean over prompts of the share of its answers judged right (pass@1 with n = k
      samples: the chance that one answer drawn at random is right);
    * ``any``  — share of prompts with at least one of the k answers right (pass@k);
    * ``all``  — share of prompts with all k answers right.
    """
    if not judged or any(not row for row in judged):
        raise ValueError("fidelity@k needs at least one prompt and one answer per prompt")
    n = len(judged)
    return {"at1": sum(sum(r) / len(r) for r in judged) / n, "any": sum(any(r) for r in judged) / n,
            "all": sum(all(r) for r in judged) / n, "k": max(len(r) for r in judged), "prompts": n}


def answers_self_bleu(answers: list[str], order: int = 4) -> float:
    """Self-BLEU-``order`` of one prompt's answers (``divgen.engine.metrics.self_bleu``: each answer
    against the others; 1 = all the same, lower = more diverse). NaN for fewer than two answers."""
    from divgen.engine.metrics import self_bleu, tokenize

    if len(answers) < 2:
        return math.nan
    return self_bleu([tokenize(a) for a in answers], orders=(order,))[order]
