"""Special tokens outside the contrast (the own-token rule, divgen/engine/own_special.py): with
injected logits and noise, the guided score of an own token is the row's own log-prob (float64
oracle), the reference, the CPU sampler and the Triton ops (interpreted on CPU) give the oracle's
tokens, and the engine step compiles with it."""
import math

import numpy as np
import pytest
import torch

from divgen.engine.decode import generate
from divgen.engine.guidance import Guidance
from divgen.kernels import build_sample_plan, cpu_sample, ops_for, reference
from test_engine_core import VOCAB, prompts as tiny_prompts, tiny_lm  # noqa: F401
from test_guided_sample import alpha_set, corrsynth_block, cut_scores, log_softmax64, scores_from_mix

ROWS, V = 6, 64
OWN_IDS = [0, 2, 5]


def _mix():
    m = torch.zeros(ROWS, ROWS)
    m[:4, :4] = corrsynth_block(4, 2.0)
    m[4:, 4:] = corrsynth_block(2, 3.0)
    return m


def _own():
    own = torch.zeros(V, dtype=torch.bool)
    own[OWN_IDS] = True
    return own


def _logits(seed, masked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, V, generator=g) * 2
    x[:, OWN_IDS] += 2.5 * torch.randn(ROWS, len(OWN_IDS), generator=g)   # the rows disagree about EOS
    if masked:                       # another mechanism's masks in contrasting rows, own columns included
        x[1, [0, 7, 9]] = float("-inf")
        x[5, [2, 11]] = float("-inf")
    return x


def _oracle_scores(x, mix):
    lp = log_softmax64(x.double().numpy())
    s = scores_from_mix(x.double().numpy(), mix.double().numpy())       # takes logits (the mask rule)
    s[:, OWN_IDS] = lp[:, OWN_IDS]                     # the own-token rule: s_m(v) = ℓ_m(v)
    return s


def _oracle_sample(x, mix, u, temperature, alpha):
    s = _oracle_scores(x, mix)
    xs = x.double().numpy()
    gumbel = -np.log(-np.log(u.double().numpy()))
    tokens, logprobs = [], []
    for m in range(ROWS):
        z = cut_scores(s[m], alpha_set(xs[m], alpha), temperature, 0, 1.0)
        token = int(np.argmax(z if temperature == 0 else z + gumbel[m]))
        tokens.append(token)
        top = z.max()
        logprobs.append(z[token] - top - math.log(np.exp(z - top).sum()))
    return tokens, logprobs


@pytest.mark.parametrize("masked", [False, True])
def test_own_score_is_the_own_log_prob_up_to_the_rows_constant(masked):
    x = _logits(1, masked)
    mix = _mix()
    got = reference.guided_scores(x, mix, own=_own()).double().numpy()
    want = _oracle_scores(x, mix)
    finite = np.isfinite(want)             # a row's own −inf logits are cut by the α mask, not by ŝ
    assert np.isfinite(got[finite]).all()
    diff = np.where(finite, got - np.where(finite, want, 0.0), 0.0)
    const = np.array([diff[m][finite[m]].mean() for m in range(ROWS)])
    assert np.abs(np.where(finite, diff - const[:, None], 0.0)).max() < 1e-4
    # and the rule did change the own columns (the contrast would have moved them)
    plain = reference.guided_scores(x, mix).double().numpy() - const[:, None]
    assert np.abs(plain[:4, OWN_IDS] - want[:4, OWN_IDS]).max() > 0.5


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (0.7, 0.05), (0.0, 0.0)])
@pytest.mark.parametrize("masked", [False, True])
def test_tokens_and_eos_log_prob_equal_the_oracle(temperature, alpha, masked):
    """Injected noise; every row forced to an own token in turn by its noise: the sampled
    token and its log-prob under the guided distribution are the oracle's (own log-prob term)."""
    x = _logits(2, masked)
    mix = _mix()
    own = _own()
    gen = torch.Generator().manual_seed(4)
    for trial in range(4):
        u = torch.rand(ROWS, V, generator=gen).clamp(1e-6, 1 - 1e-6)
        if trial < len(OWN_IDS):
            u[:, OWN_IDS[trial]] = 1 - 1e-7                  # a huge Gumbel: the own token wins if kept
        args = (x, mix, torch.zeros(ROWS, dtype=torch.int64), torch.zeros(ROWS, dtype=torch.int64),
                torch.full((ROWS,), temperature), torch.full((ROWS,), alpha),
                torch.zeros(ROWS, dtype=torch.int64), torch.ones(ROWS))
        tokens, logprobs = reference.guided_sample_step(*args, noise=u, return_logprobs=True, own=own)
        want_tokens, want_logprobs = _oracle_sample(x, mix, u, temperature, alpha)
        assert tokens.tolist() == want_tokens
        assert np.allclose(logprobs.numpy(), want_logprobs, atol=2e-4)
        assert torch.equal(cpu_sample.guided_sample_step(*args, noise=u, own=own), tokens)


def test_cpu_sampler_and_triton_ops_follow_the_rule_with_counter_noise():
    x = _logits(3, masked=True)
    mix = _mix()
    own = _own()
    common = (torch.arange(ROWS, dtype=torch.int64) + 17, torch.full((ROWS,), 5, dtype=torch.int64),
              torch.ones(ROWS), torch.full((ROWS,), 0.02), torch.zeros(ROWS, dtype=torch.int64), torch.ones(ROWS))
    want = reference.guided_sample_step(x, mix, *common, own=own)
    assert torch.equal(cpu_sample.guided_sample_step(x, mix, *common, own=own), want)
    for impl in ("cpu", "triton", "reference"):
        ops = ops_for("cpu", impl)
        plan = build_sample_plan(mix, "cpu", rows=ROWS, ops=ops, own=own)
        assert torch.equal(ops.guided_sample_step(x, plan, *common), want), impl


def test_contrast_no_longer_keeps_a_row_from_stopping():
    """Row 0's own top token is EOS (id 0) by a small margin; the other rows of its group are
    surer of EOS, so the contrast pushes row 0 away from it. Greedy: without the rule row 0
    does not stop, with it it stops (its own argmax)."""
    x = torch.full((ROWS, V), 2.0)
    x[:, 30] = 3.0
    x[0, 0] = 3.2
    x[1:4, 0] = 4.0
    mix = _mix()
    common = (torch.zeros(ROWS, dtype=torch.int64), torch.zeros(ROWS, dtype=torch.int64), torch.zeros(ROWS),
              torch.zeros(ROWS), torch.zeros(ROWS, dtype=torch.int64), torch.ones(ROWS))
    assert int(reference.guided_sample_step(x, mix, *common)[0]) == 30
    assert int(reference.guided_sample_step(x, mix, *common, own=_own())[0]) == 0


def _eos_as_special(monkeypatch):
    """The tiny model's EOS ids (6..11) are its special tokens for the own-token rule."""
    import divgen.engine.decode as decode_mod

    monkeypatch.setattr(decode_mod, "special_token_mask",
                        lambda lm: torch.isin(torch.arange(VOCAB), torch.tensor(sorted(lm.eos_token_ids))))


def _ids(results):
    return [(r.row, r.token_ids, r.finish_reason) for r in results]


def test_engine_own_special(tiny_lm, monkeypatch):
    """FewGen: no effect. CorrSynth: the compiled step gives the eager step's tokens, and the rule
    changes some rows (EOS ids 6..11 of the tiny model are its special tokens here; a large g
    makes the rows' EOS scores differ enough to matter)."""
    ps = tiny_prompts(9)
    kw = dict(max_new_tokens=14, temperature=1.0, min_p=0.02, seeds=7, max_batch_rows=6)
    plain, _ = generate(tiny_lm, ps, **kw)
    g = Guidance.corrsynth([i // 3 for i in range(9)], g=30.0)
    _eos_as_special(monkeypatch)
    assert _ids(generate(tiny_lm, ps, own_special=True, **kw)[0]) == _ids(plain)
    guided, _ = generate(tiny_lm, ps, guidance=g, **kw)
    own_eager, _ = generate(tiny_lm, ps, guidance=g, own_special=True, compile=False, **kw)
    own_compiled, _ = generate(tiny_lm, ps, guidance=g, own_special=True, compile=True, **kw)
    assert _ids(own_compiled) == _ids(own_eager)
    assert _ids(own_eager) != _ids(guided)


def test_slow_path_own_special_and_copy_guard_give_the_engine_tokens(tiny_lm, monkeypatch):
    """The HF forward (architectures without the own forward, e.g. Gemma 3) runs the same rule and
    the same guard: a CorrSynth run with own-special, then with a copy guard too, gives the
    engine's tokens; the guard (built from the unguarded run's own outputs, so it must act in
    every row) leaves none of its n-grams in the guarded outputs; own-special changes some rows."""
    import dataclasses

    from divgen.engine.copy_guard import CopyGuard, ngram_table

    ps = tiny_prompts(9)
    kw = dict(max_new_tokens=14, temperature=1.0, min_p=0.02, seeds=7, max_batch_rows=6, ignore_eos=True)
    slow_lm = dataclasses.replace(tiny_lm, fast_path=False)
    slow_lm.decode = tiny_lm.decode
    g = Guidance.corrsynth([i // 3 for i in range(9)], g=30.0)
    plain, _ = generate(slow_lm, ps, guidance=g, **kw)
    n = 3
    _eos_as_special(monkeypatch)
    own_fast, _ = generate(tiny_lm, ps, guidance=g, own_special=True, **kw)
    own_slow, _ = generate(slow_lm, ps, guidance=g, own_special=True, **kw)
    guard = CopyGuard(n, [[r.token_ids[2:9]] for r in own_slow])       # each row's own 7-token run
    guarded_fast, _ = generate(tiny_lm, ps, guidance=g, own_special=True, copy_guard=guard, **kw)
    guarded_slow, _ = generate(slow_lm, ps, guidance=g, own_special=True, copy_guard=guard, **kw)
    assert _ids(own_slow) == _ids(own_fast)
    assert _ids(own_slow) != _ids(plain)
    assert _ids(guarded_slow) == _ids(guarded_fast)
    # with EOS on, rows leave the batch at different steps (the slow loop selects its guard rows)
    eos_kw = {**kw, "ignore_eos": False}
    left_early = generate(slow_lm, ps, copy_guard=guard, **eos_kw)[0]
    assert {r.finish_reason for r in left_early} == {"eos", "length"}
    assert _ids(left_early) == _ids(generate(tiny_lm, ps, copy_guard=guard, **eos_kw)[0])
    assert all(a.token_ids != b.token_ids for a, b in zip(guarded_slow, own_slow))    # the guard acted
    for res, src in zip(guarded_slow, guard.sources):
        grams = set(ngram_table(None, src, n))
        seq = ps[res.row][-(n - 1):] + res.token_ids
        assert not any(tuple(seq[i:i + n]) in grams for i in range(len(seq) - n + 1)), res.row
