"""Fused guided sampling (CorrSynth, CFG, plain) from logits, in Triton.

Same tokens as ``divgen.kernels.reference`` (DESIGN.md, "The math"; the reference's docstring is
the contract, including its rules for non-finite input). Entry points: ``guided_sample_step``
(the capturable step on a ``SamplePlan``: device buffers only, no host sync) and
``guided_sample`` (direct callers: checks, then the step). Layout: derivation → kernels → host.

Derivation
----------
For a row m of a guidance group G(m) (rows that ``mix`` couples, see ``kernels/plan.py``), with
W the group's block of ``mix``:

    ℓ_n(v)  = l_n(v) − lse_n,   lse_n = max_n + log Σ_u exp(l_n(u) − max_n)     log_softmax
    s_m(v)  = Σ_{n ∈ G(m)} W[m, n] · g_{m,n}(v),  g = ℓ_n(v), or l_m(v) − lse_n where ℓ_n(v) = −inf (a mask)
    ŝ_m(v)  = s_m(v) + c_m = W·L + L_m ⊙ (W_off·Mk)                           (``_mix``)
    z_m(v)  = ŝ_m(v) · (1 / T_m)   if l_m(v) finite and l_m(v) ≥ max_m + log α_m,   else −inf
            and −inf where z_m(v) < max_u z_m(u) + log min_p_m                   (min-p, tempered)
    x_m     = argmax_v z'_m(v) + G_m(v)     (T_m < 1e-6: no G; z' = z after top-k / top-p)

ŝ is the reference's (``reference.guided_scores``): raw logits L (−inf read as 0) mixed, plus the
mask rule's term (Mk = [l = −inf], W_off = W off the diagonal), a constant c_m = Σ_n W[m, n] lse_n
per row away from s, so the same tokens, cuts and log-probs; a row without guidance
compares its raw logits.

1. Pass 1 (``_stats_kernel``, one program per (row, chunk)) keeps an online (max, Σ exp) per
   lane and reduces once; ``_row_stats_kernel`` combines the ≤ 64 chunk partials into lse [R]
   and the α threshold cut = max + log α [R].
2. A program owns a tile (up to M rows of one group) × a vocabulary chunk. Groups of ≤ 16 rows
   are one tile: one 2-D load reads the group's rows and W mixes them in registers (broadcast
   multiply-sum below 16 rows, an fp32 ``tl.dot`` at 16). Larger groups (up to 256) are split
   into M = 32-row tiles, each its own program, and the mixing loops over K = 32-row blocks of
   the group (load, clamp, ``tl.dot`` into an fp32 accumulator), so registers and shared memory
   do not grow with the group and a 256-row group spreads over 8 × chunks programs.
   Cost g·V multiply-adds per row; no R·R·V work.
3. Gumbel-max needs no softmax: the sample pass keeps a running (best score, smallest token id)
   per lane, reduced per (row, chunk) at the end; ``_select_kernel`` reduces the chunks (ties →
   smallest token id, as torch.argmax). The log-prob of the choice needs log Σ exp z', online in
   the same pass. Two exact shortcuts: a tile with no token in any row's α set is skipped after
   its load, and a tile whose max z + 16.64 (the largest Gumbel of 24-bit uniforms) cannot reach
   any row's best so far skips the noise.
4. top-k and top-p: K (top-k, then top-p over the top-k set) is a threshold set, upward closed
   in z (v ∈ K and z(u) ≥ z(v) ⇒ u ∈ K). So Gumbel-max over any S ⊇ K whose winner x lies in K
   is the reference's token (x beats every token of K), and a token surely outside K puts every
   token at or below its z outside K. Sample / verify rounds (SAMPLE_ROUNDS = 4, a fixed launch
   list) use both; each row carries a state (open, refining, bisect, settled) and a lower key
   bound lo (all of K has key > lo):
   a. sample pass over S = {key(z) > lo} (``_sample_kernel`` with CANDIDATE): per-chunk
      winners; only open rows.
   b. verify pass (``_verify_kernel``): each program first reduces its rows' chunk winners to
      the candidate x, its z (zx) and the row's max z (zmax) (chunk 0 stores the token), then
      per-lane sums, one reduction per chunk, of #{z > zx},
      #{z finite}, M(z > zx), M(all) and the count C(L) / mass M(L) of z ≥ L at 8 probe levels L
      (zx − 0, 1, 2, 4, 8 and zx + 1, 2, 4 nats; spread over its bracket for a refining row),
      with M the mass Σ e^(z − zmax) (every weight ≤ 1: no rescaling).
   c. decide (``_decide_rows``, computed by every program of the next launch for its own rows:
      the next round's sample pass, or the first counting pass after the last round): x ∈ K iff
      #{z > zx} < k and M(z > zx) < top_p · M_k, M_k the mass of the top-k set (= M(all) without
      top-k: exact). With both cuts M_k is bracketed from
      the probes: C(L) ≤ k ⇒ M_k ≥ M(L); C(L) ≥ k ⇒ every token below L is out, M_k ≤ M(L); else
      M_k ≤ M(L) + (k − C(L)) e^(L − zmax); and x in the top-k set gives M_k ≥ M(z ≥ zx)
      (level 0 is zx, ties included). x ∈ K for sure: settled (its token stays). x surely
      out (#{z > zx} ≥ k, or M(z > zx) ≥ top_p · upper bound): lo ≥ key(zx), and lo ≥ key(L) − 1
      for every level L with everything below it surely out; the row resamples next round.
      Neither (the bracket is too wide): the row refines, no new sample (same noise, same x),
      and the next verify probes 8 levels spread over its bracket of the top-k threshold
      ([highest level with C ≥ k, lowest with C ≤ k]).
   A program whose rows are all settled loops over nothing, so the rounds after acceptance cost
   launches only. Rows still open after the last round, and every row of a step that returns
   log-probs (the normaliser needs the whole of K), take the exact bisection: the int32 key of
   each threshold is pinned without sorting by 8 counting passes, each measuring 15 pivots at
   once (interval narrowed 16×; each pass starts by narrowing the previous pass's interval from
   its double-buffered partials, ``_narrow_rows``, so there is no narrowing launch): each token
   gets its bucket (how many pivots lie below its key:
   one subtract, shift and clamp) and adds its weight into a per-lane [M, BLOCK_V, 16]
   accumulator, reduced once per chunk (mass with an online max, rescaled only when a row's max
   grows); settled rows are skipped there too, and a final sample over key ≥ both thresholds
   serves the bisected rows. Exactness never depends on the rounds: a row settles only when
   x ∈ K is proven, otherwise the bisection decides.
5. Noise: u = (2·(h >> 9) + 1) / 2^24 with h = fmix32(fmix32(v ^ k1) ^ k2), in uint32; the row
   keys (k1, k2) = f(seed, step) are computed in the kernel from the device-side seeds and per-row
   step counters, so the bits equal ``reference.uniform_noise`` and a replayed CUDA graph draws
   fresh noise at every step.

Launches (``launch_count``), a fixed list per plan: a plain step 3 (stats, sample, select; the
sample pass combines the stats itself, ``_combine_stats``, when its tiles are whole groups, i.e.
groups of ≤ 16 rows; 4 with larger groups, whose mixing reads other tiles' rows' lse). With
``any_top_k_top_p``: stats + 4 rounds · 2 (sample, verify) + 2 · 8 counting passes + final
sample + select = 27 (28 with groups > 16 rows; 20 with log-probs, which skip the rounds and
keep the row-stats launch), against 52 before the fusions below (20 before the rounds). Most of
them, once rows settle, run programs that read their rows' state and exit (a fixed cost, ~1–2 µs
each in a CUDA graph, not measured without a GPU); a few elementwise torch ops set up the per-row
parameters and buffers. No launch has a reduction of its own: a round's candidate is reduced by
the verify programs (``_pick_candidate``), its decision by the next launch's programs
(``_decide_rows``), each narrowing by the next counting pass's (``_narrow_rows``), the stats by
the first sample pass's (``_combine_stats``), every program for its own rows from the same
partials in the same order (identical results; chunk 0 stores them). Per-round state buffers
keep any launch from reading what it writes. The price: each program re-reads its rows'
partials from L2 (≤ M · 64 chunks · 24 floats, masked to live rows).
The passes' instruction costs, the measured distribution of rounds and why 4 rounds of 15
pivots are in kernels/README.md ("Passes, rounds and launches").
Nothing reads back to the host, so the step can be captured in a CUDA graph.

Compiled figures (sm_90 / sm_80 registers, spills, shared memory, instructions per logit) are
measured by ``tests/test_kernels_compile.py``; see ``kernels/README.md``.

Equality with the reference: with the same noise the tokens are those of the reference except
where two scores lie within float rounding (~1e-6 relative) of each other: s is summed in another
order, 1/T multiplies instead of dividing, and the GPU's log differs from torch's in the last bit;
likewise a top-p mass within rounding of top_p · total (summed in another order) may fall either way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

from divgen.kernels.plan import MAX_GROUP_ROWS, SamplePlan, build_sample_plan, next_power_of_2
from divgen.kernels.reference import (
    check_guided_sample_args, sampling_temperature, step_tensor,
)

NUM_PIVOTS = 16            # measure columns per counting pass: 0 = total, 1..15 = pivots
PIVOT_BITS = 4             # log2(NUM_PIVOTS)
THRESHOLD_PASSES = 8       # 32 key bits / PIVOT_BITS bits per pass
SAMPLE_ROUNDS = 4          # sample / verify rounds before the exact bisection (module docstring)
STATE_OPEN, STATE_REFINE, STATE_BISECT, STATE_ACCEPTED = 0, 1, 2, 3   # per-row state (module docstring)
KEY_BELOW_ALL = -(2**31) - 1   # an int64 below every int32 key: the bisection's first lower end
KEY_FLOOR: tl.constexpr = tl.constexpr(-(2**31) - 1)   # the same, inside kernels
REFINE_FLOOR_NATS: tl.constexpr = tl.constexpr(32.0)   # refine bracket's depth when no level has C ≥ k
NUM_LEVELS = 8             # probe levels of the verify pass (``_probe_levels``)
GUMBEL_MAX = 17.0              # > −log(−log(1 − 2^-24)) = 16.64, the largest Gumbel of the noise
MAX_CHUNKS = 64            # vocabulary chunks per row (later kernels combine them in one tile)
# Rows per program (M) and contracted rows per mixing step (K): a group of up to 16 rows is one
# tile (M = K = group block); larger groups are split into M-row blocks, each its own program,
# and the mixing loops over K-row blocks of the group (tl.dot, fp32 "ieee"), so neither registers
# nor shared memory grow with the group: G = 256 runs as 8 programs a chunk, each 8 K steps.
CUDA_ROW_BLOCK = 32
CUDA_K_BLOCK = 32
SINGLE_TILE_MAX = 16
# (BLOCK_V, num_warps) by rows per program on a GPU (tests/test_kernels_compile.py checks every
# entry for registers, spills and shared memory on sm_90 and sm_80).
CUDA_TILES = {1: (2048, 8), 2: (1024, 8), 4: (512, 8), 8: (256, 8), 16: (128, 8), 32: (32, 8)}
CUDA_STATS_BLOCK_V = 2048
CPU_TILE_ELEMS = 1024      # M · BLOCK_V under TRITON_INTERPRET=1 (the interpreter is per-op)
CPU_ROW_BLOCK = 64


# ----------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fmix32(h):
    """murmur3's finaliser on uint32: shifts are logical, products wrap modulo 2^32."""
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    h = h ^ (h >> 16)
    return h


@triton.jit
def _noise_keys(seed, step):
    """int64 seeds and step counters -> the uint32 row keys (k1, k2) of ``reference.noise_keys``."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    s = (step & 0xFFFFFFFF).to(tl.uint32)
    k1 = _fmix32(lo ^ _fmix32(s * 0x9E3779B9 + hi))
    k2 = _fmix32((k1 + 0x9E3779B9) ^ hi)
    return k1, k2


@triton.jit
def _uniform(key1, key2, token):
    """uint32 row keys and token ids -> the uniforms of ``reference.uniform_noise``, fp32."""
    h = _fmix32(_fmix32(token ^ key1) ^ key2)
    return ((h >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _ordered_key(z):
    """fp32 -> int32 with the same order (−0.0 first made +0.0 so that equal values share a key)."""
    z = tl.where(z == 0.0, 0.0, z)
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _load_logits(logits_ptr, row_offsets, row_mask, cols, col_mask):
    """Logits [rows, BLOCK_V] fp32, −inf where masked, +inf read as LOGIT_MAX = 65504 (reference)."""
    x = tl.load(logits_ptr + row_offsets[:, None] + cols[None, :],
                mask=row_mask[:, None] & col_mask[None, :], other=float("-inf")).to(tl.float32)
    return tl.minimum(x, 65504.0)


@triton.jit
def _tile_rows(tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile,
               M_BLOCK: tl.constexpr):
    """The output rows of a tile: (positions in the group [M], their mask, row ids, group start,
    group size, the group's weight offset)."""
    group = tl.load(tile_group_ptr + tile)
    row0 = tl.load(tile_row0_ptr + tile)
    start = tl.load(group_start_ptr + group)
    size = tl.load(group_start_ptr + group + 1) - start
    pos = row0 + tl.arange(0, M_BLOCK)
    pos_mask = pos < size
    rows = tl.load(order_ptr + start + pos, mask=pos_mask, other=0)
    w_off = tl.load(w_offset_ptr + group)
    return pos, pos_mask, rows, start, size, w_off


@triton.jit
def _mask_terms(s, own, lse_own, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                logits_ptr, stride_logits, cols, col_mask):
    """s + the mask rule's term: Σ_{n ≠ m, l_n(v) = −inf} W[m, n] · L_m(v) (row n read as agreeing
    with row m on v; lse_own and lse_ptr are unused, kept for the call sites' shape).

    One contrasting row at a time (its logits re-read from L1/L2, its column of W), so only
    [M, BLOCK_V] values stay live; it runs only for a tile where some row of the group is masked."""
    for n in range(0, size):
        row_n = tl.load(order_ptr + start + n)
        xn = tl.load(logits_ptr + row_n.to(tl.int64) * stride_logits + cols, mask=col_mask, other=0.0)
        masked_n = (xn.to(tl.float32) == float("-inf")) & col_mask                  # [BLOCK_V]
        w_n = tl.load(weights_ptr + w_off + pos * size + n, mask=pos_mask & (pos != n), other=0.0)   # [M]
        s += tl.where(masked_n[None, :], w_n[:, None] * own, 0.0)
    return s


@triton.jit
def _mix(x_own, lse_own, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
         logits_ptr, stride_logits, cols, col_mask,
         M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
         MASKS: tl.constexpr):
    """Guided scores ŝ [M, BLOCK_V] over the group's rows at ``cols`` (``reference.guided_scores``):

        ŝ = W · L + L_own ⊙ (W_off · Mk)

    L = the logits, −inf read as 0; Mk = [logit = −inf] (a mask: that row is read as agreeing
    with the own row there); W_off = W off the diagonal. Not log-probs: a row without
    guidance compares its own logits exactly. The mask terms (``_mask_terms``) are compiled in
    only with MASKS (a plan's ``masks``: contrasting rows may hold −inf) and run only for a tile
    where a row of the group has a −inf logit.

    G_BLOCK = 1: a scale. One tile (M = K = G_BLOCK ≤ 16): the tile's own rows are the whole group,
    mixed by a broadcast multiply-sum (< 16 rows) or one tl.dot. Larger groups: a loop over K-row
    blocks of the group, each loaded and multiplied into an fp32 accumulator (tl.dot, "ieee").
    """
    own = tl.where(x_own > float("-inf"), x_own, 0.0)                       # [M, BLOCK_V] L_own
    if G_BLOCK == 1:
        w = tl.load(weights_ptr + w_off)
        s = w * own
    else:
        if M_BLOCK == G_BLOCK:
            w = tl.load(weights_ptr + w_off + pos[:, None] * size + pos[None, :],
                        mask=pos_mask[:, None] & pos_mask[None, :], other=0.0)          # [G, G]
            if G_BLOCK >= 16:
                s = tl.dot(w, own, input_precision="ieee")
            else:
                s = tl.sum(w[:, :, None] * own[None, :, :], axis=1)
            if MASKS:
                masks = tl.max((pos_mask[:, None] & col_mask[None, :] & (x_own == float("-inf"))).to(tl.int32))
        else:
            s = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
            masks = tl.zeros([], dtype=tl.int32)
            for k0 in range(0, size, K_BLOCK):
                kpos = k0 + tl.arange(0, K_BLOCK)
                kmask = kpos < size
                krows = tl.load(order_ptr + start + kpos, mask=kmask, other=0)
                xk = _load_logits(logits_ptr, krows.to(tl.int64) * stride_logits, kmask, cols, col_mask)
                w = tl.load(weights_ptr + w_off + pos[:, None] * size + kpos[None, :],
                            mask=pos_mask[:, None] & kmask[None, :], other=0.0)         # [M, K]
                s = tl.dot(w, tl.where(xk > float("-inf"), xk, 0.0), s, input_precision="ieee")
                if MASKS:
                    masks = tl.maximum(masks, tl.max((kmask[:, None] & col_mask[None, :]
                                                      & (xk == float("-inf"))).to(tl.int32)))
        if MASKS and masks > 0:
            s = _mask_terms(s, own, lse_own, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                            logits_ptr, stride_logits, cols, col_mask)
    return s


# ----------------------------------------------------------------------------------------------
# Kernels. Tile kernels run on the grid (tiles, vocabulary chunks); a tile is M_BLOCK rows of
# one guidance group (the plan's tile list).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _stats_kernel(
    logits_ptr, stride_logits,
    part_max_ptr, part_sum_ptr,                                   # out: [R, num_chunks] fp32
    vocab, chunk_len, num_chunks,
    BLOCK_V: tl.constexpr,
):
    """Pass 1, per (row, chunk): max logit and Σ exp(l − max), online over the chunk's tiles."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_logits
    run_max = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    for start in range(v_begin, v_end, BLOCK_V):       # per-lane online (max, sum): no reduction
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < v_end, other=float("-inf")).to(tl.float32)
        x = tl.minimum(x, 65504.0)                   # reference.LOGIT_MAX
        new_max = tl.maximum(run_max, x)
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - ref) + tl.exp(x - ref)
        run_max = new_max
    top = tl.max(run_max, axis=0)
    ref = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(run_sum * tl.exp(run_max - ref), axis=0)
    tl.store(part_max_ptr + row * num_chunks + chunk, top)
    tl.store(part_sum_ptr + row * num_chunks + chunk, total)


@triton.jit
def _row_stats_kernel(
    part_max_ptr, part_sum_ptr, cutoff_ptr,
    lse_ptr, cut_ptr,                                             # out: [R] fp32
    rows_total, num_chunks,
    BLOCK_R: tl.constexpr, C_BLOCK: tl.constexpr,
):
    """Combine the chunk partials: lse = max + log Σ, cut = max + log α (the α threshold).

    A row with no finite logit (a slot not in use) gets lse 0: its logits stay −inf, masked
    everywhere when mixed (the reference's rule), never NaN."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, C_BLOCK)
    rmask = r < rows_total
    mask = rmask[:, None] & (c < num_chunks)[None, :]
    offs = r[:, None] * num_chunks + c[None, :]
    pmax = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
    psum = tl.load(part_sum_ptr + offs, mask=mask, other=0.0)
    row_max = tl.max(pmax, axis=1)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(psum * tl.exp(pmax - ref[:, None]), axis=1)
    lse = tl.where(row_max == float("-inf"), 0.0, ref + tl.log(tl.where(total > 0, total, 1.0)))
    tl.store(lse_ptr + r, lse, mask=rmask)
    tl.store(cut_ptr + r, row_max + tl.load(cutoff_ptr + r, mask=rmask, other=0.0), mask=rmask)


@triton.jit
def _combine_stats(rows, valid, part_max_ptr, part_sum_ptr, cutoff_ptr, num_chunks, C_BLOCK: tl.constexpr):
    """``_row_stats_kernel``'s combine (the same ops) for the rows of a program: (lse, cut)."""
    c = tl.arange(0, C_BLOCK)
    mask = valid[:, None] & (c < num_chunks)[None, :]
    offs = rows[:, None] * num_chunks + c[None, :]
    pmax = tl.load(part_max_ptr + offs, mask=mask, other=float("-inf"))
    psum = tl.load(part_sum_ptr + offs, mask=mask, other=0.0)
    row_max = tl.max(pmax, axis=1)
    ref = tl.where(row_max == float("-inf"), 0.0, row_max)
    total = tl.sum(psum * tl.exp(pmax - ref[:, None]), axis=1)
    lse = tl.where(row_max == float("-inf"), 0.0, ref + tl.log(tl.where(total > 0, total, 1.0)))
    return lse, row_max + tl.load(cutoff_ptr + rows, mask=valid, other=0.0)


@triton.jit
def _narrow_rows(rows, slots, live, measure_ptr, measure_max_ptr, lo_prev, shift, num_chunks, vocab,
                 top_k_ptr, top_p_ptr,
                 M_BLOCK: tl.constexpr, NUM_PIVOTS: tl.constexpr, MASS: tl.constexpr):
    """The narrowing after a counting pass, for the rows ``live`` of a program (partials at their
    tile slots, ``slots`` = tile · M + position): with F(pivot j) the
    measure above pivot j (chunk partials summed in chunk order), lo = lo_prev + 2^shift ·
    #{j ≥ 1 : F(j) ≥ bound}, bound = k (top-k) or top_p · total mass (top-p), ∞ without the cut.

    F is non-increasing in j (sums of the same terms, fewer of them), so this moves lo to the last
    pivot that still fails "F < bound": the threshold stays in (lo, lo + 2^shift]. Every program
    of the next launch computes it for its own rows from the same partials in the same order (the
    same result everywhere: no narrowing launch)."""
    j = tl.arange(0, NUM_PIVOTS)
    mask = live[:, None] & (j < NUM_PIVOTS)[None, :]
    above = tl.zeros([M_BLOCK, NUM_PIVOTS], dtype=tl.float32)
    if MASS:
        top = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
        for c in range(0, num_chunks):
            top = tl.maximum(top, tl.load(measure_max_ptr + slots * num_chunks + c, mask=live,
                                          other=float("-inf")))
        ref = tl.where(top == float("-inf"), 0.0, top)
        for c in range(0, num_chunks):
            cmax = tl.load(measure_max_ptr + slots * num_chunks + c, mask=live, other=float("-inf"))
            meas = tl.load(measure_ptr + (slots * num_chunks + c)[:, None] * NUM_PIVOTS + j[None, :],
                           mask=mask, other=0.0)
            above += meas * tl.exp(cmax - ref)[:, None]
        top_p = tl.load(top_p_ptr + rows, mask=live, other=1.0)
        total = tl.sum(tl.where(j[None, :] == 0, above, 0.0), axis=1)
        bound = tl.where(top_p < 1.0, top_p * total, float("inf"))
    else:
        for c in range(0, num_chunks):
            above += tl.load(measure_ptr + (slots * num_chunks + c)[:, None] * NUM_PIVOTS + j[None, :],
                             mask=mask, other=0.0)
        top_k = tl.load(top_k_ptr + rows, mask=live, other=0)
        bound = tl.where(top_k > 0, tl.minimum(top_k, vocab).to(tl.float32), float("inf"))
    fails = tl.sum(tl.where((j[None, :] > 0) & (above >= bound[:, None]), 1, 0), axis=1)
    return lo_prev + (fails.to(tl.int64) << shift)


@triton.jit(do_not_specialize=["pivot_shift", "prev_shift"])
def _threshold_count_kernel(
    logits_ptr, stride_logits,
    plan,                  # (tile_group, tile_row0, order, group_start, w_offset, weights): ``_tile_rows``
    row_params,            # (lse, cut, inv_t, zcut) [R] fp32
    cuts,                  # (top_k [R] i64, top_p [R] fp32)
    lo_top_k_ptr,          # [R] i64: the top-k threshold's lo (APPLY_TOP_K; out with FINISH_TOP_K)
    lo_prev_ptr, lo_ptr,   # [R] i64: lo of the previous counting pass (in), of this one (out)
    pivot_shift, prev_shift,
    state_ptr,             # [R] i32
    measure_in,            # the previous pass's (measure [T·M, num_chunks, NUM_PIVOTS], max [T·M, num_chunks])
    measure_out,           # out: this pass's
    decide,                # DECIDE: (part, cand_z, cand_z_max, lo_r, rounds, center, spacing, state_out); else None
    vocab, chunk_len, num_chunks,
    M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
    NUM_PIVOTS: tl.constexpr, MASS: tl.constexpr, APPLY_TOP_K: tl.constexpr, FIRST: tl.constexpr,
    DECIDE: tl.constexpr, FINISH_TOP_K: tl.constexpr, NUM_LEVELS: tl.constexpr, MASKS: tl.constexpr,
):
    """A counting pass of the threshold bisection, per (tile row, chunk).

    The pass's lo comes first: KEY_FLOOR for the FIRST pass of a threshold, else the narrowing of
    the previous pass (``_narrow_rows``) from its partials (double-buffered: this pass writes the
    other buffer); chunk 0 stores it for the next pass. DECIDE (the first pass after the rounds):
    the last round's decision (``_decide_rows``) first, chunk 0 storing the final states.
    FINISH_TOP_K (the first top-p pass): the top-k threshold's last narrowing, stored at
    lo_top_k. Rows settled by a round (state ≥ STATE_ACCEPTED) are skipped; a program with none
    left loops over nothing.

    Pivot j of row r is lo[r] + j · 2^pivot_shift. Column 0 measures every token, column j the
    tokens whose key is > pivot j. MASS: the measure is Σ exp(z − chunk max) over z after the
    top-k cut (top-p), with the chunk max written beside it; otherwise it is a count (top-k).
    Only finite z are measured; a tile with no token in any row's α set is skipped after its
    load. Per-lane accumulation: each token's bucket b = #{pivots j ≥ 1 below its key} (one
    shift and clamp), and its weight is added into a [M, BLOCK_V, NUM_PIVOTS] accumulator at the
    columns j ≤ b; the lanes are reduced once per chunk, not once per pivot and tile.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, weights_ptr = plan
    lse_ptr, cut_ptr, inv_t_ptr, zcut_ptr = row_params
    top_k_ptr, top_p_ptr = cuts
    measure_in_ptr, measure_max_in_ptr = measure_in
    measure_ptr, measure_max_ptr = measure_out
    pos, pos_mask, rows, start, size, w_off = _tile_rows(
        tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile, M_BLOCK)
    writer = pos_mask & ((pos * 0 + chunk) == 0)   # chunk 0 stores the per-row results (a tensor:
    # the interpreter cannot mask with "tensor & scalar")
    if DECIDE:
        part_ptr, cand_z_ptr, cand_z_max_ptr, lo_r_ptr, rounds_ptr, center_ptr, spacing_ptr, state_out_ptr = decide
        state_prev = tl.load(state_ptr + rows, mask=pos_mask, other=3)
        state, lo_r, center, spacing, live = _decide_rows(
            rows, pos_mask, state_prev, part_ptr, top_k_ptr, top_p_ptr, cand_z_ptr, cand_z_max_ptr,
            lo_r_ptr, center_ptr, spacing_ptr, vocab, num_chunks, M_BLOCK, NUM_LEVELS, True)
        tl.store(state_out_ptr + rows, state, mask=writer)
        tl.store(rounds_ptr + rows, tl.load(rounds_ptr + rows, mask=writer & live, other=0) + 1,
                 mask=writer & live)
    else:
        state = tl.load(state_ptr + rows, mask=pos_mask, other=3)
    active = pos_mask & (state < 3)                              # STATE_BISECT rows (or open: log-probs)
    slots = tile * M_BLOCK + tl.arange(0, M_BLOCK)               # the tile's partials (``_narrow_rows``)
    if FIRST:
        lo = tl.full([M_BLOCK], KEY_FLOOR, dtype=tl.int64)
    else:
        lo = _narrow_rows(rows, slots, active, measure_in_ptr, measure_max_in_ptr,
                          tl.load(lo_prev_ptr + rows, mask=active, other=0), prev_shift, num_chunks, vocab,
                          top_k_ptr, top_p_ptr, M_BLOCK, NUM_PIVOTS, MASS)
    tl.store(lo_ptr + rows, lo, mask=writer & active)
    row_offsets = rows.to(tl.int64) * stride_logits
    lse = tl.load(lse_ptr + rows, mask=pos_mask, other=0.0)
    cut = tl.load(cut_ptr + rows, mask=pos_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr + rows, mask=pos_mask, other=1.0)
    zcut = tl.load(zcut_ptr + rows, mask=pos_mask, other=float("-inf"))     # min-p threshold on z
    if APPLY_TOP_K:
        if FINISH_TOP_K:
            lo_k = _narrow_rows(rows, slots, active, measure_in_ptr, measure_max_in_ptr,
                                tl.load(lo_prev_ptr + rows, mask=active, other=0), 0, num_chunks, vocab,
                                top_k_ptr, top_p_ptr, M_BLOCK, NUM_PIVOTS, False)
            tl.store(lo_top_k_ptr + rows, lo_k, mask=writer & active)
        else:
            lo_k = tl.load(lo_top_k_ptr + rows, mask=pos_mask, other=0)
        key_top_k = lo_k + 1
    j = tl.arange(0, NUM_PIVOTS)
    acc = tl.zeros([M_BLOCK, BLOCK_V, NUM_PIVOTS], dtype=tl.float32)
    run_max = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, v_end, v_begin)   # all settled: no loop
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_logits(logits_ptr, row_offsets, pos_mask, cols, col_mask)
        keep = (x > float("-inf")) & (x >= cut[:, None])
        if tl.max(keep.to(tl.int32)) > 0:
            s = _mix(x, lse, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                     logits_ptr, stride_logits, cols, col_mask, M_BLOCK, K_BLOCK, G_BLOCK, BLOCK_V, MASKS)
            z = tl.where(keep, s * inv_t[:, None], float("-inf"))
            z = tl.where(z >= zcut[:, None], z, float("-inf"))          # min-p (−inf: off)
            key = _ordered_key(z).to(tl.int64)
            if APPLY_TOP_K:
                z = tl.where(key >= key_top_k[:, None], z, float("-inf"))
                key = _ordered_key(z).to(tl.int64)
            if MASS:
                new_max = tl.maximum(run_max, tl.max(z, axis=1))
                if tl.max((new_max > run_max).to(tl.int32)) > 0:          # rare after a few tiles
                    scale = tl.exp(run_max - tl.where(new_max == float("-inf"), 0.0, new_max))
                    acc = acc * scale[:, None, None]
                    run_max = new_max
                ref = tl.where(run_max == float("-inf"), 0.0, run_max)
                w = tl.exp(z - ref[:, None])                                 # 0 where z = −inf
            else:
                w = tl.where(z > float("-inf"), 1.0, 0.0)
            # key > pivot j  <=>  (key − lo − 1) >> shift >= j; column 0 (j = 0) takes every token
            bucket = tl.minimum(tl.maximum((key - lo[:, None] - 1) >> pivot_shift, 0), NUM_PIVOTS - 1)
            acc += tl.where(j[None, None, :] <= bucket.to(tl.int32)[:, :, None], w[:, :, None], 0.0)
    measure = tl.sum(acc, axis=1)                                           # [M, NUM_PIVOTS]
    # partials by tile slot (tile · M + position), not by row: nothing of the rows stays live
    # over the loop for the stores (it spilled), and padding slots hold zeros
    tl.store(measure_ptr + (slots[:, None] * num_chunks + chunk) * NUM_PIVOTS + j[None, :], measure)
    if MASS:
        tl.store(measure_max_ptr + slots * num_chunks + chunk, run_max)


@triton.jit
def _probe_levels(zx, refine, center, spacing, NUM_LEVELS: tl.constexpr):
    """The verify pass's probe levels [R, NUM_LEVELS]. Level 0 is zx. An open row: zx − depth,
    depths 1, 2, 4, 8 below the candidate's z and 1, 2, 4 above it (nats of z); a refining row:
    center − (j − 1) · spacing, j = 1..7 (its bracket of the top-k threshold). The same fp32 ops
    wherever they are computed."""
    j = tl.arange(0, NUM_LEVELS)
    depth = tl.where(j == 0, 0.0, tl.where(j <= 4, tl.exp2((j - 1).to(tl.float32)),
                                            -tl.exp2((j - 5).to(tl.float32))))
    levels = tl.where(refine[:, None] & (j > 0)[None, :],
                      center[:, None] - spacing[:, None] * (j - 1).to(tl.float32)[None, :],
                      zx[:, None] - depth[None, :])
    return tl.maximum(levels, -3.4028234663852886e38)     # finite: a −inf z is below every level


@triton.jit
def _pick_candidate(rows, live, best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, vocab, num_chunks,
                    C_BLOCK: tl.constexpr):
    """A round's candidate of each live row from the sample pass's chunk winners (as
    ``_select_kernel``: max score, ties → smallest token id, none → token 0): (token, its z, the
    row's max z)."""
    c = tl.arange(0, C_BLOCK)
    mask = live[:, None] & (c < num_chunks)[None, :]
    offs = rows[:, None] * num_chunks + c[None, :]
    score = tl.load(best_score_ptr + offs, mask=mask, other=float("-inf"))
    token = tl.load(best_token_ptr + offs, mask=mask, other=vocab)
    top = tl.max(score, axis=1)
    is_top = score == top[:, None]
    chosen = tl.min(tl.where(is_top, token, vocab), axis=1)
    chosen = tl.where(chosen >= vocab, 0, chosen)
    zx = tl.max(tl.where(is_top & (token == chosen[:, None]),
                         tl.load(best_z_ptr + offs, mask=mask, other=float("-inf")), float("-inf")), axis=1)
    zmax = tl.max(tl.load(z_max_ptr + offs, mask=mask, other=float("-inf")), axis=1)
    return chosen, zx, zmax


@triton.jit
def _verify_kernel(
    logits_ptr, stride_logits,
    plan,                  # (tile_group, tile_row0, order, group_start, w_offset, weights): ``_tile_rows``
    row_params,            # (lse, cut, inv_t, zcut) [R] fp32
    cuts,                  # (top_k [R] i64, top_p [R] fp32)
    state_ptr,
    winners,               # the round's sample partials (best_score, best_token, best_z, z_max) [R, num_chunks]
    tokens_ptr,            # out (chunk 0): [R] i64
    candidate,             # out (chunk 0): (cand_z, cand_z_max) [R] fp32
    bracket,               # (center, spacing) [R] fp32: a refining row's probe levels
    part_ptr,              # out: [R, num_chunks, 3, NUM_LEVELS] fp32
    vocab, chunk_len, num_chunks,
    M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
    NUM_LEVELS: tl.constexpr, C_BLOCK: tl.constexpr, MASKS: tl.constexpr,
):
    """Measure a round's candidate x (z = zx) per (tile row, chunk), weights e^(z − zmax) ≤ 1
    (zmax the row's max z: no rescaling): plane 0 / 1 = count / mass of z ≥ level_j at the probe
    levels (``_probe_levels``), plane 2 = #{z > zx}, #{z finite}, M(z > zx), M(all). Float
    comparison of z is the order of the int32 keys (−0 = +0). Per-lane sums, reduced once per
    chunk; rows settled (state ≥ 2) or with neither cut are skipped (a program with none left
    loops over nothing).

    The candidate comes first (no select launch): every program reduces its rows' chunk winners
    (``_pick_candidate``); chunk 0 stores the token of each row sampled this round (state 0, also
    rows without a cut: their token is final) and (zx, zmax) for the next launch's decision."""
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, weights_ptr = plan
    lse_ptr, cut_ptr, inv_t_ptr, zcut_ptr = row_params
    top_k_ptr, top_p_ptr = cuts
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr = winners
    cand_z_ptr, cand_z_max_ptr = candidate
    center_ptr, spacing_ptr = bracket
    pos, pos_mask, rows, start, size, w_off = _tile_rows(
        tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile, M_BLOCK)
    state = tl.load(state_ptr + rows, mask=pos_mask, other=2)
    live = pos_mask & (state <= 1)                                    # open or refining
    chosen, zx, zmax = _pick_candidate(rows, live, best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr,
                                       vocab, num_chunks, C_BLOCK)
    writer = live & ((pos * 0 + chunk) == 0)
    tl.store(tokens_ptr + rows, chosen.to(tl.int64), mask=writer & (state == 0))
    tl.store(cand_z_ptr + rows, zx, mask=writer)
    tl.store(cand_z_max_ptr + rows, zmax, mask=writer)
    row_offsets = rows.to(tl.int64) * stride_logits
    lse = tl.load(lse_ptr + rows, mask=pos_mask, other=0.0)
    cut = tl.load(cut_ptr + rows, mask=pos_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr + rows, mask=pos_mask, other=1.0)
    zcut = tl.load(zcut_ptr + rows, mask=pos_mask, other=float("-inf"))     # min-p threshold on z
    needs = (tl.load(top_k_ptr + rows, mask=pos_mask, other=0) > 0) | \
        (tl.load(top_p_ptr + rows, mask=pos_mask, other=1.0) < 1.0)
    active = live & needs
    ref = tl.where(zmax == float("-inf"), 0.0, zmax)
    levels = _probe_levels(zx, state == 1, tl.load(center_ptr + rows, mask=pos_mask, other=0.0),
                           tl.load(spacing_ptr + rows, mask=pos_mask, other=0.0), NUM_LEVELS)   # [M, L]
    cnt_lv = tl.zeros([M_BLOCK, BLOCK_V, NUM_LEVELS], dtype=tl.float32)
    mass_lv = tl.zeros([M_BLOCK, BLOCK_V, NUM_LEVELS], dtype=tl.float32)
    cnt_gt = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    cnt_all = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    mass_gt = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    mass_all = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, v_end, v_begin)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_logits(logits_ptr, row_offsets, pos_mask, cols, col_mask)
        keep = (x > float("-inf")) & (x >= cut[:, None])
        if tl.max(keep.to(tl.int32)) > 0:
            s = _mix(x, lse, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                     logits_ptr, stride_logits, cols, col_mask, M_BLOCK, K_BLOCK, G_BLOCK, BLOCK_V, MASKS)
            z = tl.where(keep, s * inv_t[:, None], float("-inf"))
            z = tl.where(z >= zcut[:, None], z, float("-inf"))          # min-p (−inf: off)
            finite = (z > float("-inf")).to(tl.float32)
            w = tl.exp(z - ref[:, None])                      # 0 where z = −inf
            gt = (z > zx[:, None]).to(tl.float32)
            cnt_gt += gt
            cnt_all += finite
            mass_gt += gt * w
            mass_all += w
            ge = (z[:, :, None] >= levels[:, None, :]).to(tl.float32)   # 0/1: sums by fma
            cnt_lv += ge
            mass_lv += ge * w[:, :, None]
    j = tl.arange(0, NUM_LEVELS)
    out = ((rows * num_chunks + chunk) * 3)[:, None] * NUM_LEVELS + j[None, :]          # [M, L]
    amask = active[:, None] & (j[None, :] < NUM_LEVELS)
    tl.store(part_ptr + out, tl.sum(cnt_lv, axis=1), mask=amask)
    tl.store(part_ptr + out + NUM_LEVELS, tl.sum(mass_lv, axis=1), mask=amask)
    scal = tl.where(j[None, :] == 0, tl.sum(cnt_gt, axis=1)[:, None],
                    tl.where(j[None, :] == 1, tl.sum(cnt_all, axis=1)[:, None],
                             tl.where(j[None, :] == 2, tl.sum(mass_gt, axis=1)[:, None],
                                      tl.sum(mass_all, axis=1)[:, None])))
    tl.store(part_ptr + out + 2 * NUM_LEVELS, scal, mask=amask & (j[None, :] < 4))


@triton.jit
def _decide_rows(
    rows, valid, state, part_ptr, top_k_ptr, top_p_ptr, cand_z_ptr, cand_z_max_ptr,
    lo_ptr, center_ptr, spacing_ptr, vocab, num_chunks,
    M_BLOCK: tl.constexpr, NUM_LEVELS: tl.constexpr, LAST: tl.constexpr,
):
    """Accept or reject each live row's candidate x (valid, state ≤ 1) from the verify sums of
    the last round; returns (state, lo, center, spacing, live) for the rows, unchanged where not
    live. Computed by every program of the launch after the verify pass (the next round's sample
    pass, or the first counting pass after the last round), the same for all.

    x ∈ K iff #{z > zx} < k and (top-p) M(z > zx) < top_p · M_k, M_k the mass of the top-k set
    (M(all) without top-k). With top-k, M_k is bracketed from the probes (count C, mass M of
    z ≥ L): C(L) ≤ k puts every such token in the top-k set (M_k ≥ M(L)); C(L) ≥ k puts every
    token below L out (M_k ≤ M(L)); else at most k − C(L) tokens below L are in, each of weight
    ≤ e^(L − zmax) (M_k ≤ M(L) + (k − C(L)) e^(L − zmax)); x in the top-k set puts every z ≥ zx
    in it (M_k ≥ M(z ≥ zx), level 0). Accept (state 3, the token stays) when
    x ∈ K for sure. Every level known to have all tokens below it outside K (C(L) ≥ k, or
    M(L) ≥ top_p · M_k upper bound) raises lo to key(L) − 1, and x itself when surely outside
    (lo ≥ key(zx)); the row stays open (state 0, a new sample). An ambiguous row refines (state
    1: no new sample, the next verify probes 8 levels spread over its bracket of the top-k
    threshold, [highest level with C ≥ k, lowest with C ≤ k]). LAST: rows not accepted go to the
    exact bisection (state 2). Rows with neither cut are accepted.
    """
    j = tl.arange(0, NUM_LEVELS)
    rmask = valid & (state <= 1)
    mask = rmask[:, None] & (j < NUM_LEVELS)[None, :]
    cnt_lv = tl.zeros([M_BLOCK, NUM_LEVELS], dtype=tl.float32)
    mass_lv = tl.zeros([M_BLOCK, NUM_LEVELS], dtype=tl.float32)
    scal = tl.zeros([M_BLOCK, NUM_LEVELS], dtype=tl.float32)
    for c in range(0, num_chunks):          # chunk partials, one [M, L] block at a time
        base = ((rows * num_chunks + c) * 3)[:, None] * NUM_LEVELS + j[None, :]
        cnt_lv += tl.load(part_ptr + base, mask=mask, other=0.0)
        mass_lv += tl.load(part_ptr + base + NUM_LEVELS, mask=mask, other=0.0)
        scal += tl.load(part_ptr + base + 2 * NUM_LEVELS, mask=mask & (j < 4)[None, :], other=0.0)
    cnt_gt = tl.sum(tl.where(j[None, :] == 0, scal, 0.0), axis=1)
    cnt_all = tl.sum(tl.where(j[None, :] == 1, scal, 0.0), axis=1)
    mass_gt = tl.sum(tl.where(j[None, :] == 2, scal, 0.0), axis=1)
    mass_all = tl.sum(tl.where(j[None, :] == 3, scal, 0.0), axis=1)
    top_k = tl.load(top_k_ptr + rows, mask=rmask, other=0)
    top_p = tl.load(top_p_ptr + rows, mask=rmask, other=1.0)
    has_k = top_k > 0
    has_p = top_p < 1.0
    k = tl.minimum(top_k, vocab).to(tl.float32)
    zx = tl.load(cand_z_ptr + rows, mask=rmask, other=0.0)
    zmax = tl.load(cand_z_max_ptr + rows, mask=rmask, other=0.0)
    center_old = tl.load(center_ptr + rows, mask=valid, other=0.0)
    spacing_old = tl.load(spacing_ptr + rows, mask=valid, other=0.0)
    levels = _probe_levels(zx, state == 1, center_old, spacing_old, NUM_LEVELS)
    w_level = tl.exp(levels - tl.where(zmax == float("-inf"), 0.0, zmax)[:, None])
    in_k = (cnt_gt < k) | (~has_k)
    m_lo = tl.maximum(tl.where(cnt_all <= k, mass_all, 0.0),
                      tl.max(tl.where(cnt_lv <= k[:, None], mass_lv, 0.0), axis=1))
    # x in the top-k set: so is every z ≥ zx (ties included), level 0 is zx
    m_lo = tl.maximum(m_lo, tl.where(in_k, tl.sum(tl.where(j[None, :] == 0, mass_lv, 0.0), axis=1), 0.0))
    m_hi = tl.minimum(mass_all, tl.min(tl.where(cnt_lv >= k[:, None], mass_lv,
                                                 mass_lv + (k[:, None] - cnt_lv) * w_level), axis=1))
    m_lo = tl.where(has_k, m_lo, mass_all)
    m_hi = tl.where(has_k, m_hi, mass_all)
    in_p = (mass_gt < top_p * m_lo) | (~has_p)
    accept = in_k & in_p
    reject = (~in_k) | (has_p & (mass_gt >= top_p * m_hi))
    below_out = (has_k[:, None] & (cnt_lv >= k[:, None])) | \
        (has_p[:, None] & (mass_lv >= (top_p * m_hi)[:, None]))                             # [M, L]
    level_lo = tl.max(tl.where(below_out, _ordered_key(levels).to(tl.int64) - 1, KEY_FLOOR), axis=1)
    lo_old = tl.load(lo_ptr + rows, mask=valid, other=0)
    lo = tl.maximum(lo_old, level_lo)
    lo = tl.where(reject, tl.maximum(lo, _ordered_key(zx).to(tl.int64)), lo)
    # the refine bracket: [highest level with C ≥ k, lowest level with C ≤ k]
    upper = tl.min(tl.where(cnt_lv <= k[:, None], levels, float("inf")), axis=1)
    upper = tl.where(upper == float("inf"), tl.max(levels, axis=1), upper)
    lower = tl.max(tl.where(cnt_lv >= k[:, None], levels, float("-inf")), axis=1)
    lower = tl.where(lower == float("-inf"), upper - REFINE_FLOOR_NATS, lower)
    if LAST:
        new_state = tl.where(accept, 3, 2)
    else:
        new_state = tl.where(accept, 3, tl.where(reject, 0, 1))
    return (tl.where(rmask, new_state, state), tl.where(rmask, lo, lo_old),
            tl.where(rmask, upper, center_old),
            tl.where(rmask, (upper - lower) * (1.0 / (NUM_LEVELS - 2)), spacing_old), rmask)


@triton.jit(do_not_specialize=["skip_from"])
def _sample_kernel(
    logits_ptr, stride_logits,
    noise,                 # HAS_NOISE: (noise [R, V], its row stride), injected uniforms; else None
    plan,                  # (tile_group, tile_row0, order, group_start, w_offset, weights): ``_tile_rows``
    row_params,            # (lse, cut, inv_t, zcut) [R] fp32
    draw,                  # (greedy [R] i32, seed [R] i64, step [R] i64)
    winners,               # out: (best_score, best_token, best_z, z_max, z_sum) [R, num_chunks]
    vocab, chunk_len, num_chunks,
    top,                   # TOP_K_TOP_P: (top_k, top_p, lo_top_k, lo_top_p); else None
    state_ptr, skip_from,  # TOP_K_TOP_P: rows whose state is ≥ skip_from are left alone; else None, 0
    decide,                # DECIDE (rounds ≥ 2): the previous round's verify partials and candidates,
    # this round's state / lo / bracket (out, chunk 0), the rounds counter: (part, cand_z,
    # cand_z_max, state_out, lo_out, rounds, center, spacing, center_out, spacing_out); else None
    narrow,                # NARROW_P (the final sample after the bisection): the last top-p counting
    # pass's partials (measure, measure_max); else None
    stats,                 # FUSE_STATS: the stats pass's chunk partials (part_max, part_sum, cutoff); else None
    M_BLOCK: tl.constexpr, K_BLOCK: tl.constexpr, G_BLOCK: tl.constexpr, BLOCK_V: tl.constexpr,
    HAS_NOISE: tl.constexpr, TOP_K_TOP_P: tl.constexpr, RETURN_LOGPROBS: tl.constexpr,
    CANDIDATE: tl.constexpr, GUMBEL_MAX: tl.constexpr, DECIDE: tl.constexpr, NARROW_P: tl.constexpr,
    NUM_LEVELS: tl.constexpr, NUM_PIVOTS: tl.constexpr, FUSE_STATS: tl.constexpr, C_BLOCK: tl.constexpr,
    MASKS: tl.constexpr,
):
    """Pass 2: per (tile row, chunk) the Gumbel-max winner (score, token) and log-prob partials.

    The noise keys come from the device-side seeds and per-row step counters, so a replayed CUDA
    graph draws fresh noise every step. Each lane keeps its own running winner (strict >: its
    earlier, smaller token keeps a tie); the lanes are reduced once at the end of the chunk. Two
    exact shortcuts: a tile with no token in any row's α set is skipped after its load, and the
    noise of a tile is not computed when no z + max-noise of it reaches a row's best so far.

    TOP_K_TOP_P: only tokens with key ≥ both lower bounds + 1 compete, and rows whose state is
    ≥ skip_from are left alone (a program with none left loops over nothing). CANDIDATE: also
    the winner's z and the chunk max of z (a round of the sample / verify scheme, module
    docstring) without the log-prob sum. DECIDE: the rows' state and lo come from the previous
    round's decision (``_decide_rows``, here: no decide launch; chunk 0 stores them for this
    round). NARROW_P: the top-p lo is the last counting pass's narrowing (``_narrow_rows``).
    FUSE_STATS (the first pass after the stats pass, tiles that are whole groups: the mixing
    reads no other row's lse): the rows' lse and α cut are combined here from the chunk
    partials (``_combine_stats``; no row-stats launch), chunk 0 storing them for later passes.
    """
    tile = tl.program_id(0)
    chunk = tl.program_id(1)
    tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, weights_ptr = plan
    lse_ptr, cut_ptr, inv_t_ptr, zcut_ptr = row_params
    greedy_ptr, seed_ptr, step_ptr = draw
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, z_sum_ptr = winners
    pos, pos_mask, rows, start, size, w_off = _tile_rows(
        tile_group_ptr, tile_row0_ptr, order_ptr, group_start_ptr, w_offset_ptr, tile, M_BLOCK)
    row_offsets = rows.to(tl.int64) * stride_logits
    if FUSE_STATS:
        part_max_ptr, part_sum_ptr, cutoff_ptr = stats
        lse, cut = _combine_stats(rows, pos_mask, part_max_ptr, part_sum_ptr, cutoff_ptr, num_chunks, C_BLOCK)
        first = pos_mask & ((pos * 0 + chunk) == 0)
        tl.store(lse_ptr + rows, lse, mask=first)
        tl.store(cut_ptr + rows, cut, mask=first)
    else:
        lse = tl.load(lse_ptr + rows, mask=pos_mask, other=0.0)
        cut = tl.load(cut_ptr + rows, mask=pos_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr + rows, mask=pos_mask, other=1.0)
    zcut = tl.load(zcut_ptr + rows, mask=pos_mask, other=float("-inf"))     # min-p threshold on z
    greedy = tl.load(greedy_ptr + rows, mask=pos_mask, other=1) != 0
    key1, key2 = _noise_keys(tl.load(seed_ptr + rows, mask=pos_mask, other=0),
                             tl.load(step_ptr + rows, mask=pos_mask, other=0))
    active = pos_mask
    if TOP_K_TOP_P:
        top_k_ptr, top_p_ptr, lo_top_k_ptr, lo_top_p_ptr = top
        if DECIDE:
            (part_ptr, cand_z_ptr, cand_z_max_ptr, state_out_ptr, lo_out_ptr, rounds_ptr, center_ptr, spacing_ptr,
             center_out_ptr, spacing_out_ptr) = decide
            writer = pos_mask & ((pos * 0 + chunk) == 0)
            state, lo_r, center, spacing, live = _decide_rows(
                rows, pos_mask, tl.load(state_ptr + rows, mask=pos_mask, other=3), part_ptr, top_k_ptr,
                top_p_ptr, cand_z_ptr, cand_z_max_ptr, lo_top_k_ptr, center_ptr, spacing_ptr, vocab,
                num_chunks, M_BLOCK, NUM_LEVELS, False)
            tl.store(state_out_ptr + rows, state, mask=writer)
            tl.store(lo_out_ptr + rows, lo_r, mask=writer)
            tl.store(center_out_ptr + rows, center, mask=writer)
            tl.store(spacing_out_ptr + rows, spacing, mask=writer)
            tl.store(rounds_ptr + rows, tl.load(rounds_ptr + rows, mask=writer & live, other=0) + 1,
                     mask=writer & live)
            key_top_k = lo_r + 1
            key_top_p = key_top_k
        else:
            state = tl.load(state_ptr + rows, mask=pos_mask, other=0)
            key_top_k = tl.load(lo_top_k_ptr + rows, mask=pos_mask, other=0) + 1
            if NARROW_P:
                measure_ptr, measure_max_ptr = narrow
                lo_p = _narrow_rows(rows, tile * M_BLOCK + tl.arange(0, M_BLOCK), pos_mask & (state < skip_from),
                                    measure_ptr, measure_max_ptr,
                                    tl.load(lo_top_p_ptr + rows, mask=pos_mask & (state < skip_from), other=0),
                                    0, num_chunks, vocab, top_k_ptr, top_p_ptr, M_BLOCK, NUM_PIVOTS, True)
                key_top_p = lo_p + 1
            else:
                key_top_p = tl.load(lo_top_p_ptr + rows, mask=pos_mask, other=0) + 1
        active = pos_mask & (state < skip_from)
    lane_best = tl.full([M_BLOCK, BLOCK_V], float("-inf"), dtype=tl.float32)
    lane_token = tl.zeros([M_BLOCK, BLOCK_V], dtype=tl.int32) + vocab
    if RETURN_LOGPROBS or CANDIDATE:
        lane_z = tl.full([M_BLOCK, BLOCK_V], float("-inf"), dtype=tl.float32)
    z_max = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
    z_sum = tl.zeros([M_BLOCK], dtype=tl.float32)
    v_begin = chunk * chunk_len
    v_end = tl.minimum(v_begin + chunk_len, vocab)
    if TOP_K_TOP_P:   # every row of the tile settled: loop over nothing
        v_end = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, v_end, v_begin)
    row_best = tl.full([M_BLOCK], float("-inf"), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        x = _load_logits(logits_ptr, row_offsets, pos_mask, cols, col_mask)
        keep = (x > float("-inf")) & (x >= cut[:, None])
        if tl.max(keep.to(tl.int32)) > 0:          # else every z of the tile is −inf: nothing to do
            s = _mix(x, lse, pos, pos_mask, weights_ptr, w_off, start, size, order_ptr, lse_ptr,
                     logits_ptr, stride_logits, cols, col_mask, M_BLOCK, K_BLOCK, G_BLOCK, BLOCK_V, MASKS)
            z = tl.where(keep, s * inv_t[:, None], float("-inf"))
            z = tl.where(z >= zcut[:, None], z, float("-inf"))          # min-p (−inf: off)
            if TOP_K_TOP_P:
                key = _ordered_key(z).to(tl.int64)
                z = tl.where((key >= key_top_k[:, None]) & (key >= key_top_p[:, None]), z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            if RETURN_LOGPROBS:
                new_max = tl.maximum(z_max, tile_max)
                ref = tl.where(new_max == float("-inf"), 0.0, new_max)
                z_sum = z_sum * tl.exp(z_max - ref) + tl.sum(tl.exp(z - ref[:, None]), axis=1)
                z_max = new_max
            elif CANDIDATE:
                z_max = tl.maximum(z_max, tile_max)
            # a row's winner can change only if z + noise can beat its best so far (noise ≤ 16.64)
            can_win = (tile_max > float("-inf")) & (tile_max + GUMBEL_MAX > row_best)
            if tl.max(can_win.to(tl.int32)) > 0:
                if HAS_NOISE:
                    noise_ptr, stride_noise = noise
                    u = tl.load(noise_ptr + rows.to(tl.int64)[:, None] * stride_noise + cols[None, :],
                                mask=pos_mask[:, None] & col_mask[None, :], other=0.5).to(tl.float32)
                else:
                    u = _uniform(key1[:, None], key2[:, None], cols.to(tl.uint32)[None, :])
                score = tl.where(greedy[:, None], z, z - tl.log(-tl.log(u)))
                better = score > lane_best
                lane_best = tl.where(better, score, lane_best)
                lane_token = tl.where(better, cols[None, :], lane_token)
                if RETURN_LOGPROBS or CANDIDATE:
                    lane_z = tl.where(better, z, lane_z)
                row_best = tl.max(lane_best, axis=1)
    best = tl.max(lane_best, axis=1)
    is_best = lane_best == best[:, None]
    best_token = tl.min(tl.where(is_best, lane_token, vocab), axis=1)       # ties: smallest id
    out = rows * num_chunks + chunk
    tl.store(best_score_ptr + out, best, mask=active)
    tl.store(best_token_ptr + out, best_token, mask=active)
    if RETURN_LOGPROBS or CANDIDATE:
        best_z = tl.max(tl.where(lane_token == best_token[:, None], lane_z, float("-inf")), axis=1)
        tl.store(best_z_ptr + out, best_z, mask=active)
        tl.store(z_max_ptr + out, z_max, mask=active)
    if RETURN_LOGPROBS:
        tl.store(z_sum_ptr + out, z_sum, mask=active)


@triton.jit(do_not_specialize=["skip_from"])
def _select_kernel(
    best_score_ptr, best_token_ptr, best_z_ptr, z_max_ptr, z_sum_ptr,
    state_ptr, skip_from,
    tokens_ptr, logprobs_ptr,                                        # out: [R] int64, [R] fp32
    rows_total, vocab, num_chunks,
    BLOCK_R: tl.constexpr, C_BLOCK: tl.constexpr, RETURN_LOGPROBS: tl.constexpr,
    SKIP_SETTLED: tl.constexpr,
):
    """Reduce the chunk winners of BLOCK_R rows: max score, ties → smallest token id; a row with
    no candidate at all (every logit −inf: a slot not in use) gets token 0, as torch.argmax.
    SKIP_SETTLED: rows whose state is ≥ skip_from keep their token. (A round's candidate is
    reduced by its verify pass itself, ``_pick_candidate``.)"""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, C_BLOCK)
    rmask = r < rows_total
    if SKIP_SETTLED:
        rmask = rmask & (tl.load(state_ptr + r, mask=rmask, other=0) < skip_from)
    mask = rmask[:, None] & (c < num_chunks)[None, :]
    offs = r[:, None] * num_chunks + c[None, :]
    score = tl.load(best_score_ptr + offs, mask=mask, other=float("-inf"))        # [BLOCK_R, C]
    token = tl.load(best_token_ptr + offs, mask=mask, other=vocab)
    top = tl.max(score, axis=1)
    is_top = score == top[:, None]
    chosen = tl.min(tl.where(is_top, token, vocab), axis=1)
    chosen = tl.where(chosen >= vocab, 0, chosen)
    tl.store(tokens_ptr + r, chosen.to(tl.int64), mask=rmask)
    if RETURN_LOGPROBS:
        z_chosen = tl.max(tl.where(is_top & (token == chosen[:, None]),
                                   tl.load(best_z_ptr + offs, mask=mask, other=float("-inf")),
                                   float("-inf")), axis=1)
        cmax = tl.load(z_max_ptr + offs, mask=mask, other=float("-inf"))
        csum = tl.load(z_sum_ptr + offs, mask=mask, other=0.0)
        zmax = tl.max(cmax, axis=1)
        ref = tl.where(zmax == float("-inf"), 0.0, zmax)
        total = tl.sum(csum * tl.exp(cmax - ref[:, None]), axis=1)
        # relative to the max first: z may be huge (+inf logits read as 65504) and log(total) small
        tl.store(logprobs_ptr + r, (z_chosen - ref) - tl.log(total), mask=rmask)


@triton.jit
def _uniform_noise_kernel(seed_ptr, step_ptr, out_ptr, vocab, BLOCK_V: tl.constexpr):
    """u[r, v] for a [R, vocab] output: the in-kernel noise, exposed for tests and tools."""
    r = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    key1, key2 = _noise_keys(tl.load(seed_ptr + r), tl.load(step_ptr + r))
    u = _uniform(key1, key2, cols.to(tl.uint32))
    tl.store(out_ptr + r.to(tl.int64) * vocab + cols, u, mask=cols < vocab)


# ----------------------------------------------------------------------------------------------
# Host side: launch tiles (once per plan), launch configuration (once per vocabulary), the step.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tiles:
    """The plan's launch tiles: tile t is rows [row0, row0 + m_block) of group tile_group[t]."""
    m_block: int
    k_block: int
    g_block: int
    tile_group: torch.Tensor    # [T] int32
    tile_row0: torch.Tensor     # [T] int32
    busy: int = 0               # static plans: tiles with rows when the run's groups are full (chunking)

    @property
    def count(self) -> int:
        return self.tile_group.shape[0]

    @property
    def working(self) -> int:
        """Tiles that do work, for splitting the vocabulary: a static plan's padding tiles exit at
        once, so it splits as for its full groups, not for its R padded tiles."""
        return self.busy or self.count


def tile_shape(g_block: int, on_cuda: bool) -> tuple[int, int]:
    """(rows per program M, contracted rows per mixing step K) for a group block."""
    if g_block <= SINGLE_TILE_MAX:
        return g_block, g_block
    if on_cuda:
        return CUDA_ROW_BLOCK, CUDA_K_BLOCK
    return min(g_block, CPU_ROW_BLOCK), min(g_block, CPU_ROW_BLOCK)


def prepare_plan(plan: SamplePlan, m_block: int | None = None, k_block: int | None = None) -> SamplePlan:
    """Add the launch tiles to a plan (host side, once): every group split into m_block-row tiles."""
    g_block = plan.g_block
    m_auto, k_auto = tile_shape(g_block, plan.device.type == "cuda")
    m_block, k_block = m_block or m_auto, k_block or k_auto
    if g_block > 1 and m_block < g_block and (m_block < 16 or k_block < 16):
        raise ValueError("groups split over several tiles need m_block, k_block >= 16 (tl.dot)")
    groups, row0 = [], []
    for g, n in enumerate(plan.group_sizes):
        for r in range(0, n, m_block):
            groups.append(g)
            row0.append(r)
    if plan.static_block:       # R tiles whatever the groups (a fixed grid); the extra ones on an empty group
        empty = plan.group_sizes.index(0) if len(groups) < plan.rows else 0
        groups += [empty] * (plan.rows - len(groups))
        row0 += [0] * (plan.rows - len(row0))
    dev = plan.device
    # a static plan splits the vocabulary as for full groups of its block: R / block groups of
    # ⌈block / m_block⌉ tiles (a fixed number, so the launch shape never changes either)
    busy = max(1, plan.rows // g_block) * triton.cdiv(g_block, m_block) if plan.static_block else 0
    tiles = Tiles(m_block=m_block, k_block=k_block, g_block=g_block,
                  tile_group=torch.tensor(groups, dtype=torch.int32, device=dev),
                  tile_row0=torch.tensor(row0, dtype=torch.int32, device=dev), busy=busy)
    return SamplePlan(**{**plan.__dict__, "prepared": tiles})


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@dataclass(frozen=True)
class LaunchConfig:
    block_v: int       # tokens per tile of the sample pass (power of two)
    count_block_v: int  # tokens per tile of the counting passes
    verify_block_v: int  # tokens per tile of the verify pass (20 per-lane sums a logit)
    stats_block_v: int
    chunk_len: int     # tokens per program (a multiple of block_v)
    num_chunks: int    # programs per tile along the vocabulary (≤ MAX_CHUNKS)
    num_warps: int


def launch_config(vocab: int, tiles: Tiles, device: torch.device, block_v: int | None = None,
                  num_chunks: int | None = None) -> LaunchConfig:
    """Tile and vocabulary split. On a GPU: enough (tile, chunk) programs to fill the SMs ~4×."""
    on_cuda = device.type == "cuda"
    m = tiles.m_block
    if on_cuda:
        tile_v, num_warps = CUDA_TILES[m]
        count_v, stats_v = max(16, 32 * num_warps // m), CUDA_STATS_BLOCK_V
        verify_v = max(16, (64 if m == 1 else 32) * num_warps // m)   # 2 / 1 logits a thread
    else:
        tile_v, num_warps = max(16, CPU_TILE_ELEMS // m), 4
        count_v, stats_v = tile_v, CPU_TILE_ELEMS
        verify_v = tile_v
    if block_v is None:
        block_v = min(tile_v, max(16, next_power_of_2(vocab)))
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
    count_v = min(count_v, block_v)
    verify_v = min(verify_v, block_v)
    tiles_v = triton.cdiv(vocab, block_v)
    if num_chunks is None:
        num_chunks = triton.cdiv(4 * _sm_count(device.index or 0), tiles.working) if on_cuda else 1
    num_chunks = max(1, min(num_chunks, tiles_v, MAX_CHUNKS))
    chunk_len = triton.cdiv(tiles_v, num_chunks) * block_v
    return LaunchConfig(block_v=block_v, count_block_v=count_v, verify_block_v=verify_v,
                        stats_block_v=min(stats_v, next_power_of_2(vocab)),
                        chunk_len=chunk_len, num_chunks=triton.cdiv(vocab, chunk_len), num_warps=num_warps)


@dataclass(frozen=True)
class _StepInputs:
    logits: torch.Tensor
    plan: SamplePlan
    tiles: Tiles
    cfg: LaunchConfig
    lse: torch.Tensor
    cut: torch.Tensor
    inv_t: torch.Tensor
    zcut: torch.Tensor

    @property
    def plan_args(self) -> tuple:
        """The kernels' ``plan`` argument (``_tile_rows``)."""
        t, p = self.tiles, self.plan
        return (t.tile_group, t.tile_row0, p.order, p.group_start, p.w_offset, p.weights)

    @property
    def row_params(self) -> tuple:
        """The kernels' ``row_params`` argument."""
        return (self.lse, self.cut, self.inv_t, self.zcut)


def _bisect(inp: _StepInputs, top_k: torch.Tensor, top_p: torch.Tensor, state_prev: torch.Tensor,
            state: torch.Tensor, decide: tuple | None):
    """The exact bisection of both thresholds: THRESHOLD_PASSES counting passes for the top-k
    threshold, then as many for top-p (over the top-k set), one launch each; every pass narrows
    the previous one's interval itself (``_narrow_rows``), the first top-p pass finishes the
    top-k threshold (stored in lo_top_k), and the final sample finishes top-p. decide: the last
    round's (part, cand_z, cand_z_max, lo_r, rounds, center, spacing), decided by the first pass
    (state_prev → state); None: state is already final (log-probs: every row bisects).
    Returns (lo_top_k, the last top-p pass's lo, its partials)."""
    logits, plan, tiles, cfg = inp.logits, inp.plan, inp.tiles, inp.cfg
    rows, vocab = logits.shape
    dev = logits.device
    slots = tiles.count * tiles.m_block           # partials by tile slot (``_narrow_rows``)
    measure = torch.empty(2, slots, cfg.num_chunks, NUM_PIVOTS, dtype=torch.float32, device=dev)
    measure_max = torch.empty(2, slots, cfg.num_chunks, dtype=torch.float32, device=dev)
    lo = torch.empty(2 * THRESHOLD_PASSES, rows, dtype=torch.int64, device=dev)
    lo_top_k = torch.empty(rows, dtype=torch.int64, device=dev)
    for g in range(2 * THRESHOLD_PASSES):
        p = g % THRESHOLD_PASSES
        mass = g >= THRESHOLD_PASSES
        shift = 32 - PIVOT_BITS * (p + 1)
        first_decides = g == 0 and decide is not None
        _threshold_count_kernel[(tiles.count, cfg.num_chunks)](
            logits, logits.stride(0), inp.plan_args, inp.row_params, (top_k, top_p),
            lo_top_k, lo[g - 1] if g else lo[0], lo[g], shift, shift + PIVOT_BITS,
            state_prev if g == 0 else state,
            (measure[(g - 1) % 2], measure_max[(g - 1) % 2]), (measure[g % 2], measure_max[g % 2]),
            (*decide, state) if first_decides else None,
            vocab, cfg.chunk_len, cfg.num_chunks,
            M_BLOCK=tiles.m_block, K_BLOCK=tiles.k_block, G_BLOCK=tiles.g_block, BLOCK_V=cfg.count_block_v,
            NUM_PIVOTS=NUM_PIVOTS, MASS=mass, APPLY_TOP_K=mass, FIRST=p == 0,
            DECIDE=first_decides, FINISH_TOP_K=g == THRESHOLD_PASSES, NUM_LEVELS=NUM_LEVELS,
            MASKS=plan.masks,
            num_warps=cfg.num_warps,
        )
    last = 2 * THRESHOLD_PASSES - 1
    return lo_top_k, lo[last], measure[last % 2], measure_max[last % 2]


def fuses_stats(tiles: Tiles, any_top_k_top_p: bool, return_logprobs: bool) -> bool:
    """Whether the first sample pass combines the stats itself (no row-stats launch): its tiles
    are whole groups (the mixing reads only the tile's own rows' lse) and it is the first pass
    after the stats (not so for top-k/top-p with log-probs, which start with a counting pass)."""
    return tiles.m_block == tiles.g_block and not (any_top_k_top_p and return_logprobs)


def launch_count(any_top_k_top_p: bool, return_logprobs: bool = False, rounds: int | None = None,
                 fused_stats: bool = True, min_p: bool = False) -> int:
    """Triton launches of one step (the fixed launch list of ``guided_sample_step``; the per-row
    parameters add a few elementwise torch ops): stats (+ row stats unless fused, ``fuses_stats``)
    + sample + select, and with top-k/top-p 2 a round (sample, verify; none with log-probs)
    + 2 · THRESHOLD_PASSES counting passes; min-p adds its max pass (a greedy sample pass)."""
    rounds = SAMPLE_ROUNDS if rounds is None else rounds
    base = 3 + (not (fused_stats and not (any_top_k_top_p and return_logprobs))) + bool(min_p)
    if not any_top_k_top_p:
        return base
    return base + (0 if return_logprobs else 2 * rounds) + 2 * THRESHOLD_PASSES


def guided_sample_step(logits: torch.Tensor, plan: SamplePlan, seeds: torch.Tensor, step: torch.Tensor,
                       temperature: torch.Tensor, alpha: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                       *, min_p: torch.Tensor | None = None, any_top_k_top_p: bool = True,
                       noise: torch.Tensor | None = None,
                       return_logprobs: bool = False, block_v: int | None = None,
                       num_chunks: int | None = None, trace: dict | None = None):
    """The capturable step (Triton): device buffers in, tokens out; no checks, no host sync.

    Arguments as ``divgen.kernels.guided_sample_step``; the plan must come from
    ``build_sample_plan`` with this module's ops (it carries the launch tiles). Fixed launches
    (``launch_count``): stats (+ row stats for groups > 16 rows, ``fuses_stats``) + sample +
    select = 3 (4), and with any_top_k_top_p SAMPLE_ROUNDS rounds of (sample, verify) + 2 ·
    THRESHOLD_PASSES counting passes before the final sample and select: 3 + 2 · 4 + 16 = 27
    (28; 20 with log-probs, which skip the rounds; module docstring), plus a few elementwise torch
    ops for the per-row parameters; all capturable in a CUDA graph. trace (tests, tools): a dict
    that receives the per-row final ``state`` (STATE_ACCEPTED: settled by a round; STATE_BISECT:
    by the bisection) and ``rounds`` (rounds the row was open or refining in) as device tensors.

    min_p (the peers' min-p on the tempered guided scores z): its threshold max z + log min_p
    needs each row's max z first, so a min_p tensor adds one pass before the others: the plain
    sample pass with every row greedy and no cut (its chunk winners are the chunk maxima of z);
    every later pass drops z below the threshold (``zcut``, −inf without min-p).
    """
    rows, vocab = logits.shape
    dev = logits.device
    tiles = plan.prepared
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    cfg = launch_config(vocab, tiles, dev, block_v, num_chunks)
    c_block = next_power_of_2(cfg.num_chunks)

    # per-row parameters (elementwise, on the device)
    greedy, t_div = sampling_temperature(temperature.float())
    inv_t = 1.0 / t_div
    cutoff = torch.log(alpha.float())
    part_max = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    _stats_kernel[(rows, cfg.num_chunks)](
        logits, logits.stride(0), part_max, part_sum, vocab, cfg.chunk_len, cfg.num_chunks,
        BLOCK_V=cfg.stats_block_v, num_warps=cfg.num_warps,
    )
    lse = torch.empty(rows, dtype=torch.float32, device=dev)
    cut = torch.empty_like(lse)
    block_r = max(1, min(next_power_of_2(rows), 4096 // c_block, 64))
    fuse_stats = fuses_stats(tiles, any_top_k_top_p, return_logprobs)    # else a row-stats launch
    if not fuse_stats:
        _row_stats_kernel[(triton.cdiv(rows, block_r),)](
            part_max, part_sum, cutoff, lse, cut, rows, cfg.num_chunks, BLOCK_R=block_r, C_BLOCK=c_block,
        )
    zcut = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)     # min-p off
    tokens = torch.empty(rows, dtype=torch.int64, device=dev)
    logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
    best_score = torch.empty(rows, cfg.num_chunks, dtype=torch.float32, device=dev)
    best_token = torch.empty(rows, cfg.num_chunks, dtype=torch.int32, device=dev)
    best_z, z_max, z_sum = (torch.empty_like(best_score) for _ in range(3))
    greedy_i = greedy.to(torch.int32)
    winners = (best_score, best_token, best_z, z_max, z_sum)

    def sample(inp: _StepInputs, top=None, *, candidate: bool = False, decide=None, narrow=None,
               stats: bool = False, max_pass: bool = False):
        """One sample pass; top: (lo_top_k, lo_top_p, state, skip_from) with top-k/top-p."""
        lo_k, lo_p, state, skip_from = top or (None, None, None, 0)
        _sample_kernel[(tiles.count, cfg.num_chunks)](
            logits, logits.stride(0), None if noise is None else (noise, noise.stride(0)),
            inp.plan_args, inp.row_params, (torch.ones_like(greedy_i) if max_pass else greedy_i, seeds, step),
            winners, vocab, cfg.chunk_len, cfg.num_chunks,
            None if top is None else (top_k, top_p, lo_k, lo_p), state, skip_from,
            decide, narrow, (part_max, part_sum, cutoff) if stats else None,
            M_BLOCK=tiles.m_block, K_BLOCK=tiles.k_block, G_BLOCK=tiles.g_block, BLOCK_V=cfg.block_v,
            HAS_NOISE=noise is not None, TOP_K_TOP_P=top is not None,
            RETURN_LOGPROBS=return_logprobs and not candidate and not max_pass,
            CANDIDATE=candidate, GUMBEL_MAX=GUMBEL_MAX, DECIDE=decide is not None, NARROW_P=narrow is not None,
            NUM_LEVELS=NUM_LEVELS, NUM_PIVOTS=NUM_PIVOTS, FUSE_STATS=stats, C_BLOCK=c_block, MASKS=plan.masks,
            num_warps=cfg.num_warps,
        )

    def select(state=None, skip_from: int = 0):
        """Reduce the chunk winners; state: rows whose state is ≥ skip_from keep their token."""
        _select_kernel[(triton.cdiv(rows, block_r),)](
            best_score, best_token, best_z, z_max, z_sum, state, skip_from, tokens, logprobs,
            rows, vocab, cfg.num_chunks,
            BLOCK_R=block_r, C_BLOCK=c_block, RETURN_LOGPROBS=return_logprobs, SKIP_SETTLED=state is not None,
        )

    inp = _StepInputs(logits=logits, plan=plan, tiles=tiles, cfg=cfg, lse=lse, cut=cut, inv_t=inv_t, zcut=zcut)
    if min_p is not None:          # the rows' max z (greedy winners, no cut), then the threshold
        sample(inp, stats=fuse_stats, max_pass=True)
        fuse_stats = False         # lse and cut are stored now
        z_top = best_score.max(dim=1).values                                   # [R]
        zcut = torch.where(min_p > 0, z_top + torch.log(min_p.float()), zcut)
        inp = dataclasses.replace(inp, zcut=zcut)
    if not any_top_k_top_p:
        sample(inp, stats=fuse_stats)
        select()
        return (tokens, logprobs) if return_logprobs else tokens

    rounds = torch.zeros(rows, dtype=torch.int32, device=dev)
    if return_logprobs:           # log-probs need the whole of K: straight to the bisection
        state_prev = state = torch.zeros(rows, dtype=torch.int32, device=dev)
        decide = None
    else:
        n = SAMPLE_ROUNDS
        # per-round buffers (round r reads round r − 1's, the deciding program of a row writes
        # round r's: no launch reads what it writes)
        st = torch.zeros(n + 1, rows, dtype=torch.int32, device=dev)
        lo_r = torch.full((n + 1, rows), KEY_BELOW_ALL, dtype=torch.int64, device=dev)
        bracket = torch.zeros(2, n + 1, rows, dtype=torch.float32, device=dev)     # center, spacing
        cand = torch.empty(2, rows, dtype=torch.float32, device=dev)                # zx, zmax
        part = torch.empty(rows, cfg.num_chunks, 3, NUM_LEVELS, dtype=torch.float32, device=dev)
        for r in range(n):
            prev = max(r - 1, 0)
            decide = (part, cand[0], cand[1], st[r], lo_r[r], rounds, bracket[0, prev], bracket[1, prev],
                      bracket[0, r], bracket[1, r]) if r else None
            sample(inp, (lo_r[prev], lo_r[prev], st[prev], STATE_REFINE), candidate=True, decide=decide,
                   stats=fuse_stats and r == 0)
            _verify_kernel[(tiles.count, cfg.num_chunks)](
                logits, logits.stride(0), inp.plan_args, inp.row_params, (top_k, top_p), st[r],
                winners[:4], tokens, (cand[0], cand[1]), (bracket[0, r], bracket[1, r]), part,
                vocab, cfg.chunk_len, cfg.num_chunks,
                M_BLOCK=tiles.m_block, K_BLOCK=tiles.k_block, G_BLOCK=tiles.g_block, BLOCK_V=cfg.verify_block_v,
                NUM_LEVELS=NUM_LEVELS, C_BLOCK=c_block, MASKS=plan.masks, num_warps=cfg.num_warps,
            )
        state_prev, state = st[n - 1], st[n]
        decide = (part, cand[0], cand[1], lo_r[n - 1], rounds, bracket[0, n - 1], bracket[1, n - 1])
    lo_top_k, lo_p, measure, measure_max = _bisect(inp, top_k, top_p, state_prev, state, decide)
    sample(inp, (lo_top_k, lo_p, state, STATE_ACCEPTED), narrow=(measure, measure_max))
    select(state, STATE_ACCEPTED)
    if trace is not None:           # tests and tools: per-row final state and rounds open
        trace.update(state=state, rounds=rounds)
    return (tokens, logprobs) if return_logprobs else tokens


def guided_sample(
    logits: torch.Tensor,
    mix: torch.Tensor | None,
    *,
    seeds: torch.Tensor,
    step,
    temperature=1.0,
    alpha=0.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    noise: torch.Tensor | None = None,
    return_logprobs: bool = False,
    block_v: int | None = None,
    num_chunks: int | None = None,
    m_block: int | None = None,
    k_block: int | None = None,
    trace: dict | None = None,
):
    """Guided sampling from logits, fused (the twin of ``reference.guided_sample``), for direct
    callers: checks the arguments (host syncs), builds the plan, runs the capturable step.

    Semantics and arguments: ``divgen.kernels.reference.guided_sample``. ``mix`` is read as blocks
    (the connected components of its non-zero pattern; rows of a group may be anywhere in the
    batch, up to 256 a group). block_v, num_chunks, m_block, k_block override the launch shape
    (tests). Raises ValueError for the reference's bad arguments and for a group over 256 rows.
    """
    temperature, alpha, top_k, top_p, min_p = check_guided_sample_args(
        logits, mix, seeds, temperature, alpha, top_k, top_p, noise, min_p
    )
    rows = logits.shape[0]
    device = logits.device
    plan = prepare_plan(build_sample_plan(mix, device, rows=rows, ops=_NoPrepare), m_block, k_block)
    if noise is not None:
        noise = noise.to(device=device, dtype=torch.float32).contiguous()
    return guided_sample_step(
        logits, plan, seeds.to(device=device, dtype=torch.int64).contiguous(), step_tensor(step, rows, device),
        temperature.contiguous(), alpha.contiguous(), top_k.contiguous(), top_p.contiguous(),
        min_p=min_p.contiguous() if bool((min_p > 0).any()) else None,
        any_top_k_top_p=bool((top_k > 0).any() or (top_p < 1).any()), noise=noise,
        return_logprobs=return_logprobs, block_v=block_v, num_chunks=num_chunks, trace=trace,
    )


class _NoPrepare:
    """Stand-in ops for plans whose tiles this module adds itself (``guided_sample``)."""
    @staticmethod
    def prepare_plan(plan):
        return plan


def uniform_noise(seeds: torch.Tensor, step, vocab_size: int) -> torch.Tensor:
    """The kernels' uniforms u [R, V] fp32, computed on the device by the same code as the sampler
    (keys from seeds and the per-row step counters in the kernel). Equal bit for bit to
    ``reference.uniform_noise`` (a test checks it)."""
    rows = seeds.shape[0]
    steps = step_tensor(step, rows, seeds.device).contiguous()
    out = torch.empty(rows, vocab_size, dtype=torch.float32, device=seeds.device)
    block_v = min(1024, next_power_of_2(vocab_size))
    _uniform_noise_kernel[(rows, triton.cdiv(vocab_size, block_v))](
        seeds.to(torch.int64).contiguous(), steps, out, vocab_size, BLOCK_V=block_v
    )
    return out
