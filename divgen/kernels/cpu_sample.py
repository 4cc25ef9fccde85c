"""The CPU sampling step: the tokens of ``reference.guided_sample_step``, bit for bit, at a fraction
of its cost (the engine's CPU sampler; ``ops_for`` picks it for CPU tensors).

Where the reference's time goes on a CPU (16 rows x 49,152 tokens): the counter-based noise
(two murmur finalisers, ~12 int64 passes over [R, V]), the Gumbel transform (two logs over
[R, V]) and, with top-k/top-p, two full sorts. Most of that work is for tokens that cannot win:

* The Gumbel perturbation of the counter-based noise is bounded: u = (2·(h >> 9) + 1) / 2^24, so
  G = −log(−log u) lies in [G_LO, G_HI] (≈ [−2.81, 16.64]). The winner w of argmax(z + G)
  therefore has z_w ≥ max z + G_LO − G_HI (≈ max z − 19.5). Only tokens above that bound (a
  margin of 1 added against rounding) get noise; the rest are never hashed. Injected noise has
  no fixed bound: its row's own min/max give it.
* The α cutoff keeps tokens with l ≥ max l + log α (own logits), so a row with α > 0 has a
  small kept set; everything after the scores is computed on those tokens only (gathered, one
  flat list over all rows). Guided rows with α = 0 (the vLLM binding's requests) keep the whole
  vocabulary: their scores are computed densely (one [R, R] x [R, V] product when no logit is
  −inf) and only tokens within the noise's reach of each row's best guided score are gathered.
* top-k: the k-th largest kept score is a value, the same on the gathered list (``topk``, no
  sort of the vocabulary). top-p needs the ascending cumulative mass over the whole row in the
  reference's order, so a step with a top-p row runs the reference (exact, and as slow).

Exactness: every value that decides a token is computed by the same torch op on the same
operands as in the reference (the full-vocabulary log-softmax and guidance product are kept as
they are; comparisons, divisions and the noise hash are elementwise), and the Gumbel logs run
on a list padded to a multiple of 64 so every element takes torch's vectorised path, as the
reference's [R, V] tensor does. Ties go to the smallest token id. The semantic rules (the α
mask, the temperature rule, the mask rule for −inf contrasting logits, the noise) are the
reference's: its constants and building blocks are imported, and ``_cut_scores`` mirrors the
reference's scores-and-mask lines (``reference.guided_scores`` on the gathered columns); tests/test_cpu_sample.py compares the two token for token under
injected and counter-based noise, so a change of the reference's rules shows up there.
* Plain sampling (no α cut, no min-p, T = 1: most of a model's vocabulary lies within the noise's
  reach) gathers nothing: ``_dense_draw`` hashes every token in int32 (``hash_i32``: the same bits
  as the reference's int64 hash, with twice the lanes and half the bytes), bounds the row's best
  score by the exact score of its top token, and computes the Gumbel transform only for the tokens whose
  noise level (the top bits of the hash) lets them reach that bound — a few per cent of the
  vocabulary (64 rows x 49,152 at T = 1 on SmolLM2's logits, one thread: 323 ms → 25–31 ms;
  16 rows: 6–9 ms; benchmarks/bench_cpu_sampler.py).
* min-p (the peers' rule, on the tempered guided scores) keeps z ≥ max z + log min_p. For an
  unguided row z = l / T, so only logits l ≥ max l + T·log min_p (less a rounding slack) are
  gathered at all (min-p 0.05 at T = 1: the tokens within 3 nats of the best). The row's
  max z is always among the candidates (the α-kept tokens, or for unguided rows the tokens
  within the noise's reach of the best, or on the dense path the tokens within
  reach of the best guided score), so it is the same value as the reference's.
* The native candidate pass (``cpu_sample.cpp``, built on first use like the engine's CPU kernels:
  ``engine/models/native_build``): the dense draw's hash and candidate test in one AVX-512 loop
  over each sampled row, 16 tokens a step, whose candidates are compressed in a register and
  stored without a branch; it returns the candidates' flat indices and hash bits directly, so no
  [R, V] intermediate is written or scanned (``nonzero`` over one was a third of the step). Integer
  ops and one comparison only, so exact by construction; the Gumbel logs of the candidates stay
  torch's (MKL's) on the gathered list. 16 / 64 rows x 49,152 at T = 1, one thread, the whole
  sampling step: 2.4 / 6.0 ms, against 5.1 / 17.2 ms with the compiled pass below in the previous
  run of benchmarks/bench_cpu_sampler.py (benchmarks/RESULTS.md). ``DIVGEN_CPU_SAMPLER=auto`` (default) takes it where it
  built, ``native`` makes a failed build an error.
* The fused candidate pass, where the native one did not build: torch's inductor builds the same
  hash and test as ONE compiled loop over the row block
  (``_candidate_m``: ~25 integer ops and two comparisons a token, written once as int32) instead
  of ~25 torch passes over [R, V] int32 (16 / 64 rows x 49,152 at T = 1, one thread, one A/B pair
  of benchmarks/bench_cpu_sampler.py runs: 6.8 → 4.4 ms and 25.6 → 16.0 ms a step), whose output
  ``nonzero`` then scans. Inductor's own log rounds ~8 % of values differently, so the Gumbel
  logs stay torch's here too. Compiling costs 4-7 s once per process
  (inductor caches the C++ on disk), ~2,000 steps' worth of what it saves at 16 rows, so under
  ``auto`` a process switches to it only after its unfused dense
  draws have taken ``TIER_UP_S`` seconds: short runs never pay, long ones do after a few percent
  of their time. ``fused`` compiles at the first dense draw, ``unfused`` never (and skips the
  native build); a compile failure prints one line and keeps the torch passes for the rest of
  the process.
Under ``torch.compile`` (data-dependent sizes) and with ``return_logprobs`` the reference runs.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import torch

from divgen.engine.models import native_build
from divgen.kernels import reference
from divgen.kernels.reference import LOGIT_MAX, sampling_temperature

# A multiple of torch's widest vector loop (2 x 16 fp32 lanes on AVX-512): padded lists take the
# vectorised elementwise path for every element (the scalar tail may round transcendental ops
# differently).
_PAD = 64
# Extra distance (in score units) below the Gumbel bound, against rounding of z + G.
_MARGIN = 1.0


def _gumbel(u: torch.Tensor) -> torch.Tensor:
    """−log(−log u), as the reference writes it (in place on ``u``)."""
    return u.log_().neg_().log_().neg_()


def _noise_range() -> tuple[float, float]:
    """[G_LO, G_HI]: the Gumbel values of the smallest and largest counter-based uniforms."""
    h = torch.tensor([0, 0xFFFFFFFF], dtype=torch.int64)
    g = _gumbel(reference.uniform_from_hash(h))
    return float(g[0]), float(g[1])


G_LO, G_HI = _noise_range()
NOISE_GAP = G_HI - G_LO

# The counter-based hash in int32 (twice the lanes and half the bytes of the reference's int64):
# the same murmur finaliser with a logical shift written as an arithmetic shift and a mask, and
# products that wrap modulo 2^32 (int32 holds the uint32 bits). Equal bits: tests/test_cpu_sample.py.
_C1_32 = reference._FMIX_C1 - (1 << 32)
_C2_32 = reference._FMIX_C2 - (1 << 32)
_M23 = (1 << 23) - 1      # the 23 bits h >> 9 of a uint32 that make the uniform (2m + 1) / 2^24

# The noise level of the dense draw: a token whose hash does not have its top TOP_BITS bits all
# set (all but 2^-TOP_BITS of the tokens) has a Gumbel value of at most G_TOP (the value at the
# largest such hash), so it can win only if its score comes within G_TOP of the best score found
# so far; the others are bounded by G_HI.
TOP_BITS = 6


def _top_bound() -> float:
    h = torch.tensor([(((1 << TOP_BITS) - 1) << (32 - TOP_BITS)) - 1], dtype=torch.int64)
    return float(_gumbel(reference.uniform_from_hash(h))[0])


G_TOP = _top_bound()
# Rows × tokens hashed per pass of the dense draw: the int32 working set of a pass stays in cache.
_DENSE_CHUNK = 1 << 19
# ... and per call of the fused candidate pass (no intermediates: fewer, larger calls).
_FUSED_CHUNK = 1 << 22
# The dense draw runs when more than 1/_DENSE_SHARE of a step's logits are in reach (_mostly_in_reach).
_DENSE_SHARE = 8


def _as_int32(k: torch.Tensor) -> torch.Tensor:
    """uint32 values held in int64 -> int32 tensors with the same 32 bits."""
    return torch.where(k >= (1 << 31), k - (1 << 32), k).to(torch.int32)


def _fmix32_i32(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``reference._fmix32`` on int32 holding uint32 bits, in place (t: scratch of h's shape)."""
    torch.bitwise_right_shift(h, 16, out=t)
    h.bitwise_xor_(t.bitwise_and_(0xFFFF))
    h.mul_(_C1_32)
    torch.bitwise_right_shift(h, 13, out=t)
    h.bitwise_xor_(t.bitwise_and_(0x7FFFF))
    h.mul_(_C2_32)
    torch.bitwise_right_shift(h, 16, out=t)
    h.bitwise_xor_(t.bitwise_and_(0xFFFF))
    return h


def hash_i32(k1: torch.Tensor, k2: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``reference.hash_tokens(k1, k2, ids)``'s 32 bits in int32, from int32 keys (``_as_int32``)
    broadcast against int32 token ids."""
    h = ids ^ k1                                          # a fresh tensor
    t = torch.empty_like(h)
    _fmix32_i32(h, t)
    h.bitwise_xor_(k2)
    return _fmix32_i32(h, t)


def _m_of(h: torch.Tensor) -> torch.Tensor:
    """m = h >> 9 of the uint32 bits held in int32 h (23 bits)."""
    return (h >> 9).bitwise_and_(_M23)


def _uniform_from_m(m: torch.Tensor) -> torch.Tensor:
    """``reference.uniform_from_hash``'s value for h >> 9 = m: (2m + 1) / 2^24, exact in fp32."""
    return (m * 2 + 1).to(torch.float32).mul_(1.0 / 16777216.0)


def _padded_gumbel(u: torch.Tensor) -> torch.Tensor:
    n = u.shape[0]
    full = torch.full((-(-n // _PAD) * _PAD,), 0.5, dtype=torch.float32, device=u.device)
    full[:n] = u
    return _gumbel(full)[:n]


def _cut_scores(x, mix, row_limit, rows, cols, t_div, own=None):
    """The reference's tempered, α-cut scores z at the gathered (rows, cols): ŝ (the raw logits,
    or ``reference.guided_scores``), kept where the own logit is finite and ≥ the row's
    max + log α, divided by T. Mirrors ``reference.guided_sample_step``."""
    if mix is None:
        s = x[rows, cols]
    else:
        s = _mixed_scores(x, mix, rows, cols, own)
    xc = x[rows, cols]
    keep = torch.isfinite(xc) & (xc >= row_limit[rows])
    return torch.where(keep, s / t_div[rows], float("-inf"))


def _mixed_scores(x, mix, rows, cols, own=None):
    """``reference.guided_scores(x, mix)[rows, cols]`` from the needed columns only. The products
    run on at least 64 columns (a multiple of 64, padded): MKL's sgemm gives each column the same
    bits as in the full [R, V] product from 16 columns on (fewer columns take another kernel)."""
    ucols, where = torch.unique(cols, return_inverse=True)
    n = ucols.shape[0]
    padded = torch.zeros(max(_PAD, -(-n // _PAD) * _PAD), dtype=ucols.dtype, device=ucols.device)
    padded[:n] = ucols
    lse = torch.logsumexp(x, dim=-1) if own is not None else None           # [R], as the reference
    s = reference.guided_scores(x[:, padded], mix, lse=lse, own=None if own is None else own[padded])   # [R, U]
    return s[rows, where]


def _dense_scores(x, mix, row_limit, t_div, own=None):
    """The reference's z [R, V]: ``guided_scores``, kept where the own logit is finite and ≥ the
    row's max + log α, divided by T (the same ops as ``reference.guided_sample_step``)."""
    finite = torch.isfinite(x)
    if bool(finite.all()) and own is None:    # no masks: guided_scores' mask terms would add exact zeros
        s = mix.float() @ x
        if not bool(torch.isfinite(row_limit).any()):     # and no α cut: every token is kept
            return s.div_(t_div[:, None])
    else:
        s = reference.guided_scores(x, mix, own=own)
    keep = finite & (x >= row_limit[:, None])
    return torch.where(keep, s / t_div[:, None], float("-inf"))


def _noise_gap(noise, like: torch.Tensor) -> torch.Tensor:
    """[R] the largest minus the smallest Gumbel value a row's noise can take."""
    if noise is None:
        return torch.full_like(like, NOISE_GAP)
    u = noise.float()
    g = _gumbel(torch.stack((u.min(dim=-1).values, u.max(dim=-1).values), dim=1))
    return g[:, 1] - g[:, 0]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """x as [R, blocks, 64], padded with −inf to whole blocks."""
    n_rows, vocab = x.shape
    nb = -(-vocab // _PAD)
    if nb * _PAD != vocab:
        x = torch.cat([x, x.new_full((n_rows, nb * _PAD - vocab), float("-inf"))], dim=1)
    return x.view(n_rows, nb, _PAD)


def _first_argmax(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(torch.argmax(z, -1), the max) of a 2-d z: the first index of each row's max, found from
    the maxima of 64-token blocks (a vectorised reduction: ``argmax`` over a CPU row is ~8x
    slower). NaN rows take ``argmax`` itself (NaN counts as the max there)."""
    blocks = _blocks(z)
    bm = blocks.amax(dim=-1)                                                    # [R, blocks]
    best = bm.amax(dim=-1)
    if bool(torch.isnan(best).any()):
        arg = z.argmax(dim=-1)
        return arg, z.gather(1, arg[:, None])[:, 0]
    blk = (bm == best[:, None]).to(torch.uint8).argmax(dim=-1)                 # first block holding it
    inner = blocks[torch.arange(z.shape[0], device=z.device), blk]            # [R, 64]
    return blk * _PAD + (inner == best[:, None]).to(torch.uint8).argmax(dim=-1), best


def _mostly_in_reach(x: torch.Tensor, limit: torch.Tensor) -> bool:
    """True when more than 1/_DENSE_SHARE of the step's scores x reach their row's limit (counted
    on every 16th column): then the dense draw costs less than gathering the candidates. (Counting
    64-token blocks that hold a candidate would not do: a few per cent of candidates spread over
    a row touch nearly every block.)"""
    sample = x[:, ::16]
    return int((sample >= limit[:, None]).sum()) * _DENSE_SHARE > sample.numel()


def _candidates(x: torch.Tensor, limit: torch.Tensor):
    """(rows, cols) of x >= limit[row], row-major (token ids ascending): 64-token blocks whose
    max is below the limit are skipped whole."""
    n_rows, vocab = x.shape
    blocks = _blocks(x)
    nb = blocks.shape[1]
    rb, bb = (blocks.amax(dim=-1) >= limit[:, None]).nonzero(as_tuple=True)
    i, j = (blocks[rb, bb] >= limit[rb][:, None]).nonzero(as_tuple=True)
    rows, cols = rb[i], bb[i] * _PAD + j
    if nb * _PAD != vocab:                 # the padding is -inf: >= a limit of -inf (α = 0)
        inside = cols < vocab
        rows, cols = rows[inside], cols[inside]
    return rows, cols


def _row_max(values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    out = torch.full((n_rows,), float("-inf"), dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, rows, values, "amax")


def _unguided_scores(x, row_limit, t_div):
    """The reference's tempered, α-cut z of unguided rows, a block of rows at a time: a function
    of (r0, r1). Every logit finite (NaN and −inf are not), no α cut and T = 1: z is x itself
    (x / 1 is x, bit for bit), and the masks and the division are skipped."""
    if (bool((row_limit == float("-inf")).all()) and bool((t_div == 1).all())
            and bool(x.amin() > float("-inf"))):
        return lambda r0, r1: x[r0:r1]

    def block(r0, r1):
        xs = x[r0:r1]
        keep = torch.isfinite(xs) & (xs >= row_limit[r0:r1, None])
        return torch.where(keep, xs / t_div[r0:r1, None], float("-inf"))       # as the reference
    return block


def _fmix32_wrapping(h: torch.Tensor) -> torch.Tensor:
    """``reference._fmix32`` on int32 holding uint32 bits, out of place (for the compiled draw)."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1_32
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2_32
    return h ^ ((h >> 16) & 0xFFFF)


def _candidate_m(z: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """The dense draw's step 4 test for every token of a row block, with its noise: [c, V] int32,
    m + 1 (m = h >> 9, the uniform's 23 bits) where the token is a candidate (z ≥ floor[row], or its
    hash has the top TOP_BITS bits set), 0 elsewhere, so ``nonzero`` reads the candidates off it
    directly. Integer ops and comparisons only (written for ``torch.compile``: one loop, no [R, V]
    intermediates); eager it is ``hash_i32``'s arithmetic."""
    ids = torch.arange(z.shape[1], dtype=torch.int32, device=z.device)
    h = _fmix32_wrapping(_fmix32_wrapping(ids[None, :] ^ k1[:, None]) ^ k2[:, None])
    cand = (z >= floor[:, None]) | ((h >> (32 - TOP_BITS)) == -1)
    return torch.where(cand, ((h >> 9) & _M23) + 1, 0)


SAMPLER_MODES = ("auto", "native", "fused", "unfused")
_FUSED = None          # the compiled _candidate_m, False when it cannot run here (found once)
TIER_UP_S = 20.0       # auto: seconds of unfused dense draws after which the process compiles
_UNFUSED_S = 0.0       # seconds this process spent in unfused dense draws so far


_NATIVE = native_build.Loader(
    "sample", Path(__file__).with_name("cpu_sample.cpp"), "the CPU sampler's candidate pass",
    fallback="the sampler keeps the torch passes (same tokens, slower). Install g++ and ninja, or set "
             "DIVGEN_CPU_SAMPLER=unfused to skip the build",
    required_by="DIVGEN_CPU_SAMPLER=native")


def sampler_mode() -> str:
    """DIVGEN_CPU_SAMPLER: auto (default), native, fused or unfused (module docstring)."""
    mode = os.environ.get("DIVGEN_CPU_SAMPLER", "") or "auto"
    if mode not in SAMPLER_MODES:
        from divgen.engine.errors import DivgenError      # a ValueError the CLI prints as one line

        raise DivgenError(f"DIVGEN_CPU_SAMPLER={mode!r} is not a CPU sampler mode: use "
                         f"{' or '.join(SAMPLER_MODES)}, or unset it")
    return mode


def _native_draw():
    """The native candidate pass's ops (``cpu_sample.cpp``), or None: DIVGEN_CPU_SAMPLER is fused or
    unfused, or the library did not build (auto; native raises instead)."""
    mode = sampler_mode()
    if mode not in ("auto", "native"):
        return None
    return _NATIVE.get(required=mode == "native")


def active_path() -> str:
    """What the dense draw runs in this process now: native, fused or unfused."""
    if _native_draw() is not None:
        return "native"
    return "fused" if _fused_draw() is not None else "unfused"


def prefer_steady_state() -> None:
    """For benchmarks, which time a long job's steady state: where the caller chose no mode and the
    native pass did not build, compile the fused pass from the first draw instead of after
    ``TIER_UP_S`` seconds."""
    if not os.environ.get("DIVGEN_CPU_SAMPLER") and _native_draw() is None:
        os.environ["DIVGEN_CPU_SAMPLER"] = "fused"


def _fused_draw():
    """The compiled ``_candidate_m``, or None: not yet (auto, before ``TIER_UP_S`` seconds of
    unfused draws), DIVGEN_CPU_SAMPLER=unfused, no C++ compiler on PATH (inductor's CPU code is
    C++), or an earlier compile failed in this process."""
    global _FUSED
    if _FUSED is None:
        mode = sampler_mode()
        if mode == "auto" and _UNFUSED_S < TIER_UP_S:
            return None
        _FUSED = False
        if mode != "unfused" and any(shutil.which(c) for c in ("g++", "c++", "clang++")):
            _FUSED = torch.compile(_candidate_m, dynamic=True, fullgraph=True)
    return _FUSED or None


def _fused_failed(err: Exception) -> None:
    global _FUSED
    _FUSED = False
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"note: the CPU sampler's fused candidate pass could not be compiled ({first[:160]}); using the unfused "
          "draw (same tokens, slower; DIVGEN_CPU_SAMPLER=unfused skips the attempt)", file=sys.stderr)


def _dense_draw(z_rows, n_rows, vocab, greedy, seeds, step, min_p, device):
    """The tokens of rows whose candidates are most of the vocabulary (no α cut, no min-p: plain
    T = 1 sampling, unguided or guided), with the counter-based noise, a block of rows at a time:

    1. z = ``z_rows(r0, r1)``: the reference's tempered, α-cut scores of the rows r0..r1 (dense),
       min-p applied as the reference does, and its first argmax;
    2. h = the hash of every token (int32, ``hash_i32``);
    3. b = the argmax token's exact score z + G: the row's best score is at least b;
    4. candidates: tokens within G_TOP of b (any noise below the top level could lift them there)
       and the 2^-TOP_BITS of tokens whose noise is at the top level get the exact Gumbel value
       (a margin covers rounding); the best wins, ties to the
       smallest id. Greedy rows take the argmax of z.

    Steps 2 and 4's test are one compiled integer loop per row block where the fused pass is
    available (``_candidate_m``; the same candidates, so the same tokens).
    """
    k1, k2 = reference.noise_keys(seeds, step)
    k1, k2 = _as_int32(k1), _as_int32(k2)
    ids = torch.arange(vocab, dtype=torch.int32, device=device)
    global _UNFUSED_S
    tokens = torch.zeros(n_rows, dtype=torch.int64, device=device)
    native = _native_draw()
    fused = None if native is not None else _fused_draw()
    start = time.perf_counter()
    block = max(1, (_DENSE_CHUNK if fused is None and native is None else _FUSED_CHUNK) // vocab)
    for r0 in range(0, n_rows, block):
        r1 = min(r0 + block, n_rows)
        z = z_rows(r0, r1)
        if min_p is not None:
            z_max = z.amax(dim=-1, keepdim=True)
            z = torch.where(z >= z_max + torch.log(min_p[r0:r1].float())[:, None], z, float("-inf"))
        arg, best = _first_argmax(z)
        tokens[r0:r1] = arg                                # greedy rows, and rows with no finite score
        sampled = (~greedy[r0:r1]) & torch.isfinite(best)
        if not bool(sampled.any()):
            continue
        kr1, kr2 = k1[r0:r1], k2[r0:r1]
        b = best + _padded_gumbel(_uniform_from_m(_m_of(hash_i32(kr1, kr2, arg.to(torch.int32)))))
        tol = _MARGIN + b.abs() * 1e-6
        b = torch.where(sampled, b, float("inf"))                               # no candidates
        # near enough to reach b with any noise below the top level, or noise at the top level
        # (top bits all set: −1 after an arithmetic shift; its z may be −inf: it cannot win then)
        floor = b - (G_TOP + tol)
        # flat indices (row-major, ids ascending) and 1-d gathers: 2-d advanced indexing costs ~5x
        if native is not None and z.dtype == torch.float32:
            # the candidates (rows of sampled rows only) straight off one native loop
            flat, m_cand = native.candidates(z.contiguous(), kr1.contiguous(), kr2.contiguous(), floor, sampled,
                                             TOP_BITS, reference._FMIX_C1, reference._FMIX_C2)
        else:
            m1 = None
            if fused is not None:
                try:
                    m1 = fused(z, kr1, kr2, floor)                              # [c, V]: m + 1 or 0
                except Exception as err:      # no working toolchain after all: the torch passes
                    _fused_failed(err)
                    fused = None
            if m1 is not None:
                flat = m1.view(-1).nonzero()[:, 0]
                if not bool(sampled.all()):                                     # top-level noise of other rows
                    flat = flat[sampled[flat // vocab]]
                m_cand = m1.view(-1).index_select(0, flat) - 1
            else:
                h = hash_i32(kr1[:, None], kr2[:, None], ids[None, :])           # [c, V] int32
                cand = (z >= floor[:, None]).logical_or_((h >> (32 - TOP_BITS)) == -1)
                cand &= sampled[:, None]
                flat = cand.view(-1).nonzero()[:, 0]
                m_cand = _m_of(h.view(-1).index_select(0, flat))
        rows, cols = flat // vocab, flat % vocab
        scores = z.reshape(-1).index_select(0, flat) + _padded_gumbel(_uniform_from_m(m_cand))
        top = _row_max(scores, rows, r1 - r0)
        winner = torch.where(scores == top[rows], cols, vocab)
        won = torch.full((r1 - r0,), vocab, dtype=torch.int64, device=device)
        won.scatter_reduce_(0, rows, winner, "amin")                            # ties: smallest id
        tokens[r0:r1] = torch.where(sampled, won, arg)
    if fused is None and native is None:
        _UNFUSED_S += time.perf_counter() - start
    return tokens


def guided_sample_step(logits: torch.Tensor, mix: torch.Tensor | None, seeds: torch.Tensor, step: torch.Tensor,
                       temperature: torch.Tensor, alpha: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, *,
                       min_p: torch.Tensor | None = None, any_top_k_top_p: bool = True,
                       noise: torch.Tensor | None = None, return_logprobs: bool = False,
                       own: torch.Tensor | None = None):
    """``reference.guided_sample_step``'s signature and tokens (module docstring)."""
    if (return_logprobs or torch.compiler.is_compiling() or logits.device.type != "cpu"
            or (any_top_k_top_p and bool((top_p < 1).any()))):
        return reference.guided_sample_step(
            logits, mix, seeds, step, temperature, alpha, top_k, top_p, min_p=min_p,
            any_top_k_top_p=any_top_k_top_p, noise=noise, return_logprobs=return_logprobs, own=own)
    dense = mix is not None and bool((alpha <= 0).any())      # guided rows keeping every token
    n_rows, vocab = logits.shape
    x = logits.float()
    row_max = x.amax(dim=-1)
    if bool(torch.isposinf(row_max).any()):
        x = x.clamp(max=LOGIT_MAX)                                            # +inf read as LOGIT_MAX
        row_max = x.amax(dim=-1)
    row_limit = row_max + torch.log(alpha)                                    # [R]: max + log α
    greedy, t_div = sampling_temperature(temperature)
    if mix is None and noise is None and bool(greedy.all()) and bool(torch.isfinite(row_max).all()):
        # every row greedy and unguided, no NaN: the reference's token is the first argmax of the
        # logits (the α cut, min-p, top-k and top-p all keep the max; T only divides): one pass
        return _first_argmax(x)[0]
    # Candidates: the α-kept tokens; for unguided rows also only logits within the noise's reach
    # of the best (z = (l − c) / T, so a winner has l ≥ max l − T·gap; a margin covers rounding).
    top_k_on = any_top_k_top_p and bool((top_k > 0).any())
    dense_ok = noise is None and not top_k_on            # the dense draw: counter noise, no top-k
    if dense:
        # Guided rows without an α cut keep the whole vocabulary: gathering it costs more than the
        # reference's dense pass. The scores are computed densely instead (the reference's ops on
        # the same operands: the same bits), and only tokens within the noise's reach of each
        # row's best score are kept (a winner has z ≥ max z − gap; top-k keeps the max). Min-p is
        # the reference's test on the same z and max: a second lower bound.
        zf = _dense_scores(x, mix, row_limit, t_div, own)                     # [R, V]
        best = zf.amax(dim=-1)
        reach = best - (_noise_gap(noise, best) + 2 * _MARGIN) - best.abs() * 1e-6
        reach = torch.where(torch.isfinite(reach), reach, float("-inf"))
        reach = torch.where(greedy, best, reach)                              # greedy: the ties at the max
        if min_p is not None:
            reach = torch.maximum(reach, best + torch.log(min_p.float()))   # the reference's threshold
        if dense_ok and _mostly_in_reach(zf, reach):
            return _dense_draw(lambda r0, r1: zf[r0:r1], n_rows, vocab, greedy, seeds, step, min_p, x.device)
        rows, cols = _candidates(zf, reach)
        z = zf[rows, cols]
    else:
        limit = row_limit
        slack = 1e-3 * (1 + row_max.abs())          # covers the rounding of z = l / T (a superset)
        if mix is None and noise is None:
            reach = row_max - t_div * (NOISE_GAP + 2 * _MARGIN) - slack
            limit = torch.maximum(row_limit, reach)
        if mix is None and min_p is not None:
            # unguided: z = l / T and max z = max l / T, so min-p keeps l ≥ max l + T·log min_p
            # (the exact test on z follows below; this only skips tokens it surely drops)
            limit = torch.maximum(limit, row_max + t_div * torch.log(min_p.float()) - slack)
        if mix is None and dense_ok and _mostly_in_reach(x, limit):
            # most of the vocabulary is in reach (plain T = 1 sampling): hashing it densely in int32
            # and drawing the Gumbel values of the few tokens that can win costs less than gathering it
            return _dense_draw(_unguided_scores(x, row_limit, t_div), n_rows, vocab, greedy, seeds, step,
                               min_p, x.device)
        rows, cols = _candidates(x, limit)                                    # row-major, ids ascending
        z = _cut_scores(x, mix, row_limit, rows, cols, t_div, own)           # [N] gathered scores
    if min_p is not None:                                                     # the peers' min-p
        z_top = _row_max(z, rows, n_rows)                                     # [R] max z (module doc)
        z = torch.where(z >= (z_top + torch.log(min_p.float()))[rows], z, float("-inf"))

    if top_k_on:
        counts = torch.bincount(rows, minlength=n_rows)
        width = int(counts.max()) if rows.numel() else 0
        k_max = min(int(top_k.max()), width)
        if k_max > 0:
            start = torch.cumsum(counts, 0) - counts
            dense = torch.full((n_rows, width), float("-inf"), dtype=z.dtype, device=z.device)
            dense[rows, torch.arange(rows.numel(), device=z.device) - start[rows]] = z
            top = torch.topk(dense, k_max, dim=-1).values                     # [R, k_max], descending
            k = top_k.clamp(min=1, max=k_max)
            kth = top.gather(1, (k - 1)[:, None])[:, 0]
            # off (k = 0) or more than the kept tokens: nothing is cut
            kth = torch.where((top_k > 0) & (top_k <= k_max), kth, float("-inf"))
            z = torch.where(z >= kth[rows], z, float("-inf"))

    # Only tokens within the noise's reach of the row's best score can win.
    best = _row_max(z, rows, n_rows)                                           # [R]
    gap = _noise_gap(noise, best)
    reach = torch.where(greedy, best, best - (gap + _MARGIN) - best.abs() * 1e-6)
    near = (z >= reach[rows]) & torch.isfinite(z)
    rows, cols, z = rows[near], cols[near], z[near]

    if noise is None:
        k1, k2 = reference.noise_keys(seeds, step)
        u = _uniform_from_m(_m_of(hash_i32(_as_int32(k1)[rows], _as_int32(k2)[rows], cols.to(torch.int32))))
    else:
        u = noise.float()[rows, cols]
    scores = torch.where(greedy[rows], z, z + _padded_gumbel(u))
    top = _row_max(scores, rows, n_rows)
    winner = torch.where(scores == top[rows], cols, vocab)
    tokens = torch.full((n_rows,), vocab, dtype=torch.int64, device=logits.device)
    tokens.scatter_reduce_(0, rows, winner, "amin")                            # ties: smallest id
    return torch.where(tokens == vocab, 0, tokens)                             # a row with no finite score: 0
