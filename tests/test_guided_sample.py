"""Guided sampling: the Triton kernel (under TRITON_INTERPRET=1 on CPU) and the torch reference,
both against an independent float64 numpy implementation of DESIGN.md "The math".

Habits from FlashInfer's sampling tests: odd vocabulary sizes, −inf logits, "masked tokens are
never drawn", sample frequencies against the exact distribution, exact token equality when the
noise is injected. Kernel runs are kept small (the interpreter costs milliseconds a program).
"""
import itertools
import math
import os

import numpy as np
import pytest
import torch

import divgen.kernels as kernels
from divgen.kernels import guided_sample_triton, plan as plan_module, reference


@pytest.fixture(scope="module")
def gs(on_kernel_device):
    """The Triton module, run on CUDA tensors on a GPU host and under the interpreter otherwise."""
    return on_kernel_device(guided_sample_triton)


# ---- shapes, dtypes, tolerances ---------------------------------------------------------------
VOCAB_SIZES = (111, 989)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ROWS = 6
LAYOUTS = ("plain", "identity", "corrsynth", "mixed_sizes", "cfg_interleaved")
LOGPROB_ATOL = 1e-4          # fp32 log-probs of the same cut distribution, different sum orders
LOGPROB_RTOL = 1e-5
NEG_INF = float("-inf")
CHI2_Z = 4.75                # normal quantile of the chi-square bound: false alarm ≈ 1e-6

# scalar and per-row parameter sets (ROWS rows); temperature 0 marks a greedy row
SCALAR_PARAMS = dict(temperature=0.8, alpha=0.02)
PER_ROW_PARAMS = dict(
    temperature=torch.tensor([0.0, 0.7, 1.3, 0.0, 1.0, 0.4]),
    alpha=torch.tensor([0.0, 0.05, 0.001, 0.2, 0.0, 0.01]),
)
TOP_SETTINGS = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.7),
    "both_per_row": dict(top_k=torch.tensor([0, 3, 1, 500, 8, 2]),
                         top_p=torch.tensor([0.9, 1.0, 0.5, 0.3, 1.0, 0.8])),
}

# statistical test: one K-CorrSynth group, γ = (g − 1)/(K − 1)
STAT_VOCAB = 111
STAT_K = 4
STAT_SCALE = 3.0
STAT_T = 2.0
STAT_ALPHA = 0.1
STAT_REFERENCE_COPIES, STAT_REFERENCE_STEPS = 128, 24     # 3072 draws a row
STAT_KERNEL_COPIES, STAT_KERNEL_STEPS = 8, 16             # 128 draws a row


# ---- independent implementation (float64 numpy, plain loops over the formulas) ----------------
def log_softmax64(x: np.ndarray) -> np.ndarray:
    out = np.full_like(x, -np.inf)
    for r in range(x.shape[0]):
        finite = np.isfinite(x[r])
        top = x[r][finite].max()
        out[r] = x[r] - top - math.log(np.exp(x[r][finite] - top).sum())
    return out


def row_lse64(x: np.ndarray) -> np.ndarray:
    """lse_r = l_r − ℓ_r, the normaliser of each row's finite logits."""
    out = np.zeros(x.shape[0])
    for r in range(x.shape[0]):
        finite = x[r][np.isfinite(x[r])]
        out[r] = finite.max() + math.log(np.exp(finite - finite.max()).sum())
    return out


def scores_from_mix(x: np.ndarray, mix) -> np.ndarray:
    """s_m(v) = Σ_n mix[m, n] · g_{m,n}(v) from logits x, g = ℓ_n(v), or l_m(v) − lse_n where a
    contrasting ℓ_n(v) is −inf (the mask rule: row n read as agreeing with row m's logit at v);
    mix None: s = ℓ."""
    lp, lse = log_softmax64(x), row_lse64(x)
    if mix is None:
        return lp
    mix = np.asarray(mix, dtype=np.float64)
    s = np.zeros_like(lp)
    for m in range(lp.shape[0]):
        for n in range(lp.shape[0]):
            if mix[m, n] != 0:
                other = lp[n] if n == m else np.where(np.isfinite(lp[n]), lp[n], x[m] - lse[n])
                s[m] += mix[m, n] * other
    return s


def scores_from_gammas(x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """DESIGN.md: s_m = ℓ_m + Σ_{n≠m} γ_{m,n} (ℓ_m − ℓ_n) from logits x; where ℓ_n is −inf (a
    mask) the term is γ_{m,n} (lse_n − lse_m), that of a token both rows' logits agree on."""
    lp, lse = log_softmax64(x), row_lse64(x)
    s = lp.copy()
    for m in range(lp.shape[0]):
        for n in range(lp.shape[0]):
            if n != m:
                term = gamma[m, n] * (lp[m] - lp[n])
                s[m] += np.where(np.isfinite(lp[n]), term, gamma[m, n] * (lse[n] - lse[m]))
    return s


def alpha_set(x_row: np.ndarray, alpha: float) -> np.ndarray:
    """A_m = { v : ℓ_m(v) finite, ℓ_m(v) ≥ max ℓ_m + log α }, on the row's own logits."""
    finite = np.isfinite(x_row)
    if alpha == 0:
        return finite
    return finite & (x_row >= x_row[finite].max() + math.log(alpha))


def cut_scores(s_row, keep, temperature, top_k, top_p, min_p=0.0) -> np.ndarray:
    """z = s / T on the α set (T = 1 for greedy), then min-p (p ≥ min_p · max p of softmax(z)),
    top-k and top-p by threshold."""
    t = temperature if temperature > 0 else 1.0
    z = np.where(keep, s_row / t, -np.inf)
    if min_p > 0:
        p = np.exp(z - z.max())
        z = np.where(p >= min_p, z, -np.inf)
    if top_k > 0:
        above = np.array([(z > z[v]).sum() for v in range(z.size)])
        z = np.where(above < top_k, z, -np.inf)
    if top_p < 1:
        p = np.exp(z - z.max())
        p /= p.sum()
        mass_above = np.array([p[p > p[v]].sum() for v in range(z.size)])
        z = np.where(mass_above < top_p, z, -np.inf)
    return z


def per_row(value, rows):
    t = torch.as_tensor(value, dtype=torch.float64)
    return [float(t)] * rows if t.dim() == 0 else [float(v) for v in t]


def independent_sample(logits, mix, u, temperature=1.0, alpha=0.0, top_k=0, top_p=1.0, min_p=0.0):
    """Tokens and log-probs of guided Gumbel-max sampling with uniforms u, in float64."""
    x = logits.double().numpy()
    rows = x.shape[0]
    s = scores_from_mix(x, None if mix is None else mix.double().numpy())
    temps, alphas = per_row(temperature, rows), per_row(alpha, rows)
    ks, ps, mps = per_row(top_k, rows), per_row(top_p, rows), per_row(min_p, rows)
    gumbel = -np.log(-np.log(u.double().numpy()))
    tokens, logprobs = [], []
    for m in range(rows):
        z = cut_scores(s[m], alpha_set(x[m], alphas[m]), temps[m], int(ks[m]), ps[m], mps[m])
        score = z if temps[m] == 0 else z + gumbel[m]
        token = int(np.argmax(score))                       # first maximum: smallest token id
        tokens.append(token)
        top = z.max()
        logprobs.append(z[token] - top - math.log(np.exp(z - top).sum()))
    return torch.tensor(tokens), torch.tensor(logprobs, dtype=torch.float32)


# ---- inputs ------------------------------------------------------------------------------------
def corrsynth_block(k: int, scale: float) -> torch.Tensor:
    """K-CorrSynth weights γ = (g − 1)/(K − 1): diagonal 1 + Σγ, off-diagonal −γ."""
    if k == 1:
        return torch.ones(1, 1)
    gamma = (scale - 1) / (k - 1)
    return torch.full((k, k), -gamma) + torch.eye(k) * (1 + gamma * (k - 1) + gamma)


def make_mix(layout: str, rows: int = ROWS):
    if layout == "plain":
        return None
    if layout == "identity":
        return torch.eye(rows)
    if layout == "corrsynth":
        return torch.block_diag(corrsynth_block(2, 2.0), corrsynth_block(4, 3.0))
    if layout == "mixed_sizes":
        return torch.block_diag(corrsynth_block(1, 1.0), corrsynth_block(3, 2.0), corrsynth_block(2, 1.5))
    if layout == "cfg_interleaved":          # row m is guided by its shadow m + 3 (CFG, g = 1.5)
        mix = torch.eye(rows)
        for m in range(rows // 2):
            mix[m, m], mix[m, m + rows // 2] = 1.5, -0.5
        return mix
    raise AssertionError(layout)


def make_logits(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random logits with −inf entries: ~10% scattered, and one row with only 3 finite tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, vocab, generator=g) * 2.0
    x[torch.rand(rows, vocab, generator=g) < 0.1] = NEG_INF
    x[rows - 1, :] = NEG_INF
    x[rows - 1, torch.randperm(vocab, generator=g)[:3]] = torch.randn(3, generator=g)
    return x.to(dtype)


def make_seeds(rows: int, offset: int = 0) -> torch.Tensor:
    return torch.tensor([(r + offset) * 0x9E3779B97F4A7C15 % 2**63 - 2**62 for r in range(rows)],
                        dtype=torch.int64)


def make_noise(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, vocab, generator=g).clamp(1e-6, 1 - 1e-6)


def assert_same_samples(got, want):
    tokens, logprobs = got
    want_tokens, want_logprobs = want
    assert torch.equal(tokens, want_tokens), f"tokens {tokens.tolist()} != {want_tokens.tolist()}"
    torch.testing.assert_close(logprobs, want_logprobs, atol=LOGPROB_ATOL, rtol=LOGPROB_RTOL)


# ---- (a) exact equality with injected noise ---------------------------------------------------
EXACT_CASES = [(layout, dtype, VOCAB_SIZES[i % 2])
               for i, (layout, dtype) in enumerate(itertools.product(LAYOUTS, DTYPES))]


@pytest.mark.parametrize("layout,dtype,vocab", EXACT_CASES)
def test_injected_noise_kernel_equals_reference_equals_independent(layout, dtype, vocab, gs):
    logits = make_logits(ROWS, vocab, dtype, seed=vocab)
    mix = make_mix(layout)
    noise = make_noise(ROWS, vocab, seed=7)
    seeds = make_seeds(ROWS)
    for params in (SCALAR_PARAMS, PER_ROW_PARAMS):
        want = independent_sample(logits, mix, noise, **params)
        ref = reference.guided_sample(logits, mix, seeds=seeds, step=3, noise=noise, return_logprobs=True,
                                      **params)
        assert_same_samples(ref, want)
        kern = gs.guided_sample(logits, mix, seeds=seeds, step=3, noise=noise, return_logprobs=True, **params)
        assert_same_samples(kern, ref)
        assert torch.equal(gs.guided_sample(logits, mix, seeds=seeds, step=3, noise=noise, **params), ref[0])


@pytest.mark.parametrize("layout,dtype", [("corrsynth", torch.float32), ("plain", torch.bfloat16),
                                          ("mixed_sizes", torch.float16)])
@pytest.mark.parametrize("top", sorted(TOP_SETTINGS))
def test_top_k_top_p_kernel_equals_reference_equals_independent(top, layout, dtype, gs):
    """Plain rows put the thresholds among negative scores, guided rows often among positive."""
    logits = make_logits(ROWS, VOCAB_SIZES[0], dtype, seed=11)
    mix = make_mix(layout)
    noise = make_noise(ROWS, VOCAB_SIZES[0], seed=5)
    params = dict(PER_ROW_PARAMS, **TOP_SETTINGS[top])
    want = independent_sample(logits, mix, noise, **params)
    ref = reference.guided_sample(logits, mix, seeds=make_seeds(ROWS), step=0, noise=noise,
                                  return_logprobs=True, **params)
    assert_same_samples(ref, want)
    kern = gs.guided_sample(logits, mix, seeds=make_seeds(ROWS), step=0, noise=noise, return_logprobs=True,
                            **params)
    assert_same_samples(kern, ref)


def test_large_group_uses_the_matmul_path(gs):
    """A 16-row CorrSynth group (the kernel mixes with an fp32 tl.dot from 16 rows) + a plain row."""
    rows, vocab = 17, VOCAB_SIZES[0]
    logits = make_logits(rows, vocab, torch.bfloat16, seed=16)
    mix = torch.block_diag(corrsynth_block(16, 2.0), torch.ones(1, 1))
    noise = make_noise(rows, vocab, seed=16)
    params = dict(temperature=torch.linspace(0.0, 1.5, rows), alpha=0.01)
    assert kernels.build_sample_plan(mix, "cpu").g_block == 16
    want = independent_sample(logits, mix, noise, **params)
    ref = reference.guided_sample(logits, mix, seeds=make_seeds(rows), step=2, noise=noise, return_logprobs=True,
                                  **params)
    assert_same_samples(ref, want)
    assert_same_samples(gs.guided_sample(logits, mix, seeds=make_seeds(rows), step=2, noise=noise,
                                         return_logprobs=True, **params), ref)


def test_top_k_top_p_keep_ties_and_plain_rows(gs):
    """Ties at the top-k threshold are kept together; plain rows (mix None) through the cut path."""
    vocab = VOCAB_SIZES[0]
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(3))
    logits[:, 10:14] = 5.0                       # 4 tied leaders: top_k = 2 keeps all four
    logits[2, 50:] = NEG_INF
    noise = make_noise(3, vocab, seed=9)
    params = dict(temperature=torch.tensor([1.0, 0.0, 0.5]), top_k=torch.tensor([2, 2, 0]),
                  top_p=torch.tensor([1.0, 0.95, 0.6]))
    want = independent_sample(logits, None, noise, **params)
    ref = reference.guided_sample(logits, None, seeds=make_seeds(3), step=1, noise=noise, return_logprobs=True,
                                  **params)
    assert_same_samples(ref, want)
    assert_same_samples(gs.guided_sample(logits, None, seeds=make_seeds(3), step=1, noise=noise,
                                         return_logprobs=True, **params), ref)


@pytest.mark.parametrize("block_v,num_chunks", [(16, 7), (32, 2), (None, None)])
def test_vocabulary_split_and_ties_go_to_the_smallest_token(block_v, num_chunks, gs):
    """Chunked programs + final reduction: tied maxima in different chunks → smallest token id."""
    vocab = VOCAB_SIZES[0]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, [20, 57, 100]] = 9.0               # three equal maxima, in different 16-token tiles
    noise = torch.full((4, vocab), 0.5)          # equal Gumbel noise: sampled rows tie as well
    mix = torch.block_diag(torch.eye(2), corrsynth_block(2, 1.0))   # γ = 0: guided = plain
    params = dict(temperature=torch.tensor([0.0, 1.0, 0.0, 0.7]))
    tokens, logprobs = gs.guided_sample(logits, mix, seeds=make_seeds(4), step=0, noise=noise, block_v=block_v,
                                        num_chunks=num_chunks, return_logprobs=True, **params)
    assert tokens.tolist() == [20, 20, 20, 20]
    ref = reference.guided_sample(logits, mix, seeds=make_seeds(4), step=0, noise=noise, return_logprobs=True,
                                  **params)
    assert_same_samples((tokens, logprobs), ref)


@pytest.mark.parametrize("temperature", [0.05, 1.0, 3.0])
def test_small_tiles_skipping_is_exact(temperature, gs):
    """16-token tiles: tiles outside every α set, and tiles whose z + max noise cannot reach a
    row's best (most of them at T = 0.05), are skipped by the kernel; tokens must not change."""
    vocab = VOCAB_SIZES[0]
    logits = make_logits(ROWS, vocab, torch.float32, seed=30)
    mix = make_mix("mixed_sizes")
    noise = make_noise(ROWS, vocab, seed=30)
    params = dict(temperature=torch.full((ROWS,), temperature), alpha=torch.tensor([0.0, 0.3, 0.0, 0.01, 0.5, 0.0]))
    params["temperature"][2] = 0.0
    got = gs.guided_sample(logits, mix, seeds=make_seeds(ROWS), step=0, noise=noise, block_v=16, num_chunks=2,
                           return_logprobs=True, **params)
    ref = reference.guided_sample(logits, mix, seeds=make_seeds(ROWS), step=0, noise=noise, return_logprobs=True,
                                  **params)
    assert_same_samples(got, ref)
    assert_same_samples(ref, independent_sample(logits, mix, noise, **params))


def test_vocabulary_split_with_top_k_top_p(gs):
    vocab = VOCAB_SIZES[0]
    logits = make_logits(2, vocab, torch.float16, seed=4)
    mix = corrsynth_block(2, 2.0)
    noise = make_noise(2, vocab, seed=4)
    params = dict(temperature=0.9, alpha=torch.tensor([0.0, 0.02]), top_k=torch.tensor([7, 40]),
                  top_p=torch.tensor([0.8, 0.6]))
    got = gs.guided_sample(logits, mix, seeds=make_seeds(2), step=0, noise=noise, block_v=32, num_chunks=2,
                           return_logprobs=True, **params)
    ref = reference.guided_sample(logits, mix, seeds=make_seeds(2), step=0, noise=noise, return_logprobs=True,
                                  **params)
    assert_same_samples(got, ref)


# ---- (b) the kernel's noise bits --------------------------------------------------------------
def python_uniform(seed: int, step: int, token: int) -> float:
    """The randomness contract with Python integers (an independent check of the reference)."""
    m = 0xFFFFFFFF

    def fmix(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & m
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & m
        return h ^ (h >> 16)

    lo, hi = seed & m, (seed >> 32) & m
    k1 = fmix(lo ^ fmix(((step & m) * 0x9E3779B9 + hi) & m))
    k2 = fmix(((k1 + 0x9E3779B9) & m) ^ hi)
    h = fmix(fmix(token ^ k1) ^ k2)
    return (2 * (h >> 9) + 1) / 2**24


@pytest.mark.parametrize("step", [0, 1, 12345, 2**32 + 7])
def test_kernel_noise_bits_equal_reference(step, gs):
    seeds = torch.cat([make_seeds(5), torch.tensor([0, -1, 2**63 - 1], dtype=torch.int64)])
    want = reference.uniform_noise(seeds, step, VOCAB_SIZES[1])
    got = gs.uniform_noise(seeds, step, VOCAB_SIZES[1])
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert want.min() > 0 and want.max() < 1
    for r, v in [(0, 0), (5, 988), (6, 500), (7, 1)]:
        assert want[r, v].item() == python_uniform(int(seeds[r]), step, v)


def test_counter_noise_kernel_equals_reference(gs):
    """Without injected noise the kernel draws its own uniforms: the same tokens as the reference."""
    logits = make_logits(ROWS, VOCAB_SIZES[1], torch.bfloat16, seed=2)
    mix = make_mix("mixed_sizes")
    for step in range(3):
        kern = gs.guided_sample(logits, mix, seeds=make_seeds(ROWS), step=step, **PER_ROW_PARAMS)
        ref = reference.guided_sample(logits, mix, seeds=make_seeds(ROWS), step=step, **PER_ROW_PARAMS)
        assert torch.equal(kern, ref)


# ---- (c) statistics against the exact guided distribution -------------------------------------
def stat_logits() -> np.ndarray:
    rng = np.random.default_rng(3)
    shared = rng.normal(0.0, 1.0, STAT_VOCAB)
    return shared + rng.normal(0.0, 1.0, (STAT_K, STAT_VOCAB))     # [K, V] one label per row


def exact_distribution(x: np.ndarray, gamma_sign=1.0, alpha_on_guided=False, inverse_t=False) -> np.ndarray:
    """p_m ∝ exp(s_m / T) on A_m (DESIGN.md), or one of three deliberate mistakes."""
    k = x.shape[0]
    gamma = gamma_sign * (STAT_SCALE - 1) / (k - 1) * (1 - np.eye(k))
    s = scores_from_gammas(x, gamma)
    t = 1 / STAT_T if inverse_t else STAT_T
    out = np.zeros_like(x)
    for m in range(k):
        keep = alpha_set(s[m] if alpha_on_guided else x[m], STAT_ALPHA)
        z = np.where(keep, s[m] / t, -np.inf)
        out[m] = np.exp(z - z.max())
        out[m] /= out[m].sum()
    return out


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over cells with expected count ≥ 5 plus one pooled cell of the rest."""
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    if exp[-1] == 0:
        if obs[-1] > 0:
            return math.inf, len(obs) - 1            # draws where the distribution has no mass
        obs, exp = obs[:-1], exp[:-1]
    return float(sum((o - e) ** 2 / e for o, e in zip(obs, exp))), len(obs) - 1


def chi_square_bound(df: int) -> float:
    """Upper CHI2_Z-sigma quantile of χ²(df) (Wilson–Hilferty)."""
    c = 2 / (9 * df)
    return df * (1 - c + CHI2_Z * math.sqrt(c)) ** 3


def group_draws(sample_fn, copies: int, steps: int) -> np.ndarray:
    """counts [K, V] of draws from `copies` independent copies of the group over `steps` steps."""
    x = torch.tensor(stat_logits(), dtype=torch.float32)
    logits = x.repeat(copies, 1)
    mix = torch.block_diag(*[corrsynth_block(STAT_K, STAT_SCALE)] * copies)
    seeds = make_seeds(copies * STAT_K, offset=1000)
    counts = np.zeros((STAT_K, STAT_VOCAB), dtype=np.int64)
    for step in range(steps):
        tokens = sample_fn(logits, mix, seeds=seeds, step=step, temperature=STAT_T, alpha=STAT_ALPHA)
        for r, tok in enumerate(tokens.tolist()):
            counts[r % STAT_K, tok] += 1
    return counts


def assert_matches_exact_and_rejects_mistakes(counts: np.ndarray):
    x = stat_logits()
    exact = exact_distribution(x)
    assert ((counts > 0) <= (exact > 0)).all(), "a token outside the α set (or masked) was drawn"

    def stat(probs):
        pairs = [chi_square(counts[m], probs[m]) for m in range(STAT_K)]
        total, df = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
        return total, chi_square_bound(df)

    value, bound = stat(exact)
    assert value <= bound, f"χ² {value:.1f} > {bound:.1f}: frequencies do not follow the guided distribution"
    mistakes = {
        "flipped γ sign": exact_distribution(x, gamma_sign=-1.0),
        "α on the guided scores": exact_distribution(x, alpha_on_guided=True),
        "1/T instead of T": exact_distribution(x, inverse_t=True),
    }
    for name, wrong in mistakes.items():
        value, bound = stat(wrong)
        assert value > bound, f"the test could not tell the distribution from one with {name}"


def test_reference_frequencies_match_exact_guided_distribution():
    assert_matches_exact_and_rejects_mistakes(
        group_draws(reference.guided_sample, STAT_REFERENCE_COPIES, STAT_REFERENCE_STEPS))


def test_kernel_frequencies_match_exact_guided_distribution(gs):
    def both(*args, **kw):
        tokens = gs.guided_sample(*args, **kw)
        assert torch.equal(tokens, reference.guided_sample(*args, **kw))   # same counter noise
        return tokens

    assert_matches_exact_and_rejects_mistakes(group_draws(both, STAT_KERNEL_COPIES, STAT_KERNEL_STEPS))


# ---- (d) never outside the α set, never a masked token ----------------------------------------
def trap_logits(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A CFG pair (row 0 guided by its shadow row 1) and a plain row 2, with traps for wrong cuts.

    Row 0: token 3 is −inf; token 4 is finite but below the α cut, and −inf in row 1, so the floor
    gives it a huge guided score: drawn at once if α were tested on guided scores or skipped.
    Row 2 (plain, T = 50, α = 0): half its tokens are −inf; read as the floor they would take
    about one draw in eight at that temperature.
    """
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, vocab, generator=g)
    x[0, 3] = NEG_INF
    x[0, 4], x[1, 4] = -6.0, NEG_INF
    x[2, 1::2] = NEG_INF
    mix = torch.block_diag(torch.tensor([[3.0, -2.0], [0.0, 1.0]]), torch.ones(1, 1))
    return x, mix


@pytest.mark.parametrize("impl,copies,steps", [("reference", 32, 50), ("kernel", 4, 8)])
def test_masked_and_cut_tokens_are_never_drawn(impl, copies, steps, gs):
    vocab = VOCAB_SIZES[0]
    x, mix = trap_logits(vocab)
    alpha = torch.tensor([0.05, 0.0, 0.0]).repeat(copies)
    temperature = torch.tensor([1.5, 1.0, 50.0]).repeat(copies)
    allowed = [torch.tensor(alpha_set(x[r].double().numpy(), float(alpha[r]))) for r in range(3)]
    assert not allowed[0][3] and not allowed[0][4] and allowed[0].sum() > 3
    assert not allowed[2][1::2].any()
    fn = reference.guided_sample if impl == "reference" else gs.guided_sample
    seen = torch.zeros(3, vocab, dtype=torch.bool)
    for step in range(steps):
        tokens = fn(x.repeat(copies, 1), torch.block_diag(*[mix] * copies), seeds=make_seeds(3 * copies),
                    step=step, temperature=temperature, alpha=alpha)
        for r in range(3):
            seen[r, tokens[r::3]] = True
    for r in range(3):
        outside = torch.nonzero(seen[r] & ~allowed[r]).flatten().tolist()
        assert not outside, f"row {r} drew tokens outside its α set / masked: {outside}"
        assert seen[r].sum() > 1


# ---- (e) greedy = argmax of the guided scores on the α set ------------------------------------
@pytest.mark.parametrize("layout", ["plain", "corrsynth", "cfg_interleaved"])
def test_greedy_is_argmax_of_guided_scores_in_alpha_set(layout, gs):
    vocab = VOCAB_SIZES[0]
    logits = make_logits(ROWS, vocab, torch.float32, seed=21)
    logits[1, 7] = NEG_INF                                       # contrast −inf: floor boosts it
    mix = make_mix(layout)
    alpha = torch.tensor([0.0, 0.3, 0.01, 0.1, 0.0, 0.5])
    x = logits.double().numpy()
    s = scores_from_mix(x, None if mix is None else mix.double().numpy())
    want = [int(np.argmax(np.where(alpha_set(x[m], float(alpha[m])), s[m], -np.inf))) for m in range(ROWS)]
    for fn in (reference.guided_sample, gs.guided_sample):
        tokens = fn(logits, mix, seeds=make_seeds(ROWS), step=0, temperature=0.0, alpha=alpha)
        assert tokens.tolist() == want


# ---- (f) a row's token does not depend on where it sits ---------------------------------------
@pytest.mark.parametrize("impl", ["reference", "kernel"])
def test_token_does_not_depend_on_batch_position(impl, gs):
    fn = reference.guided_sample if impl == "reference" else gs.guided_sample
    logits = make_logits(ROWS, VOCAB_SIZES[1], torch.float16, seed=5)
    mix = make_mix("mixed_sizes")
    seeds = make_seeds(ROWS)
    params = PER_ROW_PARAMS
    tokens = fn(logits, mix, seeds=seeds, step=4, **params)
    perm = torch.tensor([4, 2, 0, 5, 3, 1])                      # groups and their rows reordered
    permuted = fn(logits[perm], mix[perm][:, perm], seeds=seeds[perm], step=4,
                  **{k: v[perm] for k, v in params.items()})
    assert torch.equal(permuted, tokens[perm])
    alone = [1, 2, 3]                                            # one group decoded on its own
    solo = fn(logits[alone], mix[alone][:, alone], seeds=seeds[alone], step=4,
              **{k: v[alone] for k, v in params.items()})
    assert torch.equal(solo, tokens[alone])


# ---- (g) bad arguments ------------------------------------------------------------------------
def _nan_logits():
    x = make_logits(2, 11, torch.float32, seed=0)
    x[0, 3] = float("nan")
    return x


BAD_ARGUMENTS = {
    "alpha_one": (dict(alpha=1.0), "alpha"),
    "alpha_negative": (dict(alpha=torch.tensor([0.1, -0.1])), "alpha"),
    "temperature_negative": (dict(temperature=-0.5), "temperature"),
    "top_p_zero": (dict(top_p=0.0), "top_p"),
    "top_p_above_one": (dict(top_p=1.5), "top_p"),
    "top_k_negative": (dict(top_k=-1), "top_k"),
    "per_row_wrong_length": (dict(temperature=torch.ones(3)), "temperature"),
    "mix_wrong_shape": (dict(mix=torch.eye(3)), "mix"),
    "mix_not_finite": (dict(mix=torch.tensor([[1.0, float("inf")], [0.0, 1.0]])), "mix"),
    "nan_logits": (dict(logits=_nan_logits()), "NaN"),
    "row_all_masked": (dict(logits=torch.tensor([[0.0] * 11, [NEG_INF] * 11])), "no finite"),
    "seeds_wrong_shape": (dict(seeds=torch.zeros(3, dtype=torch.int64)), "seeds"),
    "noise_out_of_range": (dict(noise=torch.zeros(2, 11)), "noise"),
}


@pytest.mark.parametrize("impl", ["reference", "kernel"])
@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_raise_clear_value_errors(case, impl, gs):
    fn = reference.guided_sample if impl == "reference" else gs.guided_sample
    overrides, message = BAD_ARGUMENTS[case]
    args = dict(logits=make_logits(2, 11, torch.float32, seed=0)[:, :], mix=torch.eye(2),
                seeds=make_seeds(2), step=0)
    args["logits"][1, :] = torch.arange(11.0)                    # both rows finite
    args.update(overrides)
    logits, mix = args.pop("logits"), args.pop("mix")
    with pytest.raises(ValueError, match=message):
        fn(logits, mix, **args)


def test_kernel_rejects_oversized_group(monkeypatch, gs):
    monkeypatch.setattr(plan_module, "MAX_GROUP_ROWS", 2)
    logits = make_logits(ROWS, 11, torch.float32, seed=0)
    with pytest.raises(ValueError, match="guidance group"):
        gs.guided_sample(logits, make_mix("mixed_sizes"), seeds=make_seeds(ROWS), step=0)


def test_plan_finds_interleaved_groups():
    plan = kernels.build_sample_plan(make_mix("cfg_interleaved"), "cpu", ops=kernels.ops_for("cpu", "reference"))
    assert plan.group_sizes == (2, 2, 2)
    assert plan.order.tolist() == [0, 3, 1, 4, 2, 5] and plan.group_start.tolist() == [0, 2, 4, 6]
    assert plan.w_offset.tolist() == [0, 4, 8]
    assert plan.weights[:4].tolist() == [1.5, -0.5, 0.0, 1.0]
    plain = kernels.build_sample_plan(None, "cpu", rows=ROWS)
    assert plain.num_groups == ROWS and plain.g_block == 1


# ---- (h) the capturable step: build_sample_plan + guided_sample_step --------------------------
def step_args(rows: int, vocab: int, seed: int, dtype=torch.float32, top=True):
    g = torch.Generator().manual_seed(seed)
    logits = make_logits(rows, vocab, dtype, seed=seed)
    params = dict(temperature=torch.rand(rows, generator=g) * 1.5, alpha=torch.rand(rows, generator=g) * 0.05,
                  top_k=torch.randint(0, 12, (rows,), generator=g) if top else torch.zeros(rows, dtype=torch.int64),
                  top_p=torch.where(torch.rand(rows, generator=g) < 0.5, 0.8, 1.0) if top else torch.ones(rows))
    params["temperature"][0] = 0.0                                # a greedy row
    return logits, params


def direct_kwargs(params):
    return dict(temperature=params["temperature"], alpha=params["alpha"], top_k=params["top_k"],
                top_p=params["top_p"])


@pytest.mark.parametrize("impl,layout", [("reference", "plain"), ("reference", "mixed_sizes"),
                                         ("reference", "cfg_interleaved"), ("triton", "mixed_sizes"),
                                         ("triton", "cfg_interleaved")])
def test_step_equals_guided_sample(impl, layout, kernel_device):
    """Same tokens as the checked guided_sample for the same integer steps: with injected noise
    and with the counter noise, per-row step counters (rows at different steps), on the kernel
    device (Triton) or the CPU (reference)."""
    device = kernel_device if impl == "triton" else torch.device("cpu")
    ops = kernels.ops_for(device, impl)
    mix = make_mix(layout)
    logits, params = step_args(ROWS, VOCAB_SIZES[0], seed=41)
    plan = kernels.build_sample_plan(mix, device, rows=ROWS, ops=ops)
    assert plan.ops is ops
    seeds = make_seeds(ROWS)
    steps = torch.tensor([0, 3, 3, 7, 1, 2])
    dev = {k: v.to(device) for k, v in params.items()}
    noise = make_noise(ROWS, VOCAB_SIZES[0], seed=3)
    got = kernels.guided_sample_step(logits.to(device), plan, seeds.to(device), steps.to(device), **dev,
                                     noise=noise.to(device), return_logprobs=True)
    want = reference.guided_sample(logits, mix, seeds=seeds, step=0, noise=noise, return_logprobs=True,
                                   **direct_kwargs(params))
    assert_same_samples(tuple(t.cpu() for t in got), want)
    tokens = kernels.guided_sample_step(logits.to(device), plan, seeds.to(device), steps.to(device), **dev).cpu()
    for r in range(ROWS):       # the counter noise of row r at its own step
        alone = reference.guided_sample(logits, mix, seeds=seeds, step=int(steps[r]), **direct_kwargs(params))
        assert tokens[r] == alone[r]


def test_plan_of_independent_rows_takes_the_row_count_from_the_step(kernel_device):
    """build_sample_plan(None, device) (the interface's form) serves any R: the reference needs
    no groups; the Triton ops derive the R-row plan once, at the first step, and reuse it."""
    logits, params = step_args(ROWS, VOCAB_SIZES[0], seed=6, top=False)
    seeds, steps = make_seeds(ROWS), torch.full((ROWS,), 4)
    want = reference.guided_sample(logits, None, seeds=seeds, step=4, **direct_kwargs(params))
    for impl, device in (("reference", torch.device("cpu")), ("triton", kernel_device)):
        plan = kernels.build_sample_plan(None, device, ops=kernels.ops_for(device, impl))
        assert plan.rows is None
        for _ in range(2):
            got = kernels.guided_sample_step(logits.to(device), plan, seeds.to(device), steps.to(device),
                                             **{k: v.to(device) for k, v in params.items()}, any_top_k_top_p=False)
            assert torch.equal(got.cpu(), want)
        assert plan.for_rows(ROWS) is plan.for_rows(ROWS) and plan.for_rows(ROWS).rows == ROWS


def test_step_without_cutoffs_ignores_top_k_top_p(kernel_device):
    logits, params = step_args(ROWS, VOCAB_SIZES[0], seed=5, top=False)
    mix = make_mix("corrsynth")
    seeds, steps = make_seeds(ROWS), torch.full((ROWS,), 2)
    want = reference.guided_sample(logits, mix, seeds=seeds, step=2, **direct_kwargs(params))
    for impl, device in (("reference", torch.device("cpu")), ("triton", kernel_device)):
        plan = kernels.build_sample_plan(mix, device, ops=kernels.ops_for(device, impl))
        dev = {k: v.to(device) for k, v in params.items()}
        dev["top_k"] = torch.full_like(dev["top_k"], 3)           # ignored with any_top_k_top_p=False
        got = kernels.guided_sample_step(logits.to(device), plan, seeds.to(device), steps.to(device), **dev,
                                         any_top_k_top_p=False)
        assert torch.equal(got.cpu(), want)


def test_reference_step_compiles_fullgraph():
    """No graph break, no data-dependent Python branch, no host sync: torch.compile(fullgraph=True)
    traces the whole step (the aot_eager backend: Dynamo + AOTAutograd, without the ~100 s of
    C++ code generation that inductor spends on this 2-core CPU; the traced graph is the same)."""
    logits, params = step_args(ROWS, VOCAB_SIZES[0], seed=9)
    mix = make_mix("mixed_sizes")
    seeds, steps = make_seeds(ROWS), torch.arange(ROWS)
    compiled = torch.compile(reference.guided_sample_step, fullgraph=True, backend="aot_eager")
    for m in (mix, None):
        got = compiled(logits, m, seeds, steps, **params, any_top_k_top_p=True)
        assert torch.equal(got, reference.guided_sample_step(logits, m, seeds, steps, **params))
        steps = steps + 1                                          # a later step, same graph


def test_plan_rejects_bad_mix():
    with pytest.raises(ValueError, match="square"):
        kernels.build_sample_plan(torch.ones(2, 3), "cpu")
    with pytest.raises(ValueError, match="finite"):
        kernels.build_sample_plan(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "cpu")
    with pytest.raises(ValueError, match="rows must be >= 1"):
        kernels.build_sample_plan(None, "cpu", rows=0)
    with pytest.raises(ValueError, match="up to 256"):
        kernels.build_sample_plan(torch.ones(257, 257), "cpu")


# ---- (i) non-finite input: one rule in the reference, the interpreter and on a GPU ------------
def test_positive_infinity_is_refused_for_direct_callers(gs):
    logits = make_logits(2, 11, torch.float16, seed=0)
    logits[0, 4] = float("inf")
    for fn in (reference.guided_sample, gs.guided_sample):
        with pytest.raises(ValueError, match=r"\+inf \(an fp16 overflow\?\)"):
            fn(logits, None, seeds=make_seeds(2), step=0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_step_reads_positive_infinity_as_the_limit(impl, kernel_device):
    """In the step (no checks) +inf is read as LOGIT_MAX (65504): the +inf tokens share all the mass."""
    device = kernel_device if impl == "triton" else torch.device("cpu")
    rows, vocab = 4, VOCAB_SIZES[0]
    logits = make_logits(rows, vocab, torch.float16, seed=2)
    logits[0, [7, 30, 90]] = float("inf")               # plain row: one of 7, 30, 90
    logits[2, 50] = float("inf")                        # guided pair (2, 3): row 2 must take 50
    mix = torch.block_diag(torch.eye(2), corrsynth_block(2, 2.0))
    plan = kernels.build_sample_plan(mix, device, ops=kernels.ops_for(device, impl))
    seen = set()
    for step in range(12):
        tokens, logprobs = kernels.guided_sample_step(
            logits.to(device), plan, make_seeds(rows).to(device), torch.full((rows,), step, device=device),
            torch.full((rows,), 0.9, device=device), torch.zeros(rows, device=device),
            torch.zeros(rows, dtype=torch.int64, device=device), torch.ones(rows, device=device),
            any_top_k_top_p=False, return_logprobs=True)
        tokens, logprobs = tokens.cpu(), logprobs.cpu()
        assert tokens[0] in (7, 30, 90) and tokens[2] == 50
        assert logprobs[0].item() == pytest.approx(-math.log(3), abs=1e-5)
        assert torch.isfinite(logprobs).all()
        seen.add(int(tokens[0]))
    assert seen == {7, 30, 90}


@pytest.mark.parametrize("temperature", [1e-7, 1e-30, 1e-40, 0.0])
def test_tiny_temperature_samples_greedily(temperature, gs):
    """T below 1e-6 (where s/T may overflow) is greedy: the argmax of s on the cut set, log-prob
    at T = 1, in both implementations (it used to give token 0 with log-prob NaN)."""
    logits = make_logits(ROWS, VOCAB_SIZES[0], torch.float32, seed=12)
    mix = make_mix("corrsynth")
    args = dict(seeds=make_seeds(ROWS), step=1, alpha=0.01, return_logprobs=True)
    want = reference.guided_sample(logits, mix, temperature=0.0, **args)
    for fn in (reference.guided_sample, gs.guided_sample):
        tokens, logprobs = fn(logits, mix, temperature=temperature, **args)
        assert torch.equal(tokens, want[0]) and torch.isfinite(logprobs).all()
        torch.testing.assert_close(logprobs, want[1], atol=LOGPROB_ATOL, rtol=LOGPROB_RTOL)


def test_unused_all_masked_slot_gives_token_zero_and_leaves_others(kernel_device):
    """A slot not in use (all −inf logits) yields token 0 and does not disturb the other rows."""
    logits, params = step_args(ROWS, VOCAB_SIZES[0], seed=8)
    logits[4] = float("-inf")
    mix = make_mix("identity")
    seeds, steps = make_seeds(ROWS), torch.full((ROWS,), 1)
    want = reference.guided_sample(logits[:4], mix[:4, :4], seeds=seeds[:4], step=1,
                                   **{k: v[:4] for k, v in direct_kwargs(params).items()})
    for impl, device in (("reference", torch.device("cpu")), ("triton", kernel_device)):
        plan = kernels.build_sample_plan(mix, device, ops=kernels.ops_for(device, impl))
        got = kernels.guided_sample_step(logits.to(device), plan, seeds.to(device), steps.to(device),
                                         **{k: v.to(device) for k, v in params.items()}).cpu()
        assert torch.equal(got[:4], want) and got[4] == 0


# ---- (j) large groups (K-loop mixing, several tiles a group) ------------------------------------
def test_large_group_split_over_tiles_and_k_blocks(gs):
    """A 20-row CorrSynth group as 16-row tiles mixed in 16-row K blocks (2 tiles, 2 K steps)."""
    rows, vocab = 21, 37
    logits = make_logits(rows, vocab, torch.bfloat16, seed=40)
    mix = torch.block_diag(corrsynth_block(20, 2.0), torch.ones(1, 1))
    noise = make_noise(rows, vocab, seed=40)
    params = dict(temperature=torch.linspace(0.0, 1.5, rows), alpha=0.01, top_k=torch.arange(rows) % 9,
                  top_p=torch.where(torch.arange(rows) % 2 == 0, 0.9, 1.0))
    want = independent_sample(logits, mix, noise, **params)
    got = gs.guided_sample(logits, mix, seeds=make_seeds(rows), step=2, noise=noise, return_logprobs=True,
                           m_block=16, k_block=16, **params)
    assert_same_samples(got, want)


@pytest.mark.parametrize("group,rows,vocab", [(1, 8, 3001), (8, 16, 3001), (64, 64, 317)])
def test_gpu_launch_shapes_equal_reference_under_the_interpreter(group, rows, vocab, monkeypatch):
    """The launch a 132-SM GPU gets (CUDA_TILES' tile widths and warps, counting/verify widths,
    vocabulary chunks for 4 programs an SM, 32-row tiles with 32-row K blocks for large groups),
    run by the interpreter: the same tokens as the reference with top-k, top-p and α. The GPU
    test below runs the same launch compiled; this one keeps its tile and chunk logic checked
    on every CPU run."""
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("the interpreter runs this; a GPU host runs test_gpu_compiled_kernels_match_reference")
    step_module = guided_sample_triton.step
    monkeypatch.setattr(step_module, "_sm_count", lambda index: 132)
    cpu_config = step_module.launch_config
    configs = []

    def as_on_a_gpu(vocab, tiles, device, block_v=None, num_chunks=None):
        configs.append(cpu_config(vocab, tiles, torch.device("cuda"), block_v, num_chunks))
        return configs[-1]

    monkeypatch.setattr(step_module, "launch_config", as_on_a_gpu)
    g = torch.Generator().manual_seed(group)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(torch.bfloat16)
    mix = torch.block_diag(*[corrsynth_block(group, 2.0)] * (rows // group))
    noise = make_noise(rows, vocab, seed=group)
    params = dict(temperature=torch.full((rows,), 0.8), alpha=0.01, top_k=torch.full((rows,), 50),
                  top_p=torch.full((rows,), 0.9))
    m_block, k_block = guided_sample_triton.tile_shape(group, on_cuda=True)
    want = reference.guided_sample(logits, mix, seeds=make_seeds(rows), step=3, noise=noise, **params)
    got = guided_sample_triton.guided_sample(logits, mix, seeds=make_seeds(rows), step=3, noise=noise,
                                             m_block=m_block, k_block=k_block, **params)
    assert torch.equal(got, want)
    tile_v, _ = guided_sample_triton.device.CUDA_TILES[m_block]
    assert configs and all(c.block_v == tile_v and c.num_chunks > 1 for c in configs)


# ---- (k) GPU smoke tests: compiled kernels vs the reference (skipped without CUDA) -------------
@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 8, 64, 128, 256])
def test_gpu_compiled_kernels_match_reference(group):
    rows, vocab = 256, 32000
    g = torch.Generator().manual_seed(group)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to("cuda", torch.bfloat16)
    mix = torch.block_diag(*[corrsynth_block(group, 2.0)] * (rows // group)).cuda()
    noise = make_noise(rows, vocab, seed=group).cuda()
    params = dict(temperature=torch.full((rows,), 0.8, device="cuda"), alpha=0.01,
                  top_k=torch.full((rows,), 50, device="cuda"), top_p=torch.full((rows,), 0.9, device="cuda"))
    seeds = make_seeds(rows).cuda()
    want = reference.guided_sample(logits, mix, seeds=seeds, step=3, noise=noise, **params)
    got = guided_sample_triton.guided_sample(logits, mix, seeds=seeds, step=3, noise=noise, **params)
    assert (got != want).float().mean() <= 0.01     # float-rounding near-ties only


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_draws_fresh_noise():
    rows, vocab = 8, 4096
    logits = torch.randn(rows, vocab, device="cuda")
    plan = kernels.build_sample_plan(torch.eye(rows, device="cuda"), "cuda")
    seeds, step = make_seeds(rows).cuda(), torch.zeros(rows, dtype=torch.int64, device="cuda")
    params = (torch.ones(rows, device="cuda"), torch.zeros(rows, device="cuda"),
              torch.zeros(rows, dtype=torch.int64, device="cuda"), torch.ones(rows, device="cuda"))
    run = lambda: kernels.guided_sample_step(logits, plan, seeds, step, *params, any_top_k_top_p=False)  # noqa: E731
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for s in range(3):
        step.fill_(s)
        graph.replay()
        want = reference.guided_sample(logits, torch.eye(rows, device="cuda"), seeds=seeds, step=s)
        assert torch.equal(out, want)


# ---- (l) top-k / top-p by sample / verify rounds (no log-probs: the rounds path) ---------------
def run_rounds(kernel_device, logits, mix, noise, **params):
    """The Triton module's guided_sample on the kernel device: tokens, and per row the final
    state and the rounds it was open in (the step's trace), as CPU tensors."""
    trace = {}
    dev = {k: v.to(kernel_device) if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    rows = logits.shape[0]
    tokens = guided_sample_triton.guided_sample(
        logits.to(kernel_device), None if mix is None else mix.to(kernel_device),
        seeds=make_seeds(rows).to(kernel_device), step=0, noise=noise.to(kernel_device), trace=trace, **dev)
    return tokens.cpu(), trace["state"].cpu(), trace["rounds"].cpu()


def test_rounds_accept_a_candidate_in_k_at_once_and_resample_one_outside(kernel_device):
    """Flat logits (K of top_p = 0.05 is tokens 0..3). Row 0: the noise favours the top token,
    which is in K: settled in round 1. Rows 1 (top_k = 3) and 2 (top_p = 0.05): it favours the
    last token, outside K: round 1 rejects, lo moves past it, round 2 draws token 0 and settles.
    Row 3 has neither cut, row 4 is greedy: round 1."""
    rows, vocab = 5, 64
    logits = (-0.01 * torch.arange(vocab, dtype=torch.float32)).expand(rows, vocab).contiguous()
    noise = torch.full((rows, vocab), 0.5)
    noise[0, 0] = 1 - 1e-6
    noise[1:4, vocab - 1] = 1 - 1e-6
    noise[4, 30] = 1 - 1e-6
    params = dict(temperature=torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]), top_k=torch.tensor([3, 3, 0, 0, 2]),
                  top_p=torch.tensor([0.05, 1.0, 0.05, 1.0, 1.0]))
    tokens, state, rounds = run_rounds(kernel_device, logits, None, noise, **params)
    want = reference.guided_sample(logits, None, seeds=make_seeds(rows), step=0, noise=noise, **params)
    assert torch.equal(tokens, want)
    assert tokens.tolist() == [0, 0, 0, vocab - 1, 0]
    assert (state == guided_sample_triton.STATE_ACCEPTED).all()
    assert rounds.tolist() == [1, 2, 2, 1, 1]


@pytest.mark.parametrize("case", ["flat_small_cuts", "near_ties"])
def test_rounds_on_flat_and_near_tied_scores_equal_reference(case, kernel_device):
    """Round 1 rejects often (top_k = 1..3, top_p = 0.05 on flat scores), and many near-tied
    values (3 distinct scores, ties at every threshold) need several rounds or the bisection;
    the tokens are the reference's."""
    rows, vocab = 6, 53
    g = torch.Generator().manual_seed(21)
    if case == "flat_small_cuts":
        logits = torch.randn(rows, vocab, generator=g) * 0.05
        params = dict(top_k=torch.tensor([1, 2, 3, 0, 2, 0]), top_p=torch.tensor([1.0, 1.0, 0.05, 0.05, 0.3, 0.1]))
    else:
        logits = torch.randint(0, 3, (rows, vocab), generator=g).float() * 1e-3
        params = dict(top_k=torch.tensor([1, 5, 20, 0, 7, 30]), top_p=torch.tensor([1.0, 0.5, 0.9, 0.2, 0.3, 1.0]))
    noise = make_noise(rows, vocab, seed=22)
    tokens, state, rounds = run_rounds(kernel_device, logits, None, noise, temperature=0.7, **params)
    want = reference.guided_sample(logits, None, seeds=make_seeds(rows), step=0, noise=noise, temperature=0.7,
                                   **params)
    assert torch.equal(tokens, want)
    assert rounds.max() >= 2                 # some row needed more than one round


def test_rows_unsettled_after_the_rounds_take_the_bisection(kernel_device, monkeypatch):
    """With one round, a rejected row goes to the exact bisection (state BISECT); its token is
    still the reference's, and the settled rows keep theirs."""
    monkeypatch.setattr(guided_sample_triton.step, "SAMPLE_ROUNDS", 1)
    rows, vocab = 3, 40
    logits = (-0.02 * torch.arange(vocab, dtype=torch.float32)).expand(rows, vocab).contiguous()
    noise = torch.full((rows, vocab), 0.5)
    noise[:, vocab - 1] = 1 - 1e-6
    noise[2, 1] = 1 - 1e-7
    params = dict(temperature=1.0, top_k=torch.tensor([2, 0, 3]), top_p=torch.tensor([1.0, 0.1, 1.0]))
    tokens, state, rounds = run_rounds(kernel_device, logits, None, noise, **params)
    want = reference.guided_sample(logits, None, seeds=make_seeds(rows), step=0, noise=noise, **params)
    assert torch.equal(tokens, want)
    s = guided_sample_triton
    assert state.tolist() == [s.STATE_BISECT, s.STATE_BISECT, s.STATE_ACCEPTED]


@pytest.mark.parametrize("layout,m_block", [("corrsynth", None), ("mixed_sizes", None), ("group20", 16)])
def test_rounds_with_groups_and_per_row_cuts_equal_reference(layout, m_block, kernel_device):
    """Per-row mixes of top-k / top-p / both / neither in guidance groups of 1..4 rows, and a
    20-row group split over 16-row tiles and K blocks: tokens equal the reference."""
    if layout == "group20":
        rows, vocab = 21, 37
        mix = torch.block_diag(corrsynth_block(20, 2.0), torch.ones(1, 1))
        params = dict(temperature=torch.linspace(0.0, 1.5, rows), alpha=0.01, top_k=torch.arange(rows) % 9,
                      top_p=torch.where(torch.arange(rows) % 3 == 0, 0.6, 1.0))
        extra = dict(m_block=16, k_block=16)
    else:
        rows, vocab = ROWS, VOCAB_SIZES[0]
        mix = make_mix(layout)
        params = dict(PER_ROW_PARAMS, **TOP_SETTINGS["both_per_row"])
        extra = dict(block_v=32, num_chunks=2)
    logits = make_logits(rows, vocab, torch.float32, seed=33)
    noise = make_noise(rows, vocab, seed=33)
    tokens, state, rounds = run_rounds(kernel_device, logits, mix, noise, **params, **extra)
    want = reference.guided_sample(logits, mix, seeds=make_seeds(rows), step=0, noise=noise, **params)
    assert torch.equal(tokens, want)


def test_step_launch_count_is_fixed(kernel_device, monkeypatch):
    """The step's Triton launches are a fixed list (``launch_count``): 3 for a plain step whose
    tiles are whole groups (the first sample pass combines the stats), 2 a round + 2 ·
    THRESHOLD_PASSES counting passes more with top-k/top-p, whatever the rows need (here row 0
    settles in round 1, row 1 takes the bisection); log-probs skip the rounds (and keep the
    row-stats launch: their first pass is a counting pass)."""
    s = guided_sample_triton.step            # the host module: it launches the kernels
    launches = []

    class Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            launches.append(self.name)
            return self.fn[grid]

    for name in [n for n in dir(s) if n.startswith("_") and n.endswith("_kernel")]:
        monkeypatch.setattr(s, name, Counted(name, getattr(s, name)))
    rows, vocab = 2, 40
    logits = (-0.02 * torch.arange(vocab, dtype=torch.float32)).expand(rows, vocab).contiguous()
    noise = torch.full((rows, vocab), 0.5)
    noise[0, 0] = 1 - 1e-6
    noise[1, vocab - 1] = 1 - 1e-6
    params = dict(top_k=torch.tensor([2, 0]), top_p=torch.tensor([1.0, 0.1]))
    monkeypatch.setattr(s, "SAMPLE_ROUNDS", 1)    # the interpreter is slow; the count is per round
    tokens, state, _ = run_rounds(kernel_device, logits, None, noise, **params)
    assert state.tolist() == [guided_sample_triton.STATE_ACCEPTED, guided_sample_triton.STATE_BISECT]
    want = reference.guided_sample(logits, None, seeds=make_seeds(rows), step=0, noise=noise, **params)
    assert torch.equal(tokens, want)
    assert len(launches) == s.launch_count(True, rounds=1) == 3 + 2 + 2 * s.THRESHOLD_PASSES
    assert launches.count("_threshold_count_kernel") == 2 * s.THRESHOLD_PASSES
    assert not {"_decide_kernel", "_threshold_narrow_kernel", "_row_stats_kernel"} & set(launches)
    monkeypatch.setattr(s, "SAMPLE_ROUNDS", 4)
    assert s.launch_count(True) == 27 and s.launch_count(True, fused_stats=False) == 28     # was 52
    launches.clear()
    s.guided_sample(logits.to(kernel_device), None, seeds=make_seeds(rows).to(kernel_device), step=0,
                    noise=noise.to(kernel_device))
    assert len(launches) == s.launch_count(False) == 3
    launches.clear()
    s.guided_sample(logits.to(kernel_device), None, seeds=make_seeds(rows).to(kernel_device), step=0,
                    noise=noise.to(kernel_device), return_logprobs=True, **params)
    assert len(launches) == s.launch_count(True, return_logprobs=True) == 4 + 2 * s.THRESHOLD_PASSES
    assert "_row_stats_kernel" in launches
