"""The CPU sampling step (divgen.kernels.cpu_sample) against the torch reference, token for token:
plain and guided rows, greedy / tiny / hot temperatures, α cutoffs, top-k, −inf and +inf logits,
rows with no finite logit, exact ties, per-row step counters, with injected and with the
counter-based noise; and it is what the CPU ops run."""
import pytest
import torch

from divgen import kernels
from divgen.kernels import cpu_sample, reference


def _mix(rows, gen, kind):
    if kind is None:
        return None
    m = torch.zeros(rows, rows)
    size = 4 if kind == "groups" else rows
    for lo in range(0, rows, size):
        hi = min(lo + size, rows)
        n = hi - lo
        if n == 1:
            m[lo, lo] = 1.0
            continue
        g = torch.rand(n, n, generator=gen) * 1.5
        g.fill_diagonal_(0)
        block = -g
        block += torch.diag(1 + g.sum(dim=1))
        m[lo:hi, lo:hi] = block
    return m


def _case(seed, rows, vocab, mix_kind, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * scale
    if vocab > 20:
        logits[0, 5:9] = logits[0].max()                    # exact ties at the top
        logits[-1, torch.randint(0, vocab, (vocab // 10,), generator=gen)] = float("-inf")
    temperature = torch.tensor([[0.0, 1.0, 0.7, 1e-7, 2.5, 1.0][i % 6] for i in range(rows)])
    min_p = torch.tensor([[0.05, 0.0, 0.3, 0.05, 0.0, 0.1][(i + seed) % 6] for i in range(rows)])
    top_k = torch.tensor([[0, 0, 5, 1, 0, vocab + 3][(i * 7 + seed) % 6] for i in range(rows)], dtype=torch.int64)
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=gen)
    step = torch.randint(0, 1000, (rows,), generator=gen)
    return logits, _mix(rows, gen, mix_kind), seeds, step, temperature, min_p, top_k, torch.ones(rows)


def _peers_min_p(rows, seed):
    """The peers' min-p per row (after temperature), 0 (off) on some rows, 1 (only the max) on one."""
    return torch.tensor([[0.0, 0.1, 0.5, 1.0, 0.02][(i * 3 + seed) % 5] for i in range(rows)])


def _both(args, *, any_cut, noise=None, min_p=None):
    logits, mix, seeds, step, temperature, alpha, top_k, top_p = args
    kw = dict(any_top_k_top_p=any_cut, noise=noise, min_p=min_p)
    ref = reference.guided_sample_step(logits, mix, seeds, step, temperature, alpha, top_k, top_p, **kw)
    fast = cpu_sample.guided_sample_step(logits, mix, seeds, step, temperature, alpha, top_k, top_p, **kw)
    return ref, fast


@pytest.mark.parametrize("mix_kind", [None, "groups", "one"])
@pytest.mark.parametrize("any_cut", [False, True])
@pytest.mark.parametrize("peers_min_p", [False, True])
def test_tokens_equal_the_reference_with_counter_noise(mix_kind, any_cut, peers_min_p):
    for seed in range(12):
        for rows, vocab, scale in ((1, 97, 3.0), (6, 1000, 3.0), (16, 4099, 8.0), (5, 300, 0.05)):
            args = _case(seed, rows, vocab, mix_kind, scale)
            ref, fast = _both(args, any_cut=any_cut, min_p=_peers_min_p(rows, seed) if peers_min_p else None)
            assert torch.equal(ref, fast), (seed, rows, vocab, scale)


def test_peers_min_p_cuts_what_the_reference_cuts():
    """The min-p cut is live in these cases (not a no-op that both sides skip): with min-p 1 on a
    hot plain row only the max survives, so every draw is the argmax, in both samplers."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 500, generator=gen)
    args = (logits, None, torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.full((4,), 5.0),
            torch.zeros(4), torch.zeros(4, dtype=torch.int64), torch.ones(4))
    without = torch.stack([_both(args[:3] + (torch.full((4,), s),) + args[4:], any_cut=False)[1]
                           for s in range(20)])
    assert (without != logits.argmax(-1)).any()          # T = 5 wanders off the argmax
    for s in range(20):
        a = args[:3] + (torch.full((4,), s),) + args[4:]
        ref, fast = _both(a, any_cut=False, min_p=torch.ones(4))
        assert torch.equal(ref, fast) and torch.equal(fast, logits.argmax(-1))


@pytest.mark.parametrize("mix_kind", [None, "groups"])
def test_tokens_equal_the_reference_with_injected_noise(mix_kind):
    for seed in range(20):
        args = _case(seed, 8, 2000, mix_kind)
        gen = torch.Generator().manual_seed(100 + seed)
        noise = torch.rand(8, 2000, generator=gen).clamp(1e-12, 1 - 1e-7)
        if seed % 2:   # extreme uniforms: Gumbel values far beyond the counter-based noise's range
            noise[:, ::97] = 1e-30
            noise[:, 3::101] = 1 - 2 ** -24
        for any_cut in (False, True):
            ref, fast = _both(args, any_cut=any_cut, noise=noise)
            assert torch.equal(ref, fast), seed


def test_model_sized_rows_equal_the_reference():
    """16 rows x 49,152 tokens (the embedded model's vocabulary), CorrSynth groups of 4, α 0.05."""
    args = list(_case(3, 16, 49152, "groups", 4.0))
    args[4] = torch.ones(16)                   # temperature 1
    args[5] = torch.full((16,), 0.05)          # α
    for step in range(3):
        args[3] = torch.full((16,), step)
        ref, fast = _both(args, any_cut=False)
        assert torch.equal(ref, fast)


@pytest.mark.parametrize("alpha", [0.0, "mixed"])
@pytest.mark.parametrize("any_cut", [False, True])
@pytest.mark.parametrize("min_p", [None, "some"])
@pytest.mark.parametrize("masks", [False, True])
def test_guided_rows_without_alpha_equal_the_reference(alpha, any_cut, min_p, masks):
    """The vLLM binding's usual step: 16 rows x 49,152 tokens in CorrSynth groups of 4, no α cut
    (every token kept: the dense-score path), greedy and sampled rows, top-k and vLLM's min-p on
    some, finite logits or masks (min_tokens, a grammar); and the same with α on half the rows."""
    for seed in range(3):
        args = list(_case(seed, 16, 49152, "groups", 4.0))
        gen = torch.Generator().manual_seed(50 + seed)
        args[0] = torch.randn(16, 49152, generator=gen) * 4.0
        if masks:
            args[0][0, 2] = float("-inf")                                     # EOS under min_tokens
            args[0][5, torch.randperm(49152, generator=gen)[:49000]] = float("-inf")   # a grammar
        args[5] = torch.zeros(16) if alpha == 0.0 else torch.tensor([0.0, 0.05] * 8)
        args[6] = torch.tensor([0, 50, 1, 0] * 4, dtype=torch.int64)
        mp = None if min_p is None else torch.tensor([0.0, 0.1, 0.5, 1.0] * 4)
        logits, mix, seeds, step, temperature, a, top_k, top_p = args
        kw = dict(any_top_k_top_p=any_cut, min_p=mp)
        ref = reference.guided_sample_step(logits, mix, seeds, step, temperature, a, top_k, top_p, **kw)
        fast = cpu_sample.guided_sample_step(logits, mix, seeds, step, temperature, a, top_k, top_p, **kw)
        assert torch.equal(ref, fast), seed


def test_non_finite_rows_follow_the_reference_rules():
    logits = torch.randn(4, 50)
    logits[1] = float("-inf")                   # a slot not in use: token 0
    logits[2, 7] = float("inf")                 # +inf read as FLT_MAX: that token
    logits[3, :] = 2.0                          # all tied: greedy takes id 0
    ones = torch.ones(4)
    args = (logits, None, torch.arange(4), torch.zeros(4, dtype=torch.int64), torch.tensor([1.0, 1.0, 1.0, 0.0]),
            torch.zeros(4), torch.zeros(4, dtype=torch.int64), ones)
    ref, fast = _both(args, any_cut=False)
    assert torch.equal(ref, fast)
    assert fast[1] == 0 and fast[2] == 7 and fast[3] == 0


def test_top_p_and_log_probs_run_the_reference_exactly():
    args = list(_case(1, 6, 500, "groups"))
    args[7] = torch.tensor([1.0, 0.9, 0.5, 1.0, 0.3, 1.0])
    ref, fast = _both(args, any_cut=True)
    assert torch.equal(ref, fast)
    r = reference.guided_sample_step(*args, return_logprobs=True)
    f = cpu_sample.guided_sample_step(*args, return_logprobs=True)
    assert torch.equal(r[0], f[0]) and torch.equal(r[1], f[1])


def test_noise_is_hashed_only_near_the_top(monkeypatch):
    """The full-vocabulary noise is never computed: only tokens within the Gumbel range of the
    best score are hashed (here a few dozen of 49,152 per row)."""
    hashed = []
    real = cpu_sample.hash_i32

    def counting(k1, k2, ids):
        hashed.append(ids.numel())
        return real(k1, k2, ids)

    monkeypatch.setattr(reference, "uniform_noise", lambda *a, **k: pytest.fail("full-vocabulary noise"))
    monkeypatch.setattr(cpu_sample, "hash_i32", counting)
    logits = torch.randn(16, 49152) * 4
    out = cpu_sample.guided_sample_step(logits, None, torch.arange(16), torch.zeros(16, dtype=torch.int64),
                                        torch.ones(16), torch.full((16,), 0.05), torch.zeros(16, dtype=torch.int64),
                                        torch.ones(16), any_top_k_top_p=False)
    assert out.shape == (16,) and 0 < sum(hashed) < 16 * 49152 // 20


def test_the_cpu_ops_run_the_fast_step():
    ops = kernels.ops_for("cpu")
    assert ops.name == "cpu"
    logits = torch.randn(3, 200)
    plan = kernels.build_sample_plan(None, "cpu", rows=3)
    args = (torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3), torch.full((3,), 0.05),
            torch.zeros(3, dtype=torch.int64), torch.ones(3))
    got = kernels.guided_sample_step(logits, plan, *args, any_top_k_top_p=False)
    assert torch.equal(got, reference.guided_sample_step(logits, None, *args, any_top_k_top_p=False))
    assert ops._step is cpu_sample.guided_sample_step


def test_noise_range_is_the_counter_uniforms_range():
    u = reference.uniform_noise(torch.arange(64), 0, 4096)
    g = -torch.log(-torch.log(u))
    assert cpu_sample.G_LO <= float(g.min()) and float(g.max()) <= cpu_sample.G_HI
    assert 19 < cpu_sample.NOISE_GAP < 20


def test_int32_hash_equals_the_reference_hash():
    """``hash_i32`` (int32, wrapping products, masked shifts) gives the reference's int64 hash bit
    for bit: random and extreme keys (0, 2^31 - 1, 2^31, 2^32 - 1), token ids up to 2^20, and
    lengths that leave scalar tails after the vector loops."""
    gen = torch.Generator().manual_seed(7)
    edge = torch.tensor([0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1], dtype=torch.int64)
    k1 = torch.cat([edge, torch.randint(0, 1 << 32, (27,), generator=gen)])
    k2 = torch.cat([edge.flip(0), torch.randint(0, 1 << 32, (27,), generator=gen)])
    for n in (1, 37, 1000, 4099):
        ids = torch.randint(0, 1 << 20, (n,), generator=gen)
        ids[0] = 0
        want = reference.hash_tokens(k1[:, None], k2[:, None], ids[None, :])
        got = cpu_sample.hash_i32(cpu_sample._as_int32(k1)[:, None], cpu_sample._as_int32(k2)[:, None],
                                  ids.to(torch.int32)[None, :])
        assert got.dtype == torch.int32 and torch.equal(got.long() & 0xFFFFFFFF, want)
    u = cpu_sample._uniform_from_m(cpu_sample._m_of(got))
    assert torch.equal(u, reference.uniform_from_hash(reference.hash_tokens(k1[:, None], k2[:, None],
                                                                            ids[None, :])))


def _model_like(rows, vocab, seed):
    """Logits spread like a language model's (a few tokens high, most within ~15 of the top), so
    nearly the whole vocabulary is within the noise's reach at T = 1."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * 2.5
    top = torch.randint(0, vocab, (rows, 20), generator=gen)
    logits.scatter_(1, top, 8 + 4 * torch.rand(rows, 20, generator=gen))
    return logits


def _native_ops():
    ops = cpu_sample._NATIVE.get()
    if ops is None:
        pytest.skip(f"the CPU sampler's native pass did not build ({cpu_sample._NATIVE.state.get('error')})")
    return ops


def _draw_mode(mode, monkeypatch):
    """Run the dense draw native (``cpu_sample.cpp``; skipped where it did not build), fused
    (compiled; skipped without a C++ compiler) or unfused; returns a list that counts the native
    or compiled pass's calls."""
    calls = []
    monkeypatch.setenv("DIVGEN_CPU_SAMPLER", mode)
    if mode == "unfused":
        monkeypatch.setattr(cpu_sample, "_FUSED", False)
        return calls
    if mode == "native":
        ops = _native_ops()

        class Counted:
            def candidates(self, *a):
                calls.append(1)
                return ops.candidates(*a)
        monkeypatch.setattr(cpu_sample._NATIVE, "get", lambda required=False: Counted())
        return calls
    monkeypatch.setattr(cpu_sample, "_FUSED", None)
    fused = cpu_sample._fused_draw()
    if fused is None:
        pytest.skip("no C++ compiler on PATH: the fused draw cannot be built here")
    monkeypatch.setattr(cpu_sample, "_FUSED", lambda *a: calls.append(1) or fused(*a))
    return calls


@pytest.mark.parametrize("mode", ["native", "fused", "unfused"])
@pytest.mark.parametrize("case", ["plain", "temperatures", "masks", "min_p", "odd_vocab", "tiny_vocab", "guided",
                                  "guided_min_p"])
def test_dense_draw_equals_the_reference(case, mode, monkeypatch):
    """Plain sampling (no α cut, no min-p: most of the vocabulary can win) takes the dense draw
    (unfused: int32 hash of every token, exact Gumbel values only for the tokens whose noise level
    lets them reach the best score; fused: one compiled loop giving every token its exact score),
    and its tokens equal the reference's over several steps: T = 1 with finite logits, mixed
    temperatures (greedy, tiny, 0.7, 2.5) and α on some rows, −inf / NaN / +inf logits and a row
    with no finite logit, the peers' min-p on some rows, vocabularies that are not a multiple of
    64 (or of the vector width: 50,001 and 97); and guided rows (CorrSynth groups of 4 with no α
    cut, the vLLM binding's usual step), with and without min-p."""
    calls = _draw_mode(mode, monkeypatch)
    rows, vocab = 24, {"odd_vocab": 50001, "tiny_vocab": 97}.get(case, 49152)
    logits = _model_like(rows, vocab, seed=len(case))
    mix = None
    if case.startswith("guided"):
        # the rows of a group share most of their distribution (as a group's prompts do), so the
        # guided scores also keep most of the vocabulary within the noise's reach
        mix = _mix(rows, torch.Generator().manual_seed(5), "groups")
        jitter = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(9))
        logits = logits[::4].repeat_interleave(4, dim=0) + 0.3 * jitter
    temperature = torch.ones(rows)
    alpha = torch.zeros(rows)
    min_p = None
    if case == "temperatures":
        temperature = torch.tensor([[1.0, 0.0, 1e-7, 0.7, 2.5, 1.0][i % 6] for i in range(rows)])
        alpha[::5] = 0.05
    if case == "masks":
        logits[0, 3] = float("-inf")
        logits[1, 100:20000] = float("-inf")
        logits[2, 17] = float("nan")
        logits[3] = float("-inf")
        logits[4, 9] = float("inf")
        logits[5, :] = 1.5                                       # all tied
    if case.endswith("min_p"):
        min_p = torch.tensor([[0.0, 0.0, 0.02, 0.0][i % 4] for i in range(rows)])
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=torch.Generator().manual_seed(3))
    zeros, ones = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
    drawn = []
    real_draw = cpu_sample._dense_draw
    monkeypatch.setattr(cpu_sample, "_dense_draw", lambda *a: drawn.append(1) or real_draw(*a))
    for step in range(4):
        st = torch.full((rows,), step) + torch.arange(rows)
        kw = dict(any_top_k_top_p=False, min_p=min_p)
        ref = reference.guided_sample_step(logits, mix, seeds, st, temperature, alpha, zeros, ones, **kw)
        fast = cpu_sample.guided_sample_step(logits, mix, seeds, st, temperature, alpha, zeros, ones, **kw)
        assert torch.equal(ref, fast), step
    assert len(drawn) == 4
    assert (len(calls) > 0) == (mode in ("native", "fused"))


def test_dense_draw_takes_exact_gumbel_values_for_few_tokens(monkeypatch):
    """The dense draw hashes every token but computes the Gumbel transform (two logs) for only a
    small share of them: those whose noise level could reach the best score."""
    _draw_mode("unfused", monkeypatch)
    rows, vocab = 16, 49152
    logits = _model_like(rows, vocab, seed=11)
    logged = []
    real = cpu_sample._padded_gumbel
    monkeypatch.setattr(cpu_sample, "_padded_gumbel", lambda u: logged.append(u.numel()) or real(u))
    zeros, ones = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
    args = (logits, None, torch.arange(rows), zeros, ones, torch.zeros(rows), zeros, ones)
    fast = cpu_sample.guided_sample_step(*args, any_top_k_top_p=False)
    assert torch.equal(fast, reference.guided_sample_step(*args, any_top_k_top_p=False))
    within_reach = int((logits >= logits.amax(-1, keepdim=True) - cpu_sample.NOISE_GAP).sum())
    assert within_reach > rows * vocab // 2                  # the case the dense draw is for
    assert 0 < sum(logged) < rows * vocab // 10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_is_torch_argmax(dtype):
    """Ties (the first index wins), −inf rows, NaN, and widths that are not a multiple of 64; the
    engine's greedy tokens on a CPU are this."""
    gen = torch.Generator().manual_seed(2)
    for width in (1, 63, 64, 200, 4096):
        z = torch.randint(-3, 4, (9, width), generator=gen).to(dtype)        # many ties
        z[1] = float("-inf")
        z[2, width // 2] = float("nan")
        z[3, -1] = 10.0
        arg, best = cpu_sample._first_argmax(z)
        want = z.argmax(dim=-1)
        assert torch.equal(arg, want) and torch.equal(kernels.greedy_tokens(z), want), width
        assert torch.allclose(best, z.gather(1, want[:, None])[:, 0], rtol=0, atol=0, equal_nan=True)


def test_a_too_tight_noise_bound_changes_the_tokens(monkeypatch):
    """The dense draw's tests have teeth: with the noise bound G_TOP cut from ~4.2 to 0.5, tokens
    that could still win are never given their Gumbel value, and the draw departs from the
    reference on some rows (the same case as ``test_dense_draw_equals_the_reference[plain]``)."""
    rows, vocab = 24, 49152
    logits = _model_like(rows, vocab, seed=len("plain"))
    seeds = torch.randint(-(2 ** 62), 2 ** 62, (rows,), generator=torch.Generator().manual_seed(3))
    zeros, ones = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
    _draw_mode("unfused", monkeypatch)
    monkeypatch.setattr(cpu_sample, "G_TOP", 0.5)
    differ = 0
    for step in range(4):
        st = torch.full((rows,), step) + torch.arange(rows)
        args = (logits, None, seeds, st, ones, torch.zeros(rows), zeros, ones)
        ref = reference.guided_sample_step(*args, any_top_k_top_p=False)
        differ += int((cpu_sample.guided_sample_step(*args, any_top_k_top_p=False) != ref).sum())
    assert differ > 0



def _candidate_case(vocab):
    """(k1, k2, z, floor) for 9 rows: extreme keys, a floor that cuts about half of each row, −inf
    and NaN scores, and a +inf floor on row 2 (only top-level noise makes candidates there)."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 9
    k1 = torch.tensor([0, 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 5, 6, 7, 8], dtype=torch.int64)
    k2 = torch.randint(0, 1 << 32, (rows,), generator=gen)
    z = torch.randn(rows, vocab, generator=gen)
    z[0, ::7] = float("-inf")
    z[1, ::11] = float("nan")
    floor = torch.zeros(rows)
    floor[2] = float("inf")
    return cpu_sample._as_int32(k1), cpu_sample._as_int32(k2), z, floor


@pytest.mark.parametrize("vocab", [97, 1000, 4099, 49152])
def test_fused_candidate_pass_equals_the_torch_passes(vocab, monkeypatch):
    """The compiled candidate pass gives every token the int32 hash's m + 1 where the unfused test
    keeps it and 0 elsewhere, bit for bit, tails of the vector loop included: extreme keys, a
    floor that cuts about half of each row, −inf and NaN scores."""
    _draw_mode("fused", monkeypatch)
    fused = cpu_sample._FUSED
    k1, k2, z, floor = _candidate_case(vocab)
    h = cpu_sample.hash_i32(k1[:, None], k2[:, None], torch.arange(vocab, dtype=torch.int32)[None, :])
    cand = (z >= floor[:, None]) | ((h >> (32 - cpu_sample.TOP_BITS)) == -1)
    want = torch.where(cand, cpu_sample._m_of(h) + 1, 0)
    got = fused(z, k1, k2, floor)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    top_level = int((got[2] > 0).sum())                     # the top-level tokens alone: ~1/64
    assert top_level < vocab // 8 + 8 and (top_level > 0 or vocab < 1000)


def test_auto_mode_compiles_only_after_enough_unfused_draws(monkeypatch):
    """DIVGEN_CPU_SAMPLER=auto (the default): the first dense draws run the torch passes and count
    their time; once it passes TIER_UP_S the process switches to the compiled pass (the same
    tokens); ``unfused`` never compiles; a bad mode names the choices."""
    if not any(cpu_sample.shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler on PATH: the fused draw cannot be built here")
    rows, vocab = 8, 4096
    logits = _model_like(rows, vocab, seed=4)
    zeros, ones = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
    monkeypatch.delenv("DIVGEN_CPU_SAMPLER", raising=False)
    monkeypatch.setattr(cpu_sample._NATIVE, "state", {"ops": None, "error": "no build here"})   # as without a compiler
    monkeypatch.setattr(cpu_sample, "_FUSED", None)
    monkeypatch.setattr(cpu_sample, "_UNFUSED_S", 0.0)
    monkeypatch.setattr(cpu_sample, "TIER_UP_S", 1e-9)
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: compiled.append(f) or real_compile(f, **kw))
    for step in range(3):
        args = (logits, None, torch.arange(rows), zeros + step, ones, torch.zeros(rows), zeros, ones)
        assert torch.equal(cpu_sample.guided_sample_step(*args, any_top_k_top_p=False),
                           reference.guided_sample_step(*args, any_top_k_top_p=False))
        assert len(compiled) == (0 if step == 0 else 1), step      # the first draw counted, then compiled
    assert cpu_sample._UNFUSED_S > 0 and cpu_sample._FUSED
    monkeypatch.setattr(cpu_sample, "_FUSED", None)
    monkeypatch.setenv("DIVGEN_CPU_SAMPLER", "unfused")
    assert cpu_sample._fused_draw() is None and len(compiled) == 1
    monkeypatch.setattr(cpu_sample, "_FUSED", None)
    monkeypatch.setenv("DIVGEN_CPU_SAMPLER", "fast")
    with pytest.raises(ValueError, match="auto or native or fused or unfused"):
        cpu_sample._fused_draw()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("any_cut", [False, True])
def test_all_greedy_unguided_batch_takes_the_first_argmax_as_the_reference_does(seed, any_cut):
    """A batch whose rows are all greedy and unguided takes the one-pass argmax path: ties at the max
    (the smallest id), +inf logits (clamped, first of them), α, min-p and top-k on some rows; and a
    row with NaN or with no finite logit sends the batch down the general path, with the same tokens."""
    logits, _, seeds, step, _, alpha, top_k, top_p = _case(seed, 7, 300, None)
    temperature = torch.tensor([0.0, 1e-7, 0.0, 0.0, 1e-9, 0.0, 0.0])
    alpha = torch.tensor([1.0, 0.3, 1.0, 0.05, 1.0, 1.0, 0.9])
    logits[1, 17] = logits[1, 40] = float("inf")
    logits[2, :] = 1.5                                      # every token tied
    logits[3, 250:260] = logits[3].max() + 1.0              # a tie between later ids
    args = (logits, None, seeds, step, temperature, alpha, top_k, top_p)
    ref, fast = _both(args, any_cut=any_cut, min_p=_peers_min_p(7, seed))
    assert torch.equal(ref, fast)
    assert fast[1] == 17 and fast[2] == 0 and fast[3] == 250
    for bad in (float("nan"), float("-inf")):
        odd = logits.clone()
        odd[5, :] = float("-inf")
        odd[6, 3] = bad
        ref, fast = _both((odd, None, seeds, step, temperature, alpha, top_k, top_p), any_cut=any_cut)
        assert torch.equal(ref, fast)


@pytest.mark.parametrize("vocab", [1, 15, 97, 1000, 4099, 49152])
def test_native_candidate_pass_equals_the_torch_passes(vocab):
    """The native candidate pass (``cpu_sample.cpp``) returns exactly the (row, token) pairs the
    unfused test keeps, row-major with ids ascending, and each one's m = h >> 9 of the int32 hash,
    bit for bit: tails of the 16-lane loop (vocabularies of 1, 15, 97 ...), extreme keys, a floor
    that cuts about half of each row, −inf and NaN scores, a +inf floor (top-level noise only), and
    rows that are not sampled (none of their tokens)."""
    ops = _native_ops()
    k1, k2, z, floor = _candidate_case(vocab)
    sampled = torch.tensor([True, True, True, False, True, True, False, True, True])
    h = cpu_sample.hash_i32(k1[:, None], k2[:, None], torch.arange(vocab, dtype=torch.int32)[None, :])
    cand = ((z >= floor[:, None]) | ((h >> (32 - cpu_sample.TOP_BITS)) == -1)) & sampled[:, None]
    want_flat = cand.view(-1).nonzero()[:, 0]
    want_m = cpu_sample._m_of(h).view(-1)[want_flat]
    flat, m = ops.candidates(z, k1, k2, floor, sampled, cpu_sample.TOP_BITS, reference._FMIX_C1, reference._FMIX_C2)
    assert flat.dtype == torch.int64 and m.dtype == torch.int32
    assert torch.equal(flat, want_flat) and torch.equal(m, want_m)
    if vocab > 1000:                           # the +inf-floor row keeps its top-level tokens only: ~1/64
        assert 0 < int((flat // vocab == 2).sum()) < vocab // 16
    with pytest.raises(RuntimeError, match="fp32"):
        ops.candidates(z.double(), k1, k2, floor, sampled, cpu_sample.TOP_BITS, reference._FMIX_C1,
                       reference._FMIX_C2)


def test_auto_mode_takes_the_native_pass_and_falls_back_when_it_did_not_build(monkeypatch, capsys):
    """auto: the native pass where it built (no tier-up wait); where the build fails, one line on
    stderr naming the fix, the torch passes with the same tokens, and no second attempt; native:
    a failed build is an error."""
    _native_ops()
    monkeypatch.delenv("DIVGEN_CPU_SAMPLER", raising=False)
    assert cpu_sample.active_path() == "native"
    rows, vocab = 8, 4096
    logits = _model_like(rows, vocab, seed=6)
    zeros, ones = torch.zeros(rows, dtype=torch.int64), torch.ones(rows)
    args = (logits, None, torch.arange(rows), zeros + 2, ones, torch.zeros(rows), zeros, ones)
    want = reference.guided_sample_step(*args, any_top_k_top_p=False)
    builds = []

    def broken():
        builds.append(1)
        raise RuntimeError("x.cpp:1: error: no compiler here")
    monkeypatch.setattr(cpu_sample._NATIVE, "state", {})
    monkeypatch.setattr(cpu_sample._NATIVE, "build", broken)
    monkeypatch.setattr(cpu_sample, "_FUSED", False)
    assert torch.equal(cpu_sample.guided_sample_step(*args, any_top_k_top_p=False), want)
    assert torch.equal(cpu_sample.guided_sample_step(*args, any_top_k_top_p=False), want)
    err = capsys.readouterr().err
    assert len(builds) == 1 and err.count("\n") == 1
    assert "did not build (x.cpp:1: error: no compiler here)" in err and "DIVGEN_CPU_SAMPLER=unfused" in err
    assert cpu_sample.active_path() == "unfused"
    monkeypatch.setenv("DIVGEN_CPU_SAMPLER", "native")
    with pytest.raises(RuntimeError, match="DIVGEN_CPU_SAMPLER=native but the CPU sampler's candidate pass did not"):
        cpu_sample.guided_sample_step(*args, any_top_k_top_p=False)
