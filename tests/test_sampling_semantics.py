"""The sampler's conventions where it meets other mechanisms and other libraries:

* the mask rule: a contrasting row's −inf (another mechanism's mask: vLLM's min_tokens, a
  grammar, ...) drops that row's term; it never makes the token more attractive to the others;
* ``min_p`` is transformers' / vLLM's min-p (after temperature, 1.0 allowed), ``alpha`` the
  papers' α on the row's own untempered distribution;
* greedy rows and cuts are decided on values that keep distinct logits distinct: a greedy row
  gives the same token alone, next to sampled rows, with top-k, or inside a guidance batch.

Reference and Triton kernel (interpreter on CPU) against the float64 oracle of
``test_guided_sample`` (exact, injected noise) and against transformers' own warpers.
"""
import math

import numpy as np
import pytest
import torch
from test_guided_sample import corrsynth_block, independent_sample, make_noise, make_seeds, scores_from_mix

import divgen.kernels as kernels
from divgen.engine.sampling import Sampler, SamplingParams
from divgen.kernels import cpu_sample, guided_sample_triton, reference

NEG_INF = float("-inf")
EOS = 7


@pytest.fixture(scope="module")
def gs(on_kernel_device):
    return on_kernel_device(guided_sample_triton)


def cpu_guided_sample(logits, mix, *, seeds, step, temperature=1.0, alpha=0.0, top_k=0, top_p=1.0, min_p=0.0,
                      noise=None, return_logprobs=False):
    """``reference.guided_sample``'s checked entry point onto the CPU sampler's step (the engine's
    CPU sampler, ``cpu_sample.guided_sample_step``; it hands log-probs and min-p to the reference)."""
    temperature, alpha, top_k, top_p, min_p = reference.check_guided_sample_args(
        logits, mix, seeds, temperature, alpha, top_k, top_p, noise, min_p)
    return cpu_sample.guided_sample_step(
        logits, mix, seeds, reference.step_tensor(step, logits.shape[0], logits.device), temperature, alpha,
        top_k, top_p, min_p=min_p if bool((min_p > 0).any()) else None,
        any_top_k_top_p=bool((top_k > 0).any() or (top_p < 1).any()), noise=noise, return_logprobs=return_logprobs)


def implementations(gs):
    return {"reference": reference.guided_sample, "kernel": gs.guided_sample, "cpu": cpu_guided_sample}


# ---- the mask rule ---------------------------------------------------------------------------
def masked_group_logits(vocab: int, seed: int) -> torch.Tensor:
    """A 4-row group with masks in contrasting rows: row 0 cannot end yet (min_tokens: EOS −inf),
    row 2 is held to a grammar's few tokens; rows 1 and 3 are free."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, vocab, generator=g) * 2.0
    x[0, EOS] = NEG_INF
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[torch.randperm(vocab, generator=g)[:9]] = True
    allowed[EOS] = True
    x[2, ~allowed] = NEG_INF
    return x


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("vocab,temperature,top", [(111, 0.9, {}), (989, 1.3, {"top_k": 30, "top_p": 0.9}),
                                                   (111, 0.0, {})])
def test_masked_contrasting_rows_equal_the_oracle(impl, vocab, temperature, top, gs):
    """Exact tokens and log-probs under injected noise: the reference and the kernel read a
    contrasting row's −inf as "drop this row's term", as the float64 oracle does."""
    mix = corrsynth_block(4, 3.0)
    for seed in range(3):
        logits = masked_group_logits(vocab, seed)
        noise = make_noise(4, vocab, seed=100 + seed)
        want = independent_sample(logits, mix, noise, temperature=temperature, alpha=0.0, **top)
        got = implementations(gs)[impl](logits, mix, seeds=make_seeds(4), step=0, temperature=temperature,
                                        noise=noise, return_logprobs=True, **top)
        assert torch.equal(got[0], want[0]), f"seed {seed}: {got[0].tolist()} != {want[0].tolist()}"
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "kernel", "cpu"])
@pytest.mark.parametrize("eos_gap", [-1.0, 1.5])
def test_a_mask_in_one_member_does_not_pull_the_others(impl, eos_gap, gs):
    """The vLLM report: 4 identical rows of one group, EOS masked in member 0 only (min_tokens).
    Identical rows contrast to nothing, so members 1-3 must draw exactly what they draw without
    the mask. The old −100 floor added 100·γ to EOS (every draw became EOS); reading ℓ_0(EOS) as
    ℓ_m(EOS) added γ·log(1/(1 − p(EOS))), which flips draws when EOS is likely (eos_gap 1.5:
    p(EOS) ≈ 0.5 in member 0's unmasked row)."""
    vocab = 111
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3))
    row[EOS] = row.max() + eos_gap
    free = row.repeat(4, 1)
    masked = free.clone()
    masked[0, EOS] = NEG_INF
    mix = corrsynth_block(4, 3.0)
    fn = implementations(gs)[impl]
    draws = 6 if impl == "kernel" else 60
    eos_masked = eos_free = 0
    for step in range(draws):
        args = dict(seeds=make_seeds(4, offset=step), step=step, temperature=1.0)
        with_mask, without = fn(masked, mix, **args), fn(free, mix, **args)
        assert torch.equal(with_mask[1:], without[1:]), step
        assert with_mask[0] != EOS
        eos_masked += int((with_mask[1:] == EOS).sum())
        eos_free += int((without[1:] == EOS).sum())
    assert eos_masked == eos_free
    if eos_gap < 0:
        assert eos_free < 3 * draws


def test_mask_rule_drops_exactly_the_masked_term():
    """ŝ (the comparison values: logits mixed, no normaliser) changes, at a masked (n, v), by
    exactly −γ_{m,n}(l_m(v) − l_n(v)) — row n is read as agreeing with row m there — and nowhere
    else; in log-probs the masked token then gets γ_{m,n}(lse_n − lse_m), the term of a token on
    which the rows' logits agree (checked against the float64 oracle's guided log-probs)."""
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    mix = corrsynth_block(3, 2.5)
    gamma = 0.75
    masked = x.clone()
    masked[1, 5] = NEG_INF
    before = reference.guided_scores(x, mix).double()
    after = reference.guided_scores(masked, mix).double()
    for m in (0, 2):
        shift = after[m] - before[m]                                     # [V]
        dropped = gamma * (x[m, 5].double() - x[1, 5].double())
        assert float(shift[5]) == pytest.approx(-float(dropped), abs=1e-5)
        assert float(torch.cat([shift[:5], shift[6:]]).abs().max()) < 1e-5
    # the same scores, up to a constant per row, as the oracle's s = mix @ g(ℓ)
    want = scores_from_mix(masked.double().numpy(), mix.double().numpy())
    lse = torch.logsumexp(masked.double(), dim=-1)
    for m in (0, 2):
        const = float(after[m, 0]) - want[m, 0]
        assert np.abs(after[m].numpy() - const - want[m]).max() < 1e-4
        agree = gamma * (float(lse[1]) - float(lse[m]))                  # the term where rows agree
        lp = torch.log_softmax(masked.double(), dim=-1)
        others = [n for n in range(3) if n != m and n != 1]
        term5 = want[m, 5] - lp[m, 5].item() - sum(gamma * (lp[m, 5] - lp[n, 5]).item() for n in others)
        assert term5 == pytest.approx(agree, abs=1e-9)


# ---- min_p as transformers and vLLM mean it ---------------------------------------------------
def hf_support(logits_row: torch.Tensor, temperature: float, min_p: float) -> set[int]:
    """Tokens transformers' TemperatureLogitsWarper + MinPLogitsWarper keep (finite scores)."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper

    scores = logits_row[None].clone()
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    scores = MinPLogitsWarper(min_p)(None, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("logits,temperature,want", [
    ([0.0, -1.0, -3.0], 0.5, {0}),          # HF and vLLM keep [0]; min-p before temperature kept [0, 1]
    ([0.0, -2.0, -5.0], 2.0, {0, 1}),       # HF and vLLM keep [0, 1]; before temperature: [0]
])
def test_min_p_keeps_the_peers_tokens(logits, temperature, want, gs):
    row = torch.tensor(logits)
    assert hf_support(row, temperature, 0.3) == want
    for name, fn in implementations(gs).items():
        n = 200 if name == "reference" else 24
        seen = set()
        for step in range(n):
            seen.add(int(fn(row[None], None, seeds=make_seeds(1), step=step, temperature=temperature,
                            min_p=0.3)[0]))
        assert seen == want, name


@pytest.mark.parametrize("vocab,temperature,min_p", [(111, 0.7, 0.05), (989, 1.5, 0.2), (111, 1.0, 1.0)])
def test_min_p_support_equals_transformers_and_tokens_equal_the_oracle(vocab, temperature, min_p, gs):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g) * 2.5
    logits[2, :4] = logits[2].max() + 0.5           # a tie at the max: min_p = 1 keeps both... all four
    noise = make_noise(3, vocab, seed=9)
    want = independent_sample(logits, None, noise, temperature=temperature, min_p=min_p)
    for r in range(3):   # the oracle's kept set is transformers' set
        x = logits[r].double().numpy() / temperature
        p = np.exp(x - x.max())
        assert set(np.nonzero(p >= min_p)[0].tolist()) == hf_support(logits[r], temperature, min_p)
    for fn in implementations(gs).values():
        got = fn(logits, None, seeds=make_seeds(3), step=0, temperature=temperature, min_p=min_p, noise=noise,
                 return_logprobs=True)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)
    if min_p == 1.0:
        assert int(want[0][2]) in range(4)


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_min_p_with_guidance_and_alpha_equals_the_oracle(impl, gs):
    """min-p on the guided, tempered scores, after the α cut on each row's own logits; with
    top-k/top-p after it (vLLM's order)."""
    vocab = 111
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(4)) * 2.0
    mix = corrsynth_block(4, 2.0)
    args = dict(temperature=torch.tensor([0.8, 1.2, 0.0, 1.0]), alpha=torch.tensor([0.01, 0.0, 0.1, 0.02]),
                min_p=torch.tensor([0.1, 0.3, 0.5, 0.0]), top_k=torch.tensor([0, 5, 0, 20]),
                top_p=torch.tensor([0.9, 1.0, 1.0, 0.8]))
    noise = make_noise(4, vocab, seed=2)
    want = independent_sample(logits, mix, noise, **args)
    got = implementations(gs)[impl](logits, mix, seeds=make_seeds(4), step=0, noise=noise, return_logprobs=True,
                                    **args)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)


def test_min_p_and_alpha_bounds():
    ok = torch.zeros(1, 5)
    reference.guided_sample(ok, None, seeds=make_seeds(1), step=0, min_p=1.0)          # 1.0: only the max
    with pytest.raises(ValueError, match="min_p must be in"):
        reference.guided_sample(ok, None, seeds=make_seeds(1), step=0, min_p=1.5)
    with pytest.raises(ValueError, match="alpha must be in"):
        reference.guided_sample(ok, None, seeds=make_seeds(1), step=0, alpha=1.0)


# ---- greedy and cuts on values that keep distinct logits distinct ------------------------------
def near_tie(vocab: int = 4099) -> torch.Tensor:
    """x[0] = 1.0, x[1] = the next fp32 above 1.0, zeros elsewhere: an fp32 log_softmax (lse ≈ 8.3,
    ulp 9.5e-7) merges the two, so a sampler on log-probs picks token 0."""
    x = torch.zeros(vocab)
    x[0] = 1.0
    x[1] = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    return x


@pytest.mark.parametrize("impl", ["reference", "kernel", "cpu"])
def test_greedy_row_gives_the_same_token_in_any_batch(impl, gs):
    x = near_tie()
    fn = implementations(gs)[impl]
    assert int(torch.argmax(x)) == 1
    alone = fn(x[None], None, seeds=make_seeds(1), step=0, temperature=0.0)
    with_sampled = fn(torch.stack([x, x]), None, seeds=make_seeds(2), step=0, temperature=torch.tensor([0.0, 1.0]))
    with_top_k = fn(x[None], None, seeds=make_seeds(1), step=0, temperature=0.0, top_k=40)
    mix = torch.block_diag(torch.eye(1), corrsynth_block(2, 2.0))            # next to a guided pair
    in_group_batch = fn(torch.stack([x, x.roll(3), x.roll(5)]), mix, seeds=make_seeds(3), step=0,
                        temperature=torch.tensor([0.0, 1.0, 1.0]))
    assert [int(alone[0]), int(with_sampled[0]), int(with_top_k[0]), int(in_group_batch[0])] == [1, 1, 1, 1]


def test_engine_sampler_greedy_shortcut_and_sampler_agree():
    x = near_tie()
    sampler = Sampler()
    all_greedy = sampler(x[None], SamplingParams.make(1, temperature=0.0), step=0)
    mixed = sampler(torch.stack([x, x]), SamplingParams.make(2, temperature=[0.0, 1.0]), step=0)
    assert int(all_greedy[0]) == int(mixed[0]) == 1


@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_top_k_on_a_flat_row_keeps_exactly_k(impl, gs):
    """Distinct logits one ulp apart: top-k = 100 keeps 100 tokens (the log-prob of a draw is
    −log 100 to within the spread), never 101 merged by a log-softmax."""
    vocab, k = 1000 if impl == "reference" else 300, 100
    ulps = np.nextafter(np.float32(1.0), np.float32(2.0)) - np.float32(1.0)
    x = (torch.ones(vocab) + torch.arange(vocab, dtype=torch.float32) * float(ulps)).float()
    fn = implementations(gs)[impl]
    for step in range(3):
        token, logprob = fn(x[None], None, seeds=make_seeds(1), step=step, temperature=1.0, top_k=k,
                            return_logprobs=True)
        assert int(token[0]) >= vocab - k
        assert float(logprob[0]) == pytest.approx(-math.log(k), abs=2e-4)


def flat_row(vocab: int) -> torch.Tensor:
    """Distinct logits one fp32 ulp apart, ascending: 1, 1 + ulp, 1 + 2 ulp, ... (a log-softmax
    rounds them to the ulp of lse, ~8 input ulps, and merges them in runs)."""
    ulp = float(np.nextafter(np.float32(1.0), np.float32(2.0)) - np.float32(1.0))
    x = torch.ones(vocab) + torch.arange(vocab, dtype=torch.float32) * ulp
    assert torch.unique(x).numel() == vocab
    return x


@pytest.mark.parametrize("impl", ["reference", "kernel", "cpu"])
def test_top_k_1000_on_a_flat_row_keeps_exactly_1000(impl, gs):
    """The issue's case, 4099 tokens, top-k = 1000: the 1000th largest logit is kept and the
    1001st is not. Injected noise puts the largest Gumbel value on one token, so that token wins
    exactly when the cut keeps it (a 1001st kept token would win its draw)."""
    vocab, k = 4099, 1000
    x = flat_row(vocab)
    fn = implementations(gs)[impl]

    def winner(token: int, temperature: float) -> int:
        noise = torch.full((1, vocab), 1e-6)
        noise[0, token] = 1 - 1e-6
        return int(fn(x[None], None, seeds=make_seeds(1), step=0, temperature=temperature, top_k=k,
                      noise=noise)[0])

    for temperature in (1.0, 0.5):
        assert winner(vocab - k, temperature) == vocab - k               # the 1000th: kept
        assert winner(vocab - k - 1, temperature) >= vocab - k           # the 1001st: cut
        assert winner(0, temperature) >= vocab - k
    draws = [int(fn(x[None], None, seeds=make_seeds(1), step=s, temperature=1.0, top_k=k)[0])
             for s in range(40 if impl != "kernel" else 4)]
    assert min(draws) >= vocab - k


def test_kernel_plan_without_masks_is_a_promise_of_finite_logits(kernel_device):
    """A plan built with masks=False (the engine: model logits are finite) gives the same tokens
    as the default plan on finite logits."""
    logits = torch.randn(4, 111, generator=torch.Generator().manual_seed(8))
    mix = corrsynth_block(4, 2.0)
    ops = kernels.ops_for(kernel_device, "triton")
    args = (make_seeds(4).to(kernel_device), torch.zeros(4, dtype=torch.int64, device=kernel_device),
            torch.full((4,), 0.9, device=kernel_device), torch.zeros(4, device=kernel_device),
            torch.zeros(4, dtype=torch.int64, device=kernel_device), torch.ones(4, device=kernel_device))
    plans = [kernels.build_sample_plan(mix, kernel_device, ops=ops, masks=m) for m in (True, False)]
    got = [kernels.guided_sample_step(logits.to(kernel_device), p, *args, any_top_k_top_p=False).cpu() for p in plans]
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0], reference.guided_sample(logits, mix, seeds=make_seeds(4), step=0, temperature=0.9))
